"""Every script in scripts/ runs end to end with tiny settings (the pattern of Pyro's
tests/test_examples.py), and bad input gives one line on stderr with exit status 2."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import SCRIPTS_DIR, TINY, load_script, run_in_process, run_script

# script -> list of argument lists; every script in scripts/ must appear here.
# "{run}" stands for a run directory that a tiny train_svi.py run made.
SSVAE_TINY = [
    "--labels",
    "100",
    "--train-size",
    "1300",
    "--batch-size",
    "100",
    "--eval-size",
    "100",
    "--hidden",
    "64",
    "--classifier-hidden",
    "64",
    "--z-dim",
    "8",
    "--quiet",
]
SMOKE_RUNS = {
    "compare_baselines.py": [
        [
            *("--z-dims", "2", "3", "--epochs", "1", "--train-size", "600"),
            *("--test-size", "100", "--samples", "50", "--hidden", "32", "--threads", "1"),
        ],
    ],
    "detect_ood.py": [
        [
            *("--checkpoint", "{run}", "--ood", "noise", "--images", "30", "--num-particles"),
            *("10", "--background", "{background}"),
        ],
        [
            *("--checkpoint", "{run}/checkpoint.pt", "--ood", "flipped", "--images", "20"),
            *("--num-particles", "5", "--compressor", "bz2", "--quiet"),
        ],
    ],
    "inference_gaps.py": [
        [
            *("--checkpoint", "{run}", "--images", "4", "--num-particles", "20"),
            *("--elbo-particles", "20", "--fit-steps", "300", "--family", "full", "--quiet"),
        ],
    ],
    "compress.py": [
        [
            "--checkpoint",
            "{run}",
            "encode",
            "--split",
            "valid",
            "--count",
            "12",
            "--output",
            "{out}.pvbb",
        ],
        [
            *("--checkpoint", "{run}", "encode", "--split", "valid", "--count", "8"),
            *("--particles", "4", "--output", "{out}-k4.pvbb"),
        ],
    ],
    "train_ssvae.py": [
        [
            *("--epochs", "2", "--eval-particles", "5", "--likelihood-size", "20"),
            *("--balance", "5", "--label-shift", "2", *SSVAE_TINY),
        ],
        [
            "--epochs",
            "1",
            "--eval-particles",
            "0",
            "--binarize",
            "static",
            "--labelled-every",
            "2",
            "--aux-weight",
            "0",
            "--classifier",
            "conv",
            *("--label-shift", "1", "--label-rotate", "10", "--label-shear", "15"),
            *SSVAE_TINY,
        ],
        # M1+M2 on the codes of the tiny VAE, stopped early by --patience or --max-minutes
        [
            *("--m1", "{run}", "--epochs", "6", "--patience", "1", "--max-minutes", "10"),
            *("--eval-particles", "4", "--likelihood-size", "10", *SSVAE_TINY),
        ],
    ],
    "evaluate_marginal_likelihood.py": [
        ["--checkpoint", "{run}", "--num-particles", "60", "--eval-size", "40", "--quiet"],
        [
            "--checkpoint",
            "{run}/checkpoint.pt",
            "--num-particles",
            "7",
            "--split",
            "valid",
            "--eval-size",
            "10",
            "--no-psis",
            "--max-rows",
            "20",
            "--quiet",
        ],
    ],
    "train_svi.py": [
        ["--epochs", "2", "--eval-particles", "50", *TINY],
        ["--epochs", "1", "--preset", "classic", "--eval-particles", "10", "--threads", "1", *TINY],
        [
            "--epochs",
            "2",
            "--elbo",
            "iwae",
            "--num-particles",
            "3",
            "--covariance",
            "full",
            "--lr-schedule",
            "cosine",
            "--eval-particles",
            "0",
            *TINY,
        ],
        [
            "--epochs",
            "1",
            "--elbo",
            "meanfield",
            "--likelihood",
            "gaussian",
            "--binarize",
            "none",
            "--hidden",
            "32,16",
            "--z-dim",
            "2",
            "--beta",
            "2",
            "--eval-particles",
            "0",
            *TINY,
        ],
        [
            "--epochs",
            "1",
            "--elbo",
            "jit",
            "--binarize",
            "static",
            "--num-particles",
            "2",
            "--eval-particles",
            "20",
            *TINY,
        ],
    ],
}


def test_every_script_has_a_smoke_run():
    scripts = {p.name for p in SCRIPTS_DIR.glob("*.py")}
    assert scripts, "no scripts found"
    assert scripts == set(SMOKE_RUNS), f"scripts without a smoke run: {scripts - set(SMOKE_RUNS)}"


def background_run(run, directory):
    """A background model for detect_ood.py: the trained run's checkpoint with its decoder's
    output bias moved (the model itself is refused as its own background)."""
    import torch

    from pyro_vae.io.checkpoints import load_checkpoint, save_checkpoint

    state = load_checkpoint(run)
    bias = next(k for k in state["model"] if k.startswith("decoder") and k.endswith("bias"))
    state["model"][bias] = state["model"][bias] + 0.5 * torch.randn_like(state["model"][bias])
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory / "checkpoint.pt", state)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args",
    [(s, a) for s, runs in SMOKE_RUNS.items() for a in runs],
    ids=lambda v: v if isinstance(v, str) else " ".join(v[:6]),
)
def test_script_smoke(script, args, data_dir, trained_run, tmp_path):
    out = tmp_path / "run"
    if "{background}" in args:
        background_run(trained_run, tmp_path / "background")
    args = [
        a.replace("{run}", str(trained_run))
        .replace("{out}", str(out))
        .replace("{background}", str(tmp_path / "background"))
        for a in args
    ]
    extra = [] if script == "compress.py" else ["--out", str(out)]
    result = run_script(script, [*args, *extra], data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if script == "train_svi.py":
        assert (out / "config.json").is_file() and (out / "checkpoint.pt").is_file()
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))
        report = json.loads((out / "evaluation.json").read_text())
        assert math.isfinite(report["elbo"]) and report["units"] == "nats per image"
        if "log_px" in report:
            assert report["log_px"] >= report["elbo"]
            assert "test log p(x)" in result.stdout
        figures = {p.name for p in (out / "figures").glob("*.png")}
        assert {
            "elbo_curves.png",
            "reconstructions.png",
            "prior_samples.png",
            "latent_map.png",
            "interpolation.png",
        } <= figures
    if script == "train_ssvae.py":
        report = json.loads((out / "evaluation.json").read_text())
        assert 0 <= report["test_error"] <= 1 and report["labels"] == 100
        assert (out / "best.pt").is_file() and "test accuracy" in result.stdout
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(0 <= m["val_accuracy"] <= 1 for m in metrics)
        assert {"confusion.png", "style_content.png"} <= {
            p.name for p in (out / "figures").glob("*.png")
        }
        config = json.loads((out / "config.json").read_text())
        assert len(config["labelled_indices"]) == 100
        if "log_px" in report:
            assert report["log_px"] >= report["log_pxy"]  # summing over y adds mass
        if "--m1" in args:
            assert report["model"] == "StackedSSVAE" and config["model_class"] == "StackedSSVAE"
            assert report["epochs_trained"] == len(metrics) <= 6
            if report["stopped"] is not None:  # patience 1: stopped right after a non-improvement
                assert metrics[-1]["val_accuracy"] <= max(m["val_accuracy"] for m in metrics[:-1])
    if script == "inference_gaps.py":
        report = json.loads((out / "inference_gaps_full.json").read_text())
        assert report["num_datapoints"] == 4 and report["units"] == "nats per image"
        gap = report["inference_gap"]["mean"]
        parts = report["approximation_gap"]["mean"] + report["amortisation_gap"]["mean"]
        assert math.isclose(gap, parts, abs_tol=1e-6)
        assert (out / "figures" / "inference_gaps_full.png").is_file()
    if script == "detect_ood.py":
        kind = args[args.index("--ood") + 1]
        report = json.loads((out / f"ood_mnist_vs_{kind}.json").read_text())
        n = int(args[args.index("--images") + 1])
        assert report["images"] == {"in": n, "out": n}
        for metrics in report["metrics"].values():
            assert 0 <= metrics["auroc"] <= 1 and 0 <= metrics["fpr_at_95_tpr"] <= 1
        assert {f"ood_mnist_vs_{kind}_roc.png", f"ood_mnist_vs_{kind}_scores.png"} <= {
            p.name for p in (out / "figures").glob("*.png")
        }
        assert ("AUROC" in result.stdout) == ("--quiet" not in args)
        if "--background" in args:  # another model's weights: a ratio that is not zero
            assert 0 <= report["metrics"]["background_ratio"]["auroc"] <= 1
            assert report["mean_score"]["background_ratio"]["in"] != 0
            assert report["background"]["perturb"] == 0.0
    if script == "compare_baselines.py":
        report = json.loads((out / "comparison.json").read_text())
        assert set(report["results"]) == {"2", "3"}
        assert report["capabilities"]["GAN"] == {
            "reconstruct": False,
            "log p(x)": False,
            "sample": True,
        }
        for methods in report["results"].values():
            assert set(methods) == {"PCA", "linear autoencoder", "autoencoder", "VAE", "GAN"}
            for name, m in methods.items():
                if name == "GAN":  # no encoder: nothing to reconstruct with
                    assert m["bce_per_pixel"] is None and m["squared_error_per_pixel"] is None
                else:
                    assert 0 < m["squared_error_per_pixel"] < 1 and m["bce_per_pixel"] > 0
                q = m["samples"]
                assert m["train_seconds"] > 0
                assert 0 <= q["class_balance"] <= 1 + 1e-9
                assert sum(q["class_counts"]) == 50
                assert q["frechet_distance"] > 0 and 0 <= q["precision"] <= 1
                assert 0 <= q["recall"] <= 1
        for reference in report["reference"].values():
            assert 0 < reference["frechet_distance"]
        figures = {p.name for p in (out / "figures").glob("*.png")}
        expected = {"latent_maps_d2.png", "samples_d3.png", "reconstructions_d3.png"}
        assert expected | {"interpolations_d3.png"} <= figures
        assert "FD" in result.stdout and "GAN" in result.stdout
    if script == "compress.py":
        packed = Path(args[args.index("--output") + 1])
        assert packed.stat().st_size > 0 and "bits per pixel" in result.stdout
        unpacked = tmp_path / "back.npy"
        back = run_script(
            "compress.py",
            ["--checkpoint", str(trained_run), "decode", "--input", str(packed)]
            + ["--output", str(unpacked)],
            data_dir,
        )
        assert back.returncode == 0, back.stderr[-2000:]
        assert np.load(unpacked).shape == (int(args[args.index("--count") + 1]), 28, 28)
    if script == "evaluate_marginal_likelihood.py":
        k = args[args.index("--num-particles") + 1]
        report = json.loads((out / f"marginal_likelihood_k{k}.json").read_text())
        assert report["log_px"] >= report["elbo"] and report["units"] == "nats per image"
        assert report["num_datapoints"] == int(args[args.index("--eval-size") + 1])
        assert "log p(x)" in result.stdout
        figures = {p.name for p in (out / "figures").glob("*.png")}
        tag = f"marginal_likelihood_k{k}_"
        assert {f"{tag}bound_vs_k.png", f"{tag}gap_histogram.png"} <= figures
        assert (f"{tag}khat.png" in figures) == ("--no-psis" not in args)


def test_evaluation_script_bad_inputs(trained_run, tmp_path, capsys, monkeypatch, data_dir):
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    cases = [
        (["--checkpoint", str(tmp_path / "nothing")], "no checkpoint"),
        (["--checkpoint", str(trained_run), "--num-particles", "0"], "positive integer"),
        (["--checkpoint", str(trained_run), "--split", "train"], "invalid choice"),
    ]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02garbage")
    cases.append((["--checkpoint", str(garbage)], "truncated or corrupt"))
    for args, message in cases:
        status, err = run_in_process("evaluate_marginal_likelihood.py", args, capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_same_seed_same_numbers_through_the_script(data_dir, tmp_path):
    args = ["--epochs", "2", "--eval-particles", "20", "--seed", "3", *TINY]
    reports = []
    for name in ("a", "b"):
        result = run_script("train_svi.py", [*args, "--out", str(tmp_path / name)], data_dir)
        assert result.returncode == 0, result.stderr[-2000:]
        metrics = [
            json.loads(line)
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for m in metrics:
            m.pop("seconds")
        reports.append((metrics, json.loads((tmp_path / name / "evaluation.json").read_text())))
    assert reports[0] == reports[1]


BAD_INPUTS = [
    (["--epochs", "0"], "positive integer"),
    (["--epochs", "-3"], "positive integer"),
    (["--epochs", "two"], "positive integer"),
    (["--batch-size", "0"], "positive integer"),
    (["--lr", "0"], "positive number"),
    (["--lr", "nan"], "positive number"),
    (["--z-dim", "0"], "positive integer"),
    (["--hidden", "400,-1"], "--hidden: '400,-1': sizes must be positive"),
    (["--model", "hvae", "--z-dims", "100,0"], "--z-dims: '100,0': sizes must be positive"),
    (["--beta", "0"], "positive number"),
    (["--perturb", "1"], "in [0, 1)"),
    (["--dataset", "cifar"], "is not one of mnist, fashion-mnist, digits, nor a .npy"),
    (["--likelihood", "poisson"], "invalid choice"),
    (["--binarize", "sometimes"], "invalid choice"),
    (["--device", "tpu"], "invalid choice"),
    (["--binarize", "none"], "Bernoulli likelihood needs binary data"),
    (["--x-scale", "0.1"], "gaussian likelihood only"),
    (["--elbo", "jit", "--train-size", "100", "--batch-size", "128"], "full batch"),
    # a KL weight under an importance-weighted bound is a temperature now; free bits are not
    (["--free-bits", "1"], "--free-bits: applies to the ELBO"),  # the default preset: DReG
    (["--elbo", "jit", "--kl-warmup", "5"], "--kl-warmup: needs an objective"),
    (["--preset", "fastest"], "invalid choice"),
    (["--lr-schedule", "linear"], "invalid choice"),
    (["--threads", "0"], "positive integer"),
    (["--patience", "-1"], "--patience"),
    (["--max-minutes", "0"], "--max-minutes"),
]


@pytest.mark.parametrize(
    "args,message", BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_input_is_one_line_and_exit_2(args, message, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    out = tmp_path / "run"
    status, err = run_in_process("train_svi.py", [*args, "--out", str(out), "--quiet"], capsys)
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--epochs", "0"], ["--binarize", "none"]])
def test_bad_input_in_a_real_process_has_no_traceback(args, data_dir, tmp_path):
    result = run_script("train_svi.py", [*args, "--out", str(tmp_path / "run")], data_dir)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unusable_paths(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, err = run_in_process("train_svi.py", ["--out", str(blocker / "run")], capsys)
    assert status == 2 and "cannot create" in err
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "checkpoint.pt").write_bytes(b"precious")
    status, err = run_in_process("train_svi.py", ["--out", str(existing)], capsys)
    assert status == 2 and "already holds a run" in err
    assert (existing / "checkpoint.pt").read_bytes() == b"precious"
    others = tmp_path / "others"
    others.mkdir()
    (others / "notes.txt").write_text("mine")
    status, err = run_in_process("train_svi.py", ["--out", str(others)], capsys)
    assert status == 2 and "is not empty (notes.txt)" in err and "holds a run" not in err
    status, err = run_in_process(
        "train_svi.py", ["--data-dir", str(blocker / "d"), "--out", str(tmp_path / "r")], capsys
    )
    assert status == 2 and len(err.strip().splitlines()) == 1 and "data directory" in err
    assert not (tmp_path / "r").exists()


def test_resume_refuses_settings_that_would_not_apply(tmp_path, capsys, data_dir, monkeypatch):
    from pyro_vae.cli import run_config

    monkeypatch.setenv("PYRO_VAE_DATA_DIR", str(data_dir))
    module = load_script("train_svi.py")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_config(module.build_parser().parse_args(["--epochs", "1"]), out=run_dir)
    (run_dir / "config.json").write_text(json.dumps(config))
    status, err = run_in_process("train_svi.py", ["--resume", str(run_dir), "--lr", "0.5"], capsys)
    assert status == 2 and "--lr cannot change when resuming" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]


def test_the_scripts_let_idle_threads_wait_passively_unless_told_otherwise():
    """Spinning OpenMP threads collapse on a busy machine (benchmarks/threads.py): the
    scripts' common module sets passive waiting before torch loads; a given value wins."""
    import subprocess
    import sys

    code = "import os, pyro_vae.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE", out.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr


def test_a_run_that_keeps_its_best_epoch_is_that_epoch_for_the_later_scripts(data_dir, tmp_path):
    """train_svi.py --keep-best: evaluation.json names the best validation epoch, and the
    evaluator and the compressor given the run directory read best.pt, not the last epoch."""
    run_dir = tmp_path / "run"
    args = ["--epochs", "6", "--eval-particles", "10", "--keep-best", "--out", str(run_dir)]
    # 32 training images and a large step: the validation ELBO peaks before the last epoch
    overfit = "--train-size 32 --batch-size 8 --lr 0.03 --lr-schedule constant --hidden 128"
    overfit += " --z-dim 8 --eval-size 64 --quiet"
    result = run_script("train_svi.py", [*args, *overfit.split()], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "config.json").read_text())["keep_best"] is True
    val = [json.loads(line)["val_elbo"] for line in (run_dir / "metrics.jsonl").open()]
    best = max(range(len(val)), key=lambda i: (val[i], i)) + 1
    assert best < 6  # else best.pt could not be told from checkpoint.pt
    assert json.loads((run_dir / "evaluation.json").read_text())["best_epoch"] == best
    assert f"scored weights   best.pt, epoch {best}" in result.stdout
    out = tmp_path / "eval"
    args = ["--checkpoint", str(run_dir), "--num-particles", "5", "--eval-size", "8", "--quiet"]
    result = run_script("evaluate_marginal_likelihood.py", [*args, "--out", str(out)], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "marginal_likelihood_k5.json").read_text())
    assert report["epoch"] == best and report["checkpoint"] == str(run_dir / "best.pt")
    assert f"weights {run_dir / 'best.pt'} (epoch {best})" in result.stdout
    encoded = tmp_path / "test.pvbb"
    args = ["--checkpoint", str(run_dir), "encode", "--split", "test", "--count", "4"]
    result = run_script("compress.py", [*args, "--output", str(encoded)], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    # the file names the weights it was coded with: best.pt decodes it, checkpoint.pt refuses
    args = ["decode", "--input", str(encoded), "--output", str(tmp_path / "back.npy")]
    result = run_script("compress.py", ["--checkpoint", str(run_dir / "best.pt"), *args], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    last = ["--checkpoint", str(run_dir / "checkpoint.pt"), *args[:-1], str(tmp_path / "x.npy")]
    result = run_script("compress.py", last, data_dir)
    assert result.returncode == 2 and "weights" in result.stderr, result.stderr
