"""Test error of the semi-supervised VAE against the number of labels, over label-subset seeds.

Runs scripts/train_ssvae.py once per (labels, seed), each in its own run directory, and prints
mean ± sd of the test error and the training time per label budget. Extra arguments after
``--`` go to every training run. ``--jobs N`` runs N trainings at once, each limited to
cores / N threads (on 2 cores, two single-threaded runs finish sooner than two 2-thread runs
one after the other). Finished runs are read back; interrupted ones are resumed, and so are
finished ones when the extra arguments give them a different ``--epochs``, ``--patience`` or
``--max-minutes`` (a run that stopped on a 35-minute budget continues to a 60-minute one
exactly as if it had been given 60 minutes from the start).

    python benchmarks/ssvae_labels.py --labels 100 3000 --seeds 0 1 2 --jobs 2 -- --epochs 30
    python benchmarks/ssvae_labels.py --labels 100 --seeds 0 1 2 --out runs/b \
        --figure b.png --compare runs/a --name "b, " --compare-name "a, "
    python benchmarks/ssvae_labels.py --out runs/m1m2 --jobs 2 -- --m1 runs/m1 --beta 1 \
        --lr 3e-3 --epochs 300 --patience 15 --max-minutes 22
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from _jobs import Job, run_jobs

from pyro_vae import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "train_ssvae.py")


# test-error targets of the label-budget benchmark (%), drawn on the figure
TARGETS = {100: 5.0, 3000: 3.5}

# the flags a resumed run may change, as train_ssvae.py takes them
RESUMABLE = ("--epochs", "--patience", "--max-minutes", "--threads")


def resumable_flags(extra: list[str]) -> list[str]:
    """The ``RESUMABLE`` flags among ``extra``, with their values."""
    flags = []
    for i, arg in enumerate(extra):
        name, eq, value = arg.partition("=")
        if name in RESUMABLE:
            flags += [name, value] if eq else [name, extra[i + 1]]
    return flags


def is_finished(out: Path, extra: list[str]) -> bool:
    """Whether the run in ``out`` was evaluated with the stopping rules ``extra`` asks for."""
    if not (out / "evaluation.json").is_file():
        return False
    checkpoint = load_checkpoint(out)
    # a run stopped while being extended keeps the evaluation of its shorter self
    report = json.loads((out / "evaluation.json").read_text())
    if report.get("epochs_trained") != checkpoint["trainer"]["epoch"]:
        return False
    # a resumed run's flags are in its checkpoint (config.json keeps those it started with)
    config = checkpoint["config"]
    flags = resumable_flags(extra)
    for name, value in zip(flags[::2], flags[1::2]):
        key = name[2:].replace("-", "_")
        if key != "threads" and (config.get(key) is None or float(config[key]) != float(value)):
            return False
    return True


def command_for(out: Path, labels: int, seed: int, extra: list[str]) -> list[str]:
    if (out / "config.json").is_file():  # an interrupted or extended run: continue it
        return [sys.executable, SCRIPT, "--resume", str(out), "--quiet", *resumable_flags(extra)]
    return [
        sys.executable,
        SCRIPT,
        *("--labels", str(labels), "--seed", str(seed), "--out", str(out), "--quiet"),
        *extra,
    ]


def _curve(out: Path) -> tuple[list[float], list[float], dict]:
    """Cumulative training minutes, validation error (%) and the test report of a run."""
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    minutes = [m["seconds"] / 60 for m in metrics]
    minutes = [sum(minutes[: i + 1]) for i in range(len(minutes))]
    error = [100 * (1 - m["val_accuracy"]) for m in metrics]
    return minutes, error, json.loads((out / "evaluation.json").read_text())


def plot(
    runs: list[tuple[int, int, Path]],
    path: Path,
    compare: Path | None = None,
    label: str = "",
    compare_label: str = "",
) -> None:
    """Validation error against training minutes, one line per run and a panel per label
    budget; a dot marks the epoch whose weights were kept and tested.  With ``compare``,
    the same (labels, seed) runs of that benchmark directory are drawn dashed, in the
    seed's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    budgets = sorted({labels for labels, _, _ in runs})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for labels, seed, out in runs:
            if labels != budget or not (out / "evaluation.json").is_file():
                continue
            minutes, error, report = _curve(out)
            color = f"C{seed % 10}"
            ax.plot(
                minutes,
                error,
                lw=1,
                color=color,
                label=f"{label}seed {seed}: test {100 * report['test_error']:.2f}%",
            )
            best = report["best_epoch"] - 1
            ax.plot(minutes[best], error[best], "o", color=color, ms=4)
            other = None if compare is None else compare / out.name
            if other is not None and (other / "evaluation.json").is_file():
                minutes, error, report = _curve(other)
                ax.plot(
                    minutes,
                    error,
                    lw=0.8,
                    ls="--",
                    color=color,
                    alpha=0.7,
                    label=f"{compare_label}seed {seed}: test {100 * report['test_error']:.2f}%",
                )
        if budget in TARGETS:
            ax.axhline(TARGETS[budget], ls=":", color="k", lw=0.8)
            ax.text(0, TARGETS[budget], " target (test error)", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("training minutes (one thread)")
        ax.set_ylabel("validation error (%)")
        ax.set_title(f"M2, {budget} labels", fontsize=10)
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure: {path}")


def main(args, extra: list[str]) -> None:
    runs = [
        (labels, seed, Path(args.out) / f"labels{labels}-seed{seed}")
        for labels in args.labels
        for seed in args.seeds
    ]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def job(labels: int, seed: int, out: Path) -> Job:
        def done(seconds: float) -> None:
            with open(out / "wall_seconds.txt", "a") as f:  # a line per session
                f.write(f"{seconds:.1f}\n")
            report = json.loads((out / "evaluation.json").read_text())
            print(f"{out.name}: test error {report['test_error']:.2%}", flush=True)

        return Job(out.name, [command_for(out, labels, seed, extra)], out.with_suffix(".log"), done)

    todo = [job(*r) for r in runs if not is_finished(r[2], extra)]
    failed = run_jobs(todo, args.jobs, threads)

    results: dict[int, list[tuple[float, float]]] = {}
    for labels, seed, out in runs:
        if not (out / "evaluation.json").is_file():
            continue
        report = json.loads((out / "evaluation.json").read_text())
        wall = out / "wall_seconds.txt"
        # a resumed run appends a line per session
        seconds = sum(map(float, wall.read_text().split())) if wall.is_file() else float("nan")
        results.setdefault(labels, []).append((report["test_error"], seconds))
        if "epochs_trained" in report:  # early stopping / a time budget
            epochs = [json.loads(line) for line in (out / "metrics.jsonl").open()]
            minutes = sum(m["seconds"] for m in epochs) / 60
            print(
                f"labels {labels:>5}  seed {seed}: {report['epochs_trained']} epochs in "
                f"{minutes:.1f} min; {report['stopped'] or 'ran all epochs'}"
            )
        extra_cols = ""
        if "log_px" in report:
            extra_cols = (
                f"  log p(x) {report['log_px']:.2f}  ELBO {report['elbo']:.2f}"
                f"  argmax_y p(x,y) {report['generative_accuracy']:.2%}"
            )
        print(
            f"labels {labels:>5}  seed {seed}: test error {report['test_error']:.2%}"
            f"  best epoch {report['best_epoch']}{extra_cols}  ({seconds / 60:.1f} min)"
        )
    print(f"\n{threads} thread(s) per run, {args.jobs} run(s) at a time")
    print("labels   test error (mean ± sd over seeds)   minutes per run")
    for labels, rows in results.items():
        errors = [e for e, _ in rows]
        sd = statistics.stdev(errors) if len(errors) > 1 else float("nan")
        print(
            f"{labels:>6}   {statistics.mean(errors):.2%} ± {sd:.2%} (n={len(errors)})"
            f"               {statistics.mean(s for _, s in rows) / 60:.1f}"
        )
    if args.figure is not None:
        plot(runs, args.figure, args.compare, args.name, args.compare_name)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=int, nargs="+", default=[100, 3000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (default: 1)")
    p.add_argument("--out", default="runs/ssvae-benchmark")
    p.add_argument(
        "--figure", type=Path, default=None, help="validation error against minutes (PNG)"
    )
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another benchmark directory whose runs of the same labels and seeds the figure "
        "draws dashed",
    )
    p.add_argument("--name", default="", help="legend prefix of this directory's runs")
    p.add_argument("--compare-name", default="", help="legend prefix of --compare's runs")
    main(p.parse_args(argv), extra)
