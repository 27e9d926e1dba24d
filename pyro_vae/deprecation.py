"""Modules and names that moved: still importable from where they were for one release, with
a ``DeprecationWarning`` that says where they live now.

The package's modules moved into sub-packages, one per layer (``inference/``, ``training/``,
``apps/``, ...).  An old module path such as ``pyro_vae.train`` is not a file any more: an
import finder (installed by ``pyro_vae/__init__.py``) answers for it with a small module
whose every attribute is looked up in the new home, with a warning naming it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings
from typing import Any

# old module -> the module that holds its names now
MOVED_MODULES: dict[str, str] = {
    "pyro_vae.checkpoints": "pyro_vae.io.checkpoints",
    "pyro_vae.rundir": "pyro_vae.io.rundir",
    "pyro_vae.nets": "pyro_vae.networks.nets",
    "pyro_vae.distributions": "pyro_vae.networks.distributions",
    "pyro_vae.weights": "pyro_vae.inference.weights",
    "pyro_vae.objectives": "pyro_vae.inference.objectives",
    "pyro_vae.evaluate": "pyro_vae.inference.evaluate",
    "pyro_vae.schedules": "pyro_vae.training.schedules",
    "pyro_vae.stepper": "pyro_vae.training.stepper",
    "pyro_vae.distributed": "pyro_vae.training.distributed",
    "pyro_vae.runs": "pyro_vae.training.runs",
    "pyro_vae.train": "pyro_vae.training.trainer",
    "pyro_vae.gaps": "pyro_vae.apps.gaps",
    "pyro_vae.ood": "pyro_vae.apps.ood",
    "pyro_vae.compression": "pyro_vae.apps.compression",
    "pyro_vae.baselines": "pyro_vae.apps.baselines",
    "pyro_vae.sample_metrics": "pyro_vae.apps.sample_metrics",
    "pyro_vae.plots": "pyro_vae.apps.plots",
}

# (old module, name) -> the module that holds the name now, where that is not the old
# module's new home (names that had moved out of train.py and checkpoints.py before)
MOVED_NAMES: dict[tuple[str, str], str] = {
    **{
        ("pyro_vae.train", name): "pyro_vae.training.stepper"
        for name in (
            "NonFiniteError",
            "ParamClashError",
            "StepInfo",
            "Stepper",
            "nonfinite_sites",
            "owner_modules",
        )
    },
    ("pyro_vae.train", "DEFAULT_PRESET"): "pyro_vae.choices",
    ("pyro_vae.train", "PRESETS"): "pyro_vae.choices",
    ("pyro_vae.train", "seed_everything"): "pyro_vae.seeding",
    ("pyro_vae.checkpoints", "RunDir"): "pyro_vae.io.rundir",
    ("pyro_vae.checkpoints", "default_run_dir"): "pyro_vae.io.rundir",
}


def moved_name(module: str, name: str, home: str) -> Any:
    """``name`` from ``home``, with a warning that ``module.name`` moved there."""
    value = getattr(importlib.import_module(home), name)  # AttributeError if it never was
    warnings.warn(
        f"{module}.{name} moved to {home}: import it from there (or from pyro_vae); "
        f"the old place goes in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return value


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the old module paths (``MOVED_MODULES``)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default: an empty module, filled in below

    def exec_module(self, module: types.ModuleType) -> None:
        old, new = module.__name__, MOVED_MODULES[module.__name__]
        module.__doc__ = f"Moved to {new}; this path imports for one release more."

        def __getattr__(name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(f"module {old!r} has no attribute {name!r}")
            try:
                return moved_name(old, name, MOVED_NAMES.get((old, name), new))
            except AttributeError:
                raise AttributeError(f"module {old!r} has no attribute {name!r}") from None

        module.__getattr__ = __getattr__
        module.__dir__ = lambda: dir(importlib.import_module(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
