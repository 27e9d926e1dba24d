"""Training and evaluation on several processes with torchrun (gloo on 2 CPU cores): the
same numbers as one process, checkpoints that move between world sizes, a killed rank that
stops the others, and bad launches that fail with one line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SCRIPTS_DIR

from pyro_vae import load_checkpoint
from pyro_vae.data import Dataset
from pyro_vae.faults import PAUSE_ENV, PAUSE_FILE_ENV
from pyro_vae.training.distributed import Ranks, ShardedLoader, shard_bounds

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN = str(SCRIPTS_DIR / "train_svi.py")
EVALUATE = str(SCRIPTS_DIR / "evaluate_marginal_likelihood.py")
ARGS = [
    *("--train-size", "512", "--eval-size", "64", "--batch-size", "64", "--epochs", "3"),
    *("--eval-particles", "20", "--hidden", "32", "--z-dim", "4", "--threads", "1"),
    *("--seed", "5", "--quiet"),
]


def test_shards_cover_everything_once_at_whole_chunks():
    for n, world, align in ((10, 2, 1), (23, 3, 5), (7, 4, 3), (2, 3, 1), (100, 2, 32)):
        bounds = [shard_bounds(n, Ranks(r, world), align) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(start % align == 0 for start, stop in bounds if stop > start)


def test_sharded_batches_are_the_single_process_batch():
    from pyro_vae import BatchLoader

    data = Dataset(torch.rand(50, 6))
    batches = list(BatchLoader(data, 16, shuffle=True, binarize="dynamic", seed=1))
    shards = [
        list(
            ShardedLoader(
                BatchLoader(data, 16, shuffle=True, binarize="dynamic", seed=1), Ranks(r, 3)
            )
        )
        for r in range(3)
    ]
    assert len(shards[0]) == len(batches) - 1  # the last batch, 2 rows for 3 ranks, is skipped
    for i, (x,) in enumerate(batches[:-1]):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), x)


def environment(data_dir, **extra):
    env = {**os.environ, "PYRO_VAE_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
    env.pop(PAUSE_ENV, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, script, args, data_dir, *, timeout=300, **env):
    cmd = [*TORCHRUN, f"--nproc-per-node={nproc}", "--master-port", str(free_port()), script]
    return subprocess.run(
        [*cmd, *args],
        env=environment(data_dir, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def python(script, args, data_dir, *, timeout=300):
    return subprocess.run(
        [sys.executable, script, *args],
        env=environment(data_dir),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def weights(run_dir):
    return load_checkpoint(run_dir)["model"]


@pytest.mark.slow
def test_two_processes_train_the_same_parameters_as_one(data_dir, tmp_path):
    worker = str(ROOT / "tests" / "ddp_worker.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    result = subprocess.run(
        [sys.executable, worker, str(one)],
        env=environment(data_dir),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    result = torchrun(2, worker, [str(two)], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5), key
    for ma, mb in zip(a["history"], b["history"]):  # the epoch losses are global sums too
        assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_scripts_under_torchrun_checkpoints_move_between_world_sizes(data_dir, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    result = torchrun(2, TRAIN, [*ARGS, "--out", str(two)], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank1]" not in result.stdout and result.stdout.count("test ELBO") == 1
    assert sorted(p.name for p in two.iterdir() if p.name != ".lock") == sorted(
        ["checkpoint.pt", "config.json", "evaluation.json", "figures", "metrics.jsonl"]
    )
    result = python(TRAIN, [*ARGS, "--out", str(one)], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert weights(two).keys() == weights(one).keys()  # no "module." prefix
    state = load_checkpoint(two)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    # 2 -> 1 and 1 -> 2: resume with more epochs under the other world size
    result = python(TRAIN, ["--resume", str(two), "--epochs", "4", "--quiet"], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    result = torchrun(2, TRAIN, ["--resume", str(one), "--epochs", "4", "--quiet"], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in (one, two):
        assert load_checkpoint(run)["trainer"]["epoch"] == 4
    # evaluation: the same report, per image bit for bit, from 1 and 2 ranks
    args = ["--checkpoint", str(one), "--num-particles", "30", "--eval-size", "50", "--quiet"]
    assert python(EVALUATE, [*args, "--out", str(tmp_path / "e1")], data_dir).returncode == 0
    result = torchrun(2, EVALUATE, [*args, "--out", str(tmp_path / "e2")], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [
        json.loads((tmp_path / e / "marginal_likelihood_k30.json").read_text())
        for e in ("e1", "e2")
    ]
    assert reports[0] == reports[1]


@pytest.mark.slow
def test_semi_supervised_training_under_torchrun(data_dir, tmp_path):
    args = [
        *("--labels", "100", "--epochs", "2", "--train-size", "1300", "--batch-size", "100"),
        *("--eval-size", "100", "--hidden", "32", "--classifier-hidden", "32", "--z-dim", "4"),
        *("--eval-particles", "5", "--likelihood-size", "20", "--threads", "1", "--quiet"),
    ]
    out = tmp_path / "run"
    result = torchrun(2, str(SCRIPTS_DIR / "train_ssvae.py"), [*args, "--out", str(out)], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("test accuracy") == 1
    assert (out / "best.pt").is_file() and (out / "evaluation.json").is_file()


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_and_the_run_resumes_bitwise(data_dir, tmp_path):
    reference = tmp_path / "reference"
    result = torchrun(2, TRAIN, [*ARGS, "--out", str(reference)], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out, marker = tmp_path / "run", tmp_path / "held"
    cmd = [*TORCHRUN, "--nproc-per-node=2", "--master-port", str(free_port()), TRAIN]
    env = environment(data_dir, **{PAUSE_ENV: "epoch-saved:2@1", PAUSE_FILE_ENV: marker})
    proc = subprocess.Popen(
        [*cmd, *ARGS, "--out", str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    held = Path(f"{marker}.rank1")
    deadline = time.monotonic() + 300
    while not held.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "rank 1 never reached its pause point"
        time.sleep(0.05)
    pid = int(
        subprocess.run(
            ["pgrep", "-f", f"{TRAIN}.*--out {out}"], capture_output=True, text=True
        ).stdout.split()[-1]
    )  # the youngest worker: rank 1
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert time.monotonic() - killed_at < 150  # the process group timeout is 120 s
    assert proc.returncode != 0
    # rank 0 either meets the closed connection first or is stopped by torchrun: one line
    # either way; torchrun's own report names the rank that died
    assert (
        "error: rank 0: the process group was lost" in err
        or "error: rank 0: stopped by torchrun because another process of the run failed" in err
    ), err[-3000:]
    root_cause = err[err.index("Root Cause") :]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "SIGKILL" in root_cause
    load_checkpoint(out)  # whole
    result = torchrun(2, TRAIN, ["--resume", str(out), "--quiet"], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = load_checkpoint(out), load_checkpoint(reference)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.loads((out / "evaluation.json").read_text()) == json.loads(
        (reference / "evaluation.json").read_text()
    )


@pytest.mark.slow
def test_two_nodes_on_one_machine(data_dir, tmp_path):
    port = free_port()
    common = [
        *TORCHRUN,
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=pyro-vae-test",
    ]
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [*common, f"--node-rank={node}", TRAIN, *ARGS, "--out", str(out)],
            env=environment(data_dir),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    assert load_checkpoint(out)["world_size"] == 2


@pytest.mark.slow
def test_bad_launches_are_one_line_and_exit_2(data_dir, tmp_path):
    result = torchrun(
        2, TRAIN, [*ARGS, "--batch-size", "63", "--out", str(tmp_path / "a")], data_dir
    )
    assert result.returncode != 0 and not (tmp_path / "a").exists()
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: --batch-size 63 (the global batch) is not a multiple of the 2 processes"
    ]
    # no traceback from the workers (torchrun prints its own report of their exit status)
    assert "[rank0]:" not in result.stderr and "[rank1]:" not in result.stderr
    # a rank that cannot reach the rendezvous: nobody listens on the port
    env = environment(
        data_dir,
        WORLD_SIZE=2,
        RANK=1,
        LOCAL_RANK=0,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        PYRO_VAE_DIST_TIMEOUT=3,
    )
    result = subprocess.run(
        [sys.executable, TRAIN, *ARGS, "--out", str(tmp_path / "b")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().startswith(
        "error: rank 1 could not join the process group at 127.0.0.1:"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_the_same_code(data_dir, tmp_path):
    result = python(TRAIN, [*ARGS, "--device", "cuda", "--out", str(tmp_path / "gpu")], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
