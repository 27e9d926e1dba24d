"""Distributions the models share."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.nn import functional as F

__all__ = ["BernoulliImage"]


class BernoulliImage(TorchDistribution):
    """Independent Bernoulli pixels from logits, one event over the last dimension.

    The same distribution as ``dist.Bernoulli(logits=l).to_event(1)`` on binary data, with a
    cheaper ``log_prob``: log p(x) = sum_d log sigmoid((2 x_d - 1) l_d), one multiply and one
    softplus per pixel.  torch's Bernoulli evaluates binary cross-entropy with several passes
    over a broadcast copy of x, which at K x N x 784 values costs more than the decoder's
    largest matrix product (224 ms against 127 ms for 5000 x 6 x 784 on 2 cores).
    ``log_prob`` is defined for x in {0, 1} only: with Pyro's validation on, other values
    raise; the training scripts check the data before switching validation off.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, logits: Tensor, validate_args: bool | None = None) -> None:
        if logits.dim() < 1:
            raise ValueError("logits need at least one (event) dimension")
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BernoulliImage, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        super(BernoulliImage, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def probs(self) -> Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> Tensor:
        return self.probs

    @property
    def variance(self) -> Tensor:
        p = self.probs
        return p * (1 - p)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            return torch.bernoulli(self.probs.expand(shape))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        # log sigmoid(s) = -softplus(-s), with s = (2x - 1) l: -softplus((1 - 2x) l)
        return -F.softplus((1 - 2 * value) * self.logits).sum(-1)

    def entropy(self) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.logits, self.probs, reduction="none").sum(-1)
