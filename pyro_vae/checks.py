"""Argument checks for the public API: a bad argument fails where it enters, with one line
that names it, instead of a deep ``AttributeError`` or a number that cannot be true.

``ValueError``/``TypeError`` are raised (the command-line scripts check their flags before
calling the library, so a user of the scripts never sees these).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pyro_vae.choices import ARRAY_SUFFIXES, DATASETS

__all__ = [
    "ConfigError",
    "as_tensor",
    "check_data_matrix",
    "is_user_data",
    "positive_int",
    "positive_number",
    "sizes",
]


class ConfigError(ValueError):
    """Settings of a model that do not go together, naming the setting (``field``) that a
    command-line flag of the same name (``--flow`` for ``flow``) sets: the scripts report it
    in one line, so the check lives in the model alone."""

    def __init__(self, field: str, message: str | None = None) -> None:
        if message is None:  # re-raised as cls(text), as Pyro does: "field: message ..."
            field, _, message = field.partition(": ")
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def is_user_data(name: str) -> bool:
    """Whether ``name`` names a user's images (a ``.npy`` / ``.npz`` file or a folder) rather
    than a named data set.  An absolute path without a suffix counts as a folder even when it
    is gone, so that a run trained on one says so instead of calling it an unknown name."""
    if name in DATASETS:
        return False
    path = Path(name)
    return (
        path.suffix.lower() in ARRAY_SUFFIXES
        or path.is_dir()
        or (path.is_absolute() and not path.suffix)
    )


def positive_int(name: str, value, *, allow_zero: bool = False) -> int:
    """``value`` as an int if it is a whole number above zero (or zero with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}"
        )
    return int(value)


def positive_number(name: str, value) -> float:
    """``value`` as a float if it is a finite number above zero."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return float(value)


def sizes(name: str, value, *, allow_empty: bool = True) -> tuple[int, ...]:
    """A sequence of positive integer layer sizes (not a bare int or a string)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of sizes such as (400,), got {value!r}")
    out = tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(value))
    if not out and not allow_empty:
        raise ValueError(f"{name} must hold at least one size")
    return out


def as_tensor(name: str, value) -> Tensor:
    """A tensor as it is; a numpy array converted (shared memory); anything else refused."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def check_data_matrix(name: str, x: Tensor, width: int, *, binary: bool = False) -> None:
    """``x`` must be a floating (N, width) tensor of finite values, binary if ``binary``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != width:
        hint = " (one image: x[None])" if x.dim() == 1 and x.shape[0] == width else ""
        raise ValueError(f"{name} must have shape (N, {width}), got {tuple(x.shape)}{hint}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or inf")
    if binary and not ((x == 0) | (x == 1)).all():
        raise ValueError(f"{name}: a Bernoulli likelihood needs binary (0/1) values")
