import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import with_onehot
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from torch.nn import functional as F

from pyro_vae import DataError
from pyro_vae.data import Dataset, labelled_subset
from pyro_vae.inference.evaluate import estimate_log_px_over_labels
from pyro_vae.models import SSVAE
from pyro_vae.networks.nets import mlp, with_class

C = 4


@pytest.fixture(params=["mlp", "conv"])
def ssvae(request):
    torch.manual_seed(0)
    return SSVAE(
        x_dim=12,
        z_dim=3,
        num_classes=C,
        hidden=(8,),
        classifier_hidden=(8,),
        aux_weight=7.0,
        image_shape=(3, 4),
        classifier=request.param,
    )


def batch(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((n, 12), 0.3), generator=g), torch.tensor([0, 1, 2, 3, 1])[:n]


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_enumerated_loss_is_the_sum_over_classes_by_hand(ssvae, beta):
    ssvae.beta = beta
    x, _ = batch()
    pyro.set_rng_seed(11)
    loss = float(TraceEnum_ELBO(max_plate_nesting=1).loss(ssvae.model, ssvae.guide, x))
    # by hand: the same standard-normal draws, one z per class per image
    pyro.set_rng_seed(11)
    with torch.no_grad():
        log_qy = torch.log_softmax(ssvae.classifier(x), -1)  # (N, C)
        ys = torch.arange(C)[:, None].expand(C, len(x))
        loc, scale = ssvae.encoder(with_onehot(x, ys, C))  # (C, N, z)
        z = loc + scale * torch.empty(loc.shape).normal_()
        log_px = -F.softplus((1 - 2 * x) * ssvae.decoder(with_onehot(z, ys, C))).sum(-1)
        log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = dist.Normal(loc, scale).log_prob(z).sum(-1)
        per_class = math.log(1 / C) + log_px + beta * (log_pz - log_qz)  # (C, N)
        q = log_qy.T.exp()
        elbo = (q * per_class).sum(0) - (q * log_qy.T).sum(0)
    assert loss == pytest.approx(-float(elbo.sum()), rel=1e-5)


def test_labelled_trace_shapes_and_enumerated_shapes(ssvae):
    x, y = batch()
    guide_trace = poutine.trace(ssvae.guide).get_trace(x, y)
    model_trace = poutine.trace(poutine.replay(ssvae.model, trace=guide_trace)).get_trace(x, y)
    assert model_trace.nodes["y"]["is_observed"] and "y" not in guide_trace.nodes
    assert guide_trace.nodes["z"]["value"].shape == (5, 3)
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (5,)
    enum_guide = poutine.enum(ssvae.guide, first_available_dim=-2)
    trace = poutine.trace(enum_guide).get_trace(x)
    assert trace.nodes["y"]["value"].shape == (C, 1)
    assert trace.nodes["z"]["value"].shape == (C, 5, 3)


def test_aux_loss_is_alpha_log_q_and_reaches_only_the_classifier(ssvae):
    x, y = batch()
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    pyro.set_rng_seed(3)
    with_aux = elbo.differentiable_loss(ssvae.model, ssvae.guide, x, y, aux=True)
    pyro.set_rng_seed(3)
    without = elbo.differentiable_loss(ssvae.model, ssvae.guide, x, y)
    log_q = torch.log_softmax(ssvae.classifier(x), -1)[torch.arange(5), y].sum()
    assert float((with_aux - without).detach()) == pytest.approx(
        -7.0 * float(log_q.detach()), rel=1e-5
    )
    ssvae.zero_grad()
    (with_aux - without).backward()
    assert any(p.grad.abs().sum() > 0 for p in ssvae.classifier.parameters())
    for net in (ssvae.encoder, ssvae.decoder):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.parameters())
    # without the auxiliary term, labelled data give the classifier no gradient at all
    ssvae.zero_grad()
    pyro.set_rng_seed(3)
    elbo.differentiable_loss(ssvae.model, ssvae.guide, x, y).backward()
    assert all(p.grad is None for p in ssvae.classifier.parameters())


def test_balance_is_gamma_n_kl_of_the_batch_mean_of_q_and_reaches_only_the_classifier(ssvae):
    x, y = batch()
    x, ssvae = x.double(), ssvae.double()  # the factor is a small difference of two losses
    elbo = TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False)
    ssvae.balance = 2.5
    pyro.set_rng_seed(3)
    with_balance = elbo.differentiable_loss(ssvae.model, ssvae.guide, x, aux=True)
    pyro.set_rng_seed(3)
    without = elbo.differentiable_loss(ssvae.model, ssvae.guide, x)  # what the evaluator sees
    q_bar = torch.softmax(ssvae.classifier(x), -1).mean(0)
    kl = (q_bar * (q_bar * C).log()).sum()  # KL(q̄ || uniform p(y))
    assert float((with_balance - without).detach()) == pytest.approx(
        2.5 * len(x) * float(kl.detach()), rel=1e-9
    )
    ssvae.zero_grad()
    (with_balance - without).backward()
    assert any(p.grad.abs().sum() > 0 for p in ssvae.classifier.parameters())
    for net in (ssvae.encoder, ssvae.decoder):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.parameters())
    # labelled batches do not carry it: there the classes are given
    pyro.set_rng_seed(3)
    labelled = elbo.differentiable_loss(ssvae.model, ssvae.guide, x, y, aux=True)
    ssvae.balance = 0.0
    pyro.set_rng_seed(3)
    assert torch.equal(labelled, elbo.differentiable_loss(ssvae.model, ssvae.guide, x, y, aux=True))


def test_balance_is_non_negative_and_is_in_the_config():
    with pytest.raises(ValueError, match="balance"):
        SSVAE(x_dim=12, z_dim=3, balance=-1.0)
    assert SSVAE(x_dim=12, z_dim=3, balance=20.0).config()["balance"] == 20.0


def test_beta_must_be_positive_and_is_in_the_config():
    with pytest.raises(ValueError, match="beta"):
        SSVAE(x_dim=12, z_dim=3, beta=0.0)
    assert SSVAE(x_dim=12, z_dim=3, beta=2.5).config()["beta"] == 2.5


def test_labelled_subsets_are_balanced_and_reproducible():
    data = Dataset(torch.rand(500, 4), torch.arange(500) % 10, (2, 2))
    a, rest = labelled_subset(data, 100, seed=0)
    assert torch.equal(data.labels[a].bincount(), torch.full((10,), 10))
    assert len(a) + len(rest) == 500 and not set(a.tolist()) & set(rest.tolist())
    assert torch.equal(a, labelled_subset(data, 100, seed=0)[0])
    assert not torch.equal(a, labelled_subset(data, 100, seed=1)[0])
    with pytest.raises(DataError, match="evenly"):
        labelled_subset(data, 105, seed=0)
    with pytest.raises(DataError, match="fewer than 10"):
        labelled_subset(Dataset(torch.rand(50, 4), torch.arange(50) % 5), 20, seed=0)
    with pytest.raises(DataError, match="class 3 has"):
        labels = torch.arange(500) % 10
        labels[labels == 3] = 4
        labels[:2] = 3
        labelled_subset(Dataset(torch.rand(500, 4), labels), 100, seed=0)


class LabelledGaussian:
    """y ~ Cat(1/C), z ~ N(0, 1), x | y, z ~ N(mu_y + z, s^2): p(x|y) = N(mu_y, 1 + s^2)."""

    mu = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    s = 0.6

    def model(self, x, y=None):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample(
                "y", dist.Categorical(logits=torch.zeros(3, dtype=torch.float64)), obs=y
            )
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
            pyro.sample("x", dist.Normal(self.mu[y] + z, self.s), obs=x)

    def guide(self, x, y):  # the exact posterior of z given x and y
        v = self.s**2 / (1 + self.s**2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - self.mu[y]) / (1 + self.s**2), math.sqrt(v)))


def test_log_px_with_labels_summed_out_is_exact():
    m = LabelledGaussian()
    x = torch.tensor([-2.5, 0.0, 1.7, 4.0], dtype=torch.float64)
    result = estimate_log_px_over_labels(m.model, m.guide, x, 3, num_particles=5)
    exact_joint = math.log(1 / 3) + dist.Normal(m.mu, math.sqrt(1 + m.s**2)).log_prob(x[:, None])
    assert torch.allclose(result.log_pxy, exact_joint, atol=1e-6)
    exact = torch.logsumexp(exact_joint, 1)
    assert torch.allclose(result.log_px, exact, atol=1e-6)
    labels = torch.tensor([0, 1, 1, 2])
    summary = result.summary(labels)
    assert summary["log_px"] == pytest.approx(float(exact.mean()), abs=1e-6)
    assert summary["log_px_sem"] == pytest.approx(float(exact.std() / 2), abs=1e-6)
    true = exact_joint.gather(1, labels[:, None]).squeeze(1)
    assert summary["log_pxy"] == pytest.approx(float(true.mean()), abs=1e-6)
    assert summary["generative_accuracy"] == float(
        (exact_joint.argmax(1) == labels).double().mean()
    )


@pytest.mark.parametrize(
    "h_shape, y_shape",
    [((6, 5), (6,)), ((6, 5), (C, 1)), ((6, 1, 5), (6, C)), ((5,), ())],
    ids=["labelled", "enumerated", "every-class-per-row", "single"],
)
def test_with_class_equals_the_net_on_the_concatenated_one_hot(h_shape, y_shape):
    """The factored first layer gives what the net gives on [h, one_hot(y)], and the same
    gradients for every weight, for each way the models broadcast h against y."""
    torch.manual_seed(0)
    net = mlp([5 + C, 7, 3], "softplus").double()
    h = torch.randn(h_shape, dtype=torch.float64)
    y = torch.randint(C, y_shape)
    if y_shape == (C, 1):
        y = torch.arange(C).reshape(C, 1)
    fast = with_class(net, h, y, C)
    reference = net(with_onehot(h, y, C))
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast.square().sum(), list(net.parameters()))
    g_ref = torch.autograd.grad(reference.square().sum(), list(net.parameters()))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_with_class_rejects_a_net_of_the_wrong_width():
    with pytest.raises(ValueError, match="takes 9 inputs, not 6 \\+ 4 classes"):
        with_class(mlp([5 + C, 3]), torch.zeros(2, 6), torch.zeros(2, dtype=torch.long), C)


def test_a_conv_classifier_sees_images_and_round_trips_through_a_checkpoint(tmp_path):
    from pyro_vae import load_checkpoint, save_checkpoint
    from pyro_vae.models import model_from_checkpoint

    torch.manual_seed(0)
    model = SSVAE(x_dim=12, z_dim=3, num_classes=C, hidden=(8,), image_shape=(3, 4))
    assert model.config()["classifier"] == "mlp"
    conv = SSVAE(
        x_dim=12, z_dim=3, num_classes=C, hidden=(8,), image_shape=(3, 4), classifier="conv"
    )
    x, _ = batch()
    # a pixel's neighbours matter: the net reads x as a 3 x 4 image, whatever the batch shape
    assert conv.classifier(x[None].expand(2, -1, -1)).shape == (2, 5, C)
    first = conv.classifier.features[0]
    assert isinstance(first, torch.nn.Conv2d) and first.in_channels == 1
    path = save_checkpoint(
        tmp_path / "c.pt",
        {"model_class": "SSVAE", "model_config": conv.config(), "model": conv.state_dict()},
    )
    again = model_from_checkpoint(load_checkpoint(path))
    assert again.config() == conv.config()
    assert torch.equal(again.class_probs(x), conv.class_probs(x))
    # a config written before the option existed builds the MLP
    old = {k: v for k, v in model.config().items() if k != "classifier"}
    assert SSVAE(**old).classifier_kind == "mlp"
    with pytest.raises(ValueError, match="unknown classifier"):
        SSVAE(x_dim=12, image_shape=(3, 4), classifier="rnn")
    with pytest.raises(ValueError, match="H \\* W"):
        SSVAE(x_dim=13, image_shape=(3, 4), classifier="conv")
