"""Shared command-line pieces: argument types, common flags, one-line errors with exit code 2.

Every bad value a user can type becomes one line on stderr and exit status 2, never a
traceback; a run that diverges exits with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from pyro_vae.checkpoints import CheckpointError
from pyro_vae.data import BINARIZATIONS, DATASETS, DataError
from pyro_vae.train import NonFiniteError

__all__ = [
    "ArgumentParser",
    "UsageError",
    "add_data_args",
    "check_output_dir",
    "hidden_sizes",
    "positive_float",
    "positive_int",
    "resolve_device",
    "run",
]


class UsageError(ValueError):
    """A bad flag value or combination detected after parsing."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, s: str, what: str):
    try:
        value = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{s!r} is not {what}")
    return value


def positive_int(s: str) -> int:
    value = _number(int, s, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive integer")
    return value


def nonnegative_int(s: str) -> int:
    value = _number(int, s, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a non-negative integer")
    return value


def positive_float(s: str) -> float:
    value = _number(float, s, "a positive number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a positive number")
    return value


def nonnegative_float(s: str) -> float:
    value = _number(float, s, "a non-negative number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a non-negative number")
    return value


def hidden_sizes(s: str) -> tuple[int, ...]:
    """'400' or '500,300' -> (500, 300)."""
    try:
        sizes = tuple(int(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of sizes") from None
    if not sizes or any(h <= 0 for h in sizes):
        raise argparse.ArgumentTypeError(f"{s!r}: hidden sizes must be positive")
    return sizes


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--dataset --data-dir --binarize``, spelled the same in every script."""
    parser.add_argument(
        "--dataset", default="mnist", choices=DATASETS, help="data set (default: mnist)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where data sets live (default: $PYRO_VAE_DATA_DIR or ~/.cache/pyro-vae)",
    )
    parser.add_argument(
        "--binarize",
        default="dynamic",
        choices=BINARIZATIONS,
        help="dynamic: a fresh Bernoulli draw per use (the protocol of published MNIST "
        "likelihoods); static: one seeded draw; none: grey levels (default: dynamic)",
    )


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """``--seed --device --quiet``."""
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="cpu, cuda or auto (default: cpu)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error if there is no GPU) or ``auto``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def check_output_dir(path: Path, *, must_be_new: bool = True) -> Path:
    """Check that ``path`` can be created and written, without creating anything yet."""
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--out {path}: exists and is not a directory")
        if must_be_new and any(path.iterdir()):
            raise UsageError(f"--out {path}: already holds a run; choose another directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"--out {path}: not writable")
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: cannot create a directory under {parent}")
    return path


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Call ``main(args)``; turn known errors into one line on stderr and an exit status."""
    try:
        main(args)
    except (UsageError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}; the last checkpoint was kept", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
