import os
import random

import numpy as np
import pytest
import torch

from pyro_vae import VAE, CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from pyro_vae.io.checkpoints import get_rng_state, set_rng_state


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def vae_state(vae):
    return {"model_class": "VAE", "model_config": vae.config(), "model": vae.state_dict()}


def test_round_trip_with_weights_only(tmp_path):
    vae = VAE(x_dim=12, z_dim=2, hidden=(5,))
    path = save_checkpoint(
        tmp_path / "c.pt", {**vae_state(vae), "epoch": 3, "metrics": [{"a": 1.5}]}
    )
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == 1 and raw["epoch"] == 3
    again = model_from_checkpoint(load_checkpoint(path))
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), again.parameters()))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary files left


def test_rng_states_round_trip():
    state = get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_code_in_a_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format_version": 1, "evil": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    vae = VAE(x_dim=12, z_dim=2, hidden=(5,))
    path = save_checkpoint(tmp_path / "checkpoint.pt", vae_state(vae))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a pyro-vae checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_architecture_mismatch_is_one_clear_line(tmp_path):
    vae = VAE(x_dim=12, z_dim=2, hidden=(5,))
    state = vae_state(vae)
    state["model_config"]["hidden"] = [6]
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="do not fit the VAE") as info:
        model_from_checkpoint(load_checkpoint(path))
    assert "\n" not in str(info.value)
    state["model_class"] = "Transformer"
    with pytest.raises(CheckpointError, match="unknown model class"):
        model_from_checkpoint(state)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_stale_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    from pyro_vae.io.checkpoints import remove_stale_temporaries

    stale = ["checkpoint.pt.k3x_9a0q.tmp", "best.pt.abcdefgh.tmp"]
    kept = ["checkpoint.pt", "metrics.jsonl.tmp", "notes.abcdefgh.tmp", "checkpoint.pt.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_pause_point_holds_until_signalled_and_then_runs_the_handler(tmp_path):
    """The hook the kill tests rely on: held at the n-th arrival, SIGINT then reaches the
    process's own handler (here Python's default: KeyboardInterrupt)."""
    import signal
    import subprocess
    import sys
    import time

    from pyro_vae.faults import PAUSE_ENV, PAUSE_FILE_ENV

    marker = tmp_path / "held"
    # Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at start,
    # and a background job of a non-interactive shell starts with it ignored: set it here.
    code = (
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from pyro_vae.faults import pause_point\n"
        "for i in range(3):\n"
        "    print(i, flush=True)\n"
        "    pause_point('epoch-saved')\n"
    )
    env = {**os.environ, PAUSE_ENV: "epoch-saved:2", PAUSE_FILE_ENV: str(marker)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    # the marker appears whole (written aside, then renamed), with nothing left beside it
    assert marker.read_text() == "epoch-saved"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held"]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert out.split() == [b"0", b"1"]  # held at the second arrival, never reached the third
    assert b"KeyboardInterrupt" in err


def test_a_flow_guide_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=3, hidden=(5,), flow="iaf", flow_depth=2)
    path = save_checkpoint(tmp_path / "c.pt", vae_state(vae))
    again = model_from_checkpoint(load_checkpoint(path))
    assert again.flow == "iaf" and len(again.flows) == 2
    x = torch.bernoulli(torch.full((4, 12), 0.5))
    z = torch.randn(4, 3)
    assert torch.allclose(vae.posterior(x).log_prob(z), again.posterior(x).log_prob(z))


def test_a_full_covariance_guide_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=3, hidden=(5,), covariance="full")
    with torch.no_grad():
        vae.tril_head.bias.normal_()
    path = save_checkpoint(tmp_path / "c.pt", vae_state(vae))
    again = model_from_checkpoint(load_checkpoint(path))
    assert again.covariance == "full"
    x = torch.bernoulli(torch.full((4, 12), 0.5))
    z = torch.randn(4, 3)
    assert torch.allclose(vae.posterior(x).log_prob(z), again.posterior(x).log_prob(z))


# -- a trained run read back --------------------------------------------------------------------


def test_a_trained_run_reads_back_its_model_config_and_held_out_images(trained_run, mnist):
    import json

    from pyro_vae import Run
    from pyro_vae.data import heldout_split

    run = Run.load(trained_run)
    assert run.path == trained_run / "checkpoint.pt" and run.directory == trained_run
    assert not run.model.training  # evaluation mode: batch norm on its running statistics
    saved = json.loads((trained_run / "config.json").read_text())
    assert run.config == saved and run.epoch == 1
    assert (run.data.dataset, run.data.binarize, run.data.seed) == ("mnist", "dynamic", 0)
    # the images evaluation scores: the split binarised once from the run's seed
    expected = heldout_split(mnist, "test", "dynamic", 0).images[:10]
    assert torch.equal(run.heldout("test", 10).images, expected)
    assert torch.equal(Run.load(trained_run / "checkpoint.pt").heldout("test", 10).images, expected)
    from pyro_vae import DataError

    with pytest.raises(DataError, match="--images 10001: the test split has only 10000"):
        run.heldout("test", 10001, what="--images")


def test_a_run_config_that_lacks_or_garbles_the_data_settings_is_refused_by_name(
    tmp_path, trained_run
):
    from pyro_vae import Run

    vae = VAE(x_dim=784, z_dim=2, hidden=(5,))
    path = save_checkpoint(tmp_path / "bare.pt", vae_state(vae))
    bare = Run.load(path)  # a model saved by hand loads, but which data it saw is unknown
    assert isinstance(bare.model, VAE) and bare.epoch is None
    with pytest.raises(CheckpointError, match="no run config"):
        bare.heldout("test", 5)
    state = load_checkpoint(trained_run)
    for key, value, message in (
        ("binarize", None, "has no 'binarize'"),
        ("binarize", "grey", "binarize 'grey'"),
        ("seed", -1, "seed -1"),
        ("seed", True, "seed True"),
        ("dataset", None, "has no 'dataset'"),
        ("data_dir", 3, "data_dir 3"),
    ):
        config = dict(state["config"])
        if value is None:
            del config[key]
        else:
            config[key] = value
        path = save_checkpoint(tmp_path / f"{key}.pt", {**state, "config": config})
        with pytest.raises(CheckpointError, match=message):
            _ = Run.load(path).data


def test_a_loaded_run_scores_its_held_out_images_as_the_evaluator_does(trained_run):
    from pyro_vae import Run, estimate_log_px

    run = Run.load(trained_run)
    result = run.log_px("test", 20, num_particles=30, seed=4, max_rows=70)
    x = run.heldout("test", 20).images
    direct = estimate_log_px(run.model.model, run.model.guide, x, num_particles=30, seed=4)
    assert torch.equal(result.log_px, direct.log_px) and torch.equal(result.elbo, direct.elbo)
    report = run.log_px_report(result)
    assert report["log_px"] == direct.summary()["log_px"] and report["epoch"] == 1
    assert (report["dataset"], report["binarize"], report["split"]) == ("mnist", "dynamic", "test")
    assert report["units"] == "nats per image"
