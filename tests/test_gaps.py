"""The gap decomposition against closed forms on the linear-Gaussian model, whose posterior
is Gaussian with precision Λ = I + WᵀW/σ²."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact_models import D64, LinearGaussian

from pyro_vae.gaps import fit_local_guide, inference_gaps

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
