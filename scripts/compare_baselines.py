"""PCA, a linear autoencoder, a deep autoencoder, the VAE and a GAN, side by side:
reconstructions of the test images and samples from each latent space, for several latent
sizes.

    python scripts/compare_baselines.py --z-dims 2 10 50 --epochs 10

All five fit the same statically binarised training images, for the same number of epochs.
Reports, per latent size and method, what the method can do at all (reconstruct, score
log p(x), sample), the per-pixel binary cross-entropy and squared error of the test
reconstructions (methods with an encoder), and the quality of 10,000 samples in the eyes of a
digit classifier trained here: its mean confidence, the balance of the classes it sees, the
Fréchet distance between its penultimate-layer features of the samples and of the test images,
and the k-NN precision (are samples realistic?) and recall (is every kind of test image
produced?) in that feature space, with as many training images as the reference a perfect
generator would score. Writes comparison.json and, per size, figures/reconstructions_d<d>.png,
samples_d<d>.png and interpolations_d<d>.png (the VAE's and the GAN's images along the same
line between two prior draws), and figures/latent_maps_d2.png, into --out (default: a new
directory runs/baselines-<timestamp>-<suffix>); the set is written aside and moved into place
at the end, and an existing one is replaced only with --force.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyro_vae.choices import CAPABILITIES, METHODS
from pyro_vae.cli import (
    ArgumentParser,
    UsageError,
    add_force_arg,
    add_runtime_args,
    apply_threads,
    dataset_name,
    hidden_sizes,
    output_dir,
    positive_int,
    run,
    shown,
)
from pyro_vae.io.rundir import default_run_dir


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--z-dims",
        type=positive_int,
        nargs="+",
        default=[2, 10, 50],
        help="latent sizes to compare (default: 2 10 50)",
    )
    p.add_argument(
        "--dataset",
        type=dataset_name,
        default="mnist",
        help="mnist, fashion-mnist, digits, or your own labelled images: a .npy/.npz file "
        "(with labels) or a folder with one sub-folder per class (default: mnist)",
    )
    p.add_argument(
        "--epochs", type=positive_int, default=10, help="training epochs per model (default: 10)"
    )
    p.add_argument(
        "--hidden",
        type=hidden_sizes,
        default=(400,),
        help="hidden layers of the autoencoder and the VAE (default: 400)",
    )
    p.add_argument(
        "--train-size",
        type=positive_int,
        default=None,
        help="use only the first N training images (default: all 50,000)",
    )
    p.add_argument(
        "--test-size",
        type=positive_int,
        default=None,
        help="use only the first N test images (default: all 10,000)",
    )
    p.add_argument(
        "--samples",
        type=positive_int,
        default=10000,
        help="samples per model, and training images as the reference (default: 10000)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="where data sets live (default: the cache)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write (default: a new runs/baselines-<timestamp>-<suffix>)",
    )
    add_force_arg(p)
    add_runtime_args(p)
    return p


def print_table(d: int, result) -> None:
    print(
        f"d = {d}:  {'BCE':>7} {'sq.err':>7} | samples: {'conf.':>5} {'balance':>7} "
        f"{'FD':>7} {'prec.':>5} {'recall':>6} | training"
    )
    rows = [(name, result.metrics[name]) for name in METHODS]
    rows.append(("(training images)", {"samples": result.reference}))
    for name, m in rows:
        q = m["samples"]
        bce, se = m.get("bce_per_pixel"), m.get("squared_error_per_pixel")
        recon = f"{bce:7.4f} {se:7.4f}" if bce is not None else f"{'-':>7} {'-':>7}"
        trained = f"{m['train_seconds']:6.1f} s" if "train_seconds" in m else ""
        print(
            f"  {name:<19} {recon} |          {shown(q['confidence'], '5.3f')} "
            f"{shown(q['class_balance'], '7.3f')} {shown(q['frechet_distance'], '7.2f')} "
            f"{shown(q['precision'], '5.3f')} {shown(q['recall'], '6.3f')} | {trained}"
        )


def main(args) -> dict:
    # torch loads here, after the arguments are parsed
    from pyro_vae.config import BaselinesConfig
    from pyro_vae.jobs.baselines import compare_baselines

    apply_threads(args)
    if args.device != "cpu":
        raise UsageError("compare_baselines.py runs on the CPU: drop --device")
    config = BaselinesConfig(
        dataset=args.dataset,
        z_dims=tuple(args.z_dims),
        epochs=args.epochs,
        hidden=args.hidden,
        train_size=args.train_size,
        test_size=args.test_size,
        samples=args.samples,
        seed=args.seed,
    )
    out = output_dir(args.out or default_run_dir("baselines"))
    result = compare_baselines(
        config,
        out.path,
        force=args.force,
        data_dir=args.data_dir,
        on_size=None if args.quiet else print_table,
        flag="--out",
    )
    if not args.quiet:
        print("what each method can do:", end="")
        for name in METHODS:
            can = [k for k, v in CAPABILITIES[name].items() if v]
            print(f"  {name}: {', '.join(can)};", end="")
        print(
            f"\nclassifier of the classes: test accuracy {result.report['classifier_test_accuracy']:.3f}"
        )
    print(f"report: {result.written}")
    return result.report


if __name__ == "__main__":
    sys.exit(run(main, build_parser().parse_args()))
