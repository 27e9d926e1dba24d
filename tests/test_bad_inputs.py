"""Every flag of every script, given invalid values, fails with one line and exit status 2
and leaves no run directory behind; data problems raise one-line DataErrors."""

import json

import numpy as np
import pytest
import torch
from helpers import SCRIPTS_DIR, load_script, run_in_process

from pyro_vae import (
    VAE,
    BatchLoader,
    DataError,
    as_dataset,
    check_images,
    cli,
    load_checkpoint,
)

REQUIRED = {
    "evaluate_marginal_likelihood.py": ["--checkpoint", "{run}"],
    "compress.py": ["--checkpoint", "{run}"],
    "inference_gaps.py": ["--checkpoint", "{run}"],
    "detect_ood.py": ["--checkpoint", "{run}", "--ood", "noise"],
}
BAD_BY_TYPE = {
    # sizes past int64 would reach torch as C++ overflow errors
    cli.positive_int: ["0", "-1", "1.5", "x", str(2**63)],
    cli.nonnegative_int: ["-1", "x", str(10**19)],
    cli.positive_float: ["0", "-2", "nan", "inf", "x"],
    cli.nonnegative_float: ["-1", "x"],
    cli.hidden_sizes: ["0", "-5", "a,b", "", f"4,{2**63}"],
    cli.unit_interval: ["-0.1", "1.5", "nan", "x"],
    cli.warmup_length: ["-1", "x", "150%", "1.5", "%"],
    cli.adam_betas: ["0.9", "0.9,1", "a,b", "0.9,0.99,0.5"],
    cli.seed_value: ["-1", "x", "1.5", str(2**32), str(2**64)],  # numpy takes 32 bits
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
    status, err = run_in_process(script, [*required, flag, value, "--out", str(out)], capsys)
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
    ("detect_ood.py", ["--checkpoint", "{tmp}/missing", "--ood", "noise"], "no checkpoint"),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--ood", "noise", "--background", "{tmp}/missing"],
        "no checkpoint",
    ),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--ood", "noise", "--out", "{file}/x"],
        "--out",
    ),
    ("train_ssvae.py", ["--m1", "{tmp}/missing"], "no checkpoint"),
    ("train_ssvae.py", ["--m1", "{file}"], "truncated or corrupt"),
    # flags that do not go together
    ("train_svi.py", ["--flow", "iaf", "--covariance", "full"], "--covariance: a flow starts"),
    ("train_svi.py", ["--x-scale", "0.5"], "--x-scale: applies to the gaussian likelihood"),
    ("train_svi.py", ["--flow", "planar", "--elbo", "dreg"], "no inverse"),
    # a flag of the other model is refused, not ignored
    (
        "train_svi.py",
        ["--guide", "top-down", "--out", "{tmp}/r"],
        "--guide applies to --model hvae",
    ),
    ("train_svi.py", ["--z-dims", "10,5", "--out", "{tmp}/r"], "--z-dims applies to --model hvae"),
    ("train_svi.py", ["--flow-depth", "3", "--out", "{tmp}/r"], "--flow-depth applies to a --flow"),
    (
        "train_svi.py",
        ["--model", "hvae", "--z-dim", "20", "--out", "{tmp}/r"],
        "--z-dim applies to --model vae",
    ),
    (
        "train_svi.py",
        ["--model", "hvae", "--z-dims", "10", "--layer-hidden", "20/30", "--out", "{tmp}/r"],
        "--layer-hidden: needs one list of sizes per stochastic layer",
    ),
    ("train_ssvae.py", ["--m1", "{run}", "--classifier", "conv"], "--classifier: conv"),
    ("train_ssvae.py", ["--m1", "{run}", "--balance", "5"], "--balance"),
    ("train_ssvae.py", ["--label-rotate", "200", "--out", "{tmp}/r"], "in degrees in [0, 180]"),
    # numbers that the data cannot give name the flags that chose them
    ("train_ssvae.py", ["--labels", "15", "--out", "{tmp}/r"], "--labels: 15"),
    (
        "train_ssvae.py",
        ["--train-size", "300", "--labels", "100", "--batch-size", "250", "--out", "{tmp}/r"],
        "--batch-size: 250, but the 200 unlabelled images are fewer than one batch",
    ),
    # sizes larger than the split, or than the machine can hold
    ("train_svi.py", ["--train-size", "50001", "--out", "{tmp}/r"], "has only 50000 images"),
    ("train_svi.py", ["--eval-size", "10001", "--out", "{tmp}/r"], "has only 10000 images"),
    ("train_svi.py", ["--z-dim", str(10**12), "--out", "{tmp}/r"], "not enough memory"),
    ("train_svi.py", ["--hidden", f"{10**12}", "--out", "{tmp}/r"], "not enough memory"),
    ("train_ssvae.py", ["--train-size", "60000", "--out", "{tmp}/r"], "has only 50000 images"),
    (
        "evaluate_marginal_likelihood.py",
        ["--checkpoint", "{run}", "--eval-size", "10001", "--out", "{tmp}/e"],
        "has only 10000 images",
    ),
    (
        "evaluate_marginal_likelihood.py",
        ["--checkpoint", "{run}", "--num-particles", str(10**13), "--out", "{tmp}/e"],
        "not enough memory",
    ),
    (
        "inference_gaps.py",
        ["--checkpoint", "{run}", "--images", "10001", "--out", "{tmp}/g"],
        "has only 10000 images",
    ),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--ood", "noise", "--images", "10001", "--out", "{tmp}/o"],
        "has only 10000 images",
    ),
    (
        "compare_baselines.py",
        ["--train-size", "50001", "--out", "{tmp}/b"],
        "has only 50000 images",
    ),
    ("compare_baselines.py", ["--samples", "3", "--out", "{tmp}/b"], "--samples: at least 10"),
    # the same data set in and out of distribution; outputs that are directories or inputs
    ("detect_ood.py", ["--checkpoint", "{run}", "--ood", "mnist"], "nothing to tell apart"),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--ood", "noise", "--compressor", "bz2", "--select-images", "50"],
        "--select-images: applies to compressor auto",
    ),
    (
        "compress.py",
        ["--checkpoint", "{run}", "encode", "--split", "test", "--output", "{tmp}"],
        "is a directory",
    ),
    (
        "compress.py",
        ["--checkpoint", "{run}", "encode", "--split", "test", "--count", "10001"]
        + ["--output", "{tmp}/x.pvbb"],
        "has only 10000 images",
    ),
    ("evaluate_marginal_likelihood.py", ["--checkpoint", "{run}", "--out", "{file}"], "--out"),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--ood", "noise", "--background", "{run}/checkpoint.pt"]
        + ["--out", "{tmp}/o"],
        "the model itself",
    ),
    (
        "compare_baselines.py",
        ["--z-dims", "1000", "--out", "{tmp}/b"],
        "--z-dims: PCA has at most 784 components with 50000 training images of 784 pixels, "
        "got 1000",
    ),
    ("train_svi.py", ["--threads", "100000", "--out", "{tmp}/r"], "--threads 100000: more than"),
    (
        "train_svi.py",
        ["--train-size", "300", "--batch-size", str(10**18), "--out", "{tmp}/r"],
        "more than the 300 training images",
    ),
    (
        "compare_baselines.py",
        ["--train-size", "5", "--z-dims", "2", "10", "--out", "{tmp}/b"],
        "--z-dims: PCA has at most 5 components with 5 training images of 784 pixels, got 10",
    ),
    (
        "detect_ood.py",
        ["--checkpoint", "{run}", "--ood", "noise", "--select-images", "2", "--out", "{tmp}/o"],
        "--select-images: at least 3 images are needed, got 2",
    ),
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
    (lambda: as_dataset(np.full((3, 4), np.nan, np.float32)), "NaN or inf"),
    (lambda: as_dataset(np.full((3, 4), 2.0, np.float32)), "in [0, 1]"),
    (lambda: as_dataset(np.zeros((3, 4), np.float32), labels=[0, -1, 2]), "class indices"),
    (lambda: BatchLoader(np.zeros((3, 4), np.float32), 2), "must be a Dataset"),
    (lambda: BatchLoader(as_dataset(np.zeros((3, 4), np.float32)), 2.5), "positive integer"),
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


def test_help_answers_before_torch_and_pyro_are_imported():
    """Every script parses its arguments (--help, a bad flag) with nothing heavy loaded."""
    import subprocess
    import sys

    for path in sorted(SCRIPTS_DIR.glob("*.py")):
        probe = (
            "import runpy, sys\n"
            f"sys.argv = [{str(path)!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({str(path)!r}, run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('loaded:', sorted(m for m in ('torch', 'pyro') if m in sys.modules))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
        )
        assert "usage:" in result.stdout and "loaded: []" in result.stdout, (path.name, result)


def test_the_names_users_choose_from_match_what_implements_them():
    from pyro_vae import choices
    from pyro_vae.apps import ood
    from pyro_vae.networks import nets
    from pyro_vae.training import trainer as train

    assert tuple(train.ELBOS) == choices.ELBO_NAMES
    assert set(nets.ACTIVATIONS) == set(choices.ACTIVATIONS)
    assert set(ood.COMPRESSORS) == set(choices.COMPRESSORS)


API_CASES = [
    (lambda: VAE(z_dim=2.5), TypeError, "z_dim must be an integer"),
    (lambda: VAE(hidden=400), TypeError, "hidden must be a sequence"),
    (lambda: VAE(hidden=(400, 0)), ValueError, r"hidden\[1\] must be positive"),
    (lambda: VAE(beta=float("nan")), ValueError, "beta must be a finite positive"),
    (lambda: estimate(np.full((2, 784), 0.5, np.float32), 5), ValueError, "binary"),
    (lambda: estimate(torch.zeros(2, 784, dtype=torch.long), 5), TypeError, "floating"),
    (lambda: estimate(torch.full((2, 784), float("nan")), 5), ValueError, "NaN or inf"),
    (lambda: estimate(torch.zeros(2, 100), 5), ValueError, r"shape \(N, 784\)"),
    (lambda: estimate(torch.zeros(2, 784), 0), ValueError, "num_particles must be positive"),
    (lambda: estimate(torch.zeros(2, 784), 2.0), TypeError, "num_particles must be an integer"),
    (lambda: estimate(torch.zeros(2, 784), 5, ks=(0,)), ValueError, "ks must be positive"),
    (lambda: estimate([[0.0] * 784], 5), TypeError, "torch.Tensor or numpy array"),
]


def estimate(x, k, **kwargs):
    from pyro_vae import estimate_log_px

    vae = VAE(z_dim=2, hidden=(8,))
    return estimate_log_px(vae.model, vae.guide, x, num_particles=k, **kwargs)


@pytest.mark.parametrize("make,kind,message", API_CASES)
def test_public_functions_check_their_arguments_in_one_line(make, kind, message):
    with pytest.raises(kind, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_a_numpy_array_is_evaluated_as_its_tensor():
    from pyro_vae import estimate_log_px

    vae = VAE(z_dim=2, hidden=(8,))
    x = (np.random.default_rng(0).random((3, 784)) < 0.3).astype(np.float32)
    torch.manual_seed(0)
    a = estimate_log_px(vae.model, vae.guide, x, num_particles=4, psis=False)
    torch.manual_seed(0)
    b = estimate_log_px(vae.model, vae.guide, torch.from_numpy(x), num_particles=4, psis=False)
    assert torch.equal(a.log_px, b.log_px)


def test_every_exception_class_of_the_library_survives_being_re_raised_with_its_text():
    """Pyro re-raises an error from inside a model as ``type(e)(text)``: every class the
    library raises must take its own text back as its only argument."""
    import importlib
    import inspect
    import pkgutil

    import pyro_vae
    from pyro_vae.checks import ConfigError
    from pyro_vae.training.stepper import NonFiniteError
    from pyro_vae.training.trainer import TrainingInterrupted

    examples = {
        ConfigError: ConfigError("guide", "L^{>k} needs q(z_{>k} | x)"),
        NonFiniteError: NonFiniteError("loss", 3, 7, ["model:x"]),
        TrainingInterrupted: TrainingInterrupted(2, 40),
    }
    classes = set()
    for info in pkgutil.walk_packages(pyro_vae.__path__, "pyro_vae."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("pyro_vae"):
                classes.add(obj)
    assert ConfigError in classes and len(classes) > 10
    for cls in classes:
        original = examples.get(cls) or cls("a message that says what went wrong")
        again = cls(str(original) + "\nTrace Shapes: ...")
        assert str(again).startswith(str(original)), cls


def test_compress_refuses_an_input_without_images_in_one_line(tmp_path, capsys, trained_run):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 784), np.float32))
    args = ["--checkpoint", str(trained_run), "encode", "--input", str(empty)]
    status, err = run_in_process(
        "compress.py", [*args, "--output", str(tmp_path / "e.pvbb")], capsys
    )
    assert status == 2 and "holds no images" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "e.pvbb").exists()


def test_a_run_that_diverges_before_its_first_checkpoint_says_what_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--lr", "1e300", "--epochs", "1", "--train-size", "300", "--eval-size", "50"]
    status, err = run_in_process("train_svi.py", [*args, "--quiet", "--out", str(out)], capsys)
    assert status == 1 and len(err.strip().splitlines()) == 1, err
    assert "no checkpoint to resume" in err and f"remove {out}" in err
    assert "checkpoint was kept" not in err


def test_one_test_image_gives_strict_json_and_every_figure(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--epochs", "1", "--train-size", "300", "--eval-size", "1", "--eval-particles", "10"]
    status, err = run_in_process("train_svi.py", [*args, "--quiet", "--out", str(out)], capsys)
    assert status == 0, err

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((out / "evaluation.json").read_text(), parse_constant=refuse)
    assert report["log_px_sem"] is None  # no standard error from one image
    assert (out / "figures" / "latent_map.png").is_file()


def test_a_figure_that_rounds_to_zero_is_printed_without_a_minus_sign():
    assert cli.shown(-0.0002, ".3f") == "0.000"
    assert cli.shown(-0.0002, "7.3f") == "  0.000"
    assert cli.shown(-0.5, ".3f") == "-0.500"


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_a_checkpoint_without_a_run_config_is_refused_before_any_work(script, tmp_path, capsys):
    """A model saved by hand says nothing of the data it was trained on: every script that
    scores held-out images refuses it in one line rather than guess MNIST."""
    from pyro_vae import save_checkpoint

    vae = VAE(x_dim=784, z_dim=2, hidden=(8,))
    state = {"model_class": "VAE", "model_config": vae.config(), "model": vae.state_dict()}
    (tmp_path / "bare").mkdir()
    save_checkpoint(tmp_path / "bare" / "checkpoint.pt", state)
    args = [a.replace("{run}", str(tmp_path / "bare")) for a in REQUIRED[script]]
    if script == "compress.py":
        args += ["encode", "--split", "test", "--output", str(tmp_path / "c.pvbb")]
    status, err = run_in_process(script, args, capsys)
    assert status == 2 and "no run config" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["checkpoint.pt"]
