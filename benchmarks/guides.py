"""Richer guides under one budget: test NLL, ELBO and the gap decomposition (Cremer et al.
2018) of a diagonal Gaussian, a full-covariance Gaussian and two flow guides.

Every guide trains with the same recipe (``scripts/train_svi.py --preset iw-fast`` with
``Trace_ELBO``, one particle, the same seed and number of epochs), then
``scripts/evaluate_marginal_likelihood.py`` estimates the test NLL at K = 5000 and
``scripts/inference_gaps.py`` splits the gap on the first test images, q* in the guide's own
family (and, for the diagonal guide, also in the full-covariance family).  Runs resume and
finished steps are read back.  Prints a table, writes ``results.json`` and ``gaps.png`` into
``--out``.

    python benchmarks/guides.py --epochs 50 --nll-images 2000 --gap-images 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _jobs import Job, run_jobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
GUIDES = {
    "diagonal": [],
    "full": ["--covariance", "full"],
    "iaf": ["--flow", "iaf", "--flow-depth", "2"],
    "planar": ["--flow", "planar", "--flow-depth", "4"],
}


def commands(args, guide: str) -> list[list[str]]:
    out = Path(args.out) / guide
    py = [sys.executable]
    steps: list[list[str]] = []
    config = out / "config.json"
    metrics = out / "metrics.jsonl"
    done = metrics.is_file() and len(metrics.read_text().splitlines()) >= args.epochs
    if config.is_file() and not done:  # interrupted: continue where it stood
        resume = [*py, str(SCRIPTS / "train_svi.py"), "--resume", str(out), "--quiet"]
        steps.append([*resume, "--threads", str(args.threads)])
    elif not config.is_file():
        train = [*py, str(SCRIPTS / "train_svi.py"), "--preset", "iw-fast", *GUIDES[guide]]
        train += ["--elbo", "trace", "--num-particles", "1", "--epochs", str(args.epochs)]
        train += ["--seed", str(args.seed), "--eval-particles", "0", "--threads", str(args.threads)]
        steps.append([*train, "--quiet", "--out", str(out)])
    if not (out / "marginal_likelihood_k5000.json").is_file():
        evaluate = [*py, str(SCRIPTS / "evaluate_marginal_likelihood.py"), "--checkpoint", str(out)]
        evaluate += ["--num-particles", "5000", "--eval-size", str(args.nll_images)]
        steps.append([*evaluate, "--threads", str(args.threads), "--quiet"])
    families = ["own", "full"] if guide == "diagonal" else ["own"]
    for family in families:
        if not (out / f"inference_gaps_{family}.json").is_file():
            gaps = [*py, str(SCRIPTS / "inference_gaps.py"), "--checkpoint", str(out)]
            gaps += ["--images", str(args.gap_images), "--family", family]
            steps.append([*gaps, "--threads", str(args.threads), "--quiet"])
    return steps


def read_result(args, guide: str) -> list[dict]:
    out = Path(args.out) / guide
    nll = out / "marginal_likelihood_k5000.json"
    if not nll.is_file():
        return []
    r = json.loads(nll.read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = []
    for family in ("own", "full"):
        path = out / f"inference_gaps_{family}.json"
        if not path.is_file():
            continue
        g = json.loads(path.read_text())
        rows.append(
            {
                "guide": guide,
                "q_star": "own family" if g["family"] == "own" else g["family"],
                "epochs": len(metrics),
                "train_minutes": sum(m["seconds"] for m in metrics) / 60,
                "nll": r["nll"],
                "nll_sem": r["log_px_sem"],
                "nll_images": r["num_datapoints"],
                "elbo": r["elbo"],
                "gap": r["gap"],
                "gap_images": g["num_datapoints"],
                "approximation_gap": g["approximation_gap"],
                "amortisation_gap": g["amortisation_gap"],
                "inference_gap": g["inference_gap"],
                "fit_converged": g["fit"]["converged"],
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [f"{r['guide']}\nq* {r['q_star']}" for r in rows]
    approx = [r["approximation_gap"]["mean"] for r in rows]
    amort = [r["amortisation_gap"]["mean"] for r in rows]
    ax.bar(labels, approx, color="tab:blue", label="approximation gap")
    ax.bar(labels, amort, bottom=approx, color="tab:orange", label="amortisation gap")
    for i, r in enumerate(rows):
        ax.text(
            i, approx[i] + amort[i], f"NLL {r['nll']:.2f}", ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel("nats per image")
    ax.set_title(f"where the gap log p(x) - ELBO goes ({rows[0]['gap_images']} test images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    out = Path(args.out)
    jobs = [
        Job(guide, steps, out / f"{guide}.log")
        for guide in args.guides
        if (steps := commands(args, guide))
    ]
    start = time.perf_counter()
    failed = run_jobs(jobs, args.jobs, args.threads) if jobs else []
    rows = [row for guide in args.guides for row in read_result(args, guide)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if rows:
        plot(rows, out / "gaps.png")
    print(
        f"{'guide':>8} {'q*':>8} {'epochs':>6} {'train min':>9} {'NLL':>13} {'ELBO':>8}"
        f" {'approx.':>13} {'amort.':>13}"
    )
    for r in rows:
        a, m = r["approximation_gap"], r["amortisation_gap"]
        print(
            f"{r['guide']:>8} {r['q_star']:>8} {r['epochs']:>6} {r['train_minutes']:>9.1f}"
            f" {r['nll']:>7.2f} ± {r['nll_sem']:.2f} {r['elbo']:>8.2f}"
            f" {a['mean']:>6.2f} ± {a['sem']:.2f} {m['mean']:>6.2f} ± {m['sem']:.2f}"
        )
    print(
        f"({time.perf_counter() - start:.0f} s; {args.jobs} job(s) at a time, "
        f"{args.threads} thread(s) each)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--nll-images", type=int, default=2000, help="test images for the NLL")
    p.add_argument("--gap-images", type=int, default=100, help="test images for the gaps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="threads per run (default: 2)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default: 1)")
    p.add_argument("--out", default="benchmarks/results/guides")
    sys.exit(main(p.parse_args()))
