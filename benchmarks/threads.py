"""Seconds per training epoch of the default recipe against torch's thread settings, on a
quiet machine and with other work keeping cores busy: the measurement behind
``--threads``'s default.

Each setting is one ``scripts/train_svi.py`` run (the default ``iw-fast`` recipe: DReG,
K = 5, batch 100, 784-200-200-50) of one epoch on ``--train-size`` images, in a fresh
process so that the environment applies; the epoch's own time from ``metrics.jsonl``.
``--busy N`` starts N processes that each keep one core busy (a plain Python loop) for the
whole measurement, the way a second training or a browser does.

    python benchmarks/threads.py --busy 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import Quietness

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train_svi.py")
SPIN = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"
# (label, --threads or None for the script's default, extra environment); an empty
# OMP_WAIT_POLICY is OpenMP's own default (spin a while, then sleep), which the scripts
# replaced by passive waiting
SETTINGS = {
    "1 thread": ("1", {"OMP_WAIT_POLICY": ""}),
    "2 threads, OpenMP's default wait": ("2", {"OMP_WAIT_POLICY": ""}),
    "2 threads, passive wait": ("2", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "the script's default": (None, {}),
}


def epoch_seconds(threads: str | None, env: dict, train_size: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, TRAIN, "--epochs", "1", "--train-size", str(train_size)]
        cmd += ["--eval-size", "500", "--eval-particles", "0", "--quiet", "--out", f"{tmp}/r"]
        if threads is not None:
            cmd += ["--threads", threads]
        clean = {
            k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
        }
        # (libgomp warns that the empty policy is invalid, then uses its default)
        done = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
        line = Path(f"{tmp}/r/metrics.jsonl").read_text().splitlines()[-1]
        return json.loads(line)["seconds"]


def main(args) -> int:
    results = []
    for busy in args.busy:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            for label, (threads, env) in SETTINGS.items():
                with Quietness() as q:
                    seconds = epoch_seconds(threads, env, args.train_size)
                results.append({"busy_cores": busy, "setting": label, "seconds": seconds})
                print(f"{busy} busy core(s)  {label:<34} {seconds:7.2f} s   {q.report()}")
        finally:
            for p in spinners:
                p.kill()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", nargs="+", type=int, default=[0, 1], help="cores kept busy")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--out", default="benchmarks/results/threads.json")
    sys.exit(main(p.parse_args()))
