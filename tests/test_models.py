import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.nn import functional as F

from pyro_vae import VAE


def traces(vae, x):
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    return model_trace, guide_trace


def test_trace_shapes_and_log_probs():
    vae = VAE(x_dim=20, z_dim=3, hidden=(8,), image_shape=(4, 5))
    x = torch.bernoulli(torch.full((7, 20), 0.3))
    model_trace, guide_trace = traces(vae, x)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    assert guide_trace.nodes["z"]["value"].shape == (7, 3)
    assert model_trace.nodes["z"]["log_prob"].shape == (7,)
    assert model_trace.nodes["x"]["log_prob"].shape == (7,)
    assert model_trace.nodes["x"]["is_observed"]
    z = guide_trace.nodes["z"]["value"]
    logits = vae.decoder(z)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    assert torch.allclose(model_trace.nodes["x"]["log_prob"], expected, atol=1e-5)
    loc, scale = vae.encoder(x)
    q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    assert torch.allclose(guide_trace.nodes["z"]["log_prob"], q, atol=1e-5)
    assert (scale > 0).all()


def test_validation_rejects_grey_pixels_for_bernoulli():
    vae = VAE(x_dim=4, z_dim=2, hidden=(3,))
    with pytest.raises(ValueError):
        Trace_ELBO().loss(vae.model, vae.guide, torch.full((2, 4), 0.5))


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_beta_weights_exactly_the_kl(elbo_cls):
    x = torch.bernoulli(torch.full((6, 12), 0.4))
    torch.manual_seed(1)
    vae = VAE(x_dim=12, z_dim=2, hidden=(5,))
    losses = []
    for beta in (0.5, 1.0, 2.0):
        vae.beta = beta
        pyro.set_rng_seed(3)
        losses.append(float(elbo_cls().loss(vae.model, vae.guide, x)))
    kl = losses[2] - losses[1]  # loss(beta) = -E log p(x|z) + beta * KL, linear in beta
    assert 2 * (losses[1] - losses[0]) == pytest.approx(kl, rel=1e-4, abs=1e-4)
    if elbo_cls is TraceMeanField_ELBO:
        loc, scale = vae.encoder(x)
        exact = torch.distributions.kl_divergence(
            torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
        ).sum()
        assert kl == pytest.approx(float(exact.detach()), rel=1e-4)


def test_gaussian_likelihood_learned_and_fixed_scale():
    x = torch.randn(5, 6)
    learned = VAE(x_dim=6, z_dim=2, hidden=(4,), likelihood="gaussian")
    assert any(n == "x_raw_scale" for n, _ in learned.named_parameters())
    model_trace, _ = traces(learned, x)
    fn = model_trace.nodes["x"]["fn"]
    assert torch.allclose(fn.base_dist.scale, torch.ones(6), atol=1e-3)
    fixed = VAE(x_dim=6, z_dim=2, hidden=(4,), likelihood="gaussian", x_scale=0.1)
    model_trace, _ = traces(fixed, x)
    assert torch.allclose(model_trace.nodes["x"]["fn"].base_dist.scale, torch.tensor(0.1))
    assert isinstance(model_trace.nodes["x"]["fn"].base_dist, dist.Normal)


def test_plain_svi_with_pyro_optim_trains_the_vae():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(1, 30).expand(64, 30))
    vae = VAE(x_dim=30, z_dim=2, hidden=(16,))
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    first = sum(svi.evaluate_loss(x) for _ in range(10)) / 10
    for _ in range(150):
        svi.step(x)
    last = sum(svi.evaluate_loss(x) for _ in range(10)) / 10
    assert last < first - 100


def test_conveniences_shapes():
    vae = VAE(x_dim=12, z_dim=3, hidden=(5,), image_shape=(3, 4))
    x = torch.rand(4, 12)
    assert vae.reconstruct(x).shape == (4, 12)
    s = vae.sample(6, generator=torch.Generator().manual_seed(0))
    assert s.shape == (6, 12) and (s >= 0).all() and (s <= 1).all()
    assert torch.equal(s, vae.sample(6, generator=torch.Generator().manual_seed(0)))
    assert vae.config()["image_shape"] == [3, 4]
    assert VAE(**vae.config()).config() == vae.config()
    with pytest.raises(ValueError, match="likelihood"):
        VAE(likelihood="poisson")


def test_full_covariance_guide_starts_diagonal_and_learns_correlations():
    torch.manual_seed(0)
    full = VAE(x_dim=12, z_dim=3, hidden=(8,), covariance="full")
    diagonal = VAE(x_dim=12, z_dim=3, hidden=(8,))
    diagonal.encoder.load_state_dict(full.encoder.state_dict())
    x = torch.bernoulli(torch.full((5, 12), 0.5))
    z = torch.randn(7, 5, 3)
    q = full.posterior(x)
    assert isinstance(q, dist.MultivariateNormal) and q.event_shape == (3,)
    assert torch.allclose(q.log_prob(z), diagonal.posterior(x).log_prob(z), atol=1e-5)
    # the strict lower triangle of the scale comes from the extra head, row by row
    with torch.no_grad():
        full.tril_head.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    tril = full.posterior(x).scale_tril[0]
    loc, scale = full.encoder(x[:1])
    expected = torch.diag(scale[0]) + torch.tensor([[0, 0, 0], [0.5, 0, 0], [-1.0, 2.0, 0]])
    assert torch.allclose(tril, expected)
    assert torch.allclose(full.encode(x)[1][0], expected.pow(2).sum(-1).sqrt())
    before = full.tril_head.weight.detach().clone()
    svi = SVI(full.model, full.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(x)
    assert not torch.equal(before, full.tril_head.weight)


def test_covariance_and_flow_are_checked():
    with pytest.raises(ValueError, match="unknown covariance"):
        VAE(covariance="banded")
    with pytest.raises(ValueError, match="diagonal"):
        VAE(covariance="full", flow="iaf")
