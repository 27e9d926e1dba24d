"""Bits per pixel on the test images: bits-back coding with the trained VAE, with
one particle (the ELBO's code) and with K particles (importance-weighted bits-back, BB-IS),
against gzip, bz2, lzma, PNG and WebP on the same images, measured in one run, beside the
model's -ELBO and -log p̂_K(x) at each K in bits per pixel; the one-off start-up cost of a
message (its first image) apart; encode and decode speed.

    python benchmarks/compression.py --checkpoint runs/vae-... [--latent-bits 8 10 12]
    python benchmarks/compression.py --checkpoint runs/vae-... --particles 1 5 20 50

The images are the run's test split, prepared as the evaluator prepares them: binarised once
for a Bernoulli model, the 8-bit grey levels for a discretised-logistic one (``train_svi.py
--likelihood logistic --binarize none``). Each generic compressor gets them as tightly as its
format allows; grey levels: the standard library's compressors on the raw bytes, PNG as one
8-bit grey image of all digits stacked, WebP lossless (8-bit grey); binary images: the standard library's
compressors at their highest level on the images packed 8 pixels per byte (np.packbits);
PNG as one 1-bit image of all digits stacked, with Pillow's optimisation; WebP (if Pillow
has it) lossless, 8-bit grey, the best effort.  The VAE's figures come from the evaluator on
the same images (-ELBO and -log p̂(x) at K = --num-particles).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import lzma
import math
import time

import numpy as np
import torch
from _machine import Quietness

from pyro_vae import Run, estimate_log_px
from pyro_vae.apps.compression import BitsBackCoder, CompressedImages


def generic(images: np.ndarray) -> dict[str, int]:
    """Compressed sizes in bytes."""
    packed = np.packbits(images.astype(np.uint8)).tobytes()
    sizes = {
        "gzip -9 (packed bits)": len(gzip.compress(packed, compresslevel=9, mtime=0)),
        "bz2 -9 (packed bits)": len(bz2.compress(packed, compresslevel=9)),
        "lzma -9e (packed bits)": len(lzma.compress(packed, preset=9 | lzma.PRESET_EXTREME)),
    }
    from PIL import Image, features

    n, h, w = images.shape
    tall = images.reshape(n * h, w).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(tall).convert("1").save(buffer, format="PNG", optimize=True)
    sizes["PNG, 1 bit, optimised"] = buffer.tell()
    if features.check("webp"):
        buffer = io.BytesIO()
        # WebP's largest side is 16383 pixels: tile the digits 100 to a row
        rows = -(-n // 100)
        grid = np.zeros((rows * h, 100 * w), dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, 100)
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i] * 255
        Image.fromarray(grid).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
        sizes["WebP lossless, best effort"] = buffer.tell()
    return sizes


def generic_grey(images: np.ndarray) -> dict[str, int]:
    """Compressed sizes in bytes of uint8 grey images (N, H, W)."""
    raw = images.astype(np.uint8).tobytes()
    sizes = {
        "gzip -9 (bytes)": len(gzip.compress(raw, compresslevel=9, mtime=0)),
        "bz2 -9 (bytes)": len(bz2.compress(raw, compresslevel=9)),
        "lzma -9e (bytes)": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
    }
    from PIL import Image, features

    n, h, w = images.shape
    buffer = io.BytesIO()
    Image.fromarray(images.reshape(n * h, w).astype(np.uint8)).save(
        buffer, format="PNG", optimize=True
    )
    sizes["PNG, 8-bit grey, optimised"] = buffer.tell()
    if features.check("webp"):
        rows = -(-n // 100)  # WebP's largest side is 16383 pixels: 100 images to a row
        grid = np.zeros((rows * h, 100 * w), dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, 100)
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
        buffer = io.BytesIO()
        Image.fromarray(grid).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
        sizes["WebP lossless, best effort"] = buffer.tell()
    return sizes


def main(args) -> None:
    torch.set_num_threads(args.threads)
    # the coder itself, not the compress() job: each setting is timed encoding and decoding
    trained = Run.load(args.checkpoint)
    vae = trained.model
    x = trained.heldout("test", args.eval_size, what="--eval-size").images
    n, pixels = x.shape
    levels = vae.levels if vae.likelihood_name == "logistic" else None
    images = x.reshape(n, *vae.image_shape).numpy()
    if levels is not None:
        images = np.rint(images * (levels - 1)).astype(np.uint8)
    rows = []
    settings = [(bits, k) for bits in args.latent_bits for k in args.particles]
    with Quietness() as quiet:
        for bits, k in settings:
            coder = BitsBackCoder(vae, latent_bits=bits, particles=k)
            trace: list = []
            t0 = time.perf_counter()
            message = coder.encode(x, trace)
            t1 = time.perf_counter()
            data = message.to_bytes()
            decoded = coder.decode(CompressedImages.from_bytes(data))
            t2 = time.perf_counter()
            assert torch.equal(decoded, x), "round trip failed"
            first = trace[0][0]
            rows.append(
                (
                    f"bits-back, {bits}-bit buckets, K={k}",
                    8 * len(data),
                    f"first image {first} bits (clean start); the rest "
                    f"{(trace[-1][0] - first) / (n - 1) / pixels:.4f} bits/pixel; "
                    f"encode {n / (t1 - t0):.0f} images/s, decode {n / (t2 - t1):.0f} images/s, "
                    "round trip exact",
                )
            )
            print(rows[-1][0], rows[-1][2], flush=True)
        for name, size in (generic(images) if levels is None else generic_grey(images)).items():
            rows.append((name, 8 * size, ""))
        torch.manual_seed(0)
        ks = sorted({1, *args.particles})
        r = estimate_log_px(
            vae.model, vae.guide, x, num_particles=args.num_particles, psis=False, ks=ks
        )
    to_bpp = 1 / (pixels * math.log(2))
    kind = "binarised" if levels is None else f"{levels}-level grey"
    print(f"\n{n} {kind} test images of {pixels} pixels; bits per pixel (lower is better):")
    for name, bits, note in rows:
        print(f"  {name:<36} {bits / (n * pixels):.4f}   {note}")
    print(f"  {'model -ELBO':<36} {-float(r.elbo.mean()) * to_bpp:.4f}")
    for k in ks:  # the mean of log p̂_k over the disjoint groups of k of the evaluator's draws
        print(
            f"  {'model -log p̂_K(x), K=' + str(k):<36} {-float(r.bound_vs_k[k].mean()) * to_bpp:.4f}"
        )
    print(
        f"  {'model -log p̂(x), K=' + str(args.num_particles):<36} {-float(r.log_px.mean()) * to_bpp:.4f}"
    )
    print(f"  {quiet.report()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--latent-bits", type=int, nargs="+", default=[10])
    p.add_argument("--particles", type=int, nargs="+", default=[1], help="K of BB-IS (1: BB-ANS)")
    p.add_argument("--num-particles", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    main(p.parse_args())
