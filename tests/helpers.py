"""Helpers shared by the tests: where things are, and running the scripts."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from pyro_vae.cli import run

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = ROOT / "scripts"
TINY = ["--train-size", "512", "--eval-size", "128", "--batch-size", "128", "--quiet"]


def run_script(script, args, data_dir, timeout=300):
    env = {**os.environ, "PYRO_VAE_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPTS_DIR / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def load_script(script):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), SCRIPTS_DIR / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(script, args, capsys):
    """Parse and run a script's main in this process; returns (exit status, stderr)."""
    module = load_script(script)
    try:
        status = run(module.main, module.build_parser().parse_args(args))
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def with_onehot(h, y, num_classes):
    """[h, one_hot(y)] with h's and y's batch shapes broadcast: the input that the
    class-conditional networks are defined on, built literally (the reference for
    ``pyro_vae.networks.nets.with_class``)."""
    y1 = F.one_hot(y, num_classes).to(h.dtype)
    batch = torch.broadcast_shapes(h.shape[:-1], y1.shape[:-1])
    return torch.cat([h.expand(*batch, h.shape[-1]), y1.expand(*batch, num_classes)], dim=-1)
