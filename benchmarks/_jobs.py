"""Run command sequences as background jobs, a few at a time, each with a fixed thread count
and its own log file; shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    """Commands run one after the other (stopping at the first failure), logged to ``log``;
    ``on_done(seconds)`` is called once they all succeeded."""

    name: str
    commands: Sequence[Sequence[str]]
    log: Path
    on_done: Callable[[float], None] | None = None
    _started: float = field(default=0.0, repr=False)


def run_jobs(jobs: list[Job], parallel: int, threads: int) -> list[str]:
    """Run ``jobs`` with at most ``parallel`` at once, each limited to ``threads`` threads;
    returns the names of the jobs that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    todo = list(jobs)
    running: list[tuple[Job, int, subprocess.Popen]] = []
    failed: list[str] = []

    def launch(job: Job, index: int) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "a") as log:
            proc = subprocess.Popen(job.commands[index], stdout=log, stderr=log, env=env)
        running.append((job, index, proc))

    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            job._started = time.perf_counter()
            launch(job, 0)
        time.sleep(1.0)
        for item in list(running):
            job, index, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                failed.append(job.name)
                print(f"{job.name}: exit {proc.returncode} (see {job.log})", flush=True)
            elif index + 1 < len(job.commands):
                launch(job, index + 1)
            elif job.on_done is not None:
                job.on_done(time.perf_counter() - job._started)
    return failed
