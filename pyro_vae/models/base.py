"""What every model shares: a ``pyro.module`` name of its own."""

from __future__ import annotations

import itertools

import pyro
from torch import nn

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
