"""The package's layers: every module imports only from its own layer or the layers below
(docs/guides/architecture.md), and names that moved still import, with a warning."""

import ast
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"

# lowest first; a module may import from its own layer and every layer before it
LAYERS = {
    "foundation": ["choices", "checks", "config", "deprecation", "faults", "seeding", "io"],
    "data": ["data"],
    "networks": ["networks"],
    "models": ["models"],
    "inference": ["inference"],
    "training": ["training"],
    "applications": ["apps"],
    "jobs": ["jobs"],
    "command line": ["cli"],
}  # fmt: skip
LAYER_OF = {module: i for i, modules in enumerate(LAYERS.values()) for module in modules}


def imports_of(path: Path) -> set[str]:
    """The pyro_vae modules ``path`` imports (anywhere in it), by their first name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("pyro_vae.")}
    return found


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_module_has_a_layer_and_imports_only_downwards():
    modules = sorted(
        p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE
    )
    problems = []
    for path in modules:
        own = layer_of(path)
        assert own in LAYER_OF, f"{path.relative_to(PACKAGE)} belongs to no layer of LAYERS"
        for target in imports_of(path):
            if LAYER_OF[target] > LAYER_OF[own]:
                problems.append(f"{own} imports {target}")
    assert not problems, problems


MOVED = [
    ("pyro_vae.train", "NonFiniteError", "pyro_vae.training.stepper"),
    ("pyro_vae.train", "ParamClashError", "pyro_vae.training.stepper"),
    ("pyro_vae.train", "seed_everything", "pyro_vae.seeding"),
    ("pyro_vae.train", "PRESETS", "pyro_vae.choices"),
    ("pyro_vae.train", "Trainer", "pyro_vae.training.trainer"),
    ("pyro_vae.checkpoints", "RunDir", "pyro_vae.io.rundir"),
    ("pyro_vae.checkpoints", "save_checkpoint", "pyro_vae.io.checkpoints"),
    ("pyro_vae.evaluate", "estimate_log_px", "pyro_vae.inference.evaluate"),
    ("pyro_vae.runs", "Run", "pyro_vae.training.runs"),
    ("pyro_vae.compression", "BitsBackCoder", "pyro_vae.apps.compression"),
    ("pyro_vae.nets", "Encoder", "pyro_vae.networks.nets"),
]


@pytest.mark.parametrize("old,name,home", MOVED)
def test_a_moved_name_still_imports_from_its_old_module_with_a_warning(old, name, home):
    import importlib

    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {home}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(home), name)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {home}"):
        exec(f"from {old} import {name} as imported", namespace := {})
    assert namespace["imported"] is value
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        module.nothing  # noqa: B018


def test_every_old_module_path_names_a_module_that_exists():
    import importlib

    from pyro_vae.deprecation import MOVED_MODULES, MOVED_NAMES

    for old, new in MOVED_MODULES.items():
        assert not (PACKAGE / (old.split(".")[1] + ".py")).exists(), f"{old} is a file again"
        importlib.import_module(new)
    for (old, name), home in MOVED_NAMES.items():
        assert old in MOVED_MODULES and hasattr(importlib.import_module(home), name), (old, name)


def test_the_tree_shows_the_layers():
    """Each sub-package is one layer, and the package's top holds only the foundation and
    the jobs: the folder names are the architecture."""
    for path in PACKAGE.iterdir():
        if path.is_dir() and (path / "__init__.py").exists():
            assert path.name in LAYER_OF, f"{path.name}/ is not a layer"
        elif path.suffix == ".py" and path.name != "__init__.py":
            assert LAYER_OF.get(path.stem) in (0, LAYER_OF["jobs"]), f"{path.name} at the top"


def test_the_public_names_import_without_a_warning():
    import pyro_vae

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in pyro_vae.__all__:
            assert getattr(pyro_vae, name) is not None, name
