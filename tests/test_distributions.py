import pyro.distributions as dist
import pytest
import torch

from pyro_vae.distributions import BernoulliImage


def test_log_prob_equals_torch_bernoulli_on_binary_data():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 20, dtype=torch.float64) * 5
    x = torch.bernoulli(torch.full((3, 20), 0.4, dtype=torch.float64))
    ours = BernoulliImage(logits).log_prob(x)
    reference = dist.Bernoulli(logits=logits).to_event(1).log_prob(x)
    assert ours.shape == (4, 3)
    assert torch.allclose(ours, reference, atol=1e-10)
    big = torch.tensor([[80.0, -80.0]], dtype=torch.float64)  # no overflow at large logits
    assert torch.allclose(
        BernoulliImage(big).log_prob(torch.tensor([[1.0, 0.0]], dtype=torch.float64)),
        torch.zeros(1, dtype=torch.float64),
    )


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
