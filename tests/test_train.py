import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, BatchLoader, NonFiniteError, Trainer, make_elbo


@pytest.fixture(scope="module")
def small(mnist):
    return mnist["train"].subset(slice(0, 1024)), mnist["valid"].subset(slice(0, 256))


def fit(small, seed=0, epochs=2, **kwargs):
    train, valid = small
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(z_dim=8, hidden=(64,))
    trainer = Trainer(vae.model, vae.guide, lr=3e-3, **kwargs)
    loader = BatchLoader(train, 128, shuffle=True, binarize="dynamic", seed=seed)
    val = torch.bernoulli(valid.images, generator=torch.Generator().manual_seed(0))
    history = trainer.fit(loader, epochs, val_data=(val,), progress=False)
    return vae, trainer, history


def test_loss_decreases(small):
    _, _, history = fit(small, epochs=4)
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] + 20
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    assert history[-1]["step"] == 4 * 8


def test_same_seed_same_numbers(small):
    a, _, ha = fit(small, seed=7)
    b, _, hb = fit(small, seed=7)
    c, _, hc = fit(small, seed=8)
    strip = [{k: v for k, v in m.items() if k != "seconds"} for m in ha]
    assert strip == [{k: v for k, v in m.items() if k != "seconds"} for m in hb]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ha[-1]["train_loss"] != hc[-1]["train_loss"]


def test_the_loop_around_a_hand_built_stepper_trains_as_the_one_trainer_builds(small):
    """Trainer.around(stepper): the step's options given once, on the stepper; the same
    numbers, bit for bit, as the Trainer that builds the same stepper from its keywords."""
    from pyro_vae.training.stepper import SVIStepper

    options = dict(clip_norm=50.0, adam_eps=1e-4, skip_norm=1e6)
    _, _, built = fit(
        small, seed=3, lr_schedule="cosine", elbo="dreg", num_particles=3, kl_warmup=1, **options
    )
    train, valid = small
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    vae = VAE(z_dim=8, hidden=(64,))
    stepper = SVIStepper(vae.model, vae.guide, make_elbo("dreg", 3), lr=3e-3, **options)
    trainer = Trainer.around(stepper, lr_schedule="cosine", kl_warmup=1)
    loader = BatchLoader(train, 128, shuffle=True, binarize="dynamic", seed=3)
    val = torch.bernoulli(valid.images, generator=torch.Generator().manual_seed(0))
    around = trainer.fit(loader, 2, val_data=(val,), progress=False)
    strip = [[{k: v for k, v in m.items() if k != "seconds"} for m in h] for h in (built, around)]
    assert strip[0] == strip[1] and trainer.stepper is stepper
    with pytest.raises(ValueError, match="learning-rate schedule"):
        Trainer.around(stepper, lr_schedule="linear")


@pytest.mark.parametrize("elbo", ["meanfield", "jit"])
def test_other_objectives_train(small, elbo):
    _, trainer, history = fit(small, epochs=2, elbo=elbo)
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert history[-1]["val_elbo"] > history[0]["val_elbo"]


def test_vectorised_particles():
    elbo = make_elbo("trace", num_particles=4)
    assert elbo.num_particles == 4 and elbo.vectorize_particles
    vae = VAE(x_dim=10, z_dim=2, hidden=(4,))
    trainer = Trainer(vae.model, vae.guide, elbo=elbo)
    assert math.isfinite(trainer.step(torch.bernoulli(torch.full((5, 10), 0.5))))


def test_trainer_loss_is_svis_loss():
    vae = VAE(x_dim=10, z_dim=2, hidden=(4,))
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    trainer = Trainer(vae.model, vae.guide)
    pyro.set_rng_seed(4)
    ours = float(trainer.elbo.differentiable_loss(vae.model, vae.guide, x).detach())
    pyro.set_rng_seed(4)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert ours == pytest.approx(svi.evaluate_loss(x), rel=1e-6)


def test_nonfinite_loss_names_epoch_step_and_site():
    vae = VAE(x_dim=10, z_dim=2, hidden=(4,))
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    trainer = Trainer(vae.model, vae.guide, validate=False)
    trainer.step(x)
    with torch.no_grad():
        vae.decoder.net[-1].bias.fill_(float("nan"))
    before = [p.detach().clone() for p in vae.parameters()]
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 2.*model:x"):
        trainer.step(x)
    after = list(vae.parameters())
    assert all(torch.equal(p, q) or torch.isnan(p).any() for p, q in zip(before, after))


def test_skip_nonfinite_counts():
    vae = VAE(x_dim=10, z_dim=2, hidden=(4,))
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    trainer = Trainer(vae.model, vae.guide, skip_nonfinite=True, validate=False)
    with torch.no_grad():
        vae.decoder.net[-1].bias.fill_(float("nan"))
    assert math.isnan(trainer.step(x))
    assert trainer.skipped_steps == 1


def test_bad_trainer_arguments():
    vae = VAE(x_dim=10, z_dim=2, hidden=(4,))
    with pytest.raises(ValueError, match="learning rate"):
        Trainer(vae.model, vae.guide, lr=0)
    with pytest.raises(ValueError, match="unknown ELBO"):
        Trainer(vae.model, vae.guide, elbo="renyi")


def test_plain_function_model_and_guide_with_pyro_params():
    """A user's own pair, with parameters from pyro.param (no nn.Module), trains too."""
    import pyro.distributions as dist
    from pyro.distributions import constraints

    def model(x):
        b = pyro.param("b", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + b, 0.5).to_event(1), obs=x)

    def guide(x):
        # rich enough to hold the exact posterior N(0.8 (x - b), 0.2), so b's optimum is the MLE
        w = pyro.param("w", torch.tensor(0.1))
        c = pyro.param("c", torch.zeros(3))
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w * x + c, s).to_event(1))

    x = torch.randn(200, 3) * 1.1 + torch.tensor([2.0, -1.0, 0.5])
    trainer = Trainer(model, guide, lr=0.05)
    before = trainer.evaluate_elbo(x, num_particles=50)
    loader = [(x,)] * 1500
    trainer.fit(loader, 1, progress=False)
    assert len(trainer.params) == 4  # b, w, c and the unconstrained s
    assert trainer.evaluate_elbo(x, num_particles=50) > before + 1
    assert torch.allclose(pyro.param("b").detach(), x.mean(0), atol=0.1)


def test_cosine_schedule_sets_each_epochs_rate_and_constant_leaves_it():
    from pyro_vae.training.schedules import lr_factor

    assert [lr_factor("constant", e, 4) for e in (1, 4)] == [1.0, 1.0]
    assert [round(lr_factor("cosine", e, 4), 6) for e in (1, 2, 3, 4)] == [
        1.0,
        round(0.5 * (1 + math.cos(math.pi / 4)), 6),
        0.5,
        round(0.5 * (1 + math.cos(3 * math.pi / 4)), 6),
    ]
    x = torch.bernoulli(torch.full((64, 784), 0.3))
    vae = VAE(z_dim=2, hidden=(8,))
    trainer = Trainer(vae.model, vae.guide, lr=0.01, lr_schedule="cosine")
    history = trainer.fit([(x[:32],), (x[32:],)], 4, progress=False)
    assert [m["lr"] for m in history] == pytest.approx(
        [0.01 * lr_factor("cosine", e, 4) for e in range(1, 5)]
    )
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(history[-1]["lr"])
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        Trainer(vae.model, vae.guide, lr_schedule="exponential")


def test_the_stepper_steps_any_loss_and_says_what_it_did():
    from pyro_vae.training.stepper import Stepper

    w = torch.zeros(3, requires_grad=True)
    stepper = Stepper(lambda x: ((w - x) ** 2).sum(), [w], lr=0.1)
    info = stepper.step(torch.ones(3))
    assert info.loss == 3.0 and not info.skipped
    assert info.grad_norm == pytest.approx(2 * math.sqrt(3))
    for _ in range(300):
        stepper.step(torch.ones(3))
    assert torch.allclose(w, torch.ones(3), atol=1e-2) and stepper.step_count == 301
    stepper.set_lr(0.0123)
    assert stepper.optimizer.param_groups[0]["lr"] == 0.0123
    before = w.detach().clone()
    skipping = Stepper(lambda: w.sum() * float("nan"), [w], skip_nonfinite=True)
    assert skipping.step().skipped and skipping.skipped_steps == 1
    assert torch.equal(w.detach(), before)  # a skipped step changes nothing
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        Stepper(lambda: w.sum() * float("nan"), [w]).step()


def test_stop_rules_are_asked_after_each_epoch_and_decide_nothing_else(small):
    class AfterTwo:
        def reason(self, history):
            return "two epochs are enough" if len(history) >= 2 else None

    train, _ = small
    vae = VAE(z_dim=4, hidden=(16,))
    trainer = Trainer(vae.model, vae.guide, lr=1e-3)
    loader = BatchLoader(train.subset(slice(0, 256)), 128, binarize="dynamic")
    history = trainer.fit(loader, 5, stop_rules=[AfterTwo()], progress=False)
    assert len(history) == 2 and trainer.epoch == 2
    assert trainer.stop_reason == "two epochs are enough"


def test_one_library_call_trains_resumes_and_evaluates_a_run_without_argparse(data_dir, tmp_path):
    """train_vae(config, directory): the run a notebook makes is the script's run; resumed
    from its checkpoint it continues bit for bit; the same seed gives the same numbers."""
    import json

    from pyro_vae import Run, TrainConfig, load_checkpoint, train_vae
    from pyro_vae.io.rundir import strict_json

    config = TrainConfig(
        z_dim=4, hidden=(16,), epochs=2, batch_size=128, train_size=512, eval_size=128,
        eval_particles=20, data_dir=str(data_dir),
    )  # fmt: skip
    whole = train_vae(config, tmp_path / "whole", progress=False)
    assert whole.run.epoch == 2 and whole.run.train_config == config
    assert whole.report["log_px"] >= whole.report["elbo"]
    written = json.loads((tmp_path / "whole" / "evaluation.json").read_text())
    assert written == json.loads(strict_json(whole.report))  # inf written as null
    assert (tmp_path / "whole" / "figures" / "elbo_curves.png").is_file()
    # one epoch, then resumed from the checkpoint for the second
    train_vae(config.replace(epochs=1), tmp_path / "halves", progress=False).training.close()
    state = load_checkpoint(tmp_path / "halves")
    halves = train_vae(config, tmp_path / "halves", state=state, new=False, progress=False)
    metrics = [
        [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
        for lines in (
            (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            for name in ("whole", "halves")
        )
    ]
    assert metrics[0] == metrics[1]
    assert strict_json(halves.report) == strict_json(whole.report)
    again = Run.load(tmp_path / "whole")
    assert again.heldout("test", 128).images.shape == (128, 784)


def test_keep_best_scores_and_hands_on_the_best_validation_epoch(data_dir, tmp_path):
    """keep_best: best.pt holds the weights of the epoch with the best validation ELBO; the
    test report is theirs (the report of a run stopped at that epoch, bit for bit), and the
    run directory stands for them in every later job; a resumed run keeps the same best.pt."""
    from pyro_vae import Run, TrainConfig, load_checkpoint, train_vae
    from pyro_vae.io.checkpoints import CheckpointError
    from pyro_vae.io.rundir import strict_json

    # 32 training images and a large step: the validation ELBO peaks before the last epoch
    config = TrainConfig(
        z_dim=8, hidden=(128,), epochs=8, batch_size=8, train_size=32, eval_size=64, lr=0.03,
        lr_schedule="constant", eval_particles=10, keep_best=True, data_dir=str(data_dir),
    )  # fmt: skip
    kept = train_vae(config, tmp_path / "kept", progress=False)
    val = [m["val_elbo"] for m in kept.training.trainer.history]
    best = max(range(len(val)), key=lambda i: (val[i], i)) + 1
    assert best < config.epochs  # else this test would not tell best.pt from checkpoint.pt
    assert kept.report["best_epoch"] == best
    assert kept.run.epoch == best and kept.run.path.name == "best.pt"
    assert Run.load(tmp_path / "kept").epoch == best
    assert Run.load(tmp_path / "kept" / "checkpoint.pt").epoch == config.epochs

    short = train_vae(
        config.replace(epochs=best, keep_best=False), tmp_path / "short", progress=False
    )
    weights = load_checkpoint(tmp_path / "kept" / "best.pt")["model"]
    assert all(torch.equal(weights[k], v) for k, v in short.run.model.state_dict().items())
    without_epoch = {k: v for k, v in kept.report.items() if k != "best_epoch"}
    assert strict_json(without_epoch) == strict_json(short.report)

    train_vae(config.replace(epochs=3), tmp_path / "halves", progress=False).training.close()
    state = load_checkpoint(tmp_path / "halves")
    halves = train_vae(config, tmp_path / "halves", state=state, new=False, progress=False)
    resumed = load_checkpoint(tmp_path / "halves" / "best.pt")
    assert resumed["epoch"] == best
    assert all(torch.equal(resumed["model"][k], v) for k, v in weights.items())
    assert strict_json(halves.report) == strict_json(kept.report)

    (tmp_path / "kept" / "best.pt").unlink()
    with pytest.raises(CheckpointError, match="keeps its best epoch, but has no"):
        Run.load(tmp_path / "kept")


def test_patience_and_max_minutes_stop_a_vae_run_and_a_resume_may_change_them(data_dir, tmp_path):
    """patience: training stops once the validation ELBO has not improved for that many
    epochs (the report says why); a resumed run may change it and then continues exactly as
    a run that never stopped; max_minutes stops on the time the epochs took."""
    import json

    from pyro_vae import TrainConfig, load_checkpoint, train_vae

    config = TrainConfig(
        z_dim=8, hidden=(128,), epochs=6, batch_size=8, train_size=32, eval_size=64, lr=0.03,
        lr_schedule="constant", eval_particles=10, keep_best=True, data_dir=str(data_dir),
    )  # fmt: skip
    whole = train_vae(config, tmp_path / "whole", progress=False)
    val = [m["val_elbo"] for m in whole.training.trainer.history]
    # the first epoch after which the best so far is 2 epochs old
    stop, best = next(
        (t, b)
        for t in range(1, len(val) + 1)
        for b in [max(range(t), key=lambda i: (val[i], -i))]
        if t - 1 - b >= 2
    )
    assert stop < len(val)
    stopped = train_vae(config.replace(patience=2), tmp_path / "stopped", progress=False)
    assert stopped.training.trainer.epoch == stop
    assert "val_elbo has not improved for 2 epochs" in stopped.report["stopped"]
    assert stopped.report["best_epoch"] == best + 1
    assert "stopped" not in whole.report
    # the same patience again: nothing more to train; none: on to the sixth epoch
    state = load_checkpoint(tmp_path / "stopped")
    again = train_vae(
        config.replace(patience=2), tmp_path / "stopped", state=state, new=False, progress=False
    )
    assert again.training.trainer.epoch == stop
    state = load_checkpoint(tmp_path / "stopped")
    on = train_vae(config, tmp_path / "stopped", state=state, new=False, progress=False)
    lines = [
        [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
        for lines in (
            (tmp_path / name / "metrics.jsonl").read_text().splitlines()
            for name in ("whole", "stopped")
        )
    ]
    assert lines[0] == lines[1] and on.report == whole.report
    timed = train_vae(config.replace(max_minutes=1e-6), tmp_path / "timed", progress=False)
    assert timed.training.trainer.epoch == 1 and "time budget" in timed.report["stopped"]
