"""Test error of the semi-supervised VAE against the number of labels, over label-subset seeds.

Runs scripts/train_ssvae.py once per (labels, seed), each in its own run directory, and prints
mean ± sd of the test error and the training time per label budget. Extra arguments after
``--`` go to every training run.

    python benchmarks/ssvae_labels.py --labels 100 3000 --seeds 0 1 2 -- --epochs 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(args, extra):
    results: dict[int, list[tuple[float, float]]] = {}
    for labels in args.labels:
        for seed in args.seeds:
            out = Path(args.out) / f"labels{labels}-seed{seed}"
            if not (out / "evaluation.json").is_file():
                command = [
                    sys.executable,
                    str(ROOT / "scripts" / "train_ssvae.py"),
                    "--labels",
                    str(labels),
                    "--seed",
                    str(seed),
                    "--out",
                    str(out),
                    "--quiet",
                    *extra,
                ]
                if (out / "config.json").is_file():  # an interrupted run: continue it
                    command = [
                        sys.executable,
                        str(ROOT / "scripts" / "train_ssvae.py"),
                        "--resume",
                        str(out),
                        "--quiet",
                    ]
                start = time.perf_counter()
                subprocess.run(command, check=True)
                (out / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
            report = json.loads((out / "evaluation.json").read_text())
            seconds = (
                float((out / "wall_seconds.txt").read_text())
                if (out / "wall_seconds.txt").is_file()
                else float("nan")
            )
            results.setdefault(labels, []).append((report["test_error"], seconds))
            print(
                f"labels {labels:>5}  seed {seed}: test error {report['test_error']:.2%}  ({seconds / 60:.1f} min)",
                flush=True,
            )
    print("\nlabels   test error (mean ± sd over seeds)   minutes per run")
    for labels, rows in results.items():
        errors = [e for e, _ in rows]
        sd = statistics.stdev(errors) if len(errors) > 1 else float("nan")
        print(
            f"{labels:>6}   {statistics.mean(errors):.2%} ± {sd:.2%} (n={len(errors)})"
            f"               {statistics.mean(s for _, s in rows) / 60:.1f}"
        )


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=int, nargs="+", default=[100, 3000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/ssvae-benchmark")
    main(p.parse_args(argv), extra)
