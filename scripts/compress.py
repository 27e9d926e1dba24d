"""Lossless compression of binary images with a trained VAE (bits-back coding with ANS).

    python scripts/compress.py --checkpoint runs/vae-... encode --split test --output test.pvbb
    python scripts/compress.py --checkpoint runs/vae-... encode --input digits.npy --output d.pvbb
    python scripts/compress.py --checkpoint runs/vae-... decode --input d.pvbb --output d.npy

``encode`` takes binary images from a ``.npy`` file ((N, H, W) or (N, H*W), values 0/1) or
the run's held-out split binarised as in training; ``decode`` writes them back as a uint8
``.npy`` file of shape (N, H, W).  With ``encode --particles K`` the code is importance-weighted
bits-back (BB-IS, Ruan et al. 2021): about -log p̂_K(x) per image instead of the -ELBO (one-layer
models; a hierarchical VAE's layers are chained with one particle).  The
file holds a header (format version, a hash of the model's weights, image count and shape,
latent bits, K) and the message; a file made with other weights, or
a truncated or altered one, is refused with one line.  Outputs are written to a temporary
file and renamed: never half-written; an existing --output is replaced only with --force, and
never when it is the command's --input or checkpoint.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_vae.cli import ArgumentParser, UsageError, apply_threads, positive_int, run

if TYPE_CHECKING:
    import torch


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
    enc.add_argument("--input", type=Path, default=None, help=".npy file of binary images")
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


def write_atomically(path: Path, data: bytes, *, force: bool) -> None:
    """Write ``data`` to ``path`` (checked by ``check_output``) through a temporary file in
    the same directory; without ``force`` a file that appeared meanwhile is not replaced.
    The file gets the permissions a newly created file would (the umask's)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UsageError(f"--output {path}: {e.strerror}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:  # link, not rename: fails instead of replacing a file made meanwhile
                os.link(tmp, path)
            except FileExistsError:
                raise UsageError(
                    f"--output {path}: already exists; pass --force to replace it"
                ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(args, checkpoint: Path) -> None:
    """Refuse a bad --output before any work: a missing directory, a directory, one of the
    command's inputs (even with --force), an existing file without --force."""
    output = args.output
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: no directory {output.parent}")
    for source in (checkpoint, args.input):
        if source is not None and _same_file(output, source):
            raise UsageError(f"--output {output}: is an input of this command; choose another file")
    if output.is_dir():
        raise UsageError(f"--output {output}: is a directory")
    if output.exists() and not args.force:
        raise UsageError(f"--output {output}: already exists; pass --force to replace it")


def load_images(args, trained, coder) -> torch.Tensor:
    import numpy as np
    import torch

    from pyro_vae.data import first_rows

    if (args.input is None) == (args.split is None):
        raise UsageError("encode needs exactly one of --input and --split")
    if args.split is not None:
        images = trained.heldout(args.split, data_dir=args.data_dir).images
    else:
        try:
            images = torch.from_numpy(np.load(args.input, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise UsageError(f"--input {args.input}: not a readable .npy file ({e})") from None
    if images.dim() >= 1 and images.shape[0] == 0:
        raise UsageError(f"--input {args.input}: holds no images (shape {tuple(images.shape)})")
    images = first_rows(images, args.count, "--count", "input")
    x_dim = coder.vae.x_dim
    if images.dim() < 2 or images[0].numel() != x_dim:
        raise UsageError(
            f"--input: expected images of {x_dim} pixels, got shape {tuple(images.shape)}"
        )
    flat = images.reshape(len(images), -1).float()
    if not ((flat == 0) | (flat == 1)).all():
        raise UsageError("--input: the images must be binary (0/1 values)")
    return flat


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    import numpy as np
    import torch

    from pyro_vae.apps.compression import BitsBackCoder, CompressedImages, CompressionError
    from pyro_vae.io.checkpoints import resolve_checkpoint
    from pyro_vae.training.runs import Run

    apply_threads(args)
    checkpoint = resolve_checkpoint(args.checkpoint)
    check_output(args, checkpoint)
    trained = Run.load(checkpoint)  # the coder runs on the CPU in float64
    model = trained.model
    particles = getattr(args, "particles", 1)
    try:
        coder = BitsBackCoder(model, latent_bits=args.latent_bits or 10, particles=particles)
    except ValueError as e:
        text = str(e)  # the setting the coder refused, or the checkpoint's model itself
        flag = next(
            (
                f
                for k, f in (("latent_bits", "--latent-bits"), ("particles", "--particles"))
                if k in text
            ),
            "--checkpoint",
        )
        raise UsageError(f"{flag}: {text}") from None
    if args.command == "encode":
        images = load_images(args, trained, coder)
        start = time.perf_counter()
        trace: list = []
        message = coder.encode(images, trace)
        seconds = time.perf_counter() - start
        data = message.to_bytes()
        write_atomically(args.output, data, force=args.force)
        pixels = max(1, images.numel())
        report = {
            "images": len(images),
            "bytes": len(data),
            "bits_per_pixel": 8 * len(data) / pixels,
            "images_per_second": len(images) / seconds if seconds else float("inf"),
        }
        lengths = [bits for bits, *_ in trace]
        if len(lengths) >= 2:
            # bits-back has no bits to get back for the first image's latents: a start-up cost
            # that a long message spreads out (the mean image from the later ones)
            per_image = (lengths[-1] - lengths[0]) / (len(lengths) - 1)
            report["startup_bits"] = max(0.0, lengths[0] - per_image)
            report["bits_per_pixel_after_startup"] = per_image / images[0].numel()
        if not args.quiet:
            startup = ""
            if "startup_bits" in report:
                startup = (
                    f"; the start-up cost {report['startup_bits']:.0f} bits is "
                    f"{report['startup_bits'] / (8 * len(data)):.0%} of it, "
                    f"{report['bits_per_pixel_after_startup']:.4f} bits per pixel without it"
                )
            print(
                f"{len(images)} images -> {len(data)} bytes ({report['bits_per_pixel']:.4f} bits per "
                f"pixel, header included{startup}), {report['images_per_second']:.0f} images/s: "
                f"{args.output}"
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
        if message.weights != coder.weights:  # before how it was coded: not this model's file
            raise CompressionError("the file was made with other model weights")
        coded = (message.latent_bits, message.particles)
        if coded != (coder.latent_bits, coder.particles):  # the file says how it was coded
            try:
                coder = BitsBackCoder(model, latent_bits=coded[0], particles=coded[1])
            except ValueError as e:  # K > 1 with a hierarchical model: not this model's file
                raise UsageError(f"--input {args.input}: {e}") from None
        start = time.perf_counter()
        images = coder.decode(message)
        seconds = time.perf_counter() - start
    except CompressionError as e:
        raise UsageError(f"--input {args.input}: {e}") from None
    h, w = message.image_shape
    array = images.reshape(-1, h, w).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_atomically(args.output, buffer.getvalue(), force=args.force)
    if not args.quiet:
        print(f"{len(array)} images decoded in {seconds:.1f} s: {args.output}")
    return {"images": len(array)}


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(run(main, arguments, grad=False))
