"""Several processes, one run: ``torch.distributed`` set up from ``torchrun``'s environment.

``torchrun --nproc-per-node N scripts/train_svi.py ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.  ``setup`` joins them
into one process group (gloo on the CPU, NCCL on CUDA); everything else here is what the
stepper, the trainer, the loaders and the evaluator need from it: the shard of a batch or a
data set that belongs to this rank, sums and gathers across ranks, and recognising a lost
peer.  The others use ranks through these helpers and a ``Ranks`` value: the stepper wraps
the objective in DistributedDataParallel, the trainer sums its metrics, a training run
writes files on rank 0 only and keeps every rank's RNG states, and the command-line layer
chooses the run directory on rank 0.  Without ``torchrun`` (``WORLD_SIZE`` unset or 1) all of
it is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistributedError",
    "Ranks",
    "is_lost_peer",
    "RendezvousError",
    "ShardedLoader",
    "all_gather_objects",
    "all_gather_rows",
    "all_sum",
    "setup",
    "shard_bounds",
    "sharded_log_px",
    "teardown",
]


class DistributedError(RuntimeError):
    """A process group that was lost (one line)."""


class RendezvousError(DistributedError):
    """A process group that could not be formed (one line)."""


# gloo reports a peer that went away as a plain RuntimeError from its TCP transport (seen
# with torch 2.14: "[.../gloo/transport/tcp/pair.cc:545] Read error ...: Connection reset by
# peer"), so for it the text is all there is to go by; other backends raise DistError.
_GLOO_TRANSPORT = ("gloo/transport", "Connection closed by peer", "Connection reset by peer")


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of the group is
    gone."""
    if isinstance(error, (DistributedError, dist.DistError)):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _GLOO_TRANSPORT)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


TIMEOUT_ENV = "PYRO_VAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 120.0


def setup(device: torch.device, timeout_seconds: float | None = None) -> tuple[Ranks, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (gloo for the
    CPU, NCCL for CUDA); returns this process's ``Ranks`` and its device (``cuda:<local
    rank>`` on GPUs).  ``timeout_seconds`` (default ``$PYRO_VAE_DIST_TIMEOUT``, else 120)
    bounds joining and every collective: a rank that hangs makes the others fail within it
    instead of waiting for ever (a rank that dies fails them at once: its connections
    close)."""
    if timeout_seconds is None:
        timeout_seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        with _native_stderr_silenced():
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_seconds),
            )
    except (RuntimeError, ValueError) as e:  # DistStoreError and friends are RuntimeErrors
        first = " ".join(str(e).split())[:200]
        raise RendezvousError(
            f"rank {rank} could not join the process group at {where}: {first}"
        ) from None
    return Ranks(rank, world, local_rank), device


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null: while a rendezvous retries, torch's C++ store
    logs every attempt with a stack dump to stderr; the exception that ends it carries the
    reason, which ``setup`` reports in one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def teardown() -> None:
    """Leave the process group, if one was set up (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(n: int, ranks: Ranks, align: int = 1) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of ``n`` items, cut at multiples of
    ``align`` (so that chunks of ``align`` items are the same whatever the world size)."""
    blocks = -(-n // align)
    per, extra = divmod(blocks, ranks.world_size)
    first = ranks.rank * per + min(ranks.rank, extra)
    count = per + (ranks.rank < extra)
    return min(n, first * align), min(n, (first + count) * align)


def all_sum(values: Sequence[float], ranks: Ranks) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64)."""
    if not ranks.active:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_rows(t: Tensor, ranks: Ranks) -> Tensor:
    """Every rank's ``t`` (rows may differ in number) concatenated in rank order, on every
    rank, on the CPU."""
    if not ranks.active:
        return t.cpu()
    parts: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


def all_gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj`` in rank order (picklable values), on every rank."""
    if not ranks.active:
        return [obj]
    parts: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(parts, obj)
    return parts


class ShardedLoader:
    """This rank's share of every batch of ``loader``: all ranks draw the same global batch
    (same generators), each keeps its slice of rows (``tensor_split``: sizes differ by at
    most one), so the union over ranks is exactly the batch a single process would see.
    A batch with fewer rows than ranks is skipped by all of them alike.  The loader's state
    is the global one: a checkpoint resumes under any number of processes."""

    def __init__(self, loader: Any, ranks: Ranks) -> None:
        self.loader, self.ranks = loader, ranks

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for batch in self.loader:
            if batch[0].shape[0] < self.ranks.world_size:
                continue
            yield tuple(t.tensor_split(self.ranks.world_size)[self.ranks.rank] for t in batch)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped loader's state (the same on every rank)."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped loader's state."""
        self.loader.load_state_dict(state)


def sharded_log_px(
    model,
    guide,
    *data: Tensor,
    ranks: Ranks,
    num_particles: int,
    seed: int,
    max_rows: int | None = None,
    **kwargs,
):
    """``estimate_log_px`` over ``data`` with every rank scoring its share, gathered on every
    rank.  Shards are cut at whole chunks and each chunk draws from a generator seeded by
    ``seed`` and its position, so the per-datapoint values are bit for bit those of one
    process with the same seed, whatever the number of ranks."""
    from pyro_vae.inference.evaluate import (
        MarginalLikelihood,
        estimate_log_px,
        eval_batch_size,
        rows_per_pass,
    )
    from pyro_vae.training.stepper import owner_modules

    if max_rows is None:  # sized to the networks of the modules model and guide belong to
        max_rows = rows_per_pass(*owner_modules(model, guide))
    n = data[0].shape[0]
    start, stop = shard_bounds(n, ranks, align=eval_batch_size(num_particles))
    part = None
    if stop > start:
        part = estimate_log_px(
            model,
            guide,
            *(t[start:stop] for t in data),
            num_particles=num_particles,
            max_rows=max_rows,
            seed=seed,
            first_index=start,
            **kwargs,
        )
    parts = [p for p in all_gather_objects(part, ranks) if p is not None]
    if not parts:
        raise ValueError("the data set is empty")
    return MarginalLikelihood.join(parts)
