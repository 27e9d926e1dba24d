"""pyro-vae: variational autoencoders written in Pyro.

Model/guide pairs (``VAE``), an SVI trainer (``Trainer``), per-datapoint importance-weighted
log p(x) (``estimate_log_px``), offline MNIST (``load_dataset``), safe checkpoints and figures.
"""

from pyro_vae.checkpoints import (
    CheckpointError,
    RunDir,
    load_checkpoint,
    save_checkpoint,
)
from pyro_vae.data import (
    BatchLoader,
    DataError,
    Dataset,
    as_dataset,
    binarize_static,
    check_images,
    load_dataset,
)
from pyro_vae.evaluate import MarginalLikelihood, estimate_log_px, log_weights, psis_khat
from pyro_vae.models import VAE, model_from_checkpoint
from pyro_vae.nets import Decoder, Encoder, mlp
from pyro_vae.train import NonFiniteError, Trainer, make_elbo, seed_everything

__version__ = "0.1.0"

__all__ = [
    "BatchLoader",
    "CheckpointError",
    "DataError",
    "Dataset",
    "Decoder",
    "Encoder",
    "MarginalLikelihood",
    "NonFiniteError",
    "RunDir",
    "Trainer",
    "VAE",
    "as_dataset",
    "binarize_static",
    "check_images",
    "estimate_log_px",
    "load_checkpoint",
    "load_dataset",
    "log_weights",
    "make_elbo",
    "mlp",
    "model_from_checkpoint",
    "psis_khat",
    "save_checkpoint",
    "seed_everything",
]
