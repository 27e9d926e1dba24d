"""Importance-weighted log p(x) of a trained model: the ELBO against the evidence.

    python scripts/evaluate_marginal_likelihood.py --checkpoint runs/vae-... --num-particles 5000
    torchrun --nproc-per-node 2 scripts/evaluate_marginal_likelihood.py --checkpoint runs/vae-...

Rebuilds the model from the checkpoint (a file or a run directory), scores the held-out split
binarised as in training, and writes marginal_likelihood_k<K>.json and its figures
(figures/marginal_likelihood_k<K>_*.png: bound vs K, per-datapoint gaps, PSIS k̂) into the run
directory (or --out); an existing report of the same K is replaced only with --force.
Figures in nats per image; the same --seed gives the same numbers whatever --max-rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyro_vae.choices import DEFAULT_MAX_ROWS
from pyro_vae.cli import (
    ArgumentParser,
    add_force_arg,
    add_runtime_args,
    apply_threads,
    positive_int,
    resolve_device,
    run,
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint file or run directory"
    )
    p.add_argument(
        "--num-particles",
        type=positive_int,
        default=5000,
        help="K importance samples per image (default: 5000)",
    )
    p.add_argument(
        "--split", default="test", choices=("test", "valid"), help="held-out split (default: test)"
    )
    p.add_argument(
        "--eval-size",
        type=positive_int,
        default=None,
        help="use only the first N images of the split",
    )
    p.add_argument(
        "--max-rows",
        type=positive_int,
        default=None,
        help="particles x images per forward pass of the model; bounds memory, changes no "
        f"number (default: {DEFAULT_MAX_ROWS}, fewer for convolutional networks)",
    )
    p.add_argument("--no-psis", action="store_true", help="skip the PSIS k̂ diagnostic")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="where data sets live (default: as in training)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the report (default: the run directory)",
    )
    add_force_arg(p)
    add_runtime_args(p)
    return p


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    from pyro_vae.config import EvalConfig
    from pyro_vae.jobs import evaluate_log_px
    from pyro_vae.training.distributed import setup
    from pyro_vae.training.runs import Run

    config = EvalConfig(
        split=args.split,
        eval_size=args.eval_size,
        num_particles=args.num_particles,
        max_rows=args.max_rows,
        psis=not args.no_psis,
        seed=args.seed,
    )
    ranks, device = setup(resolve_device(args.device))
    apply_threads(args)
    trained = Run.load(args.checkpoint, device=device)
    # Every rank scores a share of the images (whole chunks, each seeded by --seed and its
    # position): the per-image values are those of a single process, bit for bit.
    result = evaluate_log_px(
        trained,
        config,
        args.out or trained.directory,
        force=args.force,
        data_dir=args.data_dir,
        progress=not args.quiet,
        ranks=ranks,
        flag="--out",
    )
    if not ranks.is_main:
        return {}
    report = result.report
    print(
        f"{args.split} set, {report['num_datapoints']} images, K={args.num_particles}, "
        f"{report['binarize']} binarisation; weights {report['checkpoint']} (epoch "
        f"{report['epoch']})"
    )
    print(
        f"  log p(x)  {report['log_px']:9.2f} ± {report['log_px_sem']:.2f}   (NLL {report['nll']:.2f})"
    )
    print(f"  ELBO      {report['elbo']:9.2f} ± {report['elbo_sem']:.2f}")
    if "bits_per_dim" in report:
        rates = report["bits_per_dim"]
        print(f"  in bits per dimension: NLL {rates['nll']:.4f}, -ELBO {rates['neg_elbo']:.4f}")
    print(f"  gap       {report['gap']:9.2f} ± {report['gap_sem']:.2f}   = KL(q(z|x) || p(z|x))")
    print("  bound vs K: " + ", ".join(f"K={k}: {v:.2f}" for k, v in report["bound_vs_k"].items()))
    print(f"  ESS median {report['ess_median']:.1f} of {args.num_particles}")
    if "khat_share_over_0.7" in report:
        print(f"  PSIS k̂ > 0.7 (unreliable) for {report['khat_share_over_0.7']:.1%} of images")
    print(f"report: {result.written}")
    return report


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(run(main, arguments, grad=False))
