"""One process with 2 threads against 2 processes (torchrun) with 1 thread each, on this
machine: training images per second and the K = 5000 evaluation, run one after the other
with the same settings.

    python benchmarks/scaling.py --checkpoint runs/vae-... --epochs 3 --eval-size 500

Training: ``scripts/train_svi.py`` with the default preset for ``--epochs`` epochs; images
per second from the epochs' own timings (``metrics.jsonl``: training and the validation
ELBO), the first epoch left out. Evaluation: ``scripts/evaluate_marginal_likelihood.py``
at K = ``--num-particles`` on the first ``--eval-size`` test images, wall time of the
whole command (start-up included) and the time per image.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import Quietness

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train_svi.py")
EVALUATE = str(ROOT / "scripts" / "evaluate_marginal_likelihood.py")


def launcher(procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}",
            "--master-port", str(port)]  # fmt: skip


def main(args) -> None:
    setups = [(1, 2), (2, 1)]  # (processes, threads each)
    with tempfile.TemporaryDirectory() as tmp, Quietness() as quiet:
        for procs, threads in setups:
            out = Path(tmp) / f"train-{procs}x{threads}"
            cmd = [*launcher(procs), TRAIN, "--epochs", str(args.epochs), "--eval-particles", "0"]
            cmd += ["--threads", str(threads), "--quiet", "--out", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            metrics = [
                json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            ]
            seconds = sum(m["seconds"] for m in metrics[1:])
            images = 50_000 * (len(metrics) - 1)
            print(
                f"training  {procs} process(es) x {threads} thread(s): {images / seconds:7.0f} "
                f"images/s ({seconds / (len(metrics) - 1):.2f} s per epoch)",
                flush=True,
            )
        for procs, threads in setups:
            cmd = [*launcher(procs), EVALUATE, "--checkpoint", args.checkpoint, "--quiet"]
            cmd += ["--num-particles", str(args.num_particles), "--eval-size", str(args.eval_size)]
            cmd += ["--threads", str(threads), "--out", str(Path(tmp) / f"eval-{procs}")]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            print(
                f"evaluation {procs} rank(s) x {threads} thread(s): {wall:6.1f} s for "
                f"{args.eval_size} images at K={args.num_particles} "
                f"({wall / args.eval_size * 1e3:.1f} ms per image, start-up included)",
                flush=True,
            )
        reports = [
            json.loads(
                (
                    Path(tmp) / f"eval-{p}" / f"marginal_likelihood_k{args.num_particles}.json"
                ).read_text()
            )
            for p, _ in setups
        ]
        same = {k: v for k, v in reports[0].items() if k != "checkpoint"} == {
            k: v for k, v in reports[1].items() if k != "checkpoint"
        }
        print(f"evaluation reports of 1 and 2 ranks identical: {same}")
    print(quiet.report())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-particles", type=int, default=5000)
    p.add_argument("--eval-size", type=int, default=500)
    main(p.parse_args())
