"""Killed and interrupted runs resume to exactly the numbers of an uninterrupted run.

Each fault hits a named pause point (``pyro_vae.faults``): the process holds there, announces
it in a marker file, and only then is it killed or interrupted, so the moment of the fault
does not depend on how fast the machine is.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT

from pyro_vae import load_checkpoint
from pyro_vae.faults import PAUSE_ENV, PAUSE_FILE_ENV

# subprocess runs, killed and resumed: part of the default suite, skipped by -m 'not slow'
pytestmark = pytest.mark.slow

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


def env(data_dir, pause=None, marker=None):
    environ = {**os.environ, "PYRO_VAE_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
    environ.pop(PAUSE_ENV, None)
    if pause is not None:
        environ[PAUSE_ENV], environ[PAUSE_FILE_ENV] = pause, str(marker)
    return environ


def start(args, data_dir, script=SCRIPT, pause=None, marker=None):
    return subprocess.Popen(
        [sys.executable, script, *args],
        env=env(data_dir, pause, marker),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def held_at(args, data_dir, pause, tmp_path, script=SCRIPT):
    """Start a run that holds at the pause point ``pause`` ("<point>:<n>"); return the
    process once it is held there."""
    marker = tmp_path / "held"
    marker.unlink(missing_ok=True)
    proc = start(args, data_dir, script=script, pause=pause, marker=marker)
    # Waiting for an event, not for a time: the process is held until it is signalled.
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert proc.poll() is None, f"exited before {pause}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"never reached {pause}"
        time.sleep(0.01)
    assert marker.read_text() == pause.rpartition(":")[0]
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


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
    args = [*ARGS, "--out", str(out)]
    # Before the first checkpoint: the resumed run starts afresh from config.json.
    kill(held_at(args, data_dir, "run-started:1", tmp_path))
    assert not (out / "checkpoint.pt").exists()
    resume = ["--resume", str(out), "--quiet"]
    # Inside the second epoch's checkpoint write: a temporary file is left behind.
    kill(held_at(resume, data_dir, "checkpoint-write:2", tmp_path))
    assert len(list(out.glob("checkpoint.pt.*.tmp"))) == 1
    assert load_checkpoint(out)["trainer"]["epoch"] == 1  # the previous checkpoint is whole
    # After epoch 3's checkpoint (the second this process saves): epochs 2 and 3 redone.
    kill(held_at(resume, data_dir, "epoch-saved:2", tmp_path))
    assert not list(out.glob("*.tmp"))  # the resumed run removed the killed write's file
    assert load_checkpoint(out)["trainer"]["epoch"] == 3
    # During the final evaluation, after epoch 4's checkpoint (the first evaluated chunk is
    # epoch 4's validation set, the second the test set's).
    kill(held_at(resume, data_dir, "evaluation-chunk:2", tmp_path))
    assert load_checkpoint(out)["trainer"]["epoch"] == 4
    assert not (out / "evaluation.json").exists()
    proc = start(resume, data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert not list(out.glob("*.tmp")) and not list(out.glob("checkpoint.pt.*"))
    assert_same(outcome(out), reference)


def test_ctrl_c_saves_mid_epoch_and_resumes_bitwise(reference, data_dir, tmp_path):
    out = tmp_path / "run"
    # Held right after epoch 1's checkpoint, then interrupted: three epochs are still ahead,
    # so the run stops after the first step of epoch 2.
    proc = held_at([*ARGS, "--out", str(out)], data_dir, "epoch-saved:1", tmp_path)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert f"Resume with: {sys.executable} {SCRIPT} --resume {out}" in err
    state = load_checkpoint(out)
    assert state["trainer"]["partial_epoch"] is not None  # saved mid-epoch, at a step boundary
    assert state["trainer"]["epoch"] == 1 and state["loader"]["position"] == 1
    proc = start(["--resume", str(out), "--quiet"], data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert_same(outcome(out), reference)


def test_an_evaluation_stopped_with_ctrl_c_goes_on_where_it_stopped(data_dir, tmp_path):
    """evaluate_marginal_likelihood.py keeps its finished images: Ctrl-C says how many and
    where, the same command goes on from there, and the report is an uninterrupted one's."""
    run = tmp_path / "run"
    proc = start([*ARGS, "--epochs", "1", "--eval-particles", "0", "--out", str(run)], data_dir)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    script = str(ROOT / "scripts" / "evaluate_marginal_likelihood.py")
    # K = 32768: one image per chunk, 16 per kept block; 20 images are two blocks
    args = ["--checkpoint", str(run), "--eval-size", "20", "--num-particles", "32768", "--quiet"]
    proc = start([*args, "--out", str(tmp_path / "whole")], data_dir, script=script)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    out = tmp_path / "stopped"
    proc = held_at([*args, "--out", str(out)], data_dir, "evaluation-block:1", tmp_path, script)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    kept = out / "marginal_likelihood_k32768.progress.pt"
    assert proc.stderr.read().strip().splitlines() == [
        f"interrupted; 16 of 20 images are scored and kept in {kept}: the same command goes "
        "on from there"
    ]
    proc = start([*args, "--out", str(out)], data_dir, script=script)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert not kept.exists()
    report = json.loads((out / "marginal_likelihood_k32768.json").read_text())
    whole = json.loads((tmp_path / "whole" / "marginal_likelihood_k32768.json").read_text())
    assert report == whole


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


@pytest.fixture(scope="module")
def ssvae_reference(data_dir, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ssvae") / "reference"
    proc = start([*SSVAE_ARGS, "--out", str(ref)], data_dir, script=SSVAE_SCRIPT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    return ref


def test_semi_supervised_run_resumes_bitwise_after_sigkill_and_ctrl_c(
    ssvae_reference, data_dir, tmp_path
):
    ref = ssvae_reference
    out = tmp_path / "run"
    kill(
        held_at([*SSVAE_ARGS, "--out", str(out)], data_dir, "epoch-saved:1", tmp_path, SSVAE_SCRIPT)
    )
    resume = ["--resume", str(out), "--quiet"]
    proc = held_at(resume, data_dir, "epoch-saved:1", tmp_path, SSVAE_SCRIPT)  # after epoch 2
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130  # stopped after the first step of epoch 3
    assert load_checkpoint(out)["trainer"]["partial_epoch"] is not None
    proc = start(resume, data_dir, script=SSVAE_SCRIPT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert_same(outcome(out), outcome(ref))
    assert torch.equal(
        load_checkpoint(out / "best.pt")["model"]["classifier.0.weight"],
        load_checkpoint(ref / "best.pt")["model"]["classifier.0.weight"],
    )


def test_a_run_stopped_by_its_time_budget_runs_on_when_resumed_with_a_larger_one(
    ssvae_reference, data_dir, tmp_path
):
    out = tmp_path / "run"
    # Every epoch takes longer than 60 microseconds: the budget is spent after epoch 1.
    proc = start([*SSVAE_ARGS, "--max-minutes", "1e-6", "--out", str(out)], data_dir, SSVAE_SCRIPT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    report = json.loads((out / "evaluation.json").read_text())
    assert report["epochs_trained"] == 1 and "time budget" in report["stopped"]
    # Resuming without a new budget keeps the spent one: nothing more is trained.
    proc = start(["--resume", str(out), "--quiet"], data_dir, SSVAE_SCRIPT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert load_checkpoint(out)["trainer"]["epoch"] == 1
    # A larger budget continues the run to exactly the numbers of one that never stopped.
    resume = ["--resume", str(out), "--max-minutes", "1000", "--quiet"]
    proc = start(resume, data_dir, SSVAE_SCRIPT)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    report = json.loads((out / "evaluation.json").read_text())
    assert report["epochs_trained"] == 3 and report["stopped"] is None
    assert load_checkpoint(out)["config"]["max_minutes"] == 1000
    assert_same(outcome(out), outcome(ssvae_reference))
