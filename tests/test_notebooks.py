"""Every notebook runs top to bottom in a fresh kernel, in its small mode."""

import os
import re

import nbformat
import pytest
from helpers import ROOT
from nbclient import NotebookClient

NOTEBOOKS_DIR = ROOT / "notebooks"
# Every notebook in notebooks/ must be listed here (checked below).
NOTEBOOKS = [
    "01_vae_in_pyro.ipynb",
    "02_extending_models.ipynb",
    "03_bound_vs_evidence.ipynb",
    "04_semi_supervised.ipynb",
    "05_tighter_bounds.ipynb",
    "06_compression.ipynb",
    "07_inference_gaps.ipynb",
    "08_baselines_and_ood.ipynb",
    "09_hierarchical.ipynb",
    "10_your_own_images.ipynb",
]


def test_every_notebook_is_executed_by_the_suite():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


def test_the_tutorials_page_links_and_renders_every_notebook():
    page = (ROOT / "docs" / "tutorials" / "index.md").read_text()
    for name in NOTEBOOKS:
        assert re.search(rf"\]\({re.escape(name)}\)", page), name  # described and linked
        assert f"\n{name.removesuffix('.ipynb')}\n" in page, name  # in the site's toctree


def test_stored_notebooks_carry_outputs_and_stay_small():
    for name in NOTEBOOKS:
        path = NOTEBOOKS_DIR / name
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        # executed and saved: every code cell ran, and there are figures to see
        assert all(c.get("execution_count") for c in code), f"{name}: run it and save the outputs"
        figures = [
            o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})
        ]
        assert figures, f"{name}: no figures stored"
        assert path.stat().st_size < 1_500_000, f"{name} is larger than 1.5 MB"
        assert "PYRO_VAE_NOTEBOOK_SMALL" in code[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    client = NotebookClient(
        book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    errors = [
        o for c in book.cells for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors
    assert os.environ["PYRO_VAE_NOTEBOOK_SMALL"] == "1"
