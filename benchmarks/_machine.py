"""How quiet the machine was during a measurement: the CPU time that *other* processes used
(from /proc/stat's system-wide counters minus this process's own), reported beside every
timing so that a figure says whether it was measured on a busy machine."""

from __future__ import annotations

import os
import time


def _system_busy_seconds() -> float:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Quietness:
    """``with Quietness() as q: ...`` then ``q.report()``: wall time, this process's CPU time
    and the other processes' CPU time (in core-seconds) over the block."""

    def __enter__(self) -> Quietness:
        self.wall0, self.own0, self.all0 = (
            time.perf_counter(),
            sum(os.times()[:4]),
            _system_busy_seconds(),
        )
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.own = sum(os.times()[:4]) - self.own0  # children included (subprocess runs)
        self.others = max(0.0, _system_busy_seconds() - self.all0 - self.own)

    def report(self) -> str:
        cores = os.cpu_count() or 1
        share = self.others / (self.wall * cores) if self.wall else 0.0
        verdict = "quiet" if share < 0.05 else "busy"
        return (
            f"machine {verdict}: other processes used {self.others:.0f} core-s over {self.wall:.0f} s "
            f"of wall time ({share:.0%} of {cores} cores); this measurement {self.own:.0f} core-s"
        )


def time_alternating(arms: dict, rounds: int) -> tuple[dict[str, list[float]], Quietness]:
    """Run every arm (a callable doing one epoch) once to warm up, then ``rounds`` times in
    turn, so that load changes affect all arms alike: ({arm: seconds per round}, quietness)."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for fn in arms.values():
        fn()
    with Quietness() as quiet:
        for r in range(rounds):
            for name, fn in arms.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
            print(
                f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
                flush=True,
            )
    return times, quiet
