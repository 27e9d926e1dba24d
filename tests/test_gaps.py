"""The gap decomposition against closed forms on the linear-Gaussian model, whose posterior
is Gaussian with precision Λ = I + WᵀW/σ², and on the two-layer linear-Gaussian chain
z2 -> z1 -> x, whose joint posterior over both layers is Gaussian too."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact_models import D64, LinearGaussian, LinearGaussianChain

from pyro_vae import VAE
from pyro_vae.apps.gaps import GapFitError, fit_local_guide, inference_gaps

FIT = {
    "num_particles": 32,
    "lr": 5e-2,
    "max_steps": 3000,
    "window": 100,
    "tol": 1e-3,
    "halvings": 5,
}


def kl_to_posterior(lg, local, x):
    """KL(q* || p(z|x)) per datapoint, in closed form."""
    q = local.distribution()
    if isinstance(q, dist.Independent):
        q = dist.MultivariateNormal(q.base_dist.loc, torch.diag_embed(q.base_dist.scale**2))
    post = dist.MultivariateNormal(lg.post_mean(x), lg.post_cov)
    return torch.distributions.kl_divergence(q, post).detach()


def test_full_covariance_local_optimum_is_the_posterior():
    pyro.set_rng_seed(0)
    lg = LinearGaussian()
    x = lg.sample_x(6)
    local, fit = fit_local_guide(lg.model, lg.wrong_guide, x, family="full", **FIT)
    assert fit["converged"]
    assert kl_to_posterior(lg, local, x).max() < 0.02  # approximation gap 0
    assert torch.allclose(local.loc.detach(), lg.post_mean(x), atol=0.05)


def test_diagonal_local_optimum_has_the_closed_form_variances_and_gap():
    pyro.set_rng_seed(1)
    lg = LinearGaussian()
    x = lg.sample_x(6)
    precision = torch.linalg.inv(lg.post_cov)
    local, _ = fit_local_guide(lg.model, lg.wrong_guide, x, family="diagonal", **FIT)
    variances = local.raw.detach().exp() ** 2
    assert torch.allclose(variances, (1 / precision.diagonal()).expand_as(variances), rtol=0.05)
    gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert gap > 0.1  # the model's posterior is correlated enough for this to matter
    assert (kl_to_posterior(lg, local, x) - gap).abs().max() < 0.02


def test_amortisation_gap_is_positive_and_vanishes_for_an_exact_encoder():
    pyro.set_rng_seed(2)
    lg = LinearGaussian()
    x = lg.sample_x(6)
    fast = {**FIT, "window": 50, "halvings": 4}
    exact = lg.exact_log_px(x)
    wrong = inference_gaps(
        lg.model,
        lg.wrong_guide,
        x,
        family="full",
        num_particles=200,
        elbo_particles=1000,
        fit_options=fast,
    )
    s = wrong.summary()
    assert s["amortisation_gap"]["mean"] > 10 * s["amortisation_gap"]["sem"] > 0
    assert (wrong.log_px - exact).abs().max() < 0.02  # q* is the posterior: a near-exact proposal
    assert abs(s["approximation_gap"]["mean"]) < 0.03
    right = inference_gaps(
        lg.model,
        lg.exact_guide,
        x,
        family="full",
        num_particles=200,
        elbo_particles=1000,
        fit_options=fast,
    )
    assert abs(right.summary()["amortisation_gap"]["mean"]) < 0.03
    assert torch.allclose(right.elbo_amortised, exact, atol=1e-6)  # every weight is p(x)


def test_unknown_family_and_missing_site_are_refused():
    lg = LinearGaussian()
    x = lg.sample_x(2)
    with pytest.raises(ValueError, match="unknown family"):
        fit_local_guide(lg.model, lg.wrong_guide, x, family="mixture")
    with pytest.raises(ValueError, match="no sample site 'w'"):
        fit_local_guide(lg.model, lg.wrong_guide, x, site="w")
    assert D64 is torch.float64


def linear_gaussian_vae(covariance: str, flow: str | None = None) -> VAE:
    """A VAE whose decoder is one linear layer and whose likelihood is N(Wz + b, 0.5² I): its
    posterior is Gaussian with precision Λ = I + WᵀW / 0.25."""
    torch.manual_seed(3)
    vae = VAE(
        x_dim=6,
        z_dim=3,
        hidden=(),
        likelihood="gaussian",
        x_scale=0.5,
        covariance=covariance,
        flow=flow,
    ).double()
    with torch.no_grad():
        vae.decoder.net[0].weight.mul_(3.0)  # a strongly correlated posterior
    return vae


def vae_posterior(vae: VAE, x):
    w, b = vae.decoder.net[0].weight.detach(), vae.decoder.net[0].bias.detach()
    precision = torch.eye(vae.z_dim, dtype=D64) + w.T @ w / 0.25
    cov = torch.linalg.inv(precision)
    return (x - b) @ w @ cov / 0.25, cov, precision


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_a_vaes_own_family_reaches_the_closed_form_optimum(covariance):
    """q* in the VAE's own family (the encoder's unconstrained outputs, per image): the
    posterior itself for a full covariance, the closed-form diagonal optimum otherwise."""
    vae = linear_gaussian_vae(covariance)
    x = torch.randn(4, 6, dtype=D64) * 3
    local, fit = fit_local_guide(vae.model, vae.guide, x, **FIT)
    assert fit["family"] == "own" and fit["converged"]
    mean, cov, precision = vae_posterior(vae, x)
    q = local.distribution()
    if isinstance(q, dist.Independent):
        q = dist.MultivariateNormal(q.base_dist.loc, torch.diag_embed(q.base_dist.scale**2))
    kl = torch.distributions.kl_divergence(q, dist.MultivariateNormal(mean, cov)).detach()
    gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert gap > 0.2  # the posterior is correlated enough for the two families to differ
    expected = 0.0 if covariance == "full" else float(gap)
    assert (kl - expected).abs().max() < 0.02


def test_a_flow_guides_own_family_is_fitted_and_its_gaps_add_up():
    vae = linear_gaussian_vae("diagonal", flow="iaf")
    x = torch.randn(4, 6, dtype=D64) * 3
    pyro.set_rng_seed(4)
    fast = {**FIT, "window": 50, "halvings": 3, "max_steps": 1500}
    report = inference_gaps(
        vae.model, vae.guide, x, num_particles=200, elbo_particles=4000, fit_options=fast
    )
    s = report.summary()
    assert s["fit"]["family"] == "own"
    # an untrained encoder: the per-image optimum of the same family is far better
    assert (report.amortisation_gap > 1.0).all()
    exact = dist.MultivariateNormal(
        vae.decoder.net[0].bias.detach(),
        vae.decoder.net[0].weight.detach() @ vae.decoder.net[0].weight.detach().T
        + 0.25 * torch.eye(6, dtype=D64),
    ).log_prob(x)
    # q* is a proper density: its ELBO stays below log p(x), here within a nat of it
    assert ((exact - report.elbo_local) > -0.01).all()
    assert ((exact - report.elbo_local) < 1.0).all()


def test_family_own_needs_a_guide_that_exposes_its_family():
    lg = LinearGaussian()
    with pytest.raises(ValueError, match="family 'own' needs"):
        fit_local_guide(lg.model, lg.wrong_guide, lg.sample_x(2), family="own")


# -- several latent sites: q* is one Gaussian over both layers of the chain ----------------------


def chain_posterior(lg: LinearGaussianChain, x, order=("z1", "z2")):
    """The exact joint posterior of (z1, z2) given x, concatenated in ``order``: mean (N, 5)
    and covariance (5, 5).  p(z1 | x) is Gaussian and p(z2 | z1, x) = p(z2 | z1) is linear."""
    gain, s1 = lg.gain[0], lg.post_cov
    m1 = lg.post_mean(x)
    m2 = lg.cond_mean(0, m1)
    s21 = gain @ s1
    s22 = gain @ s1 @ gain.T + lg.cond_cov[0]
    mean = torch.cat([m1, m2], -1)
    cov = torch.cat([torch.cat([s1, s21.T], 1), torch.cat([s21, s22], 1)], 0)
    if tuple(order) == ("z2", "z1"):
        perm = torch.tensor([3, 4, 0, 1, 2])
        mean, cov = mean[:, perm], cov[perm][:, perm]
    return mean, cov


def shifted_guide(lg: LinearGaussianChain, d1: float = 0.6, d2: float = -0.4):
    """The exact bottom-up posterior q(z1 | x) q(z2 | z1) with both means shifted: its joint
    is the posterior moved by (d1, G d1 + d2), so KL to the posterior is in closed form."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(lg.post_mean(x) + d1, lg.post_cov))
            pyro.sample("z2", dist.MultivariateNormal(lg.cond_mean(0, z1) + d2, lg.cond_cov[0]))

    def kl(x):
        delta1 = torch.full((3,), d1, dtype=D64)
        delta = torch.cat([delta1, lg.gain[0] @ delta1 + d2])
        _, cov = chain_posterior(lg, x)
        return 0.5 * delta @ torch.linalg.solve(cov, delta)

    return guide, kl


def top_down_guide(lg: LinearGaussianChain):
    """A wrong guide that draws z2 first, then z1 given z2: q*'s blocks follow that order."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(2, dtype=D64), 1.0).to_event(1))
            loc = z2 @ lg.A[0].T + lg.a[0]
            pyro.sample("z1", dist.Normal(loc, 0.5).to_event(1))

    return guide


def joint_kl(local, mean, cov):
    q = local.distribution()
    if isinstance(q, dist.Independent):
        q = dist.MultivariateNormal(q.base_dist.loc, torch.diag_embed(q.base_dist.scale**2))
    return torch.distributions.kl_divergence(q, dist.MultivariateNormal(mean, cov)).detach()


@pytest.mark.parametrize("order", [("z1", "z2"), ("z2", "z1")])
def test_q_star_over_two_layers_is_the_joint_posterior_or_its_closed_form_diagonal_optimum(order):
    """Full: q*, drawn layer by layer from its Cholesky blocks, is the joint posterior in
    either order of the sites.  Diagonal: the mean-field optimum, KL 0.5 (Σ log Λ_ii − log|Λ|)."""
    pyro.set_rng_seed(5)
    lg = LinearGaussianChain()
    x = lg.sample_x(3)
    guide = shifted_guide(lg)[0] if order == ("z1", "z2") else top_down_guide(lg)
    mean, cov = chain_posterior(lg, x, order)
    fast = {**FIT, "window": 50, "halvings": 4}
    local, fit = fit_local_guide(lg.model, guide, x, **fast)
    assert fit["family"] == "full" and fit["sites"] == list(order) and fit["converged"]
    assert joint_kl(local, mean, cov).max() < 0.02
    assert torch.allclose(local.loc.detach(), mean, atol=0.05)
    precision = torch.linalg.inv(cov)
    gap = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    assert gap > 0.1  # the layers are correlated enough for the families to differ
    local, fit = fit_local_guide(lg.model, guide, x, family="diagonal", **fast)
    assert (joint_kl(local, mean, cov) - gap).abs().max() < 0.02


def test_the_gaps_of_a_two_layer_guide_match_the_closed_form():
    """A shifted bottom-up guide: log p(x) exact, no approximation gap (q* is the
    posterior), and an amortisation gap of KL(q || p(z1, z2 | x)); the exact guide has none."""
    pyro.set_rng_seed(6)
    lg = LinearGaussianChain()
    x = lg.sample_x(6)
    exact = lg.exact_log_px(x)
    fast = {**FIT, "window": 50, "halvings": 4}
    guide, kl = shifted_guide(lg)
    wrong = inference_gaps(
        lg.model, guide, x, num_particles=200, elbo_particles=2000, fit_options=fast
    )
    s = wrong.summary()
    assert s["status"] == "ok" and s["amortised_guide_in_family"] is False
    assert (wrong.log_px - exact).abs().max() < 0.02
    assert abs(s["approximation_gap"]["mean"]) < 0.03
    expected = float(kl(x))
    assert expected > 0.3
    tolerance = 4 * s["amortisation_gap"]["sem"] + 0.03
    assert abs(s["amortisation_gap"]["mean"] - expected) < tolerance
    right = inference_gaps(
        lg.model, lg.exact_guide, x, num_particles=200, elbo_particles=1000, fit_options=fast
    )
    assert torch.allclose(right.elbo_amortised, exact, atol=1e-6)  # every weight is p(x)
    assert abs(right.summary()["amortisation_gap"]["mean"]) < 0.03


def test_family_own_over_several_sites_needs_guide_from():
    lg = LinearGaussianChain()
    with pytest.raises(ValueError, match="posterior_parameters.x. and guide_from"):
        fit_local_guide(lg.model, lg.exact_guide, lg.sample_x(2), family="own")


def test_a_negative_amortisation_gap_is_refused_also_outside_the_guides_family():
    """A Gaussian q* over several layers need not hold the amortised guide, but a split in
    which it fits worse than the guide is still no decomposition: refused, not printed."""
    from pyro_vae.apps.gaps import GapFitError, GapReport

    log_px = torch.tensor([-90.0, -91.0], dtype=D64)
    elbo_local = torch.tensor([-95.0, -92.0], dtype=D64)
    elbo_amortised = torch.tensor([-93.0, -96.0], dtype=D64)
    report = GapReport(log_px, elbo_local, elbo_amortised, 100, nested=False)
    assert report.failures() == {
        0: "q*'s ELBO ends below the amortised guide's, which its family does not hold"
    }
    assert report.summary()["status"] == "failed fit"
    with pytest.raises(GapFitError, match="or another family"):
        report.check()


def test_log_px_combines_both_proposals_and_a_fit_that_misses_mass_is_refused():
    from pyro_vae.apps.gaps import GapReport, combine_estimates

    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # an exact proposal (no spread) takes all the weight; equal errors average p, not log p
    log_px, w = combine_estimates(t(-10.0, -10.0), t(0.0, 0.1), t(-12.0, -11.0), t(0.5, 0.1))
    assert float(w[0]) == pytest.approx(1.0) and float(log_px[0]) == pytest.approx(-10.0)
    assert float(log_px[1]) == pytest.approx(math.log(0.5 * math.exp(-10) + 0.5 * math.exp(-11)))
    # q*'s estimate far below the amortised guide's (a fit that collapsed): refused, whatever
    # its own error says; the amortised guide's falling short is what a worse proposal does
    report = GapReport(
        log_px=t(-200.0, -100.0),
        elbo_local=t(-370.0, -101.0),
        elbo_amortised=t(-210.0, -110.0),
        num_particles=100,
        log_px_local=t(-369.0, -100.0),
        log_px_amortised=t(-200.0, -104.0),
        log_px_local_sem=t(0.01, 0.01),
        log_px_amortised_sem=t(0.5, 0.5),
    )
    failed = report.failures()
    assert "falls short of the amortised guide's" in failed[0] or "q*'s ELBO" in failed[0]
    assert 1 not in failed
    with pytest.raises(GapFitError):
        report.check()
    only_evidence = GapReport(
        log_px=t(-200.0),
        elbo_local=t(-201.0),
        elbo_amortised=t(-202.0),
        num_particles=100,
        log_px_local=t(-205.0),
        log_px_amortised=t(-200.0),
        log_px_local_sem=t(0.01),
        log_px_amortised_sem=t(0.5),
    )
    assert "falls short" in only_evidence.failures()[0]
