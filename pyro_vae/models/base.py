"""What every model shares: a ``pyro.module`` name of its own."""

from __future__ import annotations

import itertools

import pyro
from torch import Tensor, nn

from pyro_vae.checks import check_data_matrix

__all__ = ["PyroModel"]

_instances = itertools.count()


class PyroModel(nn.Module):
    """An ``nn.Module`` whose ``model``/``guide`` register it with ``pyro.module`` under a
    name no other object shares (``<prefix>_<n>``, also for copies).

    Pyro's param store is global: under a shared name, a second model's ``pyro.module``
    returns the first model's tensors, and ``SVI`` then steps the first model's parameters
    instead of its own (silently, unless the store is cleared in between).
    """

    name_prefix = "model"

    def __init__(self) -> None:
        super().__init__()
        self.pyro_name = f"{self.name_prefix}_{next(_instances)}"

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy and pickle come here
        super().__setstate__(state)
        self.pyro_name = f"{self.name_prefix}_{next(_instances)}"

    def register(self) -> None:
        """``pyro.module(self.pyro_name, self)``: call at the top of ``model`` and ``guide``."""
        pyro.module(self.pyro_name, self)

    def check_data(self, x: Tensor, *rest) -> None:
        """Refuse data this model is not defined on, in one line naming the argument: x of
        shape (N, x_dim), floating, finite, binary for a Bernoulli likelihood."""
        binary = getattr(self, "likelihood_name", "bernoulli") == "bernoulli"
        check_data_matrix("x", x, self.x_dim, binary=binary)
        if rest and rest[0] is not None and hasattr(self, "num_classes"):
            y = rest[0]
            if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y must be a tensor of {x.shape[0]} labels")
            if y.dtype.is_floating_point or not (0 <= y.min() and y.max() < self.num_classes):
                raise ValueError(f"y must hold integer labels in [0, {self.num_classes})")
