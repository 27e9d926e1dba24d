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
import time
from pathlib import Path

from pyro_vae.choices import CAPABILITIES, METHODS
from pyro_vae.cli import (
    ArgumentParser,
    UsageError,
    add_force_arg,
    add_runtime_args,
    apply_threads,
    hidden_sizes,
    output_dir,
    outputs_for,
    positive_int,
    run,
    shown,
)
from pyro_vae.io.rundir import default_run_dir

MIN_IMAGES = 10


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
    from pyro_vae.apps.baselines import compare_latent_models, fit_classifier
    from pyro_vae.apps.plots import plot_image_rows, plot_latent_maps
    from pyro_vae.data import binarize_static, first_rows, load_dataset
    from pyro_vae.seeding import seed_everything

    apply_threads(args)
    if args.device != "cpu":
        raise UsageError("compare_baselines.py runs on the CPU: drop --device")
    for flag, value in (("--samples", args.samples), ("--test-size", args.test_size)):
        if value is not None and value < MIN_IMAGES:
            raise UsageError(
                f"{flag}: at least {MIN_IMAGES} (precision and recall compare neighbourhoods "
                f"of several images), got {value}"
            )
    outputs = outputs_for(
        output_dir(args.out or default_run_dir("baselines")), args, "comparison.json"
    )
    seed_everything(args.seed)
    splits = load_dataset("mnist", args.data_dir)
    train = first_rows(splits["train"], args.train_size, "--train-size", "training")
    test = first_rows(splits["test"], args.test_size, "--test-size", "test")
    # PCA has at most min(images, pixels) components: checked before anything trains
    largest = min(len(train), train.images.shape[1])
    too_large = [d for d in args.z_dims if d > largest]
    if too_large:
        raise UsageError(
            f"--z-dims {too_large[0]}: PCA has at most {largest} components with "
            f"{len(train)} training images of {train.images.shape[1]} pixels"
        )
    train = binarize_static(train, args.seed, "train")
    test = binarize_static(test, args.seed, "test")
    start = time.perf_counter()
    classifier = fit_classifier(train.images, train.labels, seed=args.seed)
    accuracy = float((classifier(test.images).argmax(-1) == test.labels).float().mean())
    report = {
        "classifier_test_accuracy": accuracy,
        "epochs": args.epochs,
        "hidden": list(args.hidden),
        "train_images": len(train),
        "test_images": len(test),
        "units": "per pixel, nats (cross-entropy) and squared probability error; Fréchet "
        "distance in squared classifier-feature units",
        "capabilities": CAPABILITIES,
        "results": {},
        "reference": {},
    }
    with outputs:  # a failure on the way leaves the previous set as it was
        for d in args.z_dims:
            result = compare_latent_models(
                train.images,
                test.images,
                classifier,
                d,
                hidden=args.hidden,
                epochs=args.epochs,
                num_samples=args.samples,
                seed=args.seed,
            )
            report["results"][str(d)] = result.metrics
            report["reference"][str(d)] = result.reference
            originals = {"test images": test.images}
            plot_image_rows(
                originals | result.reconstructions,
                train.image_shape,
                outputs.path(f"figures/reconstructions_d{d}.png"),
                title=f"reconstructions, d = {d}",
            )
            plot_image_rows(
                result.samples,
                train.image_shape,
                outputs.path(f"figures/samples_d{d}.png"),
                n=12,
                title=f"samples, d = {d}",
            )
            plot_image_rows(
                result.interpolations,
                train.image_shape,
                outputs.path(f"figures/interpolations_d{d}.png"),
                title=f"interpolations, d = {d}",
            )
            if d == 2:
                plot_latent_maps(
                    result.codes, test.labels, outputs.path("figures/latent_maps_d2.png")
                )
            if not args.quiet:
                print_table(d, result)
        report["seconds"] = time.perf_counter() - start
        outputs.write_json("comparison.json", report)
        outputs.commit()
    if not args.quiet:
        print("what each method can do:", end="")
        for name in METHODS:
            can = [k for k, v in CAPABILITIES[name].items() if v]
            print(f"  {name}: {', '.join(can)};", end="")
        print(f"\ndigit classifier: test accuracy {accuracy:.3f}")
        print(f"report: {outputs.directory / 'comparison.json'}")
    return report


if __name__ == "__main__":
    sys.exit(run(main, build_parser().parse_args()))
