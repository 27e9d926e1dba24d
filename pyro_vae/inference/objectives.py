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
in ``pyro_vae.inference.evaluate``), and the subsampling factor N/B multiplies the summed bounds.

``DReG`` (Tucker, Lawson, Gu & Maddison 2018) has the same value and the same gradient for
the model's parameters; for the guide's parameters it uses the doubly reparameterised
estimator sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi), with w~ the normalised weights.
Its variance vanishes when q is the exact posterior, and its signal-to-noise ratio grows
with K where IWAE's shrinks (Rainforth et al. 2018).

``num_groups`` M > 1 gives MIWAE (Rainforth et al. 2018): M independent IWAE bounds of K
particles each, averaged (K * M draws per datapoint).

A KL weight beta (the latent sites scaled by beta in model and guide: a KL warm-up, or a
beta-VAE) is a temperature on the latent terms inside each importance weight, as Sønderby
et al. (2016) apply their warm-up:

    log w_k = log p(x | z_k) + beta (log p(z_k) - log q(z_k | x)),

at beta = 1 the bound above.  Under that tempered bound the doubly reparameterised estimator
weighs particle k by (1 - beta) w~_k + beta w~_k^2 instead of w~_k^2: the score term
-beta E[sum_k w~_k d_phi log q(z_k)] turns, by the reparameterisation identity
E_q[f(z) d_phi log q(z)] = E[(df/dz)(dz/dphi)] applied to f = w~_k (whose derivative is
w~_k (1 - w~_k) d log w_k / dz_k), into -beta E[sum_k w~_k (1 - w~_k)(d log w_k / dz_k)
(dz_k / dphi)], and the path term adds w~_k (d log w_k / dz_k)(dz_k / dphi).  At beta = 0 it
is the reparameterised gradient of E log p(x | z), at beta = 1 DReG.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.infer import ELBO
from torch import Tensor

from pyro_vae.inference.weights import (
    ImportanceTraces,
    data_frame,
    replay_guide,
    site_log_prob,
    trace_particles,
)

__all__ = ["DReG", "FreeBitsELBO", "IWAE", "ObjectiveError"]


class ObjectiveError(ValueError):
    """A model/guide pair that an importance-weighted objective cannot handle (one line)."""


class IWAE(ELBO):
    """The importance-weighted bound (Burda et al. 2015) with K = ``num_particles``
    vectorised draws per datapoint, as a Pyro ELBO (the loss is the negative bound summed
    over the batch, times N/B when the data plate is subsampled, in nats).

    Every sample site must sit in ``pyro.plate(plate_name)`` and every guide site must be
    reparameterisable.  Besides the plate's own subsampling factor, the latent sites may
    carry one common ``poutine.scale`` beta (a KL weight or warm-up; ``pyro_vae.kl_weight``):
    it tempers log p(z) - log q(z) inside each weight (see the module docstring).  Observed
    sites may carry none, and latent sites scaled by different factors are refused.
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
        weights: dict[str, Tensor] = {}  # filled in once the weights are known
        traces = trace_particles(
            model,
            guide,
            *args,
            num_particles=k_total,
            max_plate_nesting=self.max_plate_nesting,
            plate_name=self.plate_name,
            model_values=self._reweighted(weights) if dreg else None,
            **kwargs,
        )
        scale, beta = self._check_sites(traces)
        log_q = traces.log_q()
        if beta == 1:  # the model as written (summed as before: the same numbers bit for bit)
            log_p = traces.log_p()
            log_w = log_p - log_q
        else:  # log p(x | z) + beta log p(z), and beta log q(z) below it
            log_p = traces.log_likelihood() + beta * traces.log_prior()
            log_w = log_p - beta * log_q
        if log_w.shape[0] == 1:
            log_w = log_w.expand(k_total, -1)
        k, m = self.num_particles, self.num_groups
        grouped = log_w.reshape(m, k, -1)  # (M, K, B)
        bound = torch.logsumexp(grouped, dim=1) - math.log(k)  # (M, B)
        loss = -scale * bound.mean(0).sum()
        if not dreg:
            return loss, None
        with torch.no_grad():
            w = torch.softmax(grouped, dim=1).reshape(k_total, -1)  # normalised per group
        # the factor on the path through the model's latents: particle k's path derivative
        # then carries (1 - beta) w_k + beta w_k^2 (w_k^2 at beta = 1)
        weights["w"] = w if beta == 1 else (1 - beta) + beta * w
        # The doubly reparameterised estimator (Tucker et al. 2018), for any guide:
        #   model parameters theta: sum_k w_k d log p(x, z_k) / d theta  (IWAE's gradient);
        #   guide parameters phi:   sum_k w_k^2 (d log w_k / d z_k)(d z_k / d phi),
        # where d log w / d z keeps phi fixed *in the densities* but every sampled value live,
        # including earlier draws inside later densities (d log q(z2 | z1) / d z1 is part of
        # the path), and d z / d phi is the whole reparameterised map, z2 through z1.
        # - log p: the model sees each latent through a hook that multiplies the gradient
        #   reaching it by w_k, so its path to phi carries w_k^2 and its theta part w_k.
        # - log q: weighted by w_k^2 as a whole, minus log q rescored with every latent
        #   detached (the guide rebuilt from detached values), whose gradient is the direct
        #   dependence on phi alone: the difference is the path derivative.
        # Under a KL weight beta (module docstring) log p(x|z) + beta log p(z) goes through
        # the hook, which then multiplies by (1 - beta) + beta w_k, and log q is weighted by
        # beta ((1 - beta) w_k + beta w_k^2).
        log_q_direct = self._log_q_direct(traces, guide, args, kwargs)
        path_q = w.square() if beta == 1 else w * ((1 - beta) + beta * w) * beta
        surrogate = -scale * (w * log_p - path_q * (log_q - log_q_direct)).sum() / m
        return loss, surrogate

    def _reweighted(self, weights: dict[str, Tensor]) -> Callable[[str, dict], Tensor]:
        """The value the model sees at a guide latent: a view whose gradient is multiplied
        by the particle's normalised weight (``weights["w"]``, (K, B), set after the pass)."""
        particle_dim = self.particle_dim

        def model_value(name: str, site: dict) -> Tensor:
            value = site["value"]
            if not getattr(site["fn"], "has_rsample", False):
                raise ObjectiveError(
                    f"DReG needs a reparameterisable guide: site {name!r} "
                    f"({type(site['fn']).__name__}) has no rsample"
                )
            if not value.requires_grad:
                return value
            data_dim = data_frame(site, self.plate_name).dim
            event_dims = value.dim() - len(site["fn"].batch_shape)

            def hook(grad: Tensor) -> Tensor:
                w = weights["w"]  # (K, B)
                view = [1] * grad.dim()
                view[particle_dim - event_dims] = w.shape[0]
                view[data_dim - event_dims] = w.shape[1]
                return grad * w.reshape(view)

            routed = value.view_as(value)
            routed.register_hook(hook)
            return routed

        return model_value

    def _log_q_direct(self, traces: ImportanceTraces, guide, args, kwargs) -> Tensor:
        """log q at the drawn values with every latent detached, (K, B): its gradient is
        the dependence of log q on the guide's parameters alone.  A guide with one latent
        site rescored in place; with several, the guide is replayed on the detached values,
        so that no later density is built from a live earlier draw."""
        latents = list(traces.latent_sites())
        if len(latents) > 1:
            detached = replay_guide(
                traces, guide, *args, values=lambda name, site: site["value"].detach(), **kwargs
            )
            latents = [(name, detached.nodes[name]) for name, _ in latents]
        total = 0.0
        for name, site in latents:
            try:
                total = total + site_log_prob(
                    site, self.plate_name, self.particle_dim, site["value"].detach()
                )
            except (KeyError, NotImplementedError):
                raise ObjectiveError(
                    f"DReG needs log q at values the guide did not just draw: site {name!r}'s "
                    f"distribution ({type(site['fn']).__name__}) cannot evaluate them (a flow "
                    "without an inverse, e.g. planar); use iwae, or an invertible flow (iaf)"
                ) from None
        return total

    def _check_sites(self, traces: ImportanceTraces) -> tuple[float, float]:
        """Refuse what the bound is not defined for; return the data plate's subsampling
        factor N/B and the latent sites' common weight beta."""
        scale, beta = None, None
        for name, site in traces.latent_sites():
            if not getattr(site["fn"], "has_rsample", False):
                raise ObjectiveError(
                    f"{type(self).__name__} needs reparameterisable guide sites: "
                    f"{name!r} ({type(site['fn']).__name__}) has no rsample"
                )
        observed = [site for _, site in traces.model_sites() if site["is_observed"]]
        latent = [site for _, site in traces.model_sites() if not site["is_observed"]]
        latent += [site for _, site in traces.latent_sites()]
        for site in observed + latent:
            subsampling, factor = self._site_scale(site)
            scale = subsampling if scale is None else scale
            if site["is_observed"]:
                if not math.isclose(factor, 1.0, rel_tol=1e-6):
                    raise ObjectiveError(
                        f"observed site {site['name']!r} is scaled by {factor:g} "
                        f"(poutine.scale): {type(self).__name__} weighs only the latent terms"
                    )
            elif beta is None:
                beta = factor
            elif not math.isclose(factor, beta, rel_tol=1e-6):
                raise ObjectiveError(
                    f"site {site['name']!r} is scaled by {factor:g}, another latent site by "
                    f"{beta:g}: {type(self).__name__} takes one KL weight for every latent "
                    "site, the same in model and guide"
                )
        if scale is None:
            raise ObjectiveError("the model and guide have no sample sites")
        return scale, 1.0 if beta is None else beta

    def _site_scale(self, site: dict) -> tuple[float, float]:
        """(the data plate's subsampling factor N/B, the site's scale beyond it)."""
        frame = data_frame(site, self.plate_name)
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
        return expected, actual / expected


class DReG(IWAE):
    """The IWAE bound with the doubly reparameterised gradient for the guide's parameters
    (Tucker et al. 2018); the model's parameters get IWAE's gradient.  The value returned
    is the same negative bound as ``IWAE``'s.

    Every guide site must have ``rsample``; sites may be drawn given earlier ones
    (q(z1 | x) q(z2 | z1), a flow after a Gaussian site): the estimator differentiates log w
    along every draw, earlier draws inside later densities included.  A guide with several
    latent sites is run once more per step, on the detached draws, to rescore log q.
    """

    _doubly_reparameterised = True


class FreeBitsELBO(IWAE):
    """The ELBO with free bits per latent site (Kingma et al. 2016, "Improved variational
    inference with inverse autoregressive flow"): each latent site l (a layer) pays
    max(lambda, its KL averaged over the batch) instead of its KL, so that no layer is
    pushed below ``free_bits`` = lambda nats per image:

        loss = -sum_n E log p(x_n | z) + beta sum_l max(lambda B, sum_n KL_l(x_n)),

    KL_l(x_n) = log q(z_l | ...) - log p(z_l | ...) at the draws (the mean over
    ``num_particles``), B the batch size, beta the KL weight (``KLWeight``), times N/B when
    the data plate is subsampled.  At lambda = 0 it is the reparameterised Trace_ELBO.
    ``free_bits`` may be changed between steps (a trainer's schedule)."""

    def __init__(self, free_bits: float = 0.0, num_particles: int = 1, **kwargs) -> None:
        super().__init__(num_particles, **kwargs)
        if not (math.isfinite(free_bits) and free_bits >= 0):
            raise ValueError(f"free_bits must be finite and non-negative, got {free_bits}")
        self.free_bits = float(free_bits)

    def _bound(self, model, guide, args, kwargs) -> tuple[Tensor, Tensor | None]:
        traces = trace_particles(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            max_plate_nesting=self.max_plate_nesting,
            plate_name=self.plate_name,
            **kwargs,
        )
        scale, beta = self._check_sites(traces)
        model_sites = dict(traces.model_sites())
        log_lik = traces.log_likelihood().mean(0)  # (B,)
        batch = log_lik.shape[0]
        penalty = log_lik.new_zeros(())
        for name, site in traces.latent_sites():
            log_q = site_log_prob(site, self.plate_name, self.particle_dim)
            log_p = site_log_prob(model_sites[name], self.plate_name, self.particle_dim)
            kl = (log_q - log_p).mean(0).sum()  # summed over the batch
            penalty = penalty + torch.clamp(kl, min=self.free_bits * batch)
        loss = -scale * (log_lik.sum() - beta * penalty)
        return loss, None
