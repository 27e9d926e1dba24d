"""Names that moved: still importable from their old module for one release, with a
``DeprecationWarning`` that says where they live now."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def moved_name(module: str, name: str, moved: dict[str, str]) -> Any:
    """A module's ``__getattr__`` for ``moved`` (old name -> the module that holds it now)."""
    if name not in moved:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {moved[name]}: import it from there (or from pyro_vae); "
        f"the old place goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(moved[name]), name)
