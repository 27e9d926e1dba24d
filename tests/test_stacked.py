"""The stacked M1+M2 model: its enumerated loss by hand, where gradients go, the checkpoint,
and log p(x) with the labels summed out."""

import json
import math
import shutil
from functools import partial

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import run_in_process, with_onehot
from pyro.infer import TraceEnum_ELBO
from torch.nn import functional as F

from pyro_vae import EarlyStopping, Trainer
from pyro_vae.inference.evaluate import estimate_log_px, estimate_log_px_over_labels
from pyro_vae.io.checkpoints import load_checkpoint, save_checkpoint
from pyro_vae.models import VAE, StackedSSVAE, model_from_checkpoint

C = 3


@pytest.fixture
def stacked():
    torch.manual_seed(0)
    m1 = VAE(x_dim=12, z_dim=4, hidden=(8,), image_shape=(3, 4))
    return StackedSSVAE.from_vae(
        m1, z_dim=2, num_classes=C, hidden=(8,), classifier_hidden=(8,), aux_weight=5.0
    )


def batch(n=5):
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((n, 12), 0.3), generator=g)
    return x, torch.tensor([0, 1, 2, 1, 0])[:n]


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_enumerated_loss_is_the_sum_over_classes_by_hand(stacked, beta):
    stacked.beta = beta
    x, _ = batch()
    pyro.set_rng_seed(11)
    loss = float(TraceEnum_ELBO(max_plate_nesting=1).loss(stacked.model, stacked.guide, x))
    # by hand, with the same standard-normal draws: z1 once per image, z2 once per class
    pyro.set_rng_seed(11)
    with torch.no_grad():
        m1 = stacked.m1
        loc1, scale1 = m1.encoder(x)
        z1 = loc1 + scale1 * torch.empty(loc1.shape).normal_()
        log_px = -F.softplus((1 - 2 * x) * m1.decoder(z1)).sum(-1)
        log_qz1 = dist.Normal(loc1, scale1).log_prob(z1).sum(-1)
        log_qy = torch.log_softmax(stacked.classifier(z1), -1).T  # (C, N)
        ys = torch.arange(C)[:, None].expand(C, len(x))
        loc2, scale2 = stacked.encoder(with_onehot(z1, ys, C))  # (C, N, z2)
        z2 = loc2 + scale2 * torch.empty(loc2.shape).normal_()
        loc_z1, scale_z1 = stacked.z1_decoder(with_onehot(z2, ys, C))
        log_pz1 = dist.Normal(loc_z1, scale_z1).log_prob(z1).sum(-1)  # (C, N)
        log_pz2 = dist.Normal(0.0, 1.0).log_prob(z2).sum(-1)
        log_qz2 = dist.Normal(loc2, scale2).log_prob(z2).sum(-1)
        per_class = math.log(1 / C) + log_pz1 + beta * (log_pz2 - log_qz2)
        q = log_qy.exp()
        elbo = log_px - log_qz1 + (q * per_class).sum(0) - (q * log_qy).sum(0)
    assert loss == pytest.approx(-float(elbo.sum()), rel=1e-5)


def test_m1_stays_fixed_and_the_classifier_learns_only_through_its_paths(stacked):
    x, y = batch()
    m1_before = {k: v.clone() for k, v in stacked.m1.state_dict().items()}
    m2_before = {k: v.clone() for k, v in stacked.state_dict().items() if not k.startswith("m1.")}
    trainer = Trainer(
        partial(stacked.model, aux=True),
        partial(stacked.guide, aux=True),
        elbo="enum",
        lr=1e-2,
    )
    owned = {id(p) for p in stacked.m1.parameters()}
    assert trainer.params and not any(id(p) in owned for p in trainer.params)
    trainer.step(x)
    trainer.step(x, y)
    assert not any(id(p) in owned for p in trainer.params)  # not picked up from the trace
    for k, v in stacked.m1.state_dict().items():
        assert torch.equal(v, m1_before[k]), k
    after = stacked.state_dict()
    for part in ("classifier", "encoder", "z1_decoder"):
        assert any(not torch.equal(after[k], v) for k, v in m2_before.items() if k.startswith(part))

    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    # labelled data without the auxiliary term: q(y|z1) is not used, no gradient reaches it
    stacked.zero_grad()
    elbo.differentiable_loss(stacked.model, stacked.guide, x, y).backward()
    assert all(p.grad is None for p in stacked.classifier.parameters())
    # the auxiliary term alone reaches only the classifier
    stacked.zero_grad()
    pyro.set_rng_seed(3)
    with_aux = elbo.differentiable_loss(stacked.model, stacked.guide, x, y, aux=True)
    pyro.set_rng_seed(3)
    without = elbo.differentiable_loss(stacked.model, stacked.guide, x, y)
    (with_aux - without).backward()
    assert any(p.grad.abs().sum() > 0 for p in stacked.classifier.parameters())
    for net in (stacked.encoder, stacked.z1_decoder):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.parameters())
    assert all(p.grad is None for p in stacked.m1.parameters())
    # unlabelled data train the classifier through the enumerated ELBO
    stacked.zero_grad()
    elbo.differentiable_loss(stacked.model, stacked.guide, x).backward()
    assert any(p.grad.abs().sum() > 0 for p in stacked.classifier.parameters())


def test_checkpoint_holds_both_models_and_round_trips(stacked, tmp_path):
    x, _ = batch()
    with torch.no_grad():
        for p in stacked.classifier.parameters():
            p.add_(0.3)  # not the initial weights
    save_checkpoint(
        tmp_path / "c.pt",
        {
            "model_class": "StackedSSVAE",
            "model_config": stacked.config(),
            "model": stacked.state_dict(),
        },
    )
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert isinstance(loaded, StackedSSVAE) and isinstance(loaded.m1, VAE)
    assert any(k.startswith("m1.") for k in loaded.state_dict())
    assert not any(p.requires_grad for p in loaded.m1.parameters())
    assert torch.equal(loaded.class_probs(x), stacked.class_probs(x))
    assert torch.equal(loaded.codes(x), stacked.m1.encode(x)[0])
    assert loaded.analogies(x).shape == (5, C, 12)


def test_log_px_of_the_stack_matches_quadrature():
    """With one-dimensional z1 and z2, log p(x) = log sum_y p(y) ∫∫ p(z2) p(z1|y,z2) p(x|z1)
    by quadrature on a grid; the evaluator's estimates (y summed per class, and y drawn
    from q(y|z1)) agree with it."""
    torch.manual_seed(2)
    m1 = VAE(x_dim=12, z_dim=1, hidden=(8,), image_shape=(3, 4))
    stacked = StackedSSVAE.from_vae(m1, z_dim=1, num_classes=C, hidden=(8,), classifier_hidden=(8,))
    x, _ = batch(3)
    with torch.no_grad():
        # guides broader than the priors (q(z1|x) = N(-0.5, 1), q(z2|z1,y) = N(0, 1)), so that
        # the importance weights are bounded and the estimates settle at K = 20000
        for last, loc in ((stacked.m1.encoder.net[-1], -0.5), (stacked.encoder.net[-1], 0.0)):
            last.weight.zero_()
            last.bias.copy_(torch.tensor([loc, 0.5413]))  # softplus(0.5413) = 1
        z1 = torch.linspace(-8, 8, 2001, dtype=torch.float64)
        z2 = torch.linspace(-8, 8, 2001, dtype=torch.float64)
        log_dz = math.log(16 / 2000) * 2
        log_px_z1 = m1.likelihood(z1[:, None].float()[:, None, :]).log_prob(x).double()  # (G1, N)
        ys = torch.arange(C)[:, None].expand(C, len(z2))
        loc, scale = stacked.z1_decoder(with_onehot(z2[None, :, None].float(), ys, C))
        log_pz1 = dist.Normal(loc.double(), scale.double()).log_prob(z1)  # (C, G2, G1)
        log_joint = log_pz1 + dist.Normal(0.0, 1.0).log_prob(z2)[:, None] + math.log(1 / C)
        # (C, G2, G1) + (G1, N) -> sum over C, G2, G1 for each image
        inner = torch.logsumexp(log_joint.flatten(0, 1), 0)  # (G1,)
        exact = torch.logsumexp(inner[:, None] + log_px_z1, 0) + log_dz
    over = estimate_log_px_over_labels(
        stacked.model, stacked.guide, x, C, num_particles=20000, seed=0
    )
    sampled = estimate_log_px(
        stacked.model, stacked.guide, x, num_particles=60000, psis=False, ks=(), seed=1
    )
    assert torch.allclose(over.log_px, exact, atol=0.02)
    assert torch.allclose(sampled.log_px, exact, atol=0.02)
    assert (sampled.log_px > sampled.elbo).all()


def test_early_stopping_reads_the_history():
    def history(values, seconds=1.0):
        return [{"epoch": i + 1, "acc": v, "seconds": seconds} for i, v in enumerate(values)]

    stop = EarlyStopping("acc", patience=2)
    assert stop.reason([]) is None
    assert stop.reason(history([0.1, 0.3, 0.2])) is None
    reason = stop.reason(history([0.1, 0.3, 0.2, 0.3]))  # a tie is no improvement
    assert reason is not None and "epoch 2" in reason
    budget = EarlyStopping("acc", max_seconds=3.0)
    assert budget.reason(history([0.1, 0.2])) is None
    assert "time budget" in budget.reason(history([0.1, 0.2, 0.3]))
    assert EarlyStopping("acc").reason(history([0.5, 0.1, 0.1, 0.1])) is None
    with pytest.raises(ValueError):
        EarlyStopping("acc", patience=-1)


def test_trainer_stops_when_a_callback_says_so(stacked):
    x, _ = batch()
    trainer = Trainer(stacked.model, stacked.guide, elbo="enum", lr=1e-3)
    loader = [(x,)]
    calls = []

    def count(trainer, metrics):
        calls.append(metrics["epoch"])
        if metrics["epoch"] == 3:
            trainer.stop_reason = "enough"

    history = trainer.fit(loader, 10, callbacks=[count], progress=False)
    assert calls == [1, 2, 3] and len(history) == 3 and trainer.epoch == 3


def test_a_stacked_run_resumes_without_the_m1_directory(data_dir, trained_run, tmp_path, capsys):
    m1 = tmp_path / "m1"
    shutil.copytree(trained_run, m1)
    out = tmp_path / "run"
    tiny = ["--labels", "100", "--train-size", "1300", "--batch-size", "100", "--eval-size", "100"]
    tiny += ["--hidden", "32", "--classifier-hidden", "32", "--z-dim", "4", "--quiet"]
    tiny += ["--data-dir", str(data_dir)]
    status, err = run_in_process(
        "train_ssvae.py",
        ["--m1", str(m1), "--epochs", "1", "--eval-particles", "0", *tiny, "--out", str(out)],
        capsys,
    )
    assert status == 0, err
    shutil.rmtree(m1)  # M1's weights travel in the stack's checkpoint
    status, err = run_in_process("train_ssvae.py", ["--resume", str(out), "--epochs", "2"], capsys)
    assert status == 0, err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["model_class"] == "StackedSSVAE" and state["trainer"]["epoch"] == 2
    stack = model_from_checkpoint(state)
    from pyro_vae import Run, SSVAEConfig

    settings = Run.load(out).train_config  # the run's settings, typed
    assert isinstance(settings, SSVAEConfig) and settings.m1 == str(m1)
    assert (settings.labels, settings.epochs, settings.hidden) == (100, 2, (32,))
    original = model_from_checkpoint(load_checkpoint(trained_run))
    assert all(torch.equal(a, b) for a, b in zip(stack.m1.parameters(), original.parameters()))
