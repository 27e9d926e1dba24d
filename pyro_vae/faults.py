"""Pause points: named moments where a process can be held so that a test kills or
interrupts it exactly there, on a busy machine as on a quiet one.

With ``PYRO_VAE_PAUSE_AT="<point>:<n>"`` and ``PYRO_VAE_PAUSE_FILE=<path>`` in the
environment, the n-th time the process reaches ``<point>`` it creates ``<path>`` (holding the
point's name) and waits for SIGINT or SIGTERM (SIGKILL needs no waiting). A caught signal is
then delivered to the process's own handler, as if it had arrived a moment later. Unset, a
pause point costs one environment lookup.  Under ``torchrun`` (``RANK`` set) the marker is
``<path>.rank<r>``, and ``"<point>:<n>@<r>"`` holds rank r only.

Points: ``run-started`` (config.json written, no checkpoint yet), ``checkpoint-write`` (a
checkpoint's temporary file written and flushed, not yet renamed), ``epoch-saved`` (an
epoch's checkpoint complete), ``evaluation-chunk`` (the evaluator finished one chunk),
``evaluation-block`` (an evaluation job kept its finished images on disk), ``data-write`` (a file of the data cache written under its temporary name, not yet renamed).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

__all__ = ["PAUSE_ENV", "PAUSE_FILE_ENV", "POINTS", "pause_point"]

PAUSE_ENV = "PYRO_VAE_PAUSE_AT"
PAUSE_FILE_ENV = "PYRO_VAE_PAUSE_FILE"
POINTS = (
    "run-started",
    "checkpoint-write",
    "epoch-saved",
    "evaluation-chunk",
    "evaluation-block",
    "data-write",
)

_reached: Counter[str] = Counter()


def pause_point(name: str) -> None:
    """Hold the process here if the environment asks for it (see the module docstring)."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    spec, _, only_rank = spec.partition("@")
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    rank = os.environ.get("RANK")
    if only_rank and only_rank != (rank or "0"):
        return
    _reached[name] += 1
    if _reached[name] != int(nth):
        return
    awaited = {signal.SIGINT, signal.SIGTERM}
    # Block first, then announce, then wait: a signal sent as soon as the marker appears
    # stays pending instead of slipping in before the wait.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, awaited)
    try:
        marker = Path(os.environ[PAUSE_FILE_ENV] + ("" if rank is None else f".rank{rank}"))
        # Written aside and renamed: a watcher that sees the marker sees its whole text.
        partial = marker.with_name(f"{marker.name}.{os.getpid()}.part")
        partial.write_text(name)
        os.replace(partial, marker)
        received = signal.sigwait(awaited)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    signal.raise_signal(received)
