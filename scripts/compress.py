"""Lossless compression of images with a trained VAE (bits-back coding with ANS).

    python scripts/compress.py --checkpoint runs/vae-... encode --split test --output test.pvbb
    python scripts/compress.py --checkpoint runs/vae-... encode --input digits.npy --output d.pvbb
    python scripts/compress.py --checkpoint runs/vae-... decode --input d.pvbb --output d.npy

``encode`` takes images from a ``.npy`` file ((N, H, W), (N, H, W, C) or (N, H*W*C)):
values 0/1 for a model of binary pixels, uint8 levels 0-255 for one with the discretised
logistic likelihood (``--likelihood logistic``, 8-bit grey or colour images); or the run's
held-out split prepared as in training; ``decode`` writes them back as a uint8 ``.npy`` file
of the model's image shape, (N, H, W) or (N, H, W, C).  With ``encode --particles K`` the code is importance-weighted
bits-back (BB-IS, Ruan et al. 2021): about -log p̂_K(x) per image instead of the -ELBO (one-layer
models; a hierarchical VAE's layers are chained with one particle).  The
file holds a header (format version, a hash of the model's weights, image count and shape,
latent bits, K) and the message; a file made with other weights, or
a truncated or altered one, is refused with one line.  Outputs are written to a temporary
file and renamed: never half-written; an existing --output is replaced only with --force, and
never when it is the command's --input or checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyro_vae.cli import ArgumentParser, UsageError, apply_threads, positive_int, run


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint file or run directory"
    )
    p.add_argument(
        "--latent-bits",
        type=positive_int,
        default=None,
        help="buckets per latent dimension: 2**bits of equal prior mass, 4 to 16 (default: 10 "
        "to encode; decode reads it from the file)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="images -> compressed file")
    enc.add_argument(
        "--input",
        type=Path,
        default=None,
        help=".npy file of images (0/1, or 8-bit levels, grey or colour)",
    )
    enc.add_argument(
        "--split",
        default=None,
        choices=("test", "valid"),
        help="the run's held-out split, binarised as in training (instead of --input)",
    )
    enc.add_argument("--count", type=positive_int, default=None, help="only the first N images")
    enc.add_argument("--output", type=Path, required=True, help="compressed file to write")
    enc.add_argument(
        "--particles",
        type=positive_int,
        default=1,
        help="K latents per image (importance-weighted bits-back, BB-IS): the code approaches "
        "-log p̂_K(x) instead of the -ELBO; K is recorded in the file (default: 1)",
    )
    dec = sub.add_parser("decode", help="compressed file -> images")
    dec.add_argument("--input", type=Path, required=True, help="compressed file")
    dec.add_argument("--output", type=Path, required=True, help=".npy file to write")
    for sp in (enc, dec):
        sp.error = p.error  # one line, exit 2, as for the main parser
        sp.add_argument(
            "--force",
            action="store_true",
            help="replace an existing --output (never an input of the command)",
        )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="where data sets live (default: as in training)"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (the coder uses one)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary line")
    return p


def read_input_images(path: Path):
    """The images of an ``encode --input`` .npy file (refused in one line if unreadable)."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"--input {path}: not a readable .npy file ({e})") from None


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    from pyro_vae.apps.compression import CompressedImages, CompressionError
    from pyro_vae.config import CompressConfig
    from pyro_vae.io.checkpoints import resolve_checkpoint
    from pyro_vae.io.rundir import check_output_file
    from pyro_vae.jobs import compress, decompress
    from pyro_vae.training.runs import Run

    apply_threads(args)
    trained = Run.load(args.checkpoint)  # the coder runs on the CPU in float64
    inputs = (args.input,) if args.input is not None else ()
    checkpoints = (resolve_checkpoint(args.checkpoint), trained.path)
    check_output_file(args.output, inputs=(*checkpoints, *inputs), force=args.force)
    if args.command == "encode":
        config = CompressConfig(
            latent_bits=args.latent_bits or 10, particles=args.particles, count=args.count
        )
        if (args.input is None) == (args.split is None):
            raise UsageError("encode needs exactly one of --input and --split")
        images = args.split if args.split is not None else read_input_images(args.input)
        result = compress(
            trained,
            images,
            config,
            args.output,
            force=args.force,
            data_dir=args.data_dir,
            inputs=inputs,
        )
        report = result.report
        if not args.quiet:
            startup = ""
            if "startup_bits" in report:
                startup = (
                    f"; the start-up cost {report['startup_bits']:.0f} bits is "
                    f"{report['startup_bits'] / (8 * report['bytes']):.0%} of it, "
                    f"{report['bits_per_pixel_after_startup']:.4f} bits per pixel without it"
                )
            print(
                f"{report['images']} images -> {report['bytes']} bytes "
                f"({report['bits_per_pixel']:.4f} bits per pixel, header included{startup}), "
                f"{report['images_per_second']:.0f} images/s: {args.output}"
            )
        return report
    try:
        raw = args.input.read_bytes()
    except OSError as e:
        raise UsageError(f"--input {args.input}: {e.strerror}") from None
    try:
        message = CompressedImages.from_bytes(raw)
        if args.latent_bits not in (None, message.latent_bits):
            raise UsageError(
                f"--input {args.input}: the file uses {message.latent_bits} latent bits, "
                f"--latent-bits says {args.latent_bits} (decode reads it from the file)"
            )
        result = decompress(trained, message, args.output, force=args.force, inputs=inputs)
    except CompressionError as e:
        raise UsageError(f"--input {args.input}: {e}") from None
    if not args.quiet:
        print(
            f"{result.report['images']} images decoded in {result.report['seconds']:.1f} s: {args.output}"
        )
    return {"images": result.report["images"]}


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(run(main, arguments, grad=False))
