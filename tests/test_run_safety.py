"""Nothing a user runs destroys an earlier result: a run directory belongs to one live process,
no script replaces a result without --force (never its own input), and a result the method
cannot produce is refused instead of printed.

Processes are held at named pause points (``pyro_vae.faults``) while a second one tries its
luck, so nothing here depends on timing."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import SCRIPTS_DIR, TINY, run_in_process, run_script
from test_resume import held_at, kill

from pyro_vae.io.rundir import LOCK_NAME, Outputs, RunDir, RunDirError, default_run_dir

pytestmark = pytest.mark.slow

SMALL = ["--epochs", "2", *TINY, "--eval-particles", "0", "--hidden", "32", "--z-dim", "4"]


def snapshot(directory):
    """Every file under ``directory`` (the lock file aside) and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


def one_line(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# -- one process per run directory --------------------------------------------------------


def test_a_second_run_on_a_live_run_directory_is_refused_and_touches_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    first = held_at([*SMALL, "--out", str(out)], data_dir, "epoch-saved:1", tmp_path)
    try:
        before = snapshot(out)
        for args in ([*SMALL, "--out", str(out)], ["--resume", str(out), "--quiet"]):
            second = run_script("train_svi.py", args, data_dir)
            assert second.returncode == 2
            line = one_line(second)
            assert f"in use by process {first.pid}" in line, line
            assert snapshot(out) == before  # byte for byte
        first.send_signal(signal.SIGINT)  # the first run stops cleanly at its step boundary
        assert first.wait(timeout=300) == 130
    finally:
        if first.poll() is None:
            kill(first)


def test_a_killed_run_leaves_no_stale_lock_and_resumes_at_once(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = held_at([*SMALL, "--out", str(out)], data_dir, "epoch-saved:1", tmp_path)
    kill(proc)
    assert (out / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock
    resumed = run_script("train_svi.py", ["--resume", str(out), "--quiet"], data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_default_run_names_do_not_collide_and_a_taken_directory_is_refused(tmp_path):
    names = {default_run_dir("vae", tmp_path) for _ in range(50)}
    assert len(names) == 50  # same second, different names
    taken = tmp_path / "taken"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pyro_vae.io.rundir import RunDir; "
            f"RunDir({str(taken)!r}).acquire(new=True); print('held', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for new in (True, False):
            with pytest.raises(RunDirError, match=f"in use by process {holder.pid}"):
                RunDir(taken).acquire(new=new)
            with pytest.raises(RunDirError, match="in use by process"):
                RunDir(taken).check(new=new)
    finally:
        holder.communicate("")
    RunDir(taken).acquire(new=True).release()  # free again once the holder exited


def test_a_resumed_run_whose_config_json_is_another_runs_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_script("train_svi.py", [*SMALL, "--out", str(out)], data_dir).returncode == 0
    config = json.loads((out / "config.json").read_text())
    for bad in ("{ not json", json.dumps({**config, "z_dim": 99, "model_class": "SSVAE"})):
        (out / "config.json").write_text(bad)
        before = snapshot(out)
        result = run_script("train_svi.py", ["--resume", str(out), "--epochs", "3"], data_dir)
        assert result.returncode == 2 and "config.json does not match" in one_line(result)
        assert snapshot(out) == before


# -- no result replaced without --force, never an input ----------------------------------


def test_evaluation_reports_need_force_and_max_rows_changes_no_number(
    data_dir, trained_run, tmp_path
):
    out = tmp_path / "eval"
    base = ["--checkpoint", str(trained_run), "--num-particles", "30", "--eval-size", "24"]
    base += ["--out", str(out), "--quiet", "--seed", "5"]
    first = run_script("evaluate_marginal_likelihood.py", [*base, "--max-rows", "7"], data_dir)
    assert first.returncode == 0, first.stderr
    report = out / "marginal_likelihood_k30.json"
    before = snapshot(out)
    assert "figures/marginal_likelihood_k30_bound_vs_k.png" in before
    again = run_script("evaluate_marginal_likelihood.py", [*base, "--max-rows", "50"], data_dir)
    assert again.returncode == 2 and "--force" in one_line(again)
    assert snapshot(out) == before
    for rows in ("50", "1000"):
        forced = run_script(
            "evaluate_marginal_likelihood.py", [*base, "--max-rows", rows, "--force"], data_dir
        )
        assert forced.returncode == 0, forced.stderr
        # same seed, same numbers, whatever the memory setting
        assert report.read_bytes() == before["marginal_likelihood_k30.json"]


def test_compress_never_replaces_an_input_and_needs_force_for_anything_else(
    data_dir, trained_run, tmp_path
):
    images = (np.random.default_rng(0).random((3, 784)) < 0.2).astype(np.uint8)
    source = tmp_path / "digits.npy"
    np.save(source, images)
    packed = tmp_path / "digits.pvbb"
    encode = ["--checkpoint", str(trained_run), "encode", "--input", str(source)]
    assert run_script("compress.py", [*encode, "--output", str(packed)], data_dir).returncode == 0
    original = source.read_bytes()
    for target in (source, trained_run / "checkpoint.pt"):
        for force in ([], ["--force"]):
            result = run_script("compress.py", [*encode, "--output", str(target), *force], data_dir)
            assert result.returncode == 2 and "an input" in one_line(result)
    assert source.read_bytes() == original
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("mine")
    result = run_script("compress.py", [*encode, "--output", str(unrelated)], data_dir)
    assert result.returncode == 2 and "--force" in one_line(result)
    assert unrelated.read_text() == "mine"
    forced = run_script("compress.py", [*encode, "--output", str(unrelated), "--force"], data_dir)
    assert forced.returncode == 0, forced.stderr
    assert oct(unrelated.stat().st_mode & 0o777) != oct(0o600)  # a normal file, not mkstemp's
    decode = ["--checkpoint", str(trained_run), "decode", "--input", str(packed)]
    result = run_script("compress.py", [*decode, "--output", str(packed), "--force"], data_dir)
    assert result.returncode == 2 and "an input" in one_line(result)


def test_outputs_are_staged_so_a_failure_leaves_the_previous_set(tmp_path):
    directory = tmp_path / "results"
    with Outputs(directory) as outputs:
        outputs.write_json("report.json", {"v": 1})
        outputs.path("figures/a.png").write_bytes(b"old figure")
        outputs.commit()
    before = snapshot(directory)
    with pytest.raises(RuntimeError), Outputs(directory, force=True) as outputs:
        outputs.write_json("report.json", {"v": 2})
        outputs.path("figures/a.png").write_bytes(b"new figure")
        raise RuntimeError("the run fails before it commits")
    assert snapshot(directory) == before
    assert not [p for p in directory.iterdir() if p.name.startswith(".staging")]
    with pytest.raises(RunDirError, match="report.json already exists; pass --force to replace it"):
        Outputs(directory).check("report.json")
    with pytest.raises(RunDirError, match="an input"):
        Outputs(directory, force=True, protect=(directory / "report.json",)).check("report.json")
    RunDir(directory).release()


def test_compare_baselines_writes_a_new_directory_each_time(data_dir, tmp_path):
    args = ["--z-dims", "2", "--epochs", "1", "--train-size", "300", "--test-size", "60"]
    args += ["--samples", "20", "--hidden", "16", "--threads", "1", "--quiet"]
    env_cwd = tmp_path / "cwd"
    env_cwd.mkdir()
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(SCRIPTS_DIR / "compare_baselines.py"), *args],
            capture_output=True,
            text=True,
            cwd=env_cwd,
            env={**os.environ, "PYRO_VAE_DATA_DIR": str(data_dir)},
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
    made = sorted((env_cwd / "runs").iterdir())
    assert len(made) == 2 and all(p.name.startswith("baselines-") for p in made)
    assert all((p / "comparison.json").is_file() for p in made)


# -- refused, not printed -----------------------------------------------------------------


def test_a_diverged_gap_fit_is_reported_as_failed(data_dir, trained_run, tmp_path):
    out = tmp_path / "gaps"
    args = ["--checkpoint", str(trained_run), "--images", "4", "--num-particles", "50"]
    args += ["--elbo-particles", "50", "--fit-steps", "200", "--fit-lr", "10", "--out", str(out)]
    result = run_script("inference_gaps.py", args, data_dir)
    assert result.returncode == 1
    line = one_line(result)
    assert "fit failed for" in line and "indices" in line
    assert result.stdout.strip() == ""  # no gap printed
    report = json.loads((out / "inference_gaps_own.json").read_text())
    assert report["status"] == "failed fit" and report["failed_images"]
    assert "approximation_gap" not in report


def test_one_image_as_a_flat_vector_is_refused_by_the_evaluator():
    import torch

    from pyro_vae import VAE, estimate_log_px

    vae = VAE(z_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((784,), 0.3))
    with pytest.raises(ValueError, match=r"shape \(N, 784\).*x\[None\]"):
        estimate_log_px(vae.model, vae.guide, x, num_particles=3)
    result = estimate_log_px(vae.model, vae.guide, x[None], num_particles=3, psis=False)
    assert result.log_px.shape == (1,)


def test_a_semi_supervised_run_that_would_never_see_a_label_is_refused(
    data_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    args = ["--train-size", "500", "--batch-size", "200", "--labelled-every", "5"]
    args += ["--eval-size", "50", "--quiet", "--out", str(tmp_path / "run")]
    status, err = run_in_process("train_ssvae.py", args, capsys)
    assert status == 2 and "no labelled batch would ever be drawn" in err
    assert len(err.strip().splitlines()) == 1
