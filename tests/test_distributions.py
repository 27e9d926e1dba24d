import pyro.distributions as dist
import pytest
import torch

from pyro_vae.networks.distributions import BernoulliImage


@pytest.mark.parametrize("grad", [True, False], ids=["training path", "evaluation path"])
def test_log_prob_equals_torch_bernoulli_on_binary_data(grad):
    torch.manual_seed(0)
    logits = (torch.randn(4, 3, 20, dtype=torch.float64) * 5).requires_grad_(grad)
    x = torch.bernoulli(torch.full((3, 20), 0.4, dtype=torch.float64))
    ours = BernoulliImage(logits).log_prob(x)
    reference = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    assert ours.shape == (4, 3) and ours.requires_grad == grad
    assert torch.allclose(ours, reference, atol=1e-10)
    big = torch.tensor([[80.0, -80.0, 0.0]], dtype=torch.float64)  # no overflow at large logits
    expected = torch.tensor([-torch.log(torch.tensor(2.0, dtype=torch.float64))])
    assert torch.allclose(
        BernoulliImage(big).log_prob(torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)),
        expected,
    )


def test_evaluation_path_in_float32_over_a_full_image_is_within_its_stated_error():
    """5e-5 nats per 784-pixel image from log(1 + e) rounding, plus float32 summation."""
    torch.manual_seed(1)
    logits = torch.randn(50, 8, 784) * 8
    x = torch.bernoulli(torch.full((8, 784), 0.15))
    with torch.no_grad():
        fast = BernoulliImage(logits).log_prob(x).double()
    exact = dist.Bernoulli(logits=logits.double()).to_event(1).log_prob(x.double())
    assert (fast - exact).abs().max() < 5e-5 + 1e-6 * exact.abs().max()


def test_shapes_expand_sample_and_moments():
    d = BernoulliImage(torch.zeros(5, 7))
    assert d.batch_shape == (5,) and d.event_shape == (7,)
    e = d.expand((2, 5))
    assert e.batch_shape == (2, 5) and e.log_prob(torch.ones(7)).shape == (2, 5)
    s = d.sample((3,))
    assert s.shape == (3, 5, 7) and set(s.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(d.mean, torch.full((5, 7), 0.5))
    assert torch.allclose(
        d.entropy(), dist.Bernoulli(logits=torch.zeros(5, 7)).to_event(1).entropy()
    )


def test_validation_refuses_grey_values():
    with pytest.raises(ValueError):
        BernoulliImage(torch.zeros(2, 3), validate_args=True).log_prob(torch.full((2, 3), 0.5))


def test_gradient_is_torchs_and_passes_gradcheck():
    torch.manual_seed(2)
    logits = (torch.randn(3, 4, 9, dtype=torch.float64) * 4).requires_grad_()
    x = torch.bernoulli(torch.full((4, 9), 0.5, dtype=torch.float64))
    torch.autograd.gradcheck(lambda logit: BernoulliImage(logit).log_prob(x), (logits,))
    weights = torch.randn(3, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad((BernoulliImage(logits).log_prob(x) * weights).sum(), logits)
    reference = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    (theirs,) = torch.autograd.grad((reference * weights).sum(), logits)
    assert torch.allclose(ours, theirs, atol=1e-12)
