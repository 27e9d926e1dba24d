"""Per-datapoint importance weights: the one computation that the evaluator, the objectives
and the diagnostics share.

For K draws z_k ~ q(z | x) per datapoint, the log weight is
log w_k = log p(x, z_k) - log q(z_k | x), one number per particle and datapoint: (K, N).
``trace_particles`` traces the guide inside a vectorised particle plate placed left of every
model plate and replays the model against it; ``ImportanceTraces`` sums each contributing
site's own log-prob over everything but the particle and data dimensions.

Pyro's ``vectorized_importance_weights`` and ``psis_diagnostic`` sum the log weights over
the data plate (one weight per particle for the whole batch), and ``RenyiELBO`` puts the
*scaled* log-probs inside its logsumexp, so neither gives per-datapoint weights under plate
subsampling or ``poutine.scale``.  Here every site's unscaled ``log_prob`` is used with the
data dimension kept; what a site was scaled by is read from its frame (``data_scale``) and
left to the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

__all__ = [
    "PARTICLE_PLATE",
    "ImportanceTraces",
    "data_frame",
    "replay_guide",
    "replay_model",
    "sample_sites",
    "site_log_prob",
    "trace_guide",
    "trace_particles",
]

PARTICLE_PLATE = "_particles"


def data_frame(site: dict, plate_name: str):
    """The site's frame of the plate ``plate_name``; a ``ValueError`` if it is outside it."""
    for frame in site["cond_indep_stack"]:
        if frame.name == plate_name:
            return frame
    raise ValueError(
        f"sample site {site['name']!r} is outside plate {plate_name!r}: per-datapoint "
        "weights need every sample site inside the data plate"
    )


def site_log_prob(
    site: dict, plate_name: str, particle_dim: int, value: Tensor | None = None
) -> Tensor:
    """The site's unscaled, masked log-prob at ``value`` (default: the site's value),
    summed over everything but the particle and data dimensions: shape (K or 1, N or 1)."""
    data_dim = data_frame(site, plate_name).dim
    lp = site["fn"].log_prob(site["value"] if value is None else value)
    mask = site["mask"]
    if mask is not None and mask is not True:
        lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, lp.new_zeros(()))
    while lp.dim() < -particle_dim:
        lp = lp.unsqueeze(0)
    others = [d for d in range(-lp.dim(), 0) if d not in (particle_dim, data_dim)]
    if others:
        lp = lp.sum(others, keepdim=True)
    # Every dimension but the two kept is now of size one, and particles sit left of data.
    return lp.reshape(lp.shape[particle_dim], lp.shape[data_dim])


def sample_sites(trace: poutine.Trace) -> Iterator[tuple[str, dict]]:
    """The trace's sample sites (observed or not), without plates' subsample sites."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


@dataclass
class ImportanceTraces:
    """A guide trace drawn in a particle plate and the model replayed against it."""

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    num_particles: int
    particle_dim: int
    plate_name: str

    def latent_sites(self) -> Iterator[tuple[str, dict]]:
        """The guide's sampled (unobserved) sites, in the order the guide drew them."""
        for name, site in sample_sites(self.guide_trace):
            if not site["is_observed"]:
                yield name, site

    def model_sites(self) -> Iterator[tuple[str, dict]]:
        """The model's sites that enter log p(x, z): the observed ones and the latents the
        guide proposed.  A model latent that the guide does not sample is drawn from its
        prior in the replay, where prior and proposal cancel, so it adds nothing."""
        for name, site in sample_sites(self.model_trace):
            if site["is_observed"] or name in self.guide_trace.nodes:
                yield name, site

    def _sum(self, sites: Iterator[tuple[str, dict]]) -> Tensor | None:
        total = None
        for _, site in sites:
            lp = site_log_prob(site, self.plate_name, self.particle_dim)
            total = lp if total is None else total + lp
        return total

    def log_p(self) -> Tensor:
        """log p(x, z_k) per particle and datapoint, (K or 1, N), nats, unscaled."""
        total = self._sum(self.model_sites())
        if total is None:
            raise ValueError("the model has no observed or proposed sample sites")
        return total

    def log_likelihood(self) -> Tensor:
        """log p(x | z_k): the model's observed sites, (K or 1, N), nats, unscaled."""
        total = self._sum((n, s) for n, s in self.model_sites() if s["is_observed"])
        if total is None:
            raise ValueError("the model has no observed sample sites")
        return total

    def log_prior(self) -> Tensor | float:
        """log p(z_k): the model's latent sites that the guide proposed, (K or 1, N), nats,
        unscaled (0 without latents)."""
        total = self._sum((n, s) for n, s in self.model_sites() if not s["is_observed"])
        return 0.0 if total is None else total

    def log_q(self) -> Tensor | float:
        """log q(z_k | x) per particle and datapoint, (K or 1, N), nats (0 without latents)."""
        total = self._sum(self.latent_sites())
        return 0.0 if total is None else total

    def log_weights(self) -> Tensor:
        """log w_k = log p(x, z_k) - log q(z_k | x), shape (K, N), in nats."""
        total = self.log_p() - self.log_q()
        return total.expand(self.num_particles, -1) if total.shape[0] == 1 else total


def trace_particles(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    plate_name: str = "data",
    model_values: Callable[[str, dict], Tensor] | None = None,
    **kwargs,
) -> ImportanceTraces:
    """Trace ``guide`` inside a vectorised particle plate of ``num_particles`` left of every
    model plate (``dim = -(max_plate_nesting + 1)``) and replay ``model`` against it.

    ``model_values(name, site)``, if given, is the value the model sees at each guide latent
    instead of the guide's own (a view with a gradient hook, for DReG); the guide trace keeps
    the values the guide drew.
    """
    guide_trace = trace_guide(
        guide, *args, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs
    )
    model_trace = replay_model(
        model,
        guide_trace,
        *args,
        max_plate_nesting=max_plate_nesting,
        model_values=model_values,
        **kwargs,
    )
    return ImportanceTraces(
        model_trace, guide_trace, num_particles, -(max_plate_nesting + 1), plate_name
    )


def trace_guide(
    guide: Callable, *args, num_particles: int = 1, max_plate_nesting: int = 1, **kwargs
) -> poutine.Trace:
    """The guide traced inside the particle plate of ``num_particles``."""
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1)):
        return poutine.trace(guide).get_trace(*args, **kwargs)


def replay_model(
    model: Callable,
    guide_trace: poutine.Trace,
    *args,
    max_plate_nesting: int = 1,
    particles: slice | None = None,
    model_values: Callable[[str, dict], Tensor] | None = None,
    **kwargs,
) -> poutine.Trace:
    """The model traced against the guide's latents, inside the particle plate: all the
    guide's particles, or the slice ``particles`` of them (so that the model, which holds
    the large per-particle tensors, can be run in pieces on one set of draws)."""
    particle_dim = -(max_plate_nesting + 1)
    num_particles = _particle_count(guide_trace, particle_dim)
    replayed = guide_trace
    if particles is not None:
        start, stop, _ = particles.indices(num_particles)
        num_particles = stop - start
        cut = _particle_slicer(particle_dim, start, num_particles)
        replayed = _with_values(replayed, cut)
    if model_values is not None:
        replayed = _with_values(replayed, model_values)
    with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
        return poutine.trace(poutine.replay(model, trace=replayed)).get_trace(*args, **kwargs)


def _particle_count(guide_trace: poutine.Trace, particle_dim: int) -> int:
    for site in guide_trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == PARTICLE_PLATE:
                return frame.size
    raise ValueError("the guide trace was not drawn inside a particle plate")


def _particle_slicer(particle_dim: int, start: int, length: int):
    def cut(name: str, site: dict) -> Tensor:
        value = site["value"]
        event_dims = value.dim() - len(site["fn"].batch_shape)
        return value.narrow(particle_dim - event_dims, start, length)

    return cut


def replay_guide(
    traces: ImportanceTraces,
    guide: Callable,
    *args,
    values: Callable[[str, dict], Tensor],
    **kwargs,
) -> poutine.Trace:
    """The guide run again in the same particle plate with each latent set to
    ``values(name, site)``: every distribution rebuilt from those values (e.g. detached
    ones, so that nothing flows back through an earlier draw)."""
    with pyro.plate(PARTICLE_PLATE, traces.num_particles, dim=traces.particle_dim):
        return poutine.trace(
            poutine.replay(guide, trace=_with_values(traces.guide_trace, values))
        ).get_trace(*args, **kwargs)


def _with_values(trace: poutine.Trace, values: Callable[[str, dict], Tensor]) -> poutine.Trace:
    """A trace for ``poutine.replay`` holding ``values(name, site)`` at each latent site."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            site = {**site, "value": values(name, site)}
        out.add_node(name, **site)
    return out
