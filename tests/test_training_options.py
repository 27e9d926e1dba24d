"""The stabilisers of hierarchical VAEs as training options: KL warm-up, Burda et al.'s
step schedule, Adam's eps, update skipping, scale links, weight norm, the output bias."""

import math

import pyro
import pytest
import torch
from helpers import TINY, run_script

from pyro_vae import VAE, BatchLoader, HierarchicalVAE, Trainer, load_checkpoint
from pyro_vae.models import model_from_checkpoint
from pyro_vae.networks.nets import Encoder, scale_from
from pyro_vae.training.schedules import KLWeight, kl_warmup_weight, lr_factor
from pyro_vae.training.stepper import Stepper


def test_the_step_schedule_is_burdas_at_3280_epochs_and_scales_to_any_length():
    # Burda et al.: 3^i epochs at 10^(-i/7), i = 0 .. 7
    starts, factors, epoch = [], [], 1
    for i in range(8):
        starts.append(epoch)
        factors.append(10 ** (-i / 7))
        epoch += 3**i
    assert epoch - 1 == 3280
    for start, factor in zip(starts, factors):
        assert lr_factor("step", start, 3280) == pytest.approx(factor)
        if start > 1:
            assert lr_factor("step", start - 1, 3280) == pytest.approx(factor * 10 ** (1 / 7))
    assert lr_factor("step", 3280, 3280) == pytest.approx(0.1)
    # scaled: the last 2/3 of the run (2187 of 3280) at the last stage's rate
    values = [lr_factor("step", e, 300) for e in range(1, 301)]
    assert values == sorted(values, reverse=True)
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.1)
    assert sum(v == pytest.approx(0.1) for v in values) == pytest.approx(300 * 2187 / 3280, abs=1)


def test_the_kl_warm_up_rises_linearly_to_one_and_is_checked():
    assert [kl_warmup_weight(e, 4) for e in range(1, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [kl_warmup_weight(e, 2, start=0.5) for e in (1, 2, 3)] == [0.5, 0.75, 1.0]
    assert kl_warmup_weight(1, 0) == 1.0
    for bad in ((1, -1), (1, 3, 1.5)):
        with pytest.raises(ValueError, match="warm-up"):
            kl_warmup_weight(*bad)
    with pytest.raises(ValueError, match="non-negative"):
        KLWeight(-1.0)


def test_a_warm_up_weighs_the_kl_under_trace_elbo_and_the_trainer_records_it(mnist):
    torch.manual_seed(0)
    vae = VAE(z_dim=4, hidden=(16,))
    x = torch.bernoulli(torch.full((8, 784), 0.3))
    elbo = pyro.infer.Trace_ELBO()

    def loss(weight):
        pyro.set_rng_seed(0)
        with KLWeight(weight):
            return elbo.loss(vae.model, vae.guide, x)

    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(vae.guide).get_trace(x)
    model = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=trace)).get_trace(x)
    log_lik = float(model.nodes["x"]["fn"].log_prob(x).sum().detach())
    kl = float(trace.nodes["z"]["fn"].log_prob(trace.nodes["z"]["value"]).sum().detach()) - float(
        model.nodes["z"]["fn"].log_prob(trace.nodes["z"]["value"]).sum()
    )
    for weight in (0.0, 0.3, 1.0):
        assert loss(weight) == pytest.approx(-log_lik + weight * kl, rel=1e-5)

    train = mnist["train"].subset(slice(0, 256))
    trainer = Trainer(vae.model, vae.guide, kl_warmup=2, elbo="iwae", num_particles=2)
    trainer.fit(BatchLoader(train, 128, binarize="dynamic", seed=0), 3, progress=False)
    assert [m["kl_weight"] for m in trainer.history] == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="JitTrace_ELBO"):
        Trainer(vae.model, vae.guide, kl_warmup=2, elbo="jit")


def test_updates_above_the_skip_norm_are_skipped_and_adam_takes_its_options():
    w = torch.nn.Parameter(torch.ones(3))
    stepper = Stepper(lambda: (10 * w).square().sum(), [w], lr=0.1, skip_norm=1.0)
    info = stepper.step()
    assert info.skipped and info.grad_norm > 1 and torch.equal(w.detach(), torch.ones(3))
    assert stepper.skipped_steps == 1
    stepper = Stepper(lambda: w.square().sum(), [w], adam_eps=1e-4, adam_betas=(0.5, 0.9))
    assert stepper.optimizer.defaults["eps"] == 1e-4
    assert stepper.optimizer.defaults["betas"] == (0.5, 0.9)
    assert not stepper.step().skipped
    for bad in ({"skip_norm": 0.0}, {"adam_eps": 0.0}, {"adam_betas": (0.9, 1.0)}):
        with pytest.raises(ValueError):
            Stepper(lambda: w.sum(), [w], **bad)


def test_scale_links():
    raw = torch.tensor([-40.0, -3.0, 0.0, 3.0, 40.0])
    soft = scale_from(raw, "softplus")
    assert soft[0] == pytest.approx(1e-4, rel=1e-3)  # the floor
    torch.testing.assert_close(scale_from(raw[1:4], "exp"), raw[1:4].exp())
    clamped = scale_from(raw, "softclamp")
    assert math.exp(-5) < float(clamped.min()) and float(clamped.max()) < math.exp(5)
    # exp has no floor: the log-scale keeps its gradient however small the scale
    r = torch.tensor([-20.0], requires_grad=True)
    scale_from(r, "exp").log().sum().backward()
    assert float(r.grad) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown scale link"):
        Encoder(4, 2, (3,), scale_link="sigmoid")


def test_weight_norm_and_the_output_bias_round_trip_through_a_checkpoint(tmp_path):
    from pyro_vae.io.checkpoints import save_checkpoint

    torch.manual_seed(0)
    hvae = HierarchicalVAE(z_dims=(6, 3), hidden=((16,), (8,)), weight_norm=True, scale_link="exp")
    linear = hvae.decoder.net[0]
    assert hasattr(linear, "parametrizations")  # g v / |v|
    mean = torch.full((784,), 0.2)
    hvae.init_output_bias(mean)
    torch.testing.assert_close(hvae.decoder.net[-1].bias, torch.logit(mean))
    # an untrained decoder then predicts the mean for every code
    assert float(hvae.decode(torch.zeros(1, 3))[0].sub(0.2).abs().max()) < 0.1
    save_checkpoint(
        tmp_path / "c.pt",
        {
            "model": hvae.state_dict(),
            "model_class": "HierarchicalVAE",
            "model_config": hvae.config(),
        },
    )
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert loaded.weight_norm and loaded.scale_link == "exp"
    x = torch.bernoulli(torch.full((2, 784), 0.3))
    torch.testing.assert_close(loaded.reconstruct(x), hvae.reconstruct(x))
    vae = VAE(z_dim=3, hidden=(8,))
    vae.init_output_bias(mean)
    torch.testing.assert_close(vae.decoder.net[-1].bias, torch.logit(mean))


@pytest.mark.slow
def test_train_svi_takes_the_options_records_them_and_resumes_a_warm_up(data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "hvae", "--guide", "deterministic", "--z-dims", "8,4"]
    args += ["--layer-hidden", "32/16", *TINY, "--eval-particles", "10", "--kl-warmup", "67%"]
    args += ["--kl-start", "0.2", "--init-output-bias", "--adam-eps", "1e-4", "--skip-norm"]
    args += ["1e6", "--scale-link", "softclamp", "--weight-norm", "--lr-schedule", "step"]
    args += ["--batch-norm"]
    first = run_script("train_svi.py", [*args, "--epochs", "2", "--out", str(out)], data_dir)
    assert first.returncode == 0, first.stderr
    resumed = run_script("train_svi.py", ["--resume", str(out), "--epochs", "3"], data_dir)
    assert resumed.returncode == 0, resumed.stderr
    state = load_checkpoint(out)
    config = state["config"]
    # 67% of the first run's 2 epochs: 1 epoch; of 3 after the resume: 2 (a share follows
    # --epochs, as the learning-rate schedule does)
    assert config["kl_warmup"] == "67%" and config["kl_start"] == 0.2 and config["adam_eps"] == 1e-4
    assert state["model_config"]["scale_link"] == "softclamp"
    history = state["trainer"]["history"]
    assert [m["kl_weight"] for m in history] == pytest.approx([0.2, 1.0, 1.0])
    # a resume that would contradict the run is refused, and changes nothing
    saved = (out / "config.json").read_bytes()
    for flags, message in (
        (["--epochs", "2"], "--epochs 2: the run has trained 3 epochs"),
        (["--model", "vae"], "--model cannot change"),
    ):
        bad = run_script("train_svi.py", ["--resume", str(out), *flags], data_dir)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert (out / "config.json").read_bytes() == saved
    # a flag that does not apply, or a bad value, is one line
    bad = run_script("train_svi.py", ["--kl-start", "2", "--out", str(tmp_path / "b")], data_dir)
    assert bad.returncode == 2 and "--kl-start" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_script(
        "train_svi.py",
        ["--elbo", "jit", "--kl-warmup", "2", "--out", str(tmp_path / "c")],
        data_dir,
    )
    assert bad.returncode == 2 and "--kl-warmup" in bad.stderr
    bad = run_script(
        "train_svi.py", ["--free-bits", "1", "--out", str(tmp_path / "d")], data_dir
    )  # the preset's objective is DReG
    assert bad.returncode == 2 and "--free-bits: applies to the ELBO" in bad.stderr


def test_free_bits_hold_each_layer_at_its_floor_and_follow_their_schedule(mnist):
    from pyro_vae.inference.objectives import IWAE, FreeBitsELBO
    from pyro_vae.training.schedules import free_bits_level

    torch.manual_seed(0)
    hvae = HierarchicalVAE(z_dims=(6, 3), hidden=((16,), (8,)))
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    pyro.set_rng_seed(0)
    plain = IWAE(1).loss(hvae.model, hvae.guide, x)  # K = 1: the ELBO
    pyro.set_rng_seed(0)
    assert FreeBitsELBO(0.0).loss(hvae.model, hvae.guide, x) == pytest.approx(plain, rel=1e-6)
    # a floor above every layer's KL: each layer pays the floor, and the guide's gradient
    # comes from the likelihood alone
    pyro.set_rng_seed(0)
    loss = FreeBitsELBO(1000.0).differentiable_loss(hvae.model, hvae.guide, x)
    pyro.set_rng_seed(0)
    traces = pyro_vae_traces(hvae, x)
    log_lik = float(traces.log_likelihood().sum())
    assert float(loss) == pytest.approx(-log_lik + 2 * 1000.0 * 5, rel=1e-6)
    assert [free_bits_level(e, 2.0, 2, 3) for e in range(1, 7)] == [2.0, 2.0, 1.5, 1.0, 0.5, 0.0]
    assert free_bits_level(50, 2.0) == 2.0
    train = mnist["train"].subset(slice(0, 256))
    trainer = Trainer(
        hvae.model, hvae.guide, free_bits=0.5, free_bits_constant=1, free_bits_cooldown=1
    )
    trainer.fit(BatchLoader(train, 128, binarize="dynamic", seed=0), 3, progress=False)
    assert [m["free_bits"] for m in trainer.history] == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="free bits apply to the ELBO"):
        Trainer(hvae.model, hvae.guide, elbo="dreg", free_bits=1.0)


def pyro_vae_traces(model, x):
    from pyro_vae.inference.weights import trace_particles

    return trace_particles(model.model, model.guide, x, num_particles=1)


def test_batch_norm_trains_on_the_batch_and_evaluates_on_running_statistics(mnist, tmp_path):
    from pyro_vae import estimate_log_px
    from pyro_vae.io.checkpoints import save_checkpoint

    torch.manual_seed(0)
    hvae = HierarchicalVAE(z_dims=(6, 3), hidden=((16,), (8,)), batch_norm=True)
    train = mnist["train"].subset(slice(0, 512))
    val = torch.bernoulli(mnist["valid"].images[:64], generator=torch.Generator().manual_seed(0))
    trainer = Trainer(hvae.model, hvae.guide, elbo="dreg", num_particles=3)
    trainer.fit(BatchLoader(train, 128, binarize="dynamic", seed=0), 2, val_data=(val,))
    assert hvae.training  # the validation ran in evaluation mode and gave the mode back
    bn = hvae.decoder.net[1]
    assert bn.num_batches_tracked > 0 and not torch.equal(bn.running_mean, torch.zeros(16))
    # in evaluation mode an image's encoding does not depend on the others in its batch
    hvae.eval()
    with torch.no_grad():
        alone = hvae.estimates(val[:1])[0][0][0]
        torch.testing.assert_close(hvae.estimates(val[:8])[0][0][0], alone)
        hvae.train()
        assert not torch.allclose(hvae.estimates(val[:8])[0][0][0], alone)  # the batch's
    hvae.eval()
    batch = estimate_log_px(hvae.model, hvae.guide, val[:8], num_particles=50, seed=3)
    save_checkpoint(
        tmp_path / "c.pt",
        {
            "model": hvae.state_dict(),
            "model_class": "HierarchicalVAE",
            "model_config": hvae.config(),
        },
    )
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt")).eval()
    torch.testing.assert_close(loaded.decoder.net[1].running_var, bn.running_var)
    again = estimate_log_px(loaded.model, loaded.guide, val[:8], num_particles=50, seed=3)
    torch.testing.assert_close(again.log_px, batch.log_px)


def test_the_training_curve_is_labelled_with_the_objective_the_run_optimised():
    from pyro_vae import TrainConfig
    from pyro_vae.jobs import curve_label as label

    assert label(TrainConfig(elbo="dreg", num_particles=5)) == "training bound L_5 (dreg)"
    assert label(TrainConfig(elbo="trace")) == "training ELBO"
    warm = TrainConfig(elbo="iwae", num_particles=5, kl_warmup="10%")
    assert label(warm) == "training bound L_5 (iwae), KL weighted"
    assert label(TrainConfig(elbo="trace", beta=0.5)).endswith("KL weighted")
