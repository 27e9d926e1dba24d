"""Checkpoints and run directories: atomic writes, safe loads, RNG state capture.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values, so
``torch.load(path, weights_only=True)`` reads it and a crafted file cannot run code.  Pyro's
``ParamStoreDict.load`` and ``PyroOptim.load`` unpickle with arbitrary globals allowed, so
they are not used here.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.faults import pause_point
from pyro_vae.io.rundir import CHECKPOINT_NAME

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "get_rng_state",
    "load_checkpoint",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT_VERSION = 1
# save_checkpoint's temporary files: "<target>." + tempfile's 8 random characters + ".tmp"
_TEMPORARY = re.compile(r"^(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; its message is one line naming the problem."""


def get_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path | str, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format version) atomically: a temporary file in the same
    directory, flushed and fsynced, then renamed over ``path``.  Returns ``path``."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            pause_point("checkpoint-write")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def remove_stale_temporaries(directory: Path | str) -> list[Path]:
    """Delete the temporary files that killed ``save_checkpoint`` calls left in ``directory``
    (only names of its own pattern, ``<name>.pt.<8 characters>.tmp``); returns them.

    A kill between writing and renaming leaves such a file behind; nothing else removes it.
    Call this only while no other process writes checkpoints into the same directory.
    """
    removed = []
    for p in Path(directory).iterdir():
        m = _TEMPORARY.match(p.name)
        if m and m.group("target").endswith(".pt") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; raise ``CheckpointError`` (one line) if the
    file is missing, truncated, corrupt, not a checkpoint, or would need arbitrary code."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"unsupported GLOBAL (\S+)", str(e))
        if blocked:
            raise CheckpointError(
                f"{path}: refused to load: it asks to run {blocked.group(1)} (only tensors and "
                "plain values are accepted)"
            ) from None
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint (not a torch.save file)"
        ) from None
    except Exception as e:  # a corrupt file can fail in many ways (struct, zip, EOF, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a pyro-vae checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format_version']} is not the supported {FORMAT_VERSION}"
        )
    return state
