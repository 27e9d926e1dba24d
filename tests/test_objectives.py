"""IWAE and DReG against exact answers: the linear-Gaussian model, whose evidence and
posterior are known in closed form."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from exact_models import D64, LinearGaussian, LinearGaussianChain
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO

from pyro_vae import VAE, Trainer, estimate_log_px, make_elbo
from pyro_vae.inference.objectives import IWAE, DReG, ObjectiveError
from pyro_vae.training.schedules import KLWeight


def exact_guide_with_params(lg):
    """The exact posterior written with trainable parameters (an offset and a Cholesky
    factor), set to their optimum."""
    offset = torch.zeros(lg.z_dim, dtype=D64, requires_grad=True)
    tril = torch.linalg.cholesky(lg.post_cov).clone().requires_grad_()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(lg.post_mean(x) + offset, scale_tril=tril))

    return guide, [offset, tril]


def replicated_wrong_guide(lg, n):
    """A wrong diagonal guide with one set of parameters per row, so that one backward pass
    over n copies of the same x gives n independent gradient draws (one per row)."""
    sd = lg.post_cov.diagonal().sqrt()
    loc = (0.5 * sd).expand(n, -1).clone().requires_grad_()
    log_scale = torch.log(1.3 * sd).expand(n, -1).clone().requires_grad_()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(lg.post_mean(x) + loc, log_scale.exp()).to_event(1))

    return guide, loc, log_scale


@pytest.mark.parametrize("k", [1, 5, 50])
def test_exact_posterior_every_weight_is_p_x_and_dregs_guide_gradient_is_zero(k):
    lg = LinearGaussian()
    x = lg.sample_x(6)
    exact = float(lg.exact_log_px(x).sum())
    for seed in range(3):
        grads = {}
        for cls in (IWAE, DReG):
            guide, params = exact_guide_with_params(lg)
            pyro.set_rng_seed(seed)
            loss = cls(k).differentiable_loss(lg.model, guide, x)
            assert float(loss.detach()) == pytest.approx(-exact, abs=1e-9)
            loss.backward()
            grads[cls] = max(float(p.grad.abs().max()) for p in params)
        assert grads[DReG] < 1e-10  # exactly zero on every draw
        assert grads[IWAE] > 1e-2  # zero only in expectation


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("n", [1, 9])
def test_the_bound_is_the_evaluators_log_p_hat_and_renyis_on_the_same_draws(k, n):
    lg = LinearGaussian()
    x = lg.sample_x(n)
    pyro.set_rng_seed(3)
    ours = IWAE(k).loss(lg.model, lg.wrong_guide, x)
    pyro.set_rng_seed(3)
    evaluated = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=k, psis=False, ks=())
    pyro.set_rng_seed(3)
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    assert ours == pytest.approx(-float(evaluated.log_px.sum()), abs=1e-9)
    assert ours == pytest.approx(renyi.loss(lg.model, lg.wrong_guide, x), abs=1e-9)
    if k == 1:  # one particle: the bound is the ELBO
        assert ours == pytest.approx(-float(evaluated.elbo.sum()), abs=1e-9)


def plate_model(lg, n_full):
    def model(x, idx):
        with pyro.plate("data", n_full, subsample=idx):
            z = pyro.sample("z", dist.Normal(torch.zeros(lg.z_dim, dtype=D64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x)

    def guide(x, idx):
        with pyro.plate("data", n_full, subsample=idx):
            pyro.sample("z", lg.wrong_q(x))

    return model, guide


def test_subsampling_scales_the_batch_bound_and_is_unbiased_for_the_full_data_bound():
    lg = LinearGaussian()
    n_full, b, k = 64, 16, 10
    x_all = lg.sample_x(n_full)
    model, guide = plate_model(lg, n_full)
    idx = torch.arange(5, 5 + b)
    pyro.set_rng_seed(1)
    ours = IWAE(k).loss(model, guide, x_all[idx], idx)
    pyro.set_rng_seed(1)
    plain = IWAE(k).loss(lg.model, lg.wrong_guide, x_all[idx])
    assert ours == pytest.approx(n_full / b * plain, rel=1e-12)
    # Pyro's RenyiELBO puts the scaled log-probs inside the logsumexp: not the IWAE bound.
    pyro.set_rng_seed(1)
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    assert abs(renyi.loss(model, guide, x_all[idx], idx) - ours) > 10
    # In expectation over batches and draws, the subsampled loss is the full-data loss.
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(300):
        idx = torch.randperm(n_full, generator=g)[:b]
        draws.append(IWAE(k).loss(model, guide, x_all[idx], idx))
    draws = torch.tensor(draws, dtype=D64)
    full = torch.tensor([IWAE(k).loss(lg.model, lg.wrong_guide, x_all) for _ in range(300)])
    se = math.sqrt(draws.var() / len(draws) + full.var() / len(full))
    assert abs(float(draws.mean() - full.mean())) < 4 * se


def guide_gradients(cls, lg, k, n, seed):
    x = lg.sample_x(1).expand(n, -1)
    guide, loc, log_scale = replicated_wrong_guide(lg, n)
    pyro.set_rng_seed(seed)
    cls(k).differentiable_loss(lg.model, guide, x).backward()
    return loc.grad, log_scale.grad


def test_dreg_guide_gradient_is_unbiased_for_iwaes():
    lg = LinearGaussian()
    n = 4000
    for k in (1, 8):
        iwae = torch.cat(guide_gradients(IWAE, lg, k, n, seed=0), 1)
        dreg = torch.cat(guide_gradients(DReG, lg, k, n, seed=1), 1)
        se = (iwae.var(0) / n + dreg.var(0) / n).sqrt()
        assert ((iwae.mean(0) - dreg.mean(0)).abs() < 4 * se).all()
        assert (dreg.var(0) < iwae.var(0)).all()  # and with less variance


def test_signal_to_noise_of_the_guide_gradient_rises_with_k_for_dreg_and_falls_for_iwae():
    """Rainforth et al. (2018): O(1/sqrt(K)) for IWAE's inference network, growing for DReG."""
    lg = LinearGaussian()
    n = 4000

    def snr(cls, k):
        loc_grad, _ = guide_gradients(cls, lg, k, n, seed=k)
        return float((loc_grad.mean(0).abs() / loc_grad.std(0)).mean())

    assert snr(IWAE, 64) < snr(IWAE, 1)
    assert snr(DReG, 64) > 2 * snr(DReG, 1)


def test_model_gradients_of_iwae_and_dreg_are_identical():
    lg = LinearGaussian()
    x = lg.sample_x(5)
    grads = []
    for cls in (IWAE, DReG):
        w = lg.W.clone().requires_grad_()

        def model(x, w=w):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(torch.zeros(lg.z_dim, dtype=D64), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z @ w.T + lg.b, lg.sigma).to_event(1), obs=x)

        guide, _, _ = replicated_wrong_guide(lg, 5)
        pyro.set_rng_seed(2)
        cls(6).differentiable_loss(model, guide, x).backward()
        grads.append(w.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_a_kl_weight_is_a_temperature_inside_the_weights_and_other_scales_are_refused():
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    vae = VAE(z_dim=3, hidden=(8,), beta=2.0)  # its latent site scaled by 2 in model and guide
    plain = VAE(z_dim=3, hidden=(8,))
    plain.load_state_dict(vae.state_dict())
    for name in ("iwae", "dreg"):
        pyro.set_rng_seed(0)
        tempered = make_elbo(name, num_particles=3).loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(0)
        with KLWeight(2.0):  # the same weight, applied from outside
            outside = make_elbo(name, num_particles=3).loss(plain.model, plain.guide, x)
        assert tempered == pytest.approx(outside, rel=1e-6)
        pyro.set_rng_seed(0)
        assert abs(make_elbo(name, num_particles=3).loss(plain.model, plain.guide, x) - outside) > 1
    # the observed site scaled (the whole model in poutine.scale): refused
    scaled_model = poutine.scale(plain.model, scale=0.5)
    with pytest.raises(ObjectiveError, match="observed site 'x' is scaled by 0.5"):
        IWAE(2).loss(scaled_model, plain.guide, x)
    # latent sites of model and guide scaled by different factors: refused
    with pytest.raises(ObjectiveError, match="one KL weight for every latent site"):
        IWAE(2).loss(plain.model, KLWeight(3.0)(plain.guide), x)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.3))

    for cls in (IWAE, DReG):
        with pytest.raises(ObjectiveError, match="'c' .*Bernoulli.* no rsample"):
            cls(2).differentiable_loss(model, guide, torch.zeros(3))


def test_iwae_with_one_group_of_many_is_miwae():
    lg = LinearGaussian()
    x = lg.sample_x(4)
    pyro.set_rng_seed(0)
    miwae = IWAE(5, num_groups=3).loss(lg.model, lg.wrong_guide, x)
    pyro.set_rng_seed(0)
    lw = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=15, psis=False, ks=(5,))
    # the evaluator's k = 5 curve point is the mean over the three groups of five
    assert miwae == pytest.approx(-float(lw.bound_vs_k[5].sum()), abs=1e-9)


@pytest.mark.parametrize("name", ["iwae", "dreg"])
def test_trains_a_vae_with_svi_the_trainer_and_as_a_module(name):
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(64, 784, generator=g) * 0.5)
    vae = VAE(z_dim=4, hidden=(32,))
    elbo = make_elbo(name, num_particles=4)
    trainer = Trainer(vae.model, vae.guide, lr=3e-3, elbo=elbo)
    before = elbo.loss(vae.model, vae.guide, x)
    for _ in range(60):
        trainer.step(x)
    assert elbo.loss(vae.model, vae.guide, x) < before - 50
    # the same object drives pyro.infer.SVI ...
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    assert math.isfinite(svi.step(x))
    # ... and is an nn.Module factory as Pyro's ELBOs are
    pyro.set_rng_seed(4)
    as_module = elbo(vae.model, vae.guide)(x)
    pyro.set_rng_seed(4)
    assert float(as_module.detach()) == pytest.approx(elbo.loss(vae.model, vae.guide, x), rel=1e-6)


def test_one_particle_iwae_is_the_trace_elbo():
    lg = LinearGaussian()
    x = lg.sample_x(7)
    pyro.set_rng_seed(8)
    ours = IWAE(1).loss(lg.model, lg.wrong_guide, x)
    pyro.set_rng_seed(8)
    assert ours == pytest.approx(Trace_ELBO().loss(lg.model, lg.wrong_guide, x), abs=1e-9)


def test_sites_outside_the_data_plate_are_refused():
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.1, 1.0))

    with pytest.raises(ValueError, match="'w' is outside plate 'data'"):
        IWAE(3).loss(model, guide, torch.zeros(4))


def test_a_flow_guide_has_a_correct_density_and_trains_with_every_objective():
    """On the linear-Gaussian model: a flow guide's ELBO stays below log p(x), and its
    importance-weighted estimate converges to the exact log p(x) (the Jacobians are right)."""
    from pyro.distributions import transforms

    lg = LinearGaussian()
    x = lg.sample_x(5)
    torch.manual_seed(0)
    flow = transforms.affine_autoregressive(lg.z_dim, hidden_dims=[8]).double()

    def flow_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(lg.wrong_q(x), [flow]))

    exact = lg.exact_log_px(x)
    r = estimate_log_px(lg.model, flow_guide, x, num_particles=20000, psis=False)
    assert (r.elbo < exact + 0.02).all()
    assert (r.log_px - exact).abs().max() < 0.05
    vae = VAE(z_dim=3, hidden=(16,), flow="iaf", flow_depth=2)
    xb = torch.bernoulli(torch.full((16, 784), 0.3))
    for name in ("trace", "iwae", "dreg"):
        trainer = Trainer(vae.model, vae.guide, lr=1e-2, elbo=name, num_particles=3)
        before = [p.detach().clone() for p in vae.flows.parameters()]
        trainer.step(xb)
        assert all(not torch.equal(a, p) for a, p in zip(before, vae.flows.parameters()))
    planar = VAE(z_dim=3, hidden=(16,), flow="planar")
    with pytest.raises(ObjectiveError, match="planar"):
        make_elbo("dreg", num_particles=2).differentiable_loss(planar.model, planar.guide, xb)


# -- guides whose sites are drawn given earlier ones: z2 -> z1 -> x chains ------------------


class ChainGuide:
    """q(z1 | x) q(z2 | z1) ... for a ``LinearGaussianChain``, full-covariance Gaussians with
    one set of parameters per row (an offset, a Cholesky factor and, above z1, a gain on the
    layer below), so that one backward pass over n rows gives n independent gradient draws.
    Set to the exact posterior, or (``wrong=True``) shifted, widened and with weaker gains.
    ``flow`` (a transform) maps the top layer's Gaussian."""

    def __init__(self, lg, n, wrong=False, flow=None):
        self.lg, self.flow = lg, flow
        shift, widen, gain = (0.5, 1.3, 0.8) if wrong else (0.0, 1.0, 1.0)
        covs = [lg.post_cov, *lg.cond_cov]
        self.offsets = [(shift * c.diagonal().sqrt()).expand(n, -1).clone() for c in covs]
        self.trils = [(widen * torch.linalg.cholesky(c)).expand(n, -1, -1).clone() for c in covs]
        self.gains = [(gain * g).expand(n, -1, -1).clone() for g in lg.gain]
        for p in self.params:
            p.requires_grad_()

    @property
    def params(self):
        return [*self.offsets, *self.trils, *self.gains]

    def locs(self, x, z_below, layer, params=None):
        """The mean of layer ``layer`` (0-based) given x or the layer below."""
        offsets, gains = (self.offsets, self.gains) if params is None else params
        lg = self.lg
        if layer == 0:
            return lg.post_mean(x) + offsets[0]
        centred = z_below - lg.m[layer - 1]
        return (
            lg.m[layer]
            + torch.einsum("nij,...nj->...ni", gains[layer - 1], centred)
            + offsets[layer]
        )

    def __call__(self, x):
        lg, top = self.lg, len(self.lg.dims) - 1
        with pyro.plate("data", x.shape[0]):
            z = None
            for layer in range(top + 1):
                tril = self.trils[layer].tril()  # the upper triangle is not a parameter
                q = dist.MultivariateNormal(self.locs(x, z, layer), scale_tril=tril)
                if self.flow is not None and layer == top:
                    q = dist.TransformedDistribution(q, [self.flow])
                z = pyro.sample(lg.names[layer], q)


def plain_dreg_guide_gradients(lg, guide, x, k, seed, beta=1.0):
    """The doubly reparameterised estimator written directly in PyTorch, for a
    ``ChainGuide`` without a flow: the latents drawn bottom-up from the same noise as Pyro
    draws it, log w scored with every guide parameter detached (the values live), and
    sum_k w~_k^2 log w_k differentiated (Tucker et al. 2018, eq. 5).  With a KL weight
    ``beta``: log w_k = log p(x | z_k) + beta (log p(z_k) - log q(z_k)), and
    sum_k ((1 - beta) w~_k + beta w~_k^2) log w_k differentiated.  Returns (negative
    (tempered) bound summed over rows, gradients)."""
    torch.manual_seed(seed)
    n = x.shape[0]
    frozen = ([o.detach() for o in guide.offsets], [g.detach() for g in guide.gains])
    zs, log_q = [], 0.0
    for layer, tril in enumerate(t.tril() for t in guide.trils):
        below = zs[-1] if zs else None
        eps = torch.randn(k, n, lg.dims[layer], dtype=D64)
        loc = guide.locs(x, below, layer)
        zs.append(loc + (tril @ eps.unsqueeze(-1)).squeeze(-1))
        q_frozen = torch.distributions.MultivariateNormal(
            guide.locs(x, below, layer, frozen), scale_tril=tril.detach()
        )
        log_q = log_q + q_frozen.log_prob(zs[-1])
    normal = torch.distributions.Normal
    log_p = normal(0.0, 1.0).log_prob(zs[-1]).sum(-1)
    for i in range(len(lg.dims) - 1):
        log_p = log_p + normal(zs[i + 1] @ lg.A[i].T + lg.a[i], lg.s[i]).log_prob(zs[i]).sum(-1)
    log_lik = normal(zs[0] @ lg.W.T + lg.b, lg.sigma).log_prob(x).sum(-1)
    log_w = log_lik + beta * (log_p - log_q)
    w = torch.softmax(log_w, dim=0).detach()
    (-(((1 - beta) * w + beta * w.square()) * log_w).sum()).backward()
    bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    return -float(bound.sum().detach()), [p.grad.clone() for p in guide.params]


@pytest.fixture
def float64_default():
    """Pyro's affine autoregressive flow inverts in the default dtype: float64 for these."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def identity_iaf(dim):
    """An affine autoregressive flow with random hidden weights and a zero output layer:
    the identity map, with parameters whose gradients are not zero in general."""
    from pyro.distributions import transforms

    torch.manual_seed(5)
    flow = transforms.affine_autoregressive(dim, hidden_dims=[8]).double()
    last = flow.arn.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    return flow


@pytest.mark.parametrize("dims", [(3, 2), (3, 2, 2)])
@pytest.mark.parametrize("k", [1, 6])
def test_chain_with_its_exact_posterior_dreg_guide_gradient_is_zero_on_every_draw(dims, k):
    lg = LinearGaussianChain(dims=dims)
    x = lg.sample_x(5)
    exact = float(lg.exact_log_px(x).sum())
    for seed in range(3):
        grads = {}
        for cls in (IWAE, DReG):
            guide = ChainGuide(lg, x.shape[0])
            pyro.set_rng_seed(seed)
            loss = cls(k).differentiable_loss(lg.model, guide, x)
            assert float(loss.detach()) == pytest.approx(-exact, abs=1e-9)
            loss.backward()
            grads[cls] = max(float(p.grad.abs().max()) for p in guide.params)
        assert grads[DReG] < 1e-8  # every log weight is log p(x), whatever z is
        assert grads[IWAE] > 1e-2  # zero only in expectation


def test_a_flow_after_a_gaussian_site_with_the_exact_posterior_has_a_zero_dreg_gradient(
    float64_default,
):
    lg = LinearGaussianChain(dims=(3, 2))
    x = lg.sample_x(4)
    for cls, check in ((IWAE, lambda g: g > 1e-3), (DReG, lambda g: g < 1e-8)):
        flow = identity_iaf(lg.dims[-1])
        guide = ChainGuide(lg, x.shape[0], flow=flow)
        pyro.set_rng_seed(1)
        loss = cls(6).differentiable_loss(lg.model, guide, x)
        assert float(loss.detach()) == pytest.approx(-float(lg.exact_log_px(x).sum()), abs=1e-9)
        loss.backward()
        flow_grad = max(float(p.grad.abs().max()) for p in flow.parameters())
        guide_grad = max(float(p.grad.abs().max()) for p in guide.params)
        assert check(flow_grad) and check(guide_grad), (cls.__name__, flow_grad, guide_grad)


@pytest.mark.parametrize("dims", [(3, 2), (3, 2, 2)])
def test_chain_dreg_is_the_plain_pytorch_estimator_on_the_same_draws(dims):
    lg = LinearGaussianChain(dims=dims)
    x = lg.sample_x(7)
    for k in (1, 5):
        guide = ChainGuide(lg, x.shape[0], wrong=True)
        pyro.set_rng_seed(11)
        loss = DReG(k).differentiable_loss(lg.model, guide, x)
        loss.backward()
        ours = [p.grad.clone() for p in guide.params]
        reference = ChainGuide(lg, x.shape[0], wrong=True)
        value, theirs = plain_dreg_guide_gradients(lg, reference, x, k, seed=11)
        assert float(loss.detach()) == pytest.approx(value, rel=1e-12)  # the same draws
        assert max(float(g.abs().max()) for g in theirs) > 1e-2
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dims", [(3, 2), (3, 2, 2)])
def test_chain_dreg_guide_gradient_is_unbiased_for_iwaes_with_less_variance(dims):
    lg = LinearGaussianChain(dims=dims)
    n = 4000
    x = lg.sample_x(1).expand(n, -1)
    for k in (1, 8):
        draws = {}
        for seed, cls in enumerate((IWAE, DReG)):
            guide = ChainGuide(lg, n, wrong=True)
            pyro.set_rng_seed(seed)
            cls(k).differentiable_loss(lg.model, guide, x).backward()
            draws[cls] = torch.cat([p.grad.reshape(n, -1) for p in guide.params], 1)
        iwae, dreg = draws[IWAE], draws[DReG]
        live = iwae.var(0) > 0  # the Cholesky factors' upper triangles have no gradient
        se = (iwae.var(0) / n + dreg.var(0) / n).sqrt()[live]
        assert ((iwae.mean(0) - dreg.mean(0)).abs()[live] < 4 * se).all()
        # Less variance in total; not on every coordinate (z1's first Cholesky entry has up
        # to 1.4 times IWAE's variance with this wrong guide).
        assert float(dreg.var(0).sum()) < float(iwae.var(0).sum())


def test_a_flow_after_a_gaussian_site_dreg_is_unbiased_for_iwaes(float64_default):
    """The flow's parameters are shared by all rows: independent draws come from separate
    calls on one datapoint each."""
    from pyro.distributions import transforms

    lg = LinearGaussianChain(dims=(3, 2))
    x = lg.sample_x(1)
    torch.manual_seed(3)
    flow = transforms.affine_autoregressive(lg.dims[-1], hidden_dims=[6]).double()
    guide = ChainGuide(lg, 1, wrong=True, flow=flow)
    params = [*flow.parameters(), *guide.params]
    draws = {}
    for seed0, cls in ((0, IWAE), (10_000, DReG)):
        rows = []
        for seed in range(seed0, seed0 + 600):
            for p in params:
                p.grad = None
            pyro.set_rng_seed(seed)
            cls(4).differentiable_loss(lg.model, guide, x).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
        draws[cls] = torch.stack(rows)
    iwae, dreg = draws[IWAE], draws[DReG]
    live = iwae.var(0) > 0
    se = (iwae.var(0) / len(iwae) + dreg.var(0) / len(dreg)).sqrt()[live]
    z = (iwae.mean(0) - dreg.mean(0)).abs()[live] / se
    assert (z < 4.5).all(), float(z.max())
    assert float(dreg.var(0)[live].sum()) < float(iwae.var(0)[live].sum())


@pytest.mark.parametrize("beta", [0.0, 0.4])
@pytest.mark.parametrize("dims", [(3, 2), (3, 2, 2)])
def test_chain_tempered_dreg_is_the_plain_pytorch_estimator_on_the_same_draws(dims, beta):
    """Under a KL weight beta the doubly reparameterised estimator weighs each particle by
    (1 - beta) w~ + beta w~^2: the same gradients as that estimator written directly."""
    lg = LinearGaussianChain(dims=dims)
    x = lg.sample_x(7)
    for k in (1, 5):
        guide = ChainGuide(lg, x.shape[0], wrong=True)
        pyro.set_rng_seed(11)
        with KLWeight(beta):
            loss = DReG(k).differentiable_loss(lg.model, guide, x)
        loss.backward()
        ours = [p.grad.clone() for p in guide.params]
        reference = ChainGuide(lg, x.shape[0], wrong=True)
        value, theirs = plain_dreg_guide_gradients(lg, reference, x, k, seed=11, beta=beta)
        assert float(loss.detach()) == pytest.approx(value, rel=1e-12)  # the tempered bound
        # the untempered weights w~^2 would give other gradients
        _, untempered = plain_dreg_guide_gradients(lg, reference, x, k, seed=11)
        assert max(float((a - b).abs().max()) for a, b in zip(theirs, untempered)) > 1e-3
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_tempered_dreg_guide_gradient_is_unbiased_for_iwaes_of_the_same_tempered_bound(beta):
    """Paired draws (the same noise for both estimators): their difference has mean zero;
    the guide reads z1 into z2, so the path through an earlier draw is tested too."""
    lg = LinearGaussianChain(dims=(3, 2))
    n = 4000
    x = lg.sample_x(1).expand(n, -1)
    for k in (1, 8):
        draws = {}
        for cls in (IWAE, DReG):
            guide = ChainGuide(lg, n, wrong=True)
            pyro.set_rng_seed(5)
            with KLWeight(beta):
                cls(k).differentiable_loss(lg.model, guide, x).backward()
            draws[cls] = torch.cat([p.grad.reshape(n, -1) for p in guide.params], 1)
        diff = draws[IWAE] - draws[DReG]
        live = draws[IWAE].var(0) > 0  # the Cholesky factors' upper triangles
        z = diff.mean(0)[live].abs() / (diff.var(0)[live] / n).sqrt()
        assert (z < 4.5).all(), float(z.max())
        # the estimator is not IWAE's: the paired difference is not zero draw by draw
        assert float(diff[:, live].abs().max()) > 1e-3


def test_the_evaluator_reports_the_untempered_bounds_under_a_kl_weight():
    lg = LinearGaussian()
    x = lg.sample_x(6)
    pyro.set_rng_seed(0)
    plain = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=20, psis=False)
    pyro.set_rng_seed(0)
    with KLWeight(0.25):
        tempered = estimate_log_px(lg.model, lg.wrong_guide, x, num_particles=20, psis=False)
    torch.testing.assert_close(plain.log_px, tempered.log_px)
    torch.testing.assert_close(plain.elbo, tempered.elbo)
