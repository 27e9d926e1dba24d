"""Schedules a training run follows epoch by epoch, each a function of the epoch and the
planned number of epochs only (so a resumed run replays them without saved state): the
learning rate's factor and the KL weight of a warm-up; and the messenger that applies a KL
weight to any Pyro model/guide pair.
"""

from __future__ import annotations

import math

from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_vae.choices import LR_SCHEDULES

__all__ = ["KLWeight", "free_bits_level", "kl_warmup_weight", "lr_factor", "warmup_epochs"]

# Burda et al. (2015): 3^i epochs at 10^(-i/7) times the base rate, i = 0 .. 7 (3,280 epochs)
_BURDA_STAGES = 8


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of (1-based) ``epoch`` of ``epochs`` as a fraction of the base rate:
    ``constant`` 1; ``cosine`` half a cosine from 1 at the first epoch towards 0 after the
    last (Loshchilov & Hutter 2017, without restarts); ``step`` Burda et al.'s eight stages,
    stage i at 10^(-i/7) and 3^i / 3,280 of the epochs long (at 3,280 epochs their schedule
    exactly, from 1 down to 0.1)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    if schedule == "step":
        total = (3**_BURDA_STAGES - 1) // 2  # 1 + 3 + ... + 3^7 = 3280
        done = (epoch - 1) / epochs * total  # the position on Burda et al.'s epoch axis
        stage, end = 0, 1
        while done >= end and stage < _BURDA_STAGES - 1:
            stage += 1
            end += 3**stage
        return 10.0 ** (-stage / (_BURDA_STAGES - 1))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from {LR_SCHEDULES}")


def kl_warmup_weight(epoch: int, warmup_epochs: int, start: float = 0.0) -> float:
    """The KL weight beta of (1-based) ``epoch`` under a linear warm-up from ``start`` at the
    first epoch to 1 after ``warmup_epochs`` epochs (1 throughout when ``warmup_epochs`` is
    0), as Sønderby et al. (2016) warm their ladder VAE up over its first epochs."""
    if warmup_epochs < 0 or not 0.0 <= start <= 1.0:
        raise ValueError(
            f"a warm-up needs warmup_epochs >= 0 and a start in [0, 1], got {warmup_epochs}, "
            f"{start}"
        )
    if warmup_epochs == 0 or epoch > warmup_epochs:
        return 1.0
    return start + (1.0 - start) * (epoch - 1) / warmup_epochs


def free_bits_level(
    epoch: int, free_bits: float, constant_epochs: int | None = None, cooldown_epochs: int = 0
) -> float:
    """The free bits (nats per image and latent layer) of (1-based) ``epoch``: ``free_bits``
    for the first ``constant_epochs`` epochs (all of them when None), then falling linearly
    to 0 over ``cooldown_epochs`` (Havtorn et al.: 200 epochs constant, 200 to cool)."""
    if (
        free_bits < 0
        or (constant_epochs is not None and constant_epochs < 0)
        or cooldown_epochs < 0
    ):
        raise ValueError(
            f"free bits need a level >= 0 and epoch counts >= 0, got {free_bits}, "
            f"{constant_epochs}, {cooldown_epochs}"
        )
    if constant_epochs is None or epoch <= constant_epochs:
        return float(free_bits)
    into = epoch - constant_epochs
    if into > cooldown_epochs:
        return 0.0
    return free_bits * (1.0 - into / (cooldown_epochs + 1))


class KLWeight(Messenger):
    """Multiplies the scale of every latent sample site by ``weight`` (observed sites and
    plates' subsample sites are left alone).  Around one objective evaluation
    (``with KLWeight(beta): elbo.differentiable_loss(model, guide, x)``) it scales the
    latent sites of model and guide alike: ``Trace_ELBO`` then optimises
    E log p(x | z) - beta KL(q || p), and the importance-weighted objectives read beta as a
    temperature on log p(z) - log q(z) inside each weight (``pyro_vae.inference.objectives``).
    The evaluator uses unscaled log-probs, so it always reports the beta = 1 bounds.

    ``JitTrace_ELBO`` compiles the scale into its trace once: it cannot follow a weight that
    changes (the trainer refuses that combination)."""

    def __init__(self, weight: float) -> None:
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"a KL weight must be finite and non-negative, got {weight}")
        super().__init__()
        self.weight = float(weight)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.weight


def warmup_epochs(length: int | str, epochs: int) -> int:
    """A warm-up's length in epochs of a run of ``epochs``: ``length`` epochs, or a share such
    as ``"10%"`` rounded, at least one epoch when the share is above zero."""
    if isinstance(length, str):
        share = float(length.rstrip("%")) / 100
        return max(1, round(share * epochs)) if share > 0 else 0
    return int(length)
