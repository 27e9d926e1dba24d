"""Where the gap between the ELBO and log p(x) goes: approximation and amortisation gaps
(Cremer, Li & Duvenaud 2018) of a trained model on held-out images.

    python scripts/inference_gaps.py --checkpoint runs/vae-... --images 200

For each image, with the model fixed: a per-image guide q* (in the guide's own family: a
diagonal or full-covariance Gaussian, or the flow conditioned on per-image parameters; or
--family diagonal|full) is fitted by SVI from the encoder's output; then ELBO[q] of the amortised
guide, ELBO[q*], and log p̂(x) with K = --num-particles draws from q*.  For a hierarchical VAE
the own family is its guide with per-image values in place of what it computes from x;
--family diagonal|full is one Gaussian over all its layers together, a family its amortised
guide is not in (where it fits worse than the guide, the images are reported as failed).  Writes
inference_gaps_<family>.json (means with standard errors, nats per image) and
figures/inference_gaps_<family>.png into the run directory (or --out); an existing report is
replaced only with --force.  A fit that ends where no gap can be (q*'s ELBO below the amortised
guide's, or log p̂(x) below an ELBO, beyond Monte Carlo error) is reported as failed: the JSON
names the images, nothing is printed as a gap, and the exit status is 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyro_vae.choices import FAMILIES
from pyro_vae.cli import (
    ArgumentParser,
    ResultError,
    add_force_arg,
    apply_threads,
    positive_float,
    positive_int,
    run,
    seed_value,
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint file or run directory"
    )
    p.add_argument(
        "--images", type=positive_int, default=100, help="held-out images (default: 100)"
    )
    p.add_argument(
        "--split", default="test", choices=("test", "valid"), help="held-out split (default: test)"
    )
    p.add_argument(
        "--family",
        default="own",
        choices=FAMILIES,
        help="q*'s family: own (the guide's: diagonal or full Gaussian, or its flow; for a "
        "hierarchical VAE its guide with per-image inputs), diagonal or full (a Gaussian, over "
        "all layers of a hierarchical VAE) (default: own)",
    )
    p.add_argument(
        "--num-particles", type=positive_int, default=5000, help="K for log p(x) (default: 5000)"
    )
    p.add_argument(
        "--elbo-particles", type=positive_int, default=1000, help="draws per ELBO (default: 1000)"
    )
    p.add_argument(
        "--fit-lr", type=positive_float, default=0.05, help="q*'s first Adam rate (default: 0.05)"
    )
    p.add_argument(
        "--fit-steps",
        type=positive_int,
        default=3000,
        help="at most this many SVI steps (default: 3000)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="where data sets live (default: as in training)"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="where to write (default: the run directory)"
    )
    add_force_arg(p)
    p.add_argument("--seed", type=seed_value, default=1, help="random seed (default: 1)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no summary")
    return p


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    from pyro_vae.apps.gaps import GapFitError
    from pyro_vae.config import GapsConfig
    from pyro_vae.jobs import decompose_gaps
    from pyro_vae.training.runs import Run

    config = GapsConfig(
        split=args.split,
        images=args.images,
        family=args.family,
        num_particles=args.num_particles,
        elbo_particles=args.elbo_particles,
        fit_lr=args.fit_lr,
        fit_steps=args.fit_steps,
        seed=args.seed,
    )
    apply_threads(args)
    trained = Run.load(args.checkpoint)
    result = decompose_gaps(
        trained,
        config,
        args.out or trained.directory,
        force=args.force,
        data_dir=args.data_dir,
        flag="--out",
    )
    try:
        result.result.check()
    except GapFitError as e:
        raise ResultError(f"{e} (marked in {result.written})") from None
    s = result.report
    if not args.quiet:
        print(
            f"{s['num_datapoints']} {args.split} images, q* {args.family} (fit: {s['fit']['steps']} steps, converged {s['fit']['converged']}), nats per image:"
        )
        for key in (
            "log_px",
            "elbo_local",
            "elbo_amortised",
            "approximation_gap",
            "amortisation_gap",
            "inference_gap",
        ):
            print(f"  {key:<18} {s[key]['mean']:9.2f} ± {s[key]['sem']:.2f}")
        print(
            f"  (log p(x) from {s['num_particles']} draws of q* ({s['log_px_from_q*']['mean']:.2f}) "
            f"and of the amortised guide ({s['log_px_from_amortised_guide']['mean']:.2f}), "
            f"combined with weight {s['log_px_weight_of_q*']:.2f} on q*'s)"
        )
        print(f"report: {result.written}")
    return s


if __name__ == "__main__":
    sys.exit(run(main, build_parser().parse_args()))
