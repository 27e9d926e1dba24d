"""Killed and interrupted runs resume to exactly the numbers of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from pyro_vae import load_checkpoint

ARGS = [
    "--epochs",
    "4",
    "--train-size",
    "1024",
    "--batch-size",
    "64",
    "--eval-size",
    "64",
    "--eval-particles",
    "10",
    "--hidden",
    "64",
    "--z-dim",
    "8",
    "--seed",
    "1",
    "--quiet",
]
SCRIPT = str(ROOT / "scripts" / "train_svi.py")


def env(data_dir):
    return {**os.environ, "PYRO_VAE_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}


def start(args, data_dir, script=SCRIPT):
    return subprocess.Popen(
        [sys.executable, script, *args],
        env=env(data_dir),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def epochs_done(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def outcome(out):
    """Everything a run leaves that must not depend on interruptions."""
    state = load_checkpoint(out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("seconds")
    history = state["trainer"]["history"]
    for m in history:
        m.pop("seconds")
    return {
        "model": state["model"],
        "optimizer": state["trainer"]["optimizer"]["state"],
        "metrics": metrics,
        "history": history,
        "evaluation": json.loads((out / "evaluation.json").read_text()),
    }


def assert_same(a, b):
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert a["evaluation"] == b["evaluation"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for i in a["optimizer"]:
        for key, value in a["optimizer"][i].items():
            assert torch.equal(value, b["optimizer"][i][key])


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = start([*ARGS, "--out", str(out)], data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return outcome(out)


def test_sigkill_at_several_points_then_resume_is_bitwise_identical(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    # killed before the first checkpoint, twice mid-training, and during the final evaluation
    kill_points = [
        lambda: (out / "config.json").exists(),
        lambda: epochs_done(out) >= 1,
        lambda: epochs_done(out) >= 3,
        lambda: epochs_done(out) >= 4,
    ]
    args = [*ARGS, "--out", str(out)]
    for i, point in enumerate(kill_points):
        proc = start(args, data_dir)
        wait_for(point, proc)
        time.sleep(0.05 * i)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (out / "checkpoint.pt").exists():
            load_checkpoint(out)  # whatever moment the kill hit, the checkpoint is whole
        args = ["--resume", str(out), "--quiet"]
    proc = start(args, data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert not list(out.glob("*.tmp")) and not list(out.glob("checkpoint.pt.*"))
    assert_same(outcome(out), reference)


def test_ctrl_c_saves_mid_epoch_and_resumes_bitwise(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start([*ARGS, "--out", str(out)], data_dir)
    wait_for(lambda: epochs_done(out) >= 1, proc)
    proc.send_signal(signal.SIGINT)  # at once: three epochs of training are still ahead
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert f"Resume with: python {SCRIPT} --resume {out}" in err
    state = load_checkpoint(out)
    assert state["trainer"]["partial_epoch"] is not None  # saved mid-epoch, at a step boundary
    assert 0 < state["loader"]["position"] < 16
    proc = start(["--resume", str(out), "--quiet"], data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert_same(outcome(out), reference)


def test_resume_of_a_directory_without_a_run_is_one_line(data_dir, tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    result = subprocess.run(
        [sys.executable, SCRIPT, "--resume", str(out)],
        env=env(data_dir),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "no checkpoint.pt or config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


SSVAE_ARGS = [
    "--labels",
    "100",
    "--epochs",
    "3",
    "--train-size",
    "900",
    "--batch-size",
    "100",
    "--eval-size",
    "64",
    "--hidden",
    "32",
    "--classifier-hidden",
    "32",
    "--z-dim",
    "4",
    "--eval-particles",
    "3",
    "--likelihood-size",
    "10",
    "--seed",
    "2",
    "--quiet",
]
SSVAE_SCRIPT = str(ROOT / "scripts" / "train_ssvae.py")


def test_semi_supervised_run_resumes_bitwise_after_sigkill_and_ctrl_c(data_dir, tmp_path):
    def launch(args):
        return start(args, data_dir, script=SSVAE_SCRIPT)

    ref = tmp_path / "reference"
    proc = launch([*SSVAE_ARGS, "--out", str(ref)])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    out = tmp_path / "run"
    proc = launch([*SSVAE_ARGS, "--out", str(out)])
    wait_for(lambda: epochs_done(out) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = launch(["--resume", str(out), "--quiet"])
    wait_for(lambda: epochs_done(out) >= 2, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) in (0, 130)  # 0 if the interrupt came after the last step
    proc = launch(["--resume", str(out), "--quiet"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert_same(outcome(out), outcome(ref))
    assert torch.equal(
        load_checkpoint(out / "best.pt")["model"]["classifier.0.weight"],
        load_checkpoint(ref / "best.pt")["model"]["classifier.0.weight"],
    )
