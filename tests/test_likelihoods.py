"""Likelihoods for images that are not binary: the discretised logistic (pixels with a fixed
number of levels, 8-bit grey) and the continuous Bernoulli, checked against exact answers."""

import math

import pytest
import torch

from pyro_vae import VAE, estimate_log_px
from pyro_vae.data import DataError, check_images
from pyro_vae.networks.distributions import DiscretizedLogistic, bits_per_dim


def all_levels(levels, shape, dtype=torch.float64):
    return torch.linspace(0, 1, levels, dtype=dtype).expand(*shape, levels).movedim(-1, 0)


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_the_levels_probabilities_sum_to_one(levels):
    torch.manual_seed(levels)
    # locations inside, at the edges of and far outside [0, 1]; scales from a hundredth of a
    # bin to ten times the range
    loc = torch.cat([torch.rand(20), torch.tensor([0.0, 1.0, -3.0, 4.0, 0.5])]).double()
    log_scale = torch.linspace(math.log(0.01 / levels), math.log(10.0), 25).double()
    d = DiscretizedLogistic(loc.unsqueeze(-1), log_scale.unsqueeze(-1), levels=levels)
    per_level = torch.stack([d.log_prob(v.unsqueeze(-1)) for v in all_levels(levels, (25,))])
    assert torch.allclose(per_level.exp().sum(0), torch.ones(25, dtype=torch.float64), atol=1e-12)


def test_a_bins_mass_is_the_logistic_cdf_difference():
    torch.manual_seed(1)
    loc, log_scale = torch.rand(6, 10).double(), (torch.rand(6, 10) * 3 - 5).double()
    x = torch.randint(0, 256, (6, 10)).double() / 255

    def cdf(v):  # the logistic's distribution function
        return torch.sigmoid((v - loc) / log_scale.exp())

    half = 0.5 / 255
    upper = torch.where(x >= 1, torch.ones_like(x), cdf(x + half))
    lower = torch.where(x <= 0, torch.zeros_like(x), cdf(x - half))
    expected = torch.log(upper - lower)
    got = DiscretizedLogistic(loc, log_scale)._pixel_log_prob(x)
    # where the difference of the two distribution functions does not round away
    usable = upper - lower > 1e-6
    assert usable.sum() > 30
    assert torch.allclose(got[usable], expected[usable], rtol=1e-9)
    assert torch.isfinite(got).all()


def test_far_tails_stay_finite_and_match_double_precision():
    # in float32 the difference of two sigmoids rounds to zero here; the log of the bin's
    # mass must not
    loc = torch.tensor([[0.0, 1.0, 0.5, 0.5]])
    log_scale = torch.tensor([[-6.0, -6.0, -7.0, -2.0]])
    x = torch.tensor([[200 / 255, 10 / 255, 1.0, 3 / 255]])
    single = DiscretizedLogistic(loc, log_scale)._pixel_log_prob(x)
    double = DiscretizedLogistic(loc.double(), log_scale.double())._pixel_log_prob(x.double())
    assert torch.isfinite(single).all()
    assert torch.allclose(single.double(), double, rtol=1e-5)


def test_draws_follow_the_levels_probabilities():
    torch.manual_seed(2)
    levels = 17
    d = DiscretizedLogistic(torch.tensor([0.4]), torch.tensor([math.log(0.08)]), levels=levels)
    n = 200_000
    draws = d.expand((n,)).sample()
    counts = torch.bincount((draws[:, 0] * (levels - 1)).round().long(), minlength=levels)
    probs = torch.stack([d.log_prob(v.reshape(1)) for v in torch.linspace(0, 1, levels)]).exp()
    sd = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * sd + 1e-6).all()


@pytest.mark.parametrize("levels", [17, 256])
def test_a_uniform_share_bounds_every_level_s_cost_and_keeps_the_sum_at_one(levels):
    """(1 - u) P + u / L: the levels still sum to one, log_prob is the log of the mixture
    at every level, no level costs more than -log(u / L), draws follow it; u = 0 is the
    distribution as it was, bit for bit."""
    g = torch.Generator().manual_seed(5)
    loc = torch.rand(4, 6, generator=g, dtype=torch.float64)
    log_scale = torch.full((4, 6), math.log(0.1 / (levels - 1)), dtype=torch.float64)  # sharp
    plain = DiscretizedLogistic(loc, log_scale, levels=levels)
    u = 0.01
    mixed = DiscretizedLogistic(loc, log_scale, levels=levels, uniform=u)
    probs = mixed.level_probs()
    assert torch.allclose(probs.sum(-1), torch.ones(4, 6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(probs, (1 - u) * plain.level_probs() + u / levels, rtol=1e-12)
    assert (probs >= u / levels * (1 - 1e-12)).all()
    values = torch.linspace(0, 1, levels, dtype=torch.float64)
    for k in (0, 1, levels // 2, levels - 1):
        x = values[k].expand(4, 6)
        assert torch.allclose(mixed.log_prob(x), probs[..., k].log().sum(-1), rtol=1e-10)
        assert (mixed.log_prob(x) >= 6 * math.log(u / levels) - 1e-9).all()
    x = (torch.randint(0, levels, (3, 4, 6), generator=g) / (levels - 1)).double()
    zero = DiscretizedLogistic(loc, log_scale, levels=levels, uniform=0.0)
    assert torch.equal(zero.log_prob(x), plain.log_prob(x))
    # draws: a far-off level is drawn about u / L of the time
    torch.manual_seed(6)
    one = DiscretizedLogistic(torch.tensor([0.0]), torch.tensor([-8.0]), levels=levels, uniform=u)
    n = 200_000
    draws = (one.expand((n,)).sample()[:, 0] * (levels - 1)).round().long()
    p_top = float(one.level_probs()[0, -1])
    sd = math.sqrt(p_top * (1 - p_top) / n)
    assert abs(float((draws == levels - 1).double().mean()) - p_top) <= 5 * sd
    with pytest.raises(ValueError, match=r"uniform must be in \[0, 1\)"):
        DiscretizedLogistic(loc, log_scale, uniform=1.0)


def test_a_vae_s_uniform_share_is_its_config_only_when_on():
    from pyro_vae import TrainConfig
    from pyro_vae.checks import ConfigError

    kw = dict(x_dim=12, z_dim=2, hidden=(8,), likelihood="logistic")
    assert "pixel_uniform" not in VAE(**kw).config()  # earlier files' weight hashes stay
    vae = VAE(**kw, pixel_uniform=0.01)
    assert vae.config()["pixel_uniform"] == 0.01
    assert VAE(**vae.config()).pixel_uniform == 0.01
    assert vae.likelihood(torch.zeros(1, 2)).uniform == 0.01
    with pytest.raises(ConfigError, match="pixel_uniform: applies to the logistic likelihood"):
        VAE(x_dim=12, z_dim=2, hidden=(8,), pixel_uniform=0.01)
    with pytest.raises(ConfigError, match="pixel_uniform: applies to likelihood logistic"):
        TrainConfig(pixel_uniform=0.01)
    with pytest.raises(ConfigError, match="pixel_uniform"):
        TrainConfig(likelihood="logistic", binarize="none", pixel_uniform=1.0)
    assert TrainConfig(likelihood="logistic", binarize="none", pixel_uniform=0.01).pixel_uniform


def test_a_value_off_the_levels_is_refused_under_validation():
    d = DiscretizedLogistic(torch.zeros(1, 3), torch.zeros(1, 3), validate_args=True)
    d.log_prob(torch.tensor([[0.0, 128 / 255, 1.0]]))
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor([[0.0, 0.5, 1.0]]))


def exact_vae(likelihood, x_dim=12):
    """A VAE whose decoder ignores z and whose guide is the prior: p(x) = p(x | any z)
    exactly, and every importance weight equals it."""
    torch.manual_seed(3)
    vae = VAE(x_dim=x_dim, z_dim=3, hidden=(8,), likelihood=likelihood, scale_link="exp")
    with torch.no_grad():
        vae.encoder.net[-1].weight.zero_()
        vae.encoder.net[-1].bias.zero_()  # loc 0, scale exp(0) = 1: q(z|x) = p(z)
        vae.decoder.net[-1].weight.zero_()  # the output is the bias, whatever z
        vae.decoder.net[-1].bias.normal_()
    return vae


@pytest.mark.parametrize("likelihood", ["logistic", "continuous-bernoulli"])
def test_the_evaluator_gives_log_p_x_exactly(likelihood):
    vae = exact_vae(likelihood)
    torch.manual_seed(4)
    if likelihood == "logistic":
        x = torch.randint(0, 256, (5, 12)).float() / 255
    else:
        x = torch.rand(5, 12)
    result = estimate_log_px(vae.model, vae.guide, x, num_particles=7, psis=False)
    exact = vae.likelihood(torch.zeros(1, 3)).log_prob(x)
    if likelihood == "continuous-bernoulli":  # the normaliser is part of the density
        logits = vae.decoder.net[-1].bias
        cb = torch.distributions.ContinuousBernoulli(logits=logits)
        assert torch.allclose(exact, cb.log_prob(x).sum(-1))
    assert torch.allclose(result.log_px.double(), exact.double(), atol=1e-4)
    assert torch.allclose(result.elbo.double(), exact.double(), atol=1e-4)


def test_bits_per_dimension():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert bits_per_dim(torch.tensor([0.0]), 10).item() == 0.0


def test_a_logistic_vae_trains_on_grey_levels():
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    torch.manual_seed(5)
    x = (torch.rand(64, 20) * 255).round() / 255
    vae = VAE(x_dim=20, z_dim=2, hidden=(16,), likelihood="logistic")
    vae.init_output_bias(x.mean(0))
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    first = svi.step(x)
    for _ in range(150):
        last = svi.step(x)
    assert last < first
    assert vae.decode(torch.zeros(1, 2)).shape == (1, 20)
    restored = VAE(**vae.config())
    assert restored.levels == 256 and restored.decoder.net[-1].out_features == 40


@pytest.mark.parametrize(
    "images,likelihood,binarize,message",
    [
        (torch.full((2, 4), 0.5), "logistic", "none", "256 grey levels"),
        (torch.full((2, 4), 1.0), "logistic", "dynamic", "use --binarize none"),
        (torch.full((2, 4), 1.5), "continuous-bernoulli", "none", "intensities in \\[0, 1\\]"),
        (torch.full((2, 4), 0.5), "continuous-bernoulli", "static", "use --binarize none"),
    ],
)
def test_images_that_do_not_suit_the_likelihood_are_refused(images, likelihood, binarize, message):
    with pytest.raises(DataError, match=message):
        check_images(images, likelihood, binarize, "train")


def test_levels_must_be_two_or_more():
    with pytest.raises(ValueError, match="levels"):
        DiscretizedLogistic(torch.zeros(1, 2), torch.zeros(1, 2), levels=1)
    with pytest.raises(ValueError, match="levels"):
        VAE(x_dim=4, likelihood="logistic", levels=1)


def test_the_digits_splits_are_fixed_and_on_17_levels():
    from pyro_vae.data import load_dataset

    first, again = load_dataset("digits"), load_dataset("digits")
    assert {k: len(v) for k, v in first.items()} == {"train": 1197, "valid": 300, "test": 300}
    for name in first:
        assert torch.equal(first[name].images, again[name].images)
        assert first[name].image_shape == (8, 8)
    everything = torch.cat([d.images for d in first.values()])
    assert len(torch.unique(everything, dim=0)) > 1700  # no image in two splits, give or take twins
    check_images(everything, "logistic", "none", "digits", levels=17)
    with pytest.raises(DataError, match="256 grey levels"):
        check_images(everything, "logistic", "none", "digits", levels=256)


def test_train_and_evaluate_a_logistic_vae_on_the_digits(tmp_path, capsys):
    from helpers import run_in_process

    out = tmp_path / "digits"
    args = ["--dataset", "digits", "--likelihood", "logistic", "--binarize", "none"]
    args += ["--epochs", "2", "--z-dim", "4", "--hidden", "32", "--eval-particles", "50"]
    status, err = run_in_process("train_svi.py", [*args, "--out", str(out)], capsys)
    assert status == 0, err
    import json

    report = json.loads((out / "evaluation.json").read_text())
    nll_bits = report["bits_per_dim"]["nll"]
    assert nll_bits == pytest.approx(-report["log_px"] / (64 * math.log(2)))
    assert 0 < nll_bits < math.log2(17)  # better than 17 equally likely levels per pixel
    model = __import__("pyro_vae").Run.load(out).model
    assert model.levels == 17


def test_train_svi_takes_a_uniform_share_and_refuses_it_for_binary_pixels(tmp_path, capsys):
    import json

    from helpers import run_in_process

    from pyro_vae import Run

    out = tmp_path / "digits"
    args = ["--dataset", "digits", "--likelihood", "logistic", "--binarize", "none"]
    args += ["--epochs", "1", "--z-dim", "4", "--hidden", "32", "--eval-particles", "10"]
    status, err = run_in_process(
        "train_svi.py", [*args, "--pixel-uniform", "0.01", "--out", str(out)], capsys
    )
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["pixel_uniform"] == 0.01
    assert Run.load(out).model.pixel_uniform == 0.01
    for bad, message in (
        (["--pixel-uniform", "0.01"], "--pixel-uniform: applies to likelihood logistic"),
        ([*args, "--pixel-uniform", "1"], "is not a number in [0, 1)"),
    ):
        status, err = run_in_process("train_svi.py", [*bad, "--out", str(tmp_path / "x")], capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) <= 3, err
