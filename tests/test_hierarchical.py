"""The hierarchical VAE: two stochastic layers, bottom-up and top-down guides, and the
likelihood ratio LLR^{>k}, against exact answers on a linear-Gaussian chain z2 -> z1 -> x."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from exact_models import D64, LinearGaussianChain
from helpers import TINY, load_script, run_in_process, run_script

from pyro_vae import HierarchicalVAE, Trainer, estimate_log_px, load_checkpoint, make_elbo
from pyro_vae.apps.compression import CompressedImages
from pyro_vae.apps.ood import bound_above, llr_above, llr_above_sampled
from pyro_vae.inference.objectives import IWAE
from pyro_vae.models import model_from_checkpoint

X = torch.bernoulli(torch.full((16, 784), 0.3), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("guide", ["bottom-up", "top-down", "deterministic"])
def test_both_guides_train_with_every_objective_and_round_trip_a_checkpoint(guide, tmp_path):
    from pyro_vae.io.checkpoints import save_checkpoint

    hvae = HierarchicalVAE(z_dims=(8, 4), hidden=((32,), (16,)), guide=guide)
    assert hvae.latent_sites == ("z1", "z2")
    trace = pyro.poutine.trace(hvae.guide).get_trace(X)
    order = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert order == (["z1", "z2"] if guide == "bottom-up" else ["z2", "z1"])
    for name in ("trace", "iwae", "dreg"):
        elbo = make_elbo(name, num_particles=3)
        trainer = Trainer(hvae.model, hvae.guide, lr=3e-3, elbo=elbo)
        before = elbo.loss(hvae.model, hvae.guide, X)
        for _ in range(40):
            trainer.step(X)
        assert elbo.loss(hvae.model, hvae.guide, X) < before - 20, name
    state = {"model_class": "HierarchicalVAE", "model_config": hvae.config()}
    save_checkpoint(tmp_path / "c.pt", {**state, "model": hvae.state_dict()})
    again = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert again.guide_kind == guide and again.z_dims == (8, 4)
    torch.manual_seed(1)
    a = estimate_log_px(hvae.model, hvae.guide, X, num_particles=20, psis=False)
    torch.manual_seed(1)
    b = estimate_log_px(again.model, again.guide, X, num_particles=20, psis=False)
    assert torch.equal(a.log_px, b.log_px)


def test_bad_settings_are_refused_in_one_line():
    from pyro_vae.checks import ConfigError

    with pytest.raises(ConfigError, match="one list of sizes per stochastic layer"):
        HierarchicalVAE(z_dims=(8, 4), hidden=((32,),))
    with pytest.raises(ConfigError, match="unknown guide"):
        HierarchicalVAE(guide="sideways")
    with pytest.raises(ConfigError, match="top-down or deterministic guide"):
        HierarchicalVAE(guide="bottom-up").guide_above(X, 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 1\]"):
        HierarchicalVAE(z_dims=(8, 4), hidden=((32,), (16,)), guide="top-down").guide_above(X, 2)


@pytest.mark.parametrize("guide", ["bottom-up", "top-down", "deterministic"])
def test_the_guides_own_family_holds_the_amortised_guide_and_its_fit_improves_on_it(guide):
    """guide_from(posterior_parameters(x)) is the guide itself (same draws, same log q), so
    the per-image fit in the guide's own family starts at the amortised guide and the
    decomposition is nested: an amortisation gap that cannot be negative."""
    from pyro_vae.apps.gaps import LocalGuide, inference_gaps

    torch.manual_seed(2)
    hvae = HierarchicalVAE(z_dims=(6, 3), hidden=((24,), (12,)), guide=guide)
    x = X[:6]
    raw = hvae.posterior_parameters(x)
    local = LocalGuide(raw, family="own", site=hvae.latent_sites, draw=hvae.guide_from)
    index = torch.arange(len(x))
    pyro.set_rng_seed(3)
    ours = pyro.poutine.trace(local.guide).get_trace(x, index)
    pyro.set_rng_seed(3)
    theirs = pyro.poutine.trace(hvae.guide).get_trace(x)
    for name in hvae.latent_sites:
        assert torch.equal(ours.nodes[name]["value"], theirs.nodes[name]["value"])
    assert torch.allclose(ours.log_prob_sum(), theirs.log_prob_sum(), atol=1e-5)
    pyro.set_rng_seed(4)
    report = inference_gaps(
        hvae.model,
        hvae.guide,
        x,
        num_particles=200,
        elbo_particles=200,
        fit_options={"max_steps": 150, "lr": 0.05, "window": 50},
    )
    s = report.summary()
    assert s["fit"]["family"] == "own" and s["amortised_guide_in_family"] is True
    assert s["status"] == "ok"
    # an untrained guide: the per-image optimum of its own family is far better
    assert s["amortisation_gap"]["mean"] > 10 * s["amortisation_gap"]["sem"] > 0


# -- LLR^{>1} against its closed form -----------------------------------------------------------


def top_posterior(lg, x):
    """p(z2 | x) of a two-layer chain: (mean (N, d2), covariance (d2, d2))."""
    (A,), W = lg.A, lg.W
    cov_x = W @ lg.C[0] @ W.T + lg.sigma**2 * torch.eye(lg.x_dim, dtype=D64)
    gain = A.T @ W.T @ torch.linalg.inv(cov_x)  # Cov(z2, x) Cov(x)^-1, with Cov(z2) = I
    mean_x = W @ lg.m[0] + lg.b
    return (x - mean_x) @ gain.T, torch.eye(lg.dims[1], dtype=D64) - gain @ W @ A


def exact_bound_above(lg, x, at_mean=False):
    """L^{>1}(x) = E_{p(z2|x) p(z1|z2)}[log p(x|z1)] + E_{p(z2|x)}[log p(z2) - log p(z2|x)];
    ``at_mean``: with z1 = E[z1 | z2] instead of a draw of p(z1 | z2) (Havtorn et al.'s)."""
    m, S = top_posterior(lg, x)
    (A,), (a,), (s,) = lg.A, lg.a, lg.s
    d1, d2, D = lg.dims[0], lg.dims[1], lg.x_dim
    mu1 = m @ A.T + a
    V1 = A @ S @ A.T + (0.0 if at_mean else s**2) * torch.eye(d1, dtype=D64)
    resid = x - mu1 @ lg.W.T - lg.b
    expected_sq = (resid**2).sum(-1) + torch.trace(lg.W @ V1 @ lg.W.T)
    log_lik = -0.5 * D * math.log(2 * math.pi * lg.sigma**2) - expected_sq / (2 * lg.sigma**2)
    cross = -0.5 * (torch.trace(S) + (m**2).sum(-1)) - 0.5 * d2 * math.log(2 * math.pi)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * S)
    return log_lik + cross + entropy


def test_llr_above_matches_its_closed_form_on_a_linear_gaussian_chain():
    lg = LinearGaussianChain(dims=(3, 2))
    x = lg.sample_x(6)

    def guide_above(x):
        m, S = top_posterior(lg, x)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.MultivariateNormal(m, S))
            pyro.sample("z1", dist.Normal(z2 @ lg.A[0].T + lg.a[0], lg.s[0]).to_event(1))

    exact = exact_bound_above(lg, x) - lg.exact_log_px(x)  # L = log p(x) with the exact guide
    assert (exact < -0.5).all()  # the lowest layer from the prior costs something
    n = 40_000
    ours = llr_above_sampled(lg.model, lg.exact_guide, guide_above, x, num_particles=n, seed=0)
    # the exact guide's log weights are constant; the others' spread sets the error
    per_draw = estimate_log_px(lg.model, guide_above, x, num_particles=2000, psis=False)
    se = per_draw.elbo_sem * math.sqrt(2000 / n)
    assert ((ours - exact).abs() < 5 * se + 1e-9).all(), (ours - exact, se)


def test_llr_above_sets_the_lower_layer_to_its_conditional_mean_as_the_papers_code_does():
    lg = LinearGaussianChain(dims=(3, 2))
    x = lg.sample_x(6)

    def top_down_guide(x):  # q(z2 | x) exact, then z1 given z2 (any proposal will do)
        m, S = top_posterior(lg, x)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.MultivariateNormal(m, S))
            pyro.sample("z1", dist.Normal(z2 @ lg.A[0].T + lg.a[0], 0.3).to_event(1))

    exact = exact_bound_above(lg, x, at_mean=True)
    sampled = exact_bound_above(lg, x)
    assert ((exact - sampled).abs() > 0.5).all()  # the two variants differ
    n = 40_000
    ours = bound_above(lg.model, top_down_guide, x, ["z1"], num_particles=n, seed=0)
    few = torch.stack(
        [
            bound_above(lg.model, top_down_guide, x, ["z1"], num_particles=1, seed=s)
            for s in range(200)
        ]
    )
    se = few.std(0) / math.sqrt(n)
    assert ((ours - exact).abs() < 5 * se + 1e-9).all(), (ours - exact, se)
    # the score is L^{>1} - L, with L the ELBO on the guide's own draws
    elbo = estimate_log_px(lg.model, top_down_guide, x, num_particles=n, psis=False, seed=0).elbo
    llr = llr_above(lg.model, top_down_guide, x, ["z1"], num_particles=n, seed=0)
    torch.testing.assert_close(llr, ours - elbo, atol=0.05, rtol=0)
    # a bottom-up guide has no q(z2 | x) apart from z1: refused
    with pytest.raises(ValueError, match="draws 'z2' after 'z1'.*bottom-up"):
        bound_above(lg.model, lg.exact_guide, x, ["z1"])
    with pytest.raises(ValueError, match="no layer is left"):
        bound_above(lg.model, top_down_guide, x, ["z1", "z2"])


def test_the_deterministic_guide_draws_each_layer_from_its_own_estimate():
    torch.manual_seed(0)
    vae = HierarchicalVAE(z_dims=(6, 3), hidden=((16,), (8,)), guide="deterministic")
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    trace = pyro.poutine.trace(vae.guide).get_trace(x)
    est = vae.estimates(x)
    for (loc, scale), name in zip(est, vae.latent_sites):
        fn = trace.nodes[name]["fn"]
        torch.testing.assert_close(fn.mean, loc)
        torch.testing.assert_close(fn.stddev, scale)
    # L^{>1} is defined for it, and the model trains with every scale link
    assert bound_above(vae.model, vae.guide, x, ["z1"], num_particles=3).shape == (4,)
    for link in ("exp", "softclamp"):
        other = HierarchicalVAE(z_dims=(6, 3), hidden=((16,), (8,)), scale_link=link)
        assert torch.isfinite(torch.tensor(IWAE(3).loss(other.model, other.guide, x)))


# -- skip connections in the generative path ----------------------------------------------------


def test_skip_connections_feed_every_generative_network_all_the_layers_above_it():
    torch.manual_seed(0)
    skip = HierarchicalVAE(z_dims=(6, 4, 3), hidden=((16,), (8,), (8,)), skip=True)
    assert skip.conditionals[0].net[0].in_features == 4 + 3  # p(z1 | z2, z3)
    assert skip.conditionals[1].net[0].in_features == 3  # p(z2 | z3)
    x = X[:5]
    trace = pyro.poutine.trace(skip.model).get_trace(x)
    z = {i: trace.nodes[f"z{i}"]["value"] for i in (1, 2, 3)}
    by_hand = (
        dist.Normal(0.0, 1.0).log_prob(z[3]).sum(-1)
        + skip.conditional(2, z[3]).log_prob(z[2])
        + skip.conditional(1, torch.cat([z[2], z[3]], -1)).log_prob(z[1])
        + dist.Bernoulli(logits=skip.decoder(torch.cat([z[1], z[2], z[3]], -1))).log_prob(x).sum(-1)
    )
    traced = sum(
        trace.nodes[n]["fn"].log_prob(trace.nodes[n]["value"]) for n in ("z1", "z2", "z3", "x")
    )
    torch.testing.assert_close(traced, by_hand)


@pytest.mark.parametrize("guide", ["bottom-up", "top-down", "deterministic"])
def test_a_skip_model_whose_skip_weights_are_zero_is_the_chain_model(guide):
    """The weights that read the layers further up set to zero, a skip model is the model
    without skip connections: the same log p(x) estimate with the same draws (to rounding);
    and L^{>1} is defined for the guides that give q(z_{>1} | x)."""
    torch.manual_seed(0)
    sizes = dict(z_dims=(6, 4, 3), hidden=((16,), (8,), (8,)), guide=guide)
    chain, skip = HierarchicalVAE(**sizes), HierarchicalVAE(**sizes, skip=True)
    state = chain.state_dict()
    with torch.no_grad():
        for name, tensor in skip.state_dict().items():
            if tensor.shape == state[name].shape:
                tensor.copy_(state[name])
            else:  # a first layer that reads the skip inputs: the chain's columns, then zeros
                tensor.zero_()
                tensor[:, : state[name].shape[1]] = state[name]
    a = estimate_log_px(chain.model, chain.guide, X, num_particles=20, psis=False, seed=3)
    b = estimate_log_px(skip.model, skip.guide, X, num_particles=20, psis=False, seed=3)
    torch.testing.assert_close(a.log_px, b.log_px, rtol=0, atol=1e-5)
    torch.testing.assert_close(skip.decode(torch.ones(2, 3)), chain.decode(torch.ones(2, 3)))
    if guide != "bottom-up":
        for k in (1, 2):
            lower = [f"z{i}" for i in range(1, k + 1)]
            torch.testing.assert_close(
                bound_above(skip.model, skip.guide, X, lower, num_particles=4, seed=0),
                bound_above(chain.model, chain.guide, X, lower, num_particles=4, seed=0),
                rtol=0,
                atol=1e-4,
            )
    # and it trains, and a checkpoint keeps the connections
    trainer = Trainer(skip.model, skip.guide, lr=3e-3, elbo=make_elbo("dreg", num_particles=3))
    before = IWAE(3).loss(skip.model, skip.guide, X)
    for _ in range(40):
        trainer.step(X)
    assert IWAE(3).loss(skip.model, skip.guide, X) < before - 20
    again = model_from_checkpoint(
        {
            "model_class": "HierarchicalVAE",
            "model_config": skip.config(),
            "model": skip.state_dict(),
        }
    )
    assert again.skip and again.conditionals[0].net[0].in_features == 7


def test_train_svi_takes_skip_connections_for_two_layers_only(
    data_dir, tmp_path, capsys, monkeypatch
):
    from pyro_vae.checks import ConfigError
    from pyro_vae.config import TrainConfig

    with pytest.raises(ConfigError, match="skip_connections: applies to model hvae"):
        TrainConfig(skip_connections=True)
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    status, err = run_in_process(
        "train_svi.py", ["--skip-connections", "--out", str(tmp_path / "v")], capsys
    )
    assert status == 2 and "--skip-connections applies to --model hvae" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "v").exists()
    out = tmp_path / "run"
    args = ["--model", "hvae", "--z-dims", "6,3", "--layer-hidden", "16/8", "--skip-connections"]
    args += [*TINY, "--epochs", "1", "--eval-particles", "0", "--out", str(out)]
    assert run_in_process("train_svi.py", args, capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["skip_connections"] is True
    model = model_from_checkpoint(load_checkpoint(out / "checkpoint.pt"))
    assert model.skip and model.decoder.net[0].in_features == 9


# -- the scripts --------------------------------------------------------------------------------


def test_the_preset_gives_two_layers_their_own_rate_unless_one_is_given():
    import argparse

    from pyro_vae.choices import PRESET_MODEL_OVERRIDES, PRESETS
    from pyro_vae.cli import apply_preset

    def lr(model, given=None):
        args = argparse.Namespace(preset="iw-fast", model=model, lr=given, epochs=None)
        return apply_preset(args, PRESETS, PRESET_MODEL_OVERRIDES).lr

    assert lr("vae") == 3e-3
    assert lr("hvae") == 1e-3
    # and the warm-up recipe, which the one-layer preset leaves off
    args = argparse.Namespace(preset="iw-fast", model="hvae", kl_warmup=None, adam_eps=None)
    filled = apply_preset(args, PRESETS, PRESET_MODEL_OVERRIDES)
    assert filled.kl_warmup == "10%" and filled.adam_eps == 1e-4
    args = argparse.Namespace(preset="iw-fast", model="vae", kl_warmup=None)
    assert apply_preset(args, PRESETS, PRESET_MODEL_OVERRIDES).kl_warmup is None
    assert lr("hvae", given=5e-4) == 5e-4
    args = argparse.Namespace(preset="classic", model="hvae", lr=None)
    assert apply_preset(args, PRESETS, PRESET_MODEL_OVERRIDES).lr == PRESETS["classic"]["lr"]


def test_a_preset_s_output_bias_can_be_switched_off_on_the_command_line():
    from pyro_vae.choices import PRESET_MODEL_OVERRIDES, PRESETS
    from pyro_vae.cli import apply_preset

    parser = load_script("train_svi.py").build_parser()
    for flags, expected in (([], True), (["--no-init-output-bias"], False)):
        args = parser.parse_args(["--model", "hvae", *flags])
        args.preset = args.preset or "iw-fast"
        assert apply_preset(args, PRESETS, PRESET_MODEL_OVERRIDES).init_output_bias is expected


@pytest.mark.slow
def test_train_svi_trains_and_resumes_a_hierarchical_vae_and_the_other_scripts_accept_or_refuse_it(
    data_dir, trained_run, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    args = ["--model", "hvae", "--guide", "top-down", "--z-dims", "8,4", "--layer-hidden", "32/16"]
    args += [*TINY, "--eval-particles", "20"]
    first = run_script("train_svi.py", [*args, "--epochs", "1", "--out", str(out)], data_dir)
    assert first.returncode == 0, first.stderr
    resumed = run_script(
        "train_svi.py", ["--resume", str(out), "--epochs", "2", "--quiet"], data_dir
    )
    assert resumed.returncode == 0, resumed.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_class"] == "HierarchicalVAE"
    assert config["lr"] == 1e-3  # the preset's rate for two layers, kept on resume
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    report = json.loads((out / "evaluation.json").read_text())
    assert report["log_px"] >= report["elbo"]
    ood = run_script(
        "detect_ood.py",
        ["--checkpoint", str(out), "--ood", "flipped", "--images", "20", "--num-particles", "5"]
        + ["--compressor", "bz2", "--quiet"],
        data_dir,
    )
    assert ood.returncode == 0, ood.stderr
    scores = json.loads((out / "ood_mnist_vs_flipped.json").read_text())["metrics"]
    assert "llr_above_1" in scores
    gaps = run_script(
        "inference_gaps.py",
        ["--checkpoint", str(out), "--images", "3", "--num-particles", "20"]
        + ["--elbo-particles", "20", "--fit-steps", "100", "--quiet"],
        data_dir,
    )
    assert gaps.returncode == 0, gaps.stderr
    report = json.loads((out / "inference_gaps_own.json").read_text())  # the guide's family
    assert report["fit"]["sites"] == ["z2", "z1"]  # the top-down guide's order
    assert report["amortised_guide_in_family"] is True
    parts = report["approximation_gap"]["mean"] + report["amortisation_gap"]["mean"]
    assert abs(report["inference_gap"]["mean"] - parts) < 1e-6
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    packed, unpacked = tmp_path / "test.pvbb", tmp_path / "test.npy"
    head = ["--checkpoint", str(out)]
    encode = ["encode", "--split", "test", "--count", "30", "--output", str(packed)]
    assert run_in_process("compress.py", [*head, "--quiet", *encode], capsys)[0] == 0
    decode = ["decode", "--input", str(packed), "--output", str(unpacked)]
    assert run_in_process("compress.py", [*head, "--quiet", *decode], capsys)[0] == 0
    assert np.load(unpacked).shape == (30, 28, 28)
    # a file that claims K = 3 particles cannot be this model's: one line, exit 2
    claimed = CompressedImages.from_bytes(packed.read_bytes())
    claimed.particles = 3
    (tmp_path / "k3.pvbb").write_bytes(claimed.to_bytes())
    decode = ["decode", "--input", str(tmp_path / "k3.pvbb"), "--output", str(tmp_path / "k3")]
    status, err = run_in_process("compress.py", [*head, *decode], capsys)
    assert status == 2 and "one-layer VAE" in err and len(err.strip().splitlines()) == 1, err
    # a one-layer model's K = 3 file is another model's file: said before the particle rule
    other = tmp_path / "other.pvbb"
    encode = ["encode", "--split", "test", "--count", "3", "--particles", "3"]
    encode += ["--output", str(other)]
    assert (
        run_in_process("compress.py", ["--checkpoint", str(trained_run), *encode], capsys)[0] == 0
    )
    decode = ["decode", "--input", str(other), "--output", str(tmp_path / "other.npy")]
    status, err = run_in_process("compress.py", [*head, *decode], capsys)
    assert status == 2 and "other model weights" in err and "one-layer" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "other.npy").exists()
    for script, extra, message in (
        (
            "compress.py",
            ["encode", "--split", "test", "--particles", "3", "--output", str(tmp_path / "x")],
            "one-layer VAE",
        ),
        (
            "train_svi.py",
            ["--model", "hvae", "--flow", "iaf", "--out", str(tmp_path / "r")],
            "--flow",
        ),
    ):
        head = ["--checkpoint", str(out)] if script != "train_svi.py" else []
        status, err = run_in_process(script, [*head, *extra], capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_one_layer_run_saved_with_the_hierarchical_flags_filled_in_still_resumes(
    data_dir, tmp_path
):
    """Runs made before the hierarchical flags defaulted to None hold their old defaults in
    config.json; resuming one must not be refused as if the user had given them."""
    out = tmp_path / "run"
    args = [*TINY, "--z-dim", "4", "--hidden", "16", "--eval-particles", "0"]
    first = run_script("train_svi.py", [*args, "--epochs", "1", "--out", str(out)], data_dir)
    assert first.returncode == 0, first.stderr
    from pyro_vae.io.checkpoints import save_checkpoint

    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["config"]["guide"] is None and state["config"]["z_dims"] is None
    legacy = dict(guide="bottom-up", z_dims=[100, 50], layer_hidden=[[200, 200], [100, 100]])
    state["config"].update(legacy)
    state.pop("format_version")
    save_checkpoint(out / "checkpoint.pt", state)
    (out / "config.json").write_text(json.dumps(state["config"]))
    resumed = run_script("train_svi.py", ["--resume", str(out), "--epochs", "2"], data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
