"""pyro-vae: variational autoencoders written in Pyro.

Model/guide pairs (``VAE``, ``SSVAE``), an SVI trainer (``Trainer``) with Pyro's ELBOs and
the importance-weighted ``IWAE`` and ``DReG`` objectives, per-datapoint importance-weighted
log p(x) (``estimate_log_px``), offline MNIST (``load_dataset``), safe checkpoints and figures.

The public names below load their module on first use (PEP 562), so ``import pyro_vae`` and
the command-line scripts' ``--help`` do not wait for torch and Pyro.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "CheckpointError": "pyro_vae.checkpoints",
    "load_checkpoint": "pyro_vae.checkpoints",
    "save_checkpoint": "pyro_vae.checkpoints",
    "BatchLoader": "pyro_vae.data",
    "DataError": "pyro_vae.data",
    "Dataset": "pyro_vae.data",
    "SemiSupervisedLoader": "pyro_vae.data",
    "as_dataset": "pyro_vae.data",
    "binarize_static": "pyro_vae.data",
    "check_images": "pyro_vae.data",
    "heldout_split": "pyro_vae.data",
    "labelled_subset": "pyro_vae.data",
    "load_dataset": "pyro_vae.data",
    "BernoulliImage": "pyro_vae.distributions",
    "LabelMarginalLikelihood": "pyro_vae.evaluate",
    "MarginalLikelihood": "pyro_vae.evaluate",
    "estimate_log_px": "pyro_vae.evaluate",
    "estimate_log_px_over_labels": "pyro_vae.evaluate",
    "log_weights": "pyro_vae.evaluate",
    "predict_labels": "pyro_vae.evaluate",
    "psis_khat": "pyro_vae.evaluate",
    "semi_supervised_report": "pyro_vae.evaluate",
    "SSVAE": "pyro_vae.models",
    "HierarchicalVAE": "pyro_vae.models",
    "VAE": "pyro_vae.models",
    "StackedSSVAE": "pyro_vae.models",
    "model_from_checkpoint": "pyro_vae.models",
    "ConvNet": "pyro_vae.nets",
    "Decoder": "pyro_vae.nets",
    "Encoder": "pyro_vae.nets",
    "mlp": "pyro_vae.nets",
    "IWAE": "pyro_vae.objectives",
    "DReG": "pyro_vae.objectives",
    "ObjectiveError": "pyro_vae.objectives",
    "Outputs": "pyro_vae.rundir",
    "RunDir": "pyro_vae.rundir",
    "RunDirError": "pyro_vae.rundir",
    "Run": "pyro_vae.runs",
    "RunData": "pyro_vae.runs",
    "TrainingRun": "pyro_vae.runs",
    "seed_everything": "pyro_vae.seeding",
    "KLWeight": "pyro_vae.schedules",
    "kl_warmup_weight": "pyro_vae.schedules",
    "lr_factor": "pyro_vae.schedules",
    "PRESETS": "pyro_vae.choices",
    "TrainResult": "pyro_vae.jobs",
    "train_ssvae": "pyro_vae.jobs",
    "train_vae": "pyro_vae.jobs",
    "SSVAEConfig": "pyro_vae.config",
    "TrainConfig": "pyro_vae.config",
    "EarlyStopping": "pyro_vae.train",
    "NonFiniteError": "pyro_vae.stepper",
    "ParamClashError": "pyro_vae.stepper",
    "Trainer": "pyro_vae.train",
    "TrainingInterrupted": "pyro_vae.train",
    "make_elbo": "pyro_vae.train",
}
_SUBMODULES = ("plots",)

__all__ = sorted([*_PUBLIC, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"pyro_vae.{name}")
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC, *_SUBMODULES])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from pyro_vae import plots  # noqa: F401
    from pyro_vae.checkpoints import CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
    from pyro_vae.choices import PRESETS  # noqa: F401
    from pyro_vae.config import SSVAEConfig, TrainConfig  # noqa: F401
    from pyro_vae.data import (  # noqa: F401
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
    from pyro_vae.distributions import BernoulliImage  # noqa: F401
    from pyro_vae.evaluate import (  # noqa: F401
        LabelMarginalLikelihood,
        MarginalLikelihood,
        estimate_log_px,
        estimate_log_px_over_labels,
        log_weights,
        predict_labels,
        psis_khat,
        semi_supervised_report,
    )
    from pyro_vae.jobs import TrainResult, train_ssvae, train_vae  # noqa: F401
    from pyro_vae.models import (  # noqa: F401
        SSVAE,
        VAE,
        HierarchicalVAE,
        StackedSSVAE,
        model_from_checkpoint,
    )
    from pyro_vae.nets import ConvNet, Decoder, Encoder, mlp  # noqa: F401
    from pyro_vae.objectives import IWAE, DReG, ObjectiveError  # noqa: F401
    from pyro_vae.rundir import Outputs, RunDir, RunDirError  # noqa: F401
    from pyro_vae.runs import Run, RunData, TrainingRun  # noqa: F401
    from pyro_vae.schedules import KLWeight, kl_warmup_weight, lr_factor  # noqa: F401
    from pyro_vae.seeding import seed_everything  # noqa: F401
    from pyro_vae.stepper import NonFiniteError, ParamClashError  # noqa: F401
    from pyro_vae.train import (  # noqa: F401
        EarlyStopping,
        Trainer,
        TrainingInterrupted,
        make_elbo,
    )
