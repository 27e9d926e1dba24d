"""pyro-vae: variational autoencoders written in Pyro.

Model/guide pairs (``VAE``), an SVI trainer (``Trainer``), per-datapoint importance-weighted
log p(x) (``estimate_log_px``), offline MNIST (``load_dataset``), safe checkpoints and figures.
"""

from pyro_vae import plots
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
    SemiSupervisedLoader,
    as_dataset,
    binarize_static,
    check_images,
    heldout_split,
    labelled_subset,
    load_dataset,
)
from pyro_vae.distributions import BernoulliImage
from pyro_vae.evaluate import (
    MarginalLikelihood,
    estimate_log_px,
    estimate_log_px_over_labels,
    log_weights,
    psis_khat,
)
from pyro_vae.models import SSVAE, VAE, model_from_checkpoint
from pyro_vae.nets import Decoder, Encoder, mlp
from pyro_vae.runs import TrainingRun
from pyro_vae.train import (
    NonFiniteError,
    Trainer,
    TrainingInterrupted,
    make_elbo,
    seed_everything,
)

__version__ = "0.1.0"

__all__ = [
    "BatchLoader",
    "BernoulliImage",
    "CheckpointError",
    "DataError",
    "Dataset",
    "Decoder",
    "Encoder",
    "MarginalLikelihood",
    "NonFiniteError",
    "RunDir",
    "SSVAE",
    "SemiSupervisedLoader",
    "Trainer",
    "TrainingInterrupted",
    "TrainingRun",
    "VAE",
    "as_dataset",
    "binarize_static",
    "check_images",
    "estimate_log_px",
    "estimate_log_px_over_labels",
    "heldout_split",
    "labelled_subset",
    "load_checkpoint",
    "load_dataset",
    "log_weights",
    "make_elbo",
    "mlp",
    "plots",
    "model_from_checkpoint",
    "psis_khat",
    "save_checkpoint",
    "seed_everything",
]
