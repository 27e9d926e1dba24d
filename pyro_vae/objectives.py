"""Importance-weighted training objectives with Pyro's ELBO interface: IWAE and DReG.

For each datapoint x and K reparameterised draws z_k ~ q(z|x), with log weights
log w_k = log p(x, z_k) - log q(z_k|x), the IWAE bound (Burda et al. 2015) is

    L_K(x) = logsumexp_k log w_k - log K,

a lower bound on log p(x) that tightens as K grows (L_1 is the ELBO).  The objectives here
return, like every Pyro ELBO, the *negative* bound summed over the batch, in nats:
``loss``, ``loss_and_grads`` and ``differentiable_loss(model, guide, *args)``, so they drive
``pyro.infer.SVI``, the project's ``Trainer`` and an ``ELBOModule`` (``IWAE()(model, guide)``).

Why not ``pyro.infer.RenyiELBO(alpha=0)``, which computes the same per-datapoint bound when
every site sits in the data plate: it puts the *scaled* log-probs inside the logsumexp, so
under plate subsampling (scale N/B) or ``poutine.scale`` it is not the IWAE bound; it has
no ``differentiable_loss``; and it has no doubly reparameterised gradient.  Here the log
weights are built from each site's own, unscaled log-prob with the data dimension kept (as
in ``pyro_vae.evaluate``), and the subsampling factor N/B multiplies the summed bounds.

``DReG`` (Tucker, Lawson, Gu & Maddison 2018) has the same value and the same gradient for
the model's parameters; for the guide's parameters it uses the doubly reparameterised
estimator sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi), with w~ the normalised weights.
Its variance vanishes when q is the exact posterior, and its signal-to-noise ratio grows
with K where IWAE's shrinks (Rainforth et al. 2018).

``num_groups`` M > 1 gives MIWAE (Rainforth et al. 2018): M independent IWAE bounds of K
particles each, averaged (K * M draws per datapoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_vae.evaluate import data_frame, site_log_prob

__all__ = ["DReG", "IWAE", "ObjectiveError"]


class ObjectiveError(ValueError):
    """A model/guide pair that an importance-weighted objective cannot handle (one line)."""


class IWAE(ELBO):
    """The importance-weighted bound (Burda et al. 2015) with K = ``num_particles``
    vectorised draws per datapoint, as a Pyro ELBO (the loss is the negative bound summed
    over the batch, times N/B when the data plate is subsampled, in nats).

    Every sample site must sit in ``pyro.plate(plate_name)``, every guide site must be
    reparameterisable, and no site may carry a ``poutine.scale`` other than the plate's own
    subsampling factor: a KL weight (beta) has no agreed meaning inside a logsumexp over
    particles, so it is refused rather than guessed.
    """

    _doubly_reparameterised = False

    def __init__(
        self,
        num_particles: int = 5,
        *,
        num_groups: int = 1,
        max_plate_nesting: int = 1,
        plate_name: str = "data",
    ) -> None:
        if num_particles < 1 or num_groups < 1:
            raise ValueError("num_particles and num_groups must be positive")
        if max_plate_nesting < 1:
            raise ValueError("max_plate_nesting must be at least 1 (the data plate)")
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,
        )
        self.num_groups, self.plate_name = num_groups, plate_name
        self.particle_dim = -(max_plate_nesting + 1)

    # -- the Pyro ELBO interface ---------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative bound summed over the batch (times N/B if subsampled), in nats."""
        with torch.no_grad():
            return float(self._bound(model, guide, args, kwargs)[0])

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        """The negative bound as a scalar tensor whose gradient is the estimator's."""
        loss, surrogate = self._bound(model, guide, args, kwargs)
        if surrogate is None:
            return loss
        # the value of the bound, the gradient of the surrogate
        return loss.detach() + (surrogate - surrogate.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """``differentiable_loss`` and its backward pass (for ``pyro.infer.SVI``)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return float(loss.detach())

    def _get_trace(self, model, guide, args, kwargs):  # abstract in ELBO; not used here
        raise NotImplementedError

    # -- the computation -----------------------------------------------------------------

    def _bound(self, model, guide, args, kwargs) -> tuple[Tensor, Tensor | None]:
        k_total = self.num_particles * self.num_groups
        dreg = self._doubly_reparameterised and torch.is_grad_enabled()
        with pyro.plate("_iw_particles", k_total, dim=self.particle_dim):
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            hooks = self._reweight_latents(guide_trace) if dreg else None
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        log_w, log_q_direct, scale = self._log_weights(model_trace, guide_trace, dreg)
        k, m = self.num_particles, self.num_groups
        grouped = log_w.reshape(m, k, -1)  # (M, K, B)
        bound = torch.logsumexp(grouped, dim=1) - math.log(k)  # (M, B)
        loss = -scale * bound.mean(0).sum()
        if not dreg:
            return loss, None
        with torch.no_grad():
            w = torch.softmax(grouped, dim=1).reshape(k_total, -1)  # normalised per group
        hooks["weights"] = w  # the latents' gradient hooks multiply by these: w~^2 overall
        # Model parameters: sum_k w~_k d log w_k.  Guide parameters: the gradient through
        # z_k, scaled once more by w~_k in the hooks, while log q(sg(z_k); phi) cancels the
        # direct dependence of log q(z_k; phi) on phi.
        surrogate = -scale * (w * (log_w + log_q_direct)).sum() / m
        return loss, surrogate

    def _reweight_latents(self, guide_trace: poutine.Trace) -> dict:
        """Route the gradient of each guide latent through a hook that multiplies it by the
        particle's normalised weight (filled in once the weights are known)."""
        state: dict = {}
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            if not getattr(site["fn"], "has_rsample", False):
                raise ObjectiveError(
                    f"DReG needs a reparameterisable guide: site {name!r} "
                    f"({type(site['fn']).__name__}) has no rsample"
                )
            value = site["value"]
            if not value.requires_grad:
                continue
            data_dim = data_frame(site, self.plate_name).dim
            batch_dims = len(site["fn"].batch_shape)
            event_dims = value.dim() - batch_dims
            shape = [1] * value.dim()

            def hook(grad, data_dim=data_dim, event_dims=event_dims, shape=shape):
                w = state["weights"]  # (K, B)
                view = list(shape)
                view[self.particle_dim - event_dims] = w.shape[0]
                view[data_dim - event_dims] = w.shape[1]
                return grad * w.reshape(view)

            routed = value.view_as(value)
            routed.register_hook(hook)
            site["value"] = routed
            site["_iw_raw_value"] = value
        return state

    def _log_weights(
        self, model_trace: poutine.Trace, guide_trace: poutine.Trace, dreg: bool
    ) -> tuple[Tensor, Tensor, float]:
        total: Tensor | None = None
        direct: Tensor | float = 0.0
        scale = None
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if sign > 0 and not site["is_observed"] and name not in guide_trace.nodes:
                    continue  # drawn from its prior in both: p and q cancel
                if sign < 0:
                    if site["is_observed"]:
                        continue
                    if not getattr(site["fn"], "has_rsample", False):
                        raise ObjectiveError(
                            f"{type(self).__name__} needs reparameterisable guide sites: "
                            f"{name!r} ({type(site['fn']).__name__}) has no rsample"
                        )
                site_scale = self._check_scale(site, data_frame(site, self.plate_name))
                if scale is None:
                    scale = site_scale
                rerouted = dreg and sign < 0 and "_iw_raw_value" in site
                try:
                    lp = sign * site_log_prob(site, self.plate_name, self.particle_dim)
                    if rerouted:
                        raw = site["_iw_raw_value"].detach()
                        lq = site_log_prob(site, self.plate_name, self.particle_dim, raw)
                        direct = direct + lq
                except (KeyError, NotImplementedError):
                    if not rerouted:
                        raise
                    raise ObjectiveError(
                        f"DReG needs log q at values the guide did not just draw: site {name!r}'s "
                        f"distribution ({type(site['fn']).__name__}) cannot evaluate them (a flow "
                        "without an inverse, e.g. planar); use iwae, or an invertible flow (iaf)"
                    ) from None
                total = lp if total is None else total + lp
        if total is None:
            raise ObjectiveError("the model and guide have no sample sites")
        k_total = self.num_particles * self.num_groups
        if total.shape[0] == 1:
            total = total.expand(k_total, -1)
        return total, direct, 1.0 if scale is None else scale

    def _check_scale(self, site: dict, frame) -> float:
        """The subsampling factor N/B of the data plate; any other scale is refused."""
        full = frame.full_size if frame.full_size is not None else frame.size
        expected = full / frame.size
        actual = site["scale"]
        if isinstance(actual, Tensor):
            if actual.numel() != 1:
                raise ObjectiveError(
                    f"site {site['name']!r} carries a tensor-valued poutine.scale: "
                    f"{type(self).__name__} does not define one"
                )
            actual = float(actual)
        if not math.isclose(actual, expected, rel_tol=1e-6):
            raise ObjectiveError(
                f"site {site['name']!r} is scaled by {actual / expected:g} (a KL weight or "
                f"poutine.scale): {type(self).__name__} is defined for the unscaled model only; "
                "use beta = 1"
            )
        return expected


class DReG(IWAE):
    """The IWAE bound with the doubly reparameterised gradient for the guide's parameters
    (Tucker et al. 2018); the model's parameters get IWAE's gradient.  The value returned
    is the same negative bound as ``IWAE``'s.

    Meant for guides whose latent sites are each reparameterised from noise and the
    guide's parameters (the project's VAE, flows on top of it); every guide site must have
    ``rsample``.
    """

    _doubly_reparameterised = True
