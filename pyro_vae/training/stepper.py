"""One optimisation step, apart from any loop: ``step(*batch) -> StepInfo``.

``Stepper`` holds a differentiable loss (nats, summed over the batch), its parameters, one
``torch.optim.Adam`` over all of them and the guards: a non-finite loss or gradient stops
(``NonFiniteError``) or is skipped and counted, and the gradient norm can be clipped.  It is
what Pyro's ``SVI.step`` is, except that it can look at the gradients between ``backward``
and the update (and all-reduce them across processes): blackjax's ``step(state) -> (state,
info)`` split, with the state held by the object.

``SVIStepper`` is the same step for a Pyro model/guide pair and one of Pyro's ELBO objects
(or the project's IWAE/DReG): ``elbo.differentiable_loss(model, guide, *batch)``, with the
pair's parameters found where they live (an owner ``nn.Module``, or ``pyro.param`` sites as
they appear), Pyro's distribution checks on the first step only, and, on several processes,
the objective inside ``DistributedDataParallel``.  ``Trainer`` runs the epochs around it;
the gap fits and the baselines step their own losses with ``Stepper``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor, nn

from pyro_vae.inference.weights import sample_sites, trace_particles
from pyro_vae.training.distributed import Ranks
from pyro_vae.training.schedules import KLWeight

__all__ = [
    "NonFiniteError",
    "ParamClashError",
    "SVIStepper",
    "StepInfo",
    "Stepper",
    "nonfinite_sites",
    "owner_modules",
]


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; names the epoch, step and culprit sites."""

    def __init__(
        self,
        what: str,
        epoch: int | None = None,
        step: int | None = None,
        sites: Sequence[str] = (),
    ) -> None:
        if epoch is None:  # re-raised as cls(text), as Pyro does: the text is the message
            super().__init__(what)
        else:
            where = f"; non-finite log-probs at sites: {', '.join(sites)}" if sites else ""
            super().__init__(f"non-finite {what} at epoch {epoch}, step {step}{where}")
        self.what, self.epoch, self.step, self.sites = what, epoch, step, list(sites)


class ParamClashError(ValueError):
    """Two modules registered under one ``pyro.module`` name (one line)."""


@dataclass
class StepInfo:
    """What one step did: the loss in nats (summed over the batch; NaN when skipped),
    whether the update was skipped for a non-finite value, and the gradient norm."""

    loss: float
    skipped: bool = False
    grad_norm: float = math.nan


def _adam(params: list[Tensor], lr: float, **options) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused where torch has a fused kernel for these parameters (one
    kernel for all tensors: 0.6 ms instead of 2.0 ms a step for 784-400-50 on one thread);
    the arithmetic is Adam's either way.  ``options``: ``eps``, ``betas``."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **options)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr, **options)


class Stepper:
    """Adam steps on ``loss(*batch)`` over ``params``, with the non-finite guards and
    optional gradient clipping (see the module docstring).  ``epoch`` only labels errors.

    ``skip_norm``: an update whose gradient norm exceeds it is skipped and counted (VDVAE's
    guard against the rare huge gradient; ``clip_norm`` instead shortens every long one).
    ``adam_eps`` and ``adam_betas`` are Adam's (Burda et al. and Sønderby et al. use
    eps = 1e-4)."""

    def __init__(
        self,
        loss: Callable[..., Tensor],
        params: Iterable[Tensor] = (),
        *,
        lr: float = 1e-3,
        clip_norm: float | None = None,
        skip_nonfinite: bool = False,
        skip_norm: float | None = None,
        adam_eps: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if skip_norm is not None and not skip_norm > 0:
            raise ValueError(f"skip_norm must be positive, got {skip_norm}")
        if not adam_eps > 0 or not all(0 <= b < 1 for b in adam_betas) or len(adam_betas) != 2:
            raise ValueError(
                f"Adam needs eps > 0 and two betas in [0, 1), got {adam_eps}, {adam_betas}"
            )
        self.loss = loss
        self.lr, self.clip_norm, self.skip_nonfinite = lr, clip_norm, skip_nonfinite
        self.skip_norm = skip_norm
        self.adam_options = {"eps": float(adam_eps), "betas": tuple(map(float, adam_betas))}
        self.params: list[Tensor] = []
        self._param_ids: set[int] = set()
        self.optimizer: torch.optim.Optimizer | None = None
        self.step_count = 0
        self.skipped_steps = 0
        self.epoch = 0
        self.add_params(params)

    def add_params(self, params: Iterable[Tensor]) -> None:
        """Train these tensors too (each once; frozen ones are left out)."""
        new = []
        for p in params:
            if p.requires_grad and id(p) not in self._param_ids:
                self._param_ids.add(id(p))
                new.append(p)
        if not new:
            return
        self.params.extend(new)
        if self.optimizer is None:
            self.optimizer = _adam(new, self.lr, **self.adam_options)
        else:
            self.optimizer.add_param_group({"params": new})
        self.set_lr(self.lr)

    def set_lr(self, lr: float) -> None:
        """The learning rate of every parameter group from now on."""
        self.lr = lr
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def compute_loss(self, *batch: Tensor) -> Tensor:
        """The loss on a batch (a scalar tensor, nats summed over the batch)."""
        return self.loss(*batch)

    def backward(self, loss: Tensor) -> None:
        """The gradients of ``loss`` into the parameters' ``.grad``."""
        loss.backward()

    def step(self, *batch: Tensor) -> StepInfo:
        """One update on a minibatch (see the module docstring)."""
        loss = self.compute_loss(*batch)
        self.step_count += 1
        value = float(loss.detach())
        if self.optimizer is None:
            raise ValueError("the loss declares no parameters to train")
        if not math.isfinite(value) and self.finite_check_before_backward:
            return self._nonfinite("loss", batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(norm):
            return self._nonfinite("gradient", batch)
        if self.skip_norm is not None and norm > self.skip_norm:
            self.skipped_steps += 1
            return StepInfo(value, skipped=True, grad_norm=float(norm))
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, norm)
        self.optimizer.step()
        return StepInfo(value, grad_norm=float(norm))

    # a subclass whose every process must reach backward (DDP) checks the gradient only
    finite_check_before_backward = True

    def _nonfinite(self, what: str, batch: Sequence[Tensor]) -> StepInfo:
        if self.skip_nonfinite:
            self.skipped_steps += 1
            return StepInfo(math.nan, skipped=True)
        raise NonFiniteError(what, self.epoch + 1, self.step_count, self.diagnose(*batch))

    def diagnose(self, *batch: Tensor) -> list[str]:
        """Where a non-finite value comes from (names), for the error message."""
        return []

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The optimiser state and the step counters, as tensors and plain values."""
        return {
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
        }

    def load_optimizer(self, saved: dict) -> None:
        """Load a saved optimiser state, or raise if it does not fit these parameters."""
        if self.optimizer is None:
            raise ValueError("the saved optimiser state has parameters this model does not declare")
        try:
            # torch checks the parameter counts only; a moment estimate of another shape
            # would fail at the next step, far from its cause
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            for index, entry in saved["state"].items():
                for value in entry.values():
                    if (
                        isinstance(value, Tensor)
                        and value.dim()
                        and value.shape != params[index].shape
                    ):
                        raise ValueError(
                            f"parameter {index} has shape {tuple(params[index].shape)}, the "
                            f"saved state {tuple(value.shape)}"
                        )
            lr = self.lr
            self.optimizer.load_state_dict(saved)
        except (ValueError, IndexError) as e:
            raise ValueError(f"the saved optimiser state does not fit this model: {e}") from None
        self.set_lr(lr)


def owner_modules(*fns: Callable) -> list[nn.Module]:
    """The ``nn.Module``s that ``fns`` belong to: modules themselves, or bound methods of
    one (also inside ``functools.partial``), each listed once."""
    owners: list[nn.Module] = []
    for fn in fns:
        while isinstance(fn, functools.partial):
            fn = fn.func
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module) and all(owner is not o for o in owners):
            owners.append(owner)
    return owners


@torch.no_grad()
def nonfinite_sites(
    model: Callable, guide: Callable, *args, max_plate_nesting: int = 1, **kwargs
) -> list[str]:
    """Names of the sample sites whose log-prob is not finite in one guide/model trace (the
    importance-weighting core's traces, one particle)."""
    with pyro.validation_enabled(False):  # distributions with NaN parameters must still build
        traces = trace_particles(
            model, guide, *args, num_particles=1, max_plate_nesting=max_plate_nesting, **kwargs
        )
    bad = []
    for prefix, trace in (("model", traces.model_trace), ("guide", traces.guide_trace)):
        for name, site in sample_sites(trace):
            if not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                bad.append(f"{prefix}:{name}")
    return bad


class _Objective(nn.Module):
    """The stepper's objective as a module holding the owners' parameters: what
    DistributedDataParallel wraps (it needs a module whose forward returns the loss)."""

    def __init__(self, stepper: SVIStepper) -> None:
        super().__init__()
        self.owners = nn.ModuleList(stepper.modules)
        self._stepper = [stepper]  # a list: not a submodule

    def forward(self, *batch: Tensor) -> Tensor:
        s = self._stepper[0]
        return s.elbo.differentiable_loss(s.model, s.guide, *batch)


class SVIStepper(Stepper):
    """``Stepper`` for a Pyro model/guide pair and an ELBO object (see the module
    docstring).  ``validate``: ``"first"`` runs Pyro's distribution checks on the first step
    only (they cost about 10% of a step on a small MLP), True/False always/never, None
    leaves Pyro's global setting."""

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        elbo: ELBO,
        *,
        lr: float = 1e-3,
        clip_norm: float | None = None,
        skip_nonfinite: bool = False,
        validate: bool | str | None = "first",
        ranks: Ranks | None = None,
        find_unused_parameters: bool = False,
        max_plate_nesting: int = 1,
        kl_weight: float = 1.0,
        **options,
    ) -> None:
        if validate not in (True, False, None, "first"):
            raise ValueError(f"validate must be True, False, None or 'first', got {validate!r}")
        self.model, self.guide, self.elbo, self.validate = model, guide, elbo, validate
        self.max_plate_nesting = max_plate_nesting
        # Parameters come from their owner module from the start, whatever else lives in
        # Pyro's global param store; plain functions' pyro.param sites join as they appear.
        self.modules = owner_modules(model, guide)
        super().__init__(
            functools.partial(elbo.differentiable_loss, model, guide),
            [p for m in self.modules for p in m.parameters()],
            lr=lr,
            clip_norm=clip_norm,
            skip_nonfinite=skip_nonfinite,
            **options,
        )
        # the weight of the latent terms (a KL warm-up sets it each epoch; 1: the model)
        self.kl_weight = kl_weight
        # a saved optimiser state for parameters the pair has not declared yet: loaded once
        # the first step has found them
        self._pending_optimizer_state: dict | None = None
        # Several processes (torchrun): the objective runs inside DistributedDataParallel,
        # which averages the gradients over the ranks during backward.
        self.ranks = ranks or Ranks()
        self._ddp: nn.Module | None = None
        if self.ranks.active:
            if not self.modules:
                raise ValueError(
                    "training on several processes needs a model/guide that belong to an "
                    "nn.Module (DistributedDataParallel wraps its parameters)"
                )
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: for models whose steps may leave some parameters out
            # (the semi-supervised classifier on a labelled batch without the auxiliary term)
            self._ddp = DistributedDataParallel(
                _Objective(self), find_unused_parameters=find_unused_parameters
            )

    @property
    def finite_check_before_backward(self) -> bool:
        # A rank whose loss is not finite still joins the all-reduce; the non-finite
        # gradient then stops (or skips) every rank alike.
        return self._ddp is None

    def _validation(self):
        if self.validate is None:
            return contextlib.nullcontext()
        if self.validate == "first":
            return pyro.validation_enabled(self.step_count == 0)
        return pyro.validation_enabled(self.validate)

    def compute_loss(self, *batch: Tensor) -> Tensor:
        """The objective on a batch, the pair's new ``pyro.param`` sites collected."""
        weight = KLWeight(self.kl_weight) if self.kl_weight != 1 else contextlib.nullcontext()
        with poutine.trace(param_only=True) as capture, self._validation(), weight:
            if self._ddp is not None:
                loss = self._ddp(*batch)
            else:
                loss = self.loss(*batch)
        self._collect_params(capture.trace)
        return loss

    def backward(self, loss: Tensor) -> None:
        """The gradients of ``loss``; under DDP, of the sum over the whole global batch."""
        # DDP averages the ranks' gradients; scaled by the world size, the average is the
        # gradient of the sum over the whole batch, as on one process.
        (loss * self.ranks.world_size if self._ddp is not None else loss).backward()

    def diagnose(self, *batch: Tensor) -> list[str]:
        return nonfinite_sites(
            self.model, self.guide, *batch, max_plate_nesting=self.max_plate_nesting
        )

    def _collect_params(self, trace: poutine.Trace) -> None:
        new = []
        for name, site in trace.nodes.items():
            p = site["value"].unconstrained()
            if id(p) in self._param_ids:
                continue
            init = site["args"][1] if len(site["args"]) > 1 else None
            if isinstance(init, nn.Parameter):  # registered by pyro.module
                if id(init) in self._param_ids or not init.requires_grad:
                    # an owner module's own parameter (trained as such) or a frozen one
                    continue
                if init is not p:
                    raise ParamClashError(
                        f"pyro.module: the param store's {name!r} belongs to another module "
                        "registered under the same name; give each module its own name, or "
                        "call pyro.clear_param_store() before building the second"
                    )
            new.append(p)
        self.add_params(new)
        if self._pending_optimizer_state is not None:
            self._pending_optimizer_state, saved = None, self._pending_optimizer_state
            self.load_optimizer(saved)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters now; the optimiser state now, or once the first step has found the
        parameters of plain functions."""
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        saved = state["optimizer"]
        if saved is None:
            return
        groups = 0 if self.optimizer is None else len(self.optimizer.param_groups)
        if len(saved["param_groups"]) > groups:
            self._pending_optimizer_state = saved
        else:
            self.load_optimizer(saved)
