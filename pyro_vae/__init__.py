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

from pyro_vae import deprecation

__version__ = "0.1.0"

# the module paths from before the sub-packages (pyro_vae.train, pyro_vae.evaluate, ...)
# still import, with a warning naming the new home
deprecation.install()

# public name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "CheckpointError": "pyro_vae.io.checkpoints",
    "load_checkpoint": "pyro_vae.io.checkpoints",
    "save_checkpoint": "pyro_vae.io.checkpoints",
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
    "BernoulliImage": "pyro_vae.networks.distributions",
    "LabelMarginalLikelihood": "pyro_vae.inference.evaluate",
    "MarginalLikelihood": "pyro_vae.inference.evaluate",
    "estimate_log_px": "pyro_vae.inference.evaluate",
    "estimate_log_px_over_labels": "pyro_vae.inference.evaluate",
    "log_weights": "pyro_vae.inference.evaluate",
    "predict_labels": "pyro_vae.inference.evaluate",
    "psis_khat": "pyro_vae.inference.evaluate",
    "semi_supervised_report": "pyro_vae.inference.evaluate",
    "SSVAE": "pyro_vae.models",
    "HierarchicalVAE": "pyro_vae.models",
    "VAE": "pyro_vae.models",
    "StackedSSVAE": "pyro_vae.models",
    "model_from_checkpoint": "pyro_vae.models",
    "ConvNet": "pyro_vae.networks.nets",
    "Decoder": "pyro_vae.networks.nets",
    "Encoder": "pyro_vae.networks.nets",
    "mlp": "pyro_vae.networks.nets",
    "IWAE": "pyro_vae.inference.objectives",
    "DReG": "pyro_vae.inference.objectives",
    "ObjectiveError": "pyro_vae.inference.objectives",
    "Outputs": "pyro_vae.io.rundir",
    "RunDir": "pyro_vae.io.rundir",
    "RunDirError": "pyro_vae.io.rundir",
    "Run": "pyro_vae.training.runs",
    "RunData": "pyro_vae.training.runs",
    "TrainingRun": "pyro_vae.training.runs",
    "seed_everything": "pyro_vae.seeding",
    "KLWeight": "pyro_vae.training.schedules",
    "kl_warmup_weight": "pyro_vae.training.schedules",
    "lr_factor": "pyro_vae.training.schedules",
    "PRESETS": "pyro_vae.choices",
    "TrainResult": "pyro_vae.jobs",
    "EvalResult": "pyro_vae.jobs",
    "decompose_gaps": "pyro_vae.jobs",
    "evaluate_log_px": "pyro_vae.jobs",
    "score_ood": "pyro_vae.jobs",
    "compress": "pyro_vae.jobs",
    "compare_baselines": "pyro_vae.jobs",
    "decompress": "pyro_vae.jobs",
    "train_ssvae": "pyro_vae.jobs",
    "train_vae": "pyro_vae.jobs",
    "SSVAEConfig": "pyro_vae.config",
    "EvalConfig": "pyro_vae.config",
    "GapsConfig": "pyro_vae.config",
    "OODConfig": "pyro_vae.config",
    "CompressConfig": "pyro_vae.config",
    "BaselinesConfig": "pyro_vae.config",
    "TrainConfig": "pyro_vae.config",
    "EarlyStopping": "pyro_vae.training.trainer",
    "NonFiniteError": "pyro_vae.training.stepper",
    "ParamClashError": "pyro_vae.training.stepper",
    "Trainer": "pyro_vae.training.trainer",
    "TrainingInterrupted": "pyro_vae.training.trainer",
    "make_elbo": "pyro_vae.training.trainer",
}
_SUBMODULES = {"plots": "pyro_vae.apps.plots"}

__all__ = sorted([*_PUBLIC, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC, *_SUBMODULES])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from pyro_vae.apps import plots  # noqa: F401
    from pyro_vae.choices import PRESETS  # noqa: F401
    from pyro_vae.config import (  # noqa: F401
        BaselinesConfig,
        CompressConfig,
        EvalConfig,
        GapsConfig,
        OODConfig,
        SSVAEConfig,
        TrainConfig,
    )
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
    from pyro_vae.inference.evaluate import (  # noqa: F401
        LabelMarginalLikelihood,
        MarginalLikelihood,
        estimate_log_px,
        estimate_log_px_over_labels,
        log_weights,
        predict_labels,
        psis_khat,
        semi_supervised_report,
    )
    from pyro_vae.inference.objectives import IWAE, DReG, ObjectiveError  # noqa: F401
    from pyro_vae.io.checkpoints import CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
    from pyro_vae.io.rundir import Outputs, RunDir, RunDirError  # noqa: F401
    from pyro_vae.jobs import (  # noqa: F401
        EvalResult,
        TrainResult,
        compare_baselines,
        compress,
        decompose_gaps,
        decompress,
        evaluate_log_px,
        score_ood,
        train_ssvae,
        train_vae,
    )
    from pyro_vae.models import (  # noqa: F401
        SSVAE,
        VAE,
        HierarchicalVAE,
        StackedSSVAE,
        model_from_checkpoint,
    )
    from pyro_vae.networks.distributions import BernoulliImage  # noqa: F401
    from pyro_vae.networks.nets import ConvNet, Decoder, Encoder, mlp  # noqa: F401
    from pyro_vae.seeding import seed_everything  # noqa: F401
    from pyro_vae.training.runs import Run, RunData, TrainingRun  # noqa: F401
    from pyro_vae.training.schedules import KLWeight, kl_warmup_weight, lr_factor  # noqa: F401
    from pyro_vae.training.stepper import NonFiniteError, ParamClashError  # noqa: F401
    from pyro_vae.training.trainer import (  # noqa: F401
        EarlyStopping,
        Trainer,
        TrainingInterrupted,
        make_elbo,
    )
