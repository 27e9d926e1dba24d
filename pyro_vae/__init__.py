"""pyro-vae: variational autoencoders written in Pyro.

Model/guide pairs (``VAE``, ``SSVAE``), an SVI trainer (``Trainer``) with Pyro's ELBOs and
the importance-weighted ``IWAE`` and ``DReG`` objectives, per-datapoint importance-weighted
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
    LabelMarginalLikelihood,
    MarginalLikelihood,
    estimate_log_px,
    estimate_log_px_over_labels,
    log_weights,
    predict_labels,
    psis_khat,
    semi_supervised_report,
)
from pyro_vae.models import SSVAE, VAE, StackedSSVAE, model_from_checkpoint
from pyro_vae.nets import ConvNet, Decoder, Encoder, mlp
from pyro_vae.objectives import IWAE, DReG, ObjectiveError
from pyro_vae.runs import TrainingRun
from pyro_vae.seeding import seed_everything
from pyro_vae.train import (
    PRESETS,
    EarlyStopping,
    NonFiniteError,
    ParamClashError,
    Trainer,
    TrainingInterrupted,
    make_elbo,
)

__version__ = "0.1.0"

__all__ = [
    "IWAE",
    "PRESETS",
    "BatchLoader",
    "BernoulliImage",
    "CheckpointError",
    "ConvNet",
    "DataError",
    "Dataset",
    "DReG",
    "Decoder",
    "EarlyStopping",
    "Encoder",
    "LabelMarginalLikelihood",
    "MarginalLikelihood",
    "NonFiniteError",
    "ObjectiveError",
    "ParamClashError",
    "RunDir",
    "SSVAE",
    "SemiSupervisedLoader",
    "StackedSSVAE",
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
    "predict_labels",
    "psis_khat",
    "semi_supervised_report",
    "save_checkpoint",
    "seed_everything",
]
