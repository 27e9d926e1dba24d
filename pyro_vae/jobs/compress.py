"""Bits-back coding as one call on a loaded run: ``compress(run, images)`` codes images
(an array, or the name of the run's held-out split) into a ``CompressedImages`` message and,
given ``output``, writes it atomically; ``decompress(run, message)`` gives the images back,
exactly.  ``compress.py`` parses its flags, calls one of them and prints.

    from pyro_vae import CompressConfig, Run, compress, decompress

    run = Run.load("runs/vae-...")
    packed = compress(run, "test", CompressConfig(count=1000), "test.pvbb")
    print(packed.report["bits_per_pixel"])
    images = decompress(run, packed.result).result
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pyro_vae.apps.compression import (
    BitsBackCoder,
    CompressedImages,
    CompressionError,
    model_hash,
)
from pyro_vae.checks import ConfigError
from pyro_vae.choices import HELDOUT_SPLITS
from pyro_vae.config import CompressConfig
from pyro_vae.data import first_rows
from pyro_vae.io.rundir import check_output_file, write_file_atomically
from pyro_vae.jobs.evaluate import EvalResult
from pyro_vae.training.runs import Run

__all__ = ["coder_for", "compress", "decompress"]


def coder_for(run: Run, latent_bits: int = 10, particles: int = 1) -> BitsBackCoder:
    """The run's bits-back coder; a ``ConfigError`` naming the setting it cannot take (or
    ``checkpoint`` when the model itself cannot be coded: not Bernoulli pixels, a flow)."""
    try:
        return BitsBackCoder(run.model, latent_bits=latent_bits, particles=particles)
    except ValueError as e:
        text = str(e)
        field = next((f for f in ("latent_bits", "particles") if f in text), "checkpoint")
        raise ConfigError(field, text) from None


def _images_for(coder: BitsBackCoder, images: Tensor | np.ndarray, count: int | None) -> Tensor:
    """The first ``count`` images, flat, in [0, 1]: binary for a Bernoulli model; for a
    discretised logistic one, uint8 levels (0-255) are scaled as the data loader scales them."""
    x_dim, levels = coder.vae.x_dim, coder.levels
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    if images.dim() >= 1 and images.shape[0] == 0:
        raise ConfigError("input", f"holds no images (shape {tuple(images.shape)})")
    images = first_rows(images, count, "--count", "input")
    if images.dim() < 2 or images[0].numel() != x_dim:
        raise ConfigError(
            "input", f"expected images of {x_dim} pixels, got shape {tuple(images.shape)}"
        )
    flat = images.reshape(len(images), -1)
    if flat.dtype == torch.uint8 and levels is not None:
        flat = flat.float() / (levels - 1)
    try:
        return coder.check_images(flat.float())
    except ValueError as e:
        raise ConfigError("input", str(e)) from None


def compress(
    run: Run,
    images: Tensor | np.ndarray | str,
    config: CompressConfig | None = None,
    output: Path | str | None = None,
    *,
    force: bool = False,
    data_dir: Path | str | None = None,
    inputs: tuple = (),
    flag: str = "--output",
) -> EvalResult:
    """Code ``images`` ((N, H, W) or (N, D) of 0/1 for a Bernoulli model, of levels 0-255
    (uint8) or k / 255 for a discretised logistic one; or ``"test"`` / ``"valid"``: the run's
    held-out split prepared as in training) with bits-back: ``result`` is the
    ``CompressedImages`` message, ``report`` its size in bytes and bits per pixel (header
    included), the start-up cost of the first image's latents, and the speed.  With
    ``output`` the file is written atomically (refused before any work if it exists without
    ``force``, or is one of ``inputs`` or the run's checkpoint)."""
    config = config or CompressConfig()
    if output is not None:
        check_output_file(output, inputs=(run.path, *inputs), force=force, flag=flag)
    coder = coder_for(run, config.latent_bits, config.particles)
    if isinstance(images, str):
        if images not in HELDOUT_SPLITS:
            raise ConfigError("split", f"{images!r} is not one of {', '.join(HELDOUT_SPLITS)}")
        images = run.heldout(images, data_dir=data_dir).images
    x = _images_for(coder, images, config.count)
    start = time.perf_counter()
    trace: list = []
    message = coder.encode(x, trace)
    seconds = time.perf_counter() - start
    data = message.to_bytes()
    written = None
    if output is not None:
        written = write_file_atomically(output, data, force=force, flag=flag)
    report = {
        "images": len(x),
        "bytes": len(data),
        "bits_per_pixel": 8 * len(data) / max(1, x.numel()),
        "images_per_second": len(x) / seconds if seconds else float("inf"),
        "config": config.recorded_in_report(),
    }
    lengths = [bits for bits, *_ in trace]
    if len(lengths) >= 2:
        # bits-back has no bits to get back for the first image's latents: a start-up cost
        # that a long message spreads out (the mean image from the later ones)
        per_image = (lengths[-1] - lengths[0]) / (len(lengths) - 1)
        report["startup_bits"] = max(0.0, lengths[0] - per_image)
        report["bits_per_pixel_after_startup"] = per_image / x[0].numel()
    return EvalResult(report, message, written)


def decompress(
    run: Run,
    message: CompressedImages | bytes,
    output: Path | str | None = None,
    *,
    force: bool = False,
    inputs: tuple = (),
    flag: str = "--output",
) -> EvalResult:
    """The images of a bits-back ``message`` (or its bytes), exactly as they were coded:
    ``result`` is a uint8 array (N, H, W) of 0/1, or of levels 0-255; with ``output`` it is written as a ``.npy`` file,
    atomically.  A message made with other weights, or truncated or altered, is a
    ``CompressionError`` (one line)."""
    if output is not None:
        check_output_file(output, inputs=(run.path, *inputs), force=force, flag=flag)
    if not isinstance(message, CompressedImages):
        message = CompressedImages.from_bytes(message)
    if message.weights != model_hash(run.model):  # before how it was coded: not its file
        raise CompressionError("the file was made with other model weights")
    try:  # the file says how it was coded
        coder = BitsBackCoder(run.model, message.latent_bits, message.particles)
    except ValueError as e:  # K > 1 with a hierarchical model: not this model's file
        raise CompressionError(str(e)) from None
    start = time.perf_counter()
    images = coder.decode(message)
    seconds = time.perf_counter() - start
    steps = 1 if coder.levels is None else coder.levels - 1
    array = (images * steps).round().reshape(-1, *message.image_shape).to(torch.uint8).numpy()
    written = None
    if output is not None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        written = write_file_atomically(output, buffer.getvalue(), force=force, flag=flag)
    return EvalResult({"images": len(array), "seconds": seconds}, array, written)
