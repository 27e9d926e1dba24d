"""Splits as training and evaluation use them: static binarisation, the held-out splits
binarised once, size limits, and class-balanced labelled subsets."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pyro_vae.data.dataset import DataError, Dataset, check_images
from pyro_vae.data.sources import load_dataset
from pyro_vae.seeding import generator

__all__ = [
    "binarize_static",
    "heldout_images",
    "heldout_split",
    "labelled_subset",
    "training_splits",
]


def binarize_static(data: Dataset, seed: int, stream: str = "binarize-train") -> Dataset:
    """One fixed Bernoulli draw of every pixel, from the generator of ``stream`` of ``seed``."""
    gen = generator(seed, stream)
    return Dataset(torch.bernoulli(data.images, generator=gen), data.labels, data.image_shape, 2)


# Held-out splits are binarised once, each from a stream of its own, so every epoch and
# every later evaluation of a run scores the same binary images.
HELDOUT = ("valid", "test")


def heldout_split(splits: dict[str, Dataset], name: str, binarize: str, seed: int) -> Dataset:
    """The ``valid`` or ``test`` split as evaluation sees it: binarised once (seeded from
    ``seed``) unless ``binarize == "none"``."""
    if name not in HELDOUT:
        raise DataError(f"unknown held-out split {name!r}; choose valid or test")
    data = splits[name]
    return data if binarize == "none" else binarize_static(data, seed, f"binarize-{name}")


def first_rows(data, n: int | None, what: str, split: str):
    """The first ``n`` rows of ``data`` (a ``Dataset`` or a tensor; all when None); a
    one-line ``DataError`` naming ``what`` (the flag or argument) when the split is shorter
    than asked for: a silently smaller set would report figures for fewer images than the
    user believes."""
    if n is None:
        return data
    if n > len(data):
        raise DataError(f"{what} {n}: the {split} split has only {len(data)} images")
    return data.subset(slice(0, n)) if isinstance(data, Dataset) else data[:n]


def heldout_images(
    dataset: str,
    data_dir: Path | str | None,
    split: str,
    binarize: str,
    seed: int,
    n: int | None = None,
    what: str = "--images",
) -> Tensor:
    """The first ``n`` images (all when None) of ``dataset``'s ``valid`` or ``test`` split as
    evaluation sees them (``heldout_split``), shape (n, pixels)."""
    images = heldout_split(load_dataset(dataset, data_dir), split, binarize, seed).images
    return first_rows(images, n, what, f"{dataset} {split}")


def training_splits(
    dataset: str,
    data_dir: Path | str | None,
    *,
    likelihood: str,
    binarize: str,
    seed: int,
    train_size: int | None = None,
    eval_size: int | None = None,
    sha256: str | None = None,
) -> tuple[Dataset, Dataset, Dataset]:
    """(train, valid, test) as a training run uses them: the first ``train_size`` /
    ``eval_size`` images, checked for the likelihood and binarisation (``DataError``
    otherwise), train binarised once if ``binarize == "static"``, and the held-out splits
    binarised once with their own seeds.  ``sha256``: for a data file, the hash the run
    recorded (a file changed since is refused)."""
    splits = load_dataset(dataset, data_dir, sha256)
    splits = {
        "train": first_rows(splits["train"], train_size, "--train-size", "training"),
        "valid": first_rows(splits["valid"], eval_size, "--eval-size", "validation"),
        "test": first_rows(splits["test"], eval_size, "--eval-size", "test"),
    }
    for name, data in splits.items():
        check_images(data.images, likelihood, binarize, name, data.levels)
    train = binarize_static(splits["train"], seed) if binarize == "static" else splits["train"]
    return (
        train,
        heldout_split(splits, "valid", binarize, seed),
        heldout_split(splits, "test", binarize, seed),
    )


def labelled_subset(
    data: Dataset, n: int, seed: int, num_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """Indices (labelled, unlabelled) of a class-balanced labelled subset of ``n`` images.

    ``n / num_classes`` images of each class, drawn from the ``labelled`` stream of ``seed``; the
    rest are the unlabelled images.  Raises ``DataError`` when ``n`` is not a multiple of
    the class count or a class has too few images.
    """
    if data.labels is None:
        raise DataError("a labelled subset needs labels")
    if n < num_classes or n % num_classes:
        raise DataError(f"{n} labels cannot be split evenly over {num_classes} classes")
    present = int(data.labels.unique().numel())
    if present < num_classes:
        raise DataError(f"the data have {present} classes, fewer than {num_classes}")
    per_class = n // num_classes
    gen = generator(seed, "labelled")
    chosen = []
    for c in range(num_classes):
        idx = (data.labels == c).nonzero().squeeze(1)
        if len(idx) < per_class:
            raise DataError(
                f"class {c} has {len(idx)} images, fewer than the {per_class} per class that "
                f"{n} labels need"
            )
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    labelled = torch.cat(chosen).sort().values
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[labelled] = False
    return labelled, mask.nonzero().squeeze(1)
