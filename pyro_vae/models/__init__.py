"""Model/guide pairs, one file per model, and rebuilding one from a checkpoint."""

from __future__ import annotations

from typing import Any

from torch import nn

from pyro_vae.io.checkpoints import CheckpointError
from pyro_vae.models.hierarchical import HierarchicalVAE
from pyro_vae.models.ssvae import SSVAE
from pyro_vae.models.stacked import StackedSSVAE
from pyro_vae.models.vae import VAE

__all__ = ["MODELS", "SSVAE", "VAE", "HierarchicalVAE", "StackedSSVAE", "model_from_checkpoint"]

#: the model classes a checkpoint may name (its ``model_class``)
MODELS: dict[str, type[nn.Module]] = {
    "VAE": VAE,
    "HierarchicalVAE": HierarchicalVAE,
    "SSVAE": SSVAE,
    "StackedSSVAE": StackedSSVAE,
}


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights.

    Raises ``CheckpointError`` (one line) for an unknown class, a bad config, or weights that
    do not fit the architecture.
    """
    name = state.get("model_class")
    if name not in MODELS:
        raise CheckpointError(f"checkpoint names an unknown model class {name!r}")
    try:
        model = MODELS[name](**state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint's model config does not build a {name}: {e}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(str(e).split()[6:])[:300]  # drop "Error(s) in loading state_dict for X:"
        raise CheckpointError(f"checkpoint weights do not fit the {name}: {detail}") from None
    return model
