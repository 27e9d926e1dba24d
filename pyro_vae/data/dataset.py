"""A data set in memory: images (N, D) in [0, 1], optional labels, the image shape; user
arrays wrapped as one; checks that images suit a likelihood and a binarisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pyro_vae.choices import BINARIZATIONS

__all__ = ["BINARIZATIONS", "DataError", "Dataset", "as_dataset", "check_images"]


class DataError(ValueError):
    """A problem with the data a user asked for; its message is one line meant for people."""


@dataclass
class Dataset:
    """Images as a float32 tensor (N, D), optional int64 labels (N,), the image shape, and
    the number of grey levels per value when the data have one (256 for 8-bit images,
    2 when binarised; None for intensities of unknown resolution)."""

    images: Tensor
    labels: Tensor | None = None
    image_shape: tuple[int, ...] = (28, 28)
    levels: int | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor | slice) -> Dataset:
        """The rows ``index`` (images and labels), with the same image shape."""
        labels = None if self.labels is None else self.labels[index]
        return Dataset(self.images[index], labels, self.image_shape, self.levels)


def _as_tensor(values, what: str) -> Tensor:
    if isinstance(values, Tensor):
        return values
    try:
        return torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a numeric array") from None


def as_dataset(
    images, labels=None, image_shape: tuple[int, ...] | None = None, levels: int | None = None
) -> Dataset:
    """Wrap a user's images (array or tensor, (N, D) or (N, H, W[, C])) as a ``Dataset``.

    uint8 images are scaled to [0, 1] by 1/255 (256 ``levels``); float images are kept as
    they are and must be finite intensities in [0, 1] (``levels`` says how many values they
    take, when known).  Raises ``DataError`` (one line) for an empty set, a
    non-numeric dtype, values outside [0, 1], negative or mismatched labels.
    """
    x = _as_tensor(images, "images")
    if x.dim() < 2:
        raise DataError(f"images must have shape (N, D) or (N, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError("the data set is empty")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
        levels = 256 if levels is None else levels
    elif x.dtype.is_floating_point:
        x = x.float()
    else:
        raise DataError(f"images must be uint8 or floating point, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise DataError("images hold NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"images must be intensities in [0, 1] (or uint8), found [{lo:g}, {hi:g}]")
    shape = tuple(image_shape) if image_shape is not None else tuple(x.shape[1:])
    x = x.reshape(x.shape[0], -1).contiguous()
    if int(np.prod(shape)) != x.shape[1]:
        raise DataError(f"image_shape {shape} does not match {x.shape[1]} values per image")
    y = None
    if labels is not None:
        y = _as_tensor(labels, "labels")
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
            raise DataError(f"labels must be a 1-D integer array, got {y.dtype} {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise DataError(f"{x.shape[0]} images but {y.shape[0]} labels")
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"labels must be class indices 0, 1, ...; found {int(y.min())}")
        y = y.long()
    if len(shape) == 1:
        side = int(round(shape[0] ** 0.5))
        shape = (side, side) if side * side == shape[0] else shape
    return Dataset(x, y, shape, levels)


def check_images(
    images: Tensor, likelihood: str, binarize: str, name: str = "data", levels: int | None = 256
) -> None:
    """Raise ``DataError`` unless ``images`` suit the likelihood and binarisation.

    NaN or inf is an error; binarisation needs intensities in [0, 1]; a Bernoulli likelihood
    on unbinarised data needs every value in {0, 1} (it is not silently relaxed); the
    continuous Bernoulli needs intensities in [0, 1]; the discretised logistic needs grey
    levels k / (levels - 1), unbinarised.
    """
    if not torch.isfinite(images).all():
        bad = int((~torch.isfinite(images)).any(dim=-1).sum())
        raise DataError(f"{name}: {bad} image(s) contain NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if binarize in ("dynamic", "static") and (lo < 0 or hi > 1):
        raise DataError(f"{name}: binarisation needs intensities in [0, 1], found [{lo:g}, {hi:g}]")
    if binarize == "none" and likelihood == "bernoulli":
        if not ((images == 0) | (images == 1)).all():
            raise DataError(
                f"{name}: a Bernoulli likelihood needs binary data, found values in [{lo:g}, {hi:g}];"
                " use --binarize dynamic or --likelihood gaussian"
            )
    if likelihood in ("continuous-bernoulli", "logistic") and binarize != "none":
        raise DataError(
            f"{name}: the {likelihood} likelihood models intensities: use --binarize none "
            "(or the bernoulli likelihood for binary images)"
        )
    if likelihood == "continuous-bernoulli" and (lo < 0 or hi > 1):
        raise DataError(
            f"{name}: the continuous Bernoulli needs intensities in [0, 1], found [{lo:g}, {hi:g}]"
        )
    if likelihood == "logistic":
        if levels is None:
            raise DataError(
                f"{name}: the discretised logistic needs data with a known number of grey "
                "levels (uint8 images: 256); these are floating-point intensities"
            )
        steps = levels - 1
        scaled = images.double() * steps
        if lo < 0 or hi > 1 or not bool(((scaled - scaled.round()).abs() < 1e-3).all()):
            raise DataError(
                f"{name}: the discretised logistic needs {levels} grey levels k / {steps} in "
                f"[0, 1] (8-bit images divided by 255), found values in [{lo:g}, {hi:g}] off "
                "that grid"
            )
