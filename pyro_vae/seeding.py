"""One seed for a run; every random stream derived from it by name.

``seed_everything`` seeds the global generators (Python, numpy, torch: what Pyro draws
from). Each data stream (shuffling, dynamic binarisation, the held-out splits' one-off
binarisation, the choice of labelled images) has a ``torch.Generator`` of its own, seeded
from the run's seed and the stream's name through numpy's ``SeedSequence``: streams of one
seed are independent of each other, and of other seeds' streams (which adding small offsets
to the seed would not give: seed 1's first stream would be seed 0's second).
"""

from __future__ import annotations

import zlib

import numpy as np
import pyro
import torch

__all__ = ["child_seed", "generator", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (which Pyro draws from)."""
    pyro.set_rng_seed(seed)


def child_seed(seed: int, stream: str) -> int:
    """A 32-bit seed for the named ``stream`` of ``seed`` (stable across versions; 32 bits so
    that it also seeds numpy's and Python's global generators)."""
    sequence = np.random.SeedSequence(seed, spawn_key=(zlib.crc32(stream.encode()),))
    return int(sequence.generate_state(1, np.uint32)[0])


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` for the named ``stream`` of ``seed``."""
    return torch.Generator().manual_seed(child_seed(seed, stream))
