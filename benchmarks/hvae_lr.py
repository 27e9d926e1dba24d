"""Why the two-layer VAE trailed at the preset's learning rate: ten epochs of the bottom-up
hierarchical VAE and of the one-layer VAE at Adam rates 3e-3 (the ``iw-fast`` preset's) and
1e-3, and of the top-down (ladder) guide at 1e-3, each at a constant rate, DReG with K = 5,
batch 100, all 50,000 training images, seed 0.

Per run: the validation ELBO after every epoch; at the end, on the first 2,000 validation
images and per latent layer, the median scale of the guide's distribution, the spread of its
means (median over units of the standard deviation over images), the active units (Burda et
al. 2015: Cov_x(E_q[u | x]) > 0.01, E_q[u | x] averaged over 20 draws of the layers below),
the same count with the covariance taken relative to the unit's aggregate variance under q,
and for the top-down guide the median scale of each layer's bottom-up estimate. Writes
``results.json`` and ``hvae_lr.png`` into ``--out``; finished runs are read back.

    python benchmarks/hvae_lr.py --threads 1 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _jobs import Job, run_jobs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train_svi.py")
ARMS = {
    "hvae-bu-lr3e-3": ["--model", "hvae", "--guide", "bottom-up", "--lr", "3e-3"],
    "hvae-bu-lr1e-3": ["--model", "hvae", "--guide", "bottom-up", "--lr", "1e-3"],
    "hvae-td-lr1e-3": ["--model", "hvae", "--guide", "top-down", "--lr", "1e-3"],
    "vae-lr3e-3": ["--lr", "3e-3"],
    "vae-lr1e-3": ["--lr", "1e-3"],
}


def layer_stats(run: Path, images: int = 2000, draws: int = 20) -> dict:
    """Per latent site of the trained guide on validation images: median scale, median
    spread of the means, active units."""
    import torch

    from pyro_vae.inference.weights import trace_particles
    from pyro_vae.training.runs import Run

    torch.manual_seed(0)
    # the validation bounds at several K from the estimator (the job reports the test split)
    trained = Run.load(run)
    model, x = trained.model, trained.heldout("valid", images).images
    out = {}
    with torch.no_grad():
        t = trace_particles(model.model, model.guide, x, num_particles=draws)
        for name, site in t.latent_sites():
            fn = site["fn"].base_dist if hasattr(site["fn"], "base_dist") else site["fn"]
            # E_q[u | x], (N, units): the mean over draws of the site's conditional mean given
            # the draws it depends on (exact for the first layer). The mean of the draws
            # themselves would carry a Monte Carlo variance of scale^2 / draws, about 0.05,
            # above the threshold in every unit.
            means = fn.loc.mean(0)
            between = means.var(0)  # Cov_x(E_q[u | x]) per unit
            # the same in units of the aggregate posterior's variance (the law of total
            # variance: between + E_x[Var_q(u | x)]), which a standard normal prior pins near
            # 1 but a learned conditional prior does not: a layer whose scale drifted to 9
            # passes the plain threshold with little information in it
            total = between + fn.scale.square().mean((0, 1))
            out[name] = {
                "units": means.shape[-1],
                "active": int((between > 1e-2).sum()),
                "active_scale_free": int((between / total > 1e-2).sum()),
                "median_scale": float(fn.scale.median()),
                "median_spread_of_means": float(fn.loc.std(-2).median()),
            }
        if getattr(model, "guide_kind", None) == "top-down":
            # the bottom-up estimates' scales, before the merge with p(z_l | z_{l+1}): a large
            # sigma_hat means the layer's draw ignores the image's own evidence
            for i, (_, scale) in enumerate(model.estimates(x)):
                out[f"z{i + 1}"]["median_estimate_scale"] = float(scale.median())
    return out


def main(args) -> int:
    out = Path(args.out)
    jobs = []
    for name, flags in ARMS.items():
        run = out / name
        if (run / "evaluation.json").is_file():
            continue
        if (run / "config.json").is_file():  # interrupted: continue where it stood
            cmd = [sys.executable, TRAIN, "--resume", str(run)]
        else:
            cmd = [sys.executable, TRAIN, "--preset", "iw-fast", *flags, "--out", str(run)]
            cmd += ["--lr-schedule", "constant", "--epochs", str(args.epochs), "--seed", "0"]
            cmd += ["--eval-particles", "0"]
        cmd += ["--threads", str(args.threads), "--quiet"]
        jobs.append(Job(name, [cmd], out / f"{name}.log"))
    failed = run_jobs(jobs, args.jobs, args.threads) if jobs else []
    results = {}
    for name in ARMS:
        run = out / name
        if not (run / "evaluation.json").is_file():
            continue
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        results[name] = {
            "val_elbo": [m["val_elbo"] for m in metrics],
            "seconds_per_epoch": sum(m["seconds"] for m in metrics) / len(metrics),
            "layers": layer_stats(run),
        }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, r in results.items():
        style = "-" if name.startswith("hvae") else "--"
        epochs = range(1, len(r["val_elbo"]) + 1)
        ax.plot(epochs, r["val_elbo"], style, marker="o", ms=3, label=name)
    ax.set_xlabel("epoch (constant learning rate)")
    ax.set_ylabel("validation ELBO (nats per image)")
    ax.set_ylim(bottom=-215)
    ax.set_title("two stochastic layers need the smaller step", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "hvae_lr.png", dpi=120)
    plt.close(fig)
    print(
        f"{'run':>16} {'val ELBO':>9}  per layer: active (scale-free) / units, median scale, spread"
    )
    for name, r in results.items():
        layers = "   ".join(
            f"{site} {s['active']} ({s['active_scale_free']})/{s['units']} {s['median_scale']:.2f} "
            f"{s['median_spread_of_means']:.2f}"
            for site, s in r["layers"].items()
        )
        print(f"{name:>16} {r['val_elbo'][-1]:>9.2f}  {layers}")
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/hvae_lr")
    sys.exit(main(p.parse_args()))
