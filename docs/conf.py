"""Sphinx configuration: Markdown pages (MyST), the stored notebooks rendered with their
outputs (not re-executed), the command-line reference generated from each script's
``build_parser()`` and the API reference from the docstrings.  The build needs no network.

Build: ``python -m sphinx -W -b html docs docs/_build/html``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "pyro-vae"
author = "the pyro-vae developers"
copyright = "2026, the pyro-vae developers"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinxarg.ext",
]
myst_heading_anchors = 3
# Sphinx's smart quotes turn "--preset" into an en dash: a flag copied from the page would fail
smartquotes = False
nb_execution_mode = "off"  # the notebooks carry the outputs of a full run
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
html_theme = "pydata_sphinx_theme"
html_title = "pyro-vae"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}


def _copy_notebooks() -> None:
    """The tutorials are the stored notebooks: copied in at build time (not kept twice)."""
    target = DOCS / "tutorials"
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        copy = target / notebook.name
        if not copy.exists() or copy.read_bytes() != notebook.read_bytes():
            shutil.copyfile(notebook, copy)


def _cli_pages() -> None:
    """One page per script in scripts/, its flags read from ``build_parser()``."""
    target = DOCS / "cli"
    target.mkdir(exist_ok=True)
    scripts = sorted(p for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))
    pages = {}
    for script in scripts:
        pages[f"{script.stem}.md"] = (
            f"# {script.name}\n\n"
            "```{argparse}\n"
            f":filename: {script}\n"
            ":func: build_parser\n"
            f":prog: python scripts/{script.name}\n"
            "```\n"
        )
    listing = "\n".join(s.stem for s in scripts)
    pages["index.md"] = (
        "# Command-line reference\n\n"
        "Every script in `scripts/`, with every flag, read from the script's own parser. "
        "Bad values end in one line on stderr and exit status 2; `--help` answers before "
        "torch and Pyro are loaded.\n\n"
        f"```{{toctree}}\n:maxdepth: 1\n\n{listing}\n```\n"
    )
    for name, text in pages.items():
        path = target / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


_copy_notebooks()
_cli_pages()


def _require_docstrings(app, what, name, obj, options, lines) -> None:
    """A public name without a docstring on the API pages is a warning (an error under -W)."""
    if what in ("module", "attribute", "data", "property"):
        return
    if not any(line.strip() for line in lines) and not name.rpartition(".")[2].startswith("_"):
        from sphinx.util import logging

        logging.getLogger(__name__).warning(f"{what} {name} has no docstring")


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _require_docstrings)
