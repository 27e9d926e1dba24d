"""The importance-weighted estimator against models whose log p(x) is known exactly."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact_models import D64, LinearGaussian
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights

from pyro_vae import VAE, estimate_log_px, log_weights


@pytest.mark.parametrize("k", [1, 5, 50, 5000])
def test_exact_posterior_gives_exact_log_px_for_every_k(k):
    lg = LinearGaussian()
    x = lg.sample_x(8)
    r = estimate_log_px(lg.model, lg.exact_guide, x, num_particles=k, psis=False)
    exact = lg.exact_log_px(x)
    assert torch.allclose(r.log_px, exact, atol=1e-4)
    assert torch.allclose(r.elbo, exact, atol=1e-4)
    assert r.gap.abs().max() < 1e-4


def test_wrong_guide_bounds_order_and_gap_is_the_kl():
    lg = LinearGaussian()
    x = lg.sample_x(40)
    r = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=5000)
    exact = lg.exact_log_px(x)
    kl = lg.kl_wrong_to_posterior(x)
    assert kl.mean() > 0.5  # the guide is wrong enough for the ordering to mean something
    means = {k: float(v.mean()) for k, v in r.bound_vs_k.items()}
    elbo = float(r.elbo.mean())
    assert elbo < means[5] < means[50] < means[500] <= means[5000] + 1e-9
    # Monte-Carlo tolerances from the estimator's own standard errors, five of them per
    # datapoint: for log p̂_K the delta method gives sd ~ sqrt((K / ESS - 1) / K); for the
    # ELBO, the sample sd of log w over sqrt(K).
    se, k = se_log_px(r), r.num_particles
    lw = log_weights(lg.model, lg.wrong_guide, x, num_particles=k)
    se_elbo = lw.std(0) / math.sqrt(k)
    assert ((r.log_px - exact).abs() < 5 * se + 1e-3).all()
    assert ((r.elbo - (exact - kl)).abs() < 5 * se_elbo).all()
    assert ((r.gap - kl).abs() < 5 * (se_elbo + se)).all()
    # and on average over the 40 datapoints, far tighter
    assert abs(float((r.log_px - exact).mean())) < 0.01
    assert abs(float((r.gap - kl).mean())) < 0.03
    assert r.khat is not None and (r.khat < 0.7).all()
    assert (r.ess > 100).all()


def test_elbo_matches_pyros_trace_elbo():
    lg = LinearGaussian()
    x = lg.sample_x(30)
    r = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=2000, psis=False)
    pyro.set_rng_seed(0)
    loss = Trace_ELBO(num_particles=2000, vectorize_particles=True).loss(
        lg.model, lg.wrong_guide, x
    )
    assert -loss / len(x) == pytest.approx(float(r.elbo.mean()), abs=0.02)


def test_matches_pyros_vectorized_importance_weights_on_one_datapoint():
    lg = LinearGaussian()
    x = lg.sample_x(1)
    pyro.set_rng_seed(5)
    ours = log_weights(lg.model, lg.wrong_guide, x, num_particles=64)
    pyro.set_rng_seed(5)
    theirs, _, _ = vectorized_importance_weights(
        lg.model, lg.wrong_guide, x, num_samples=64, max_plate_nesting=1, normalized=False
    )
    assert ours.shape == (64, 1)
    assert torch.allclose(ours[:, 0], theirs, atol=1e-8)


def test_per_datapoint_weights_sum_to_pyros_batch_weights():
    lg = LinearGaussian()
    x = lg.sample_x(6)
    pyro.set_rng_seed(9)
    ours = log_weights(lg.model, lg.wrong_guide, x, num_particles=10)
    pyro.set_rng_seed(9)
    theirs, _, _ = vectorized_importance_weights(
        lg.model, lg.wrong_guide, x, num_samples=10, max_plate_nesting=1, normalized=False
    )
    assert ours.shape == (10, 6)
    assert torch.allclose(ours.sum(1), theirs, atol=1e-8)


def se_log_px(r):
    """Delta-method standard error of log p̂_K(x) per datapoint."""
    return ((r.num_particles / r.ess - 1) / r.num_particles).sqrt()


class Mixture:
    """y ~ Cat(pi), x | y ~ N(mu_y, s^2 I): log p(x) = logsumexp_y of the joint, exactly."""

    def __init__(self):
        self.logits = torch.tensor([0.2, -0.5, 0.9], dtype=D64)
        self.mu = torch.tensor([[-2.0, 0.0], [0.0, 1.5], [2.0, -1.0]], dtype=D64)
        self.sigma = 1.1

    def joint(self, x):  # (N, C)
        lp_x = dist.Normal(self.mu, self.sigma).to_event(1).log_prob(x[:, None, :])
        return torch.log_softmax(self.logits, 0) + lp_x

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=self.logits))
            pyro.sample("x", dist.Normal(self.mu[y], self.sigma).to_event(1), obs=x)

    def exact_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=self.joint(x)))

    def uniform_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=torch.zeros(x.shape[0], 3, dtype=D64)))


def test_discrete_latent_summed_exactly():
    m = Mixture()
    x = torch.tensor([[-2.1, 0.3], [0.1, 1.0], [1.0, -0.5], [3.0, 3.0]], dtype=D64)
    exact = torch.logsumexp(m.joint(x), 1)
    r = estimate_log_px(m.model, m.exact_guide, x, num_particles=7, psis=False)
    assert torch.allclose(r.log_px, exact, atol=1e-6) and r.gap.abs().max() < 1e-6
    r = estimate_log_px(m.model, m.uniform_guide, x, num_particles=5000)
    posterior = torch.softmax(m.joint(x), 1)
    kl_uniform = (torch.full_like(posterior, 1 / 3) * (math.log(1 / 3) - posterior.log())).sum(1)
    assert ((r.log_px - exact).abs() < 5 * se_log_px(r) + 1e-3).all()
    lw = log_weights(m.model, m.uniform_guide, x, num_particles=5000)
    se_elbo = lw.std(0) / math.sqrt(5000)
    assert ((r.gap - kl_uniform).abs() < 5 * (se_log_px(r) + se_elbo)).all()
    means = {k: float(v.mean()) for k, v in r.bound_vs_k.items()}
    assert float(r.elbo.mean()) < means[5] < means[50] <= means[5000] + 0.01


def test_training_scales_do_not_leak():
    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=2, hidden=(5,))
    x = torch.bernoulli(torch.full((4, 12), 0.4))
    pyro.set_rng_seed(2)
    plain = log_weights(vae.model, vae.guide, x, num_particles=50)
    vae.beta = 0.25
    pyro.set_rng_seed(2)
    weighted = log_weights(vae.model, vae.guide, x, num_particles=50)
    pyro.set_rng_seed(2)
    scaled = log_weights(
        poutine.scale(vae.model, 10.0), poutine.scale(vae.guide, 10.0), x, num_particles=50
    )
    assert torch.equal(plain, weighted) and torch.equal(plain, scaled)


def test_chunking_does_not_change_the_answer():
    lg = LinearGaussian()
    x = lg.sample_x(10)
    pyro.set_rng_seed(0)
    whole = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=100, psis=False)
    pyro.set_rng_seed(0)
    chunked = estimate_log_px(
        lg.model, lg.wrong_guide, x, num_particles=100, psis=False, max_rows=1000
    )
    assert whole.log_px.shape == chunked.log_px.shape == (10,)
    assert (whole.log_px - chunked.log_px).abs().max() < 0.1  # different draws, same target
    s = chunked.summary()
    assert s["nll"] == -s["log_px"] and s["gap"] == pytest.approx(s["log_px"] - s["elbo"])


def test_site_outside_the_data_plate_is_an_error():
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="outside plate 'data'"):
        log_weights(model, guide, torch.zeros(3), num_particles=2)


def test_seeded_chunks_give_the_same_values_whatever_the_shards():
    """With a seed, each chunk's draws depend on its position only: aligned shards evaluated
    separately (as ranks do) reproduce the whole bit for bit, and the global RNG is untouched."""
    from pyro_vae.inference.evaluate import eval_batch_size

    lg = LinearGaussian()
    x = lg.sample_x(23)
    k, size = 40, 5
    assert eval_batch_size(k) == 32768 // 40  # the default chunk depends on K only
    state = torch.get_rng_state()
    whole = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=k, batch_size=size, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    parts = [
        estimate_log_px(
            lg.model,
            lg.wrong_guide,
            x[a:b],
            num_particles=k,
            batch_size=size,
            seed=3,
            first_index=a,
        )
        for a, b in ((0, 10), (10, 15), (15, 23))
    ]
    for field in ("log_px", "elbo", "ess", "khat"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts]))
    other = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=k, batch_size=size, seed=4)
    assert not torch.equal(whole.log_px, other.log_px)


@pytest.mark.parametrize("seed", [None, 3])
def test_max_rows_bounds_memory_and_changes_no_number(seed):
    """The model is replayed on slices of the particles a chunk drew at once: 7, 50 or 1000
    rows per pass give the values of one pass, bit for bit (with a seed, or from one global
    RNG state)."""
    lg = LinearGaussian()
    x = lg.sample_x(9)
    results = []
    for max_rows in (7, 50, 1000, 1 << 15):
        torch.manual_seed(0)
        r = estimate_log_px(
            lg.model, lg.wrong_guide, x, num_particles=60, max_rows=max_rows, seed=seed
        )
        results.append(r)
    for r in results[1:]:
        for field in ("log_px", "elbo", "ess", "khat"):
            assert torch.equal(getattr(r, field), getattr(results[0], field))
        assert all(torch.equal(r.bound_vs_k[k], results[0].bound_vs_k[k]) for k in r.bound_vs_k)


def test_a_k_above_the_particles_is_refused_and_float64_images_are_cast():
    from pyro_vae import VAE, estimate_log_px

    torch.manual_seed(0)
    vae = VAE(z_dim=3, hidden=(8,))
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    with pytest.raises(ValueError, match=r"ks \[20\].*num_particles \(10\)"):
        estimate_log_px(vae.model, vae.guide, x, ks=(20,), num_particles=10)
    # the default curve stops at K without a word
    assert sorted(estimate_log_px(vae.model, vae.guide, x, num_particles=60).bound_vs_k) == [
        1,
        5,
        50,
    ]
    single = estimate_log_px(vae.model, vae.guide, x, num_particles=10, seed=0)
    double = estimate_log_px(vae.model, vae.guide, x.double(), num_particles=10, seed=0)
    torch.testing.assert_close(single.log_px, double.log_px)
