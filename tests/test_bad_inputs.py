"""Every flag of every script, given invalid values, fails with one line and exit status 2
and leaves no run directory behind; data problems raise one-line DataErrors."""

import json

import numpy as np
import pytest
import torch
from helpers import SCRIPTS_DIR, load_script, run_in_process

from pyro_vae import VAE, DataError, as_dataset, check_images, cli, load_checkpoint

REQUIRED = {
    "evaluate_marginal_likelihood.py": ["--checkpoint", "{run}"],
    "compress.py": ["--checkpoint", "{run}"],
    "inference_gaps.py": ["--checkpoint", "{run}"],
    "detect_ood.py": ["--checkpoint", "{run}", "--out", "noise"],
}
BAD_BY_TYPE = {
    cli.positive_int: ["0", "-1", "1.5", "x"],
    cli.nonnegative_int: ["-1", "x"],
    cli.positive_float: ["0", "-2", "nan", "inf", "x"],
    cli.nonnegative_float: ["-1", "x"],
    cli.hidden_sizes: ["0", "-5", "a,b", ""],
}


def flag_cases():
    cases = []
    for path in sorted(SCRIPTS_DIR.glob("*.py")):
        parser = load_script(path.name).build_parser()
        for action in parser._actions:
            flag = next((s for s in action.option_strings if s.startswith("--")), None)
            if flag in (None, "--help") or action.nargs == 0:
                continue
            if action.choices is not None:
                values = ["bogus"]
            elif action.type in BAD_BY_TYPE:
                values = BAD_BY_TYPE[action.type]
            else:
                continue  # paths: see the path cases below
            cases += [(path.name, flag, v) for v in values]
    return cases


@pytest.mark.parametrize("script,flag,value", flag_cases())
def test_invalid_flag_values(script, flag, value, tmp_path, capsys, trained_run):
    out = tmp_path / "run"
    required = [a.replace("{run}", str(trained_run)) for a in REQUIRED.get(script, [])]
    where = "--output-dir" if script == "detect_ood.py" else "--out"
    status, err = run_in_process(script, [*required, flag, value, where, str(out)], capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], err
    assert not out.exists()


def test_every_flag_with_a_type_or_choices_is_covered():
    covered = {(s, f) for s, f, _ in flag_cases()}
    for path in SCRIPTS_DIR.glob("*.py"):
        for action in load_script(path.name).build_parser()._actions:
            flag = next((s for s in action.option_strings if s.startswith("--")), None)
            if flag and action.nargs != 0 and flag != "--help":
                assert (path.name, flag) in covered or action.type is not None, (path.name, flag)


PATH_CASES = [
    ("train_svi.py", ["--data-dir", "{file}/sub"], "data directory"),
    ("train_svi.py", ["--out", "{file}/run"], "cannot create"),
    ("train_svi.py", ["--resume", "{tmp}/missing"], "no checkpoint.pt or config.json"),
    ("evaluate_marginal_likelihood.py", ["--checkpoint", "{tmp}/missing"], "no checkpoint"),
    ("evaluate_marginal_likelihood.py", ["--checkpoint", "{file}"], "truncated or corrupt"),
    ("evaluate_marginal_likelihood.py", ["--checkpoint", "{run}", "--out", "{file}/x"], "--out"),
    ("detect_ood.py", ["--checkpoint", "{tmp}/missing", "--out", "noise"], "no checkpoint"),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--out", "noise", "--background", "{tmp}/missing"],
        "no checkpoint",
    ),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--out", "noise", "--output-dir", "{file}/x"],
        "--output-dir",
    ),
    ("train_ssvae.py", ["--m1", "{tmp}/missing"], "no checkpoint"),
    ("train_ssvae.py", ["--m1", "{file}"], "truncated or corrupt"),
    # flags that do not go together
    ("train_svi.py", ["--flow", "iaf", "--covariance", "full"], "drop --covariance full"),
    ("train_svi.py", ["--flow", "planar", "--elbo", "dreg"], "no inverse"),
    ("train_ssvae.py", ["--m1", "{run}", "--classifier", "conv"], "--classifier conv"),
    ("train_ssvae.py", ["--m1", "{run}", "--balance", "5"], "--balance"),
    ("train_ssvae.py", ["--label-rotate", "200", "--out", "{tmp}/r"], "in degrees in [0, 180]"),
]


@pytest.mark.parametrize("script,args,message", PATH_CASES)
def test_missing_and_unwritable_paths(script, args, message, tmp_path, capsys, trained_run):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"\x80\x02junk")
    args = [a.format(file=blocker, tmp=tmp_path, run=trained_run) for a in args]
    status, err = run_in_process(script, args, capsys)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


DATA_CASES = [
    (lambda: as_dataset(np.zeros(5, np.float32)), "shape"),
    (lambda: as_dataset(np.zeros((0, 4), np.float32)), "empty"),
    (lambda: as_dataset(np.array([["a"]])), "numeric"),
    (lambda: as_dataset(np.zeros((3, 4), np.int32)), "uint8 or floating"),
    (lambda: as_dataset(np.zeros((3, 4), np.float32), labels=[0.5, 1, 2]), "integer"),
    (lambda: as_dataset(np.zeros((3, 4), np.float32), labels=[0, 1]), "3 images but 2 labels"),
    (lambda: as_dataset(np.zeros((3, 12), np.float32), image_shape=(5, 5)), "image_shape"),
    (lambda: check_images(torch.tensor([[np.nan, 0.0]]), "gaussian", "none"), "NaN or inf"),
    (lambda: check_images(torch.tensor([[np.inf, 0.0]]), "bernoulli", "dynamic"), "NaN or inf"),
    (lambda: check_images(torch.tensor([[1.5, 0.0]]), "bernoulli", "dynamic"), "[0, 1]"),
    (lambda: check_images(torch.tensor([[0.5, 0.0]]), "bernoulli", "none"), "binary data"),
]


@pytest.mark.parametrize("make,message", DATA_CASES)
def test_data_problems(make, message):
    with pytest.raises(DataError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nonfinite_loss_stops_with_the_site_and_keeps_the_checkpoint(
    tmp_path, capsys, data_dir, monkeypatch
):
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    calls = {"n": 0}
    original = VAE.likelihood

    def failing(self, z):  # finite for the first epoch (8 steps), NaN from step 12 on
        calls["n"] += 1
        d = original(self, z)
        if calls["n"] > 12:
            d.logits = torch.full_like(d.logits, float("nan"))
        return d

    monkeypatch.setattr(VAE, "likelihood", failing)
    out = tmp_path / "run"
    args = [
        "--epochs",
        "3",
        "--train-size",
        "512",
        "--batch-size",
        "64",
        "--eval-size",
        "64",
        "--quiet",
        "--out",
        str(out),
    ]
    status, err = run_in_process("train_svi.py", args, capsys)
    assert status == 1
    assert "non-finite loss at epoch 2" in err and "model:x" in err and "checkpoint was kept" in err
    assert load_checkpoint(out)["trainer"]["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    json.loads((out / "config.json").read_text())
