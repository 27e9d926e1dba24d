"""The SVI training loop: objective choice, optimiser, seeding, progress bar, metrics, guards.

``Trainer.step`` computes the same loss that ``pyro.infer.SVI.step`` would
(``elbo.differentiable_loss(model, guide, *batch)``), then runs ``backward``, checks the loss
and gradients for non-finite values, optionally clips, and steps one ``torch.optim.Adam``
over all parameters.  ``SVI.step`` cannot check gradients between backward and the update,
and ``pyro.optim.Adam`` keeps one optimiser per parameter tensor, which costs about 2 ms a
step on a small MLP; the objective itself is Pyro's, unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from tqdm import tqdm

from pyro_vae.choices import (
    ELBO_NAMES,
    IMPORTANCE_WEIGHTED,
    LR_SCHEDULES,
    PRESETS,
)
from pyro_vae.distributed import Ranks, all_sum, shard_bounds
from pyro_vae.evaluate import estimate_log_px
from pyro_vae.objectives import IWAE, DReG
from pyro_vae.seeding import seed_everything

__all__ = [
    "ELBOS",
    "IMPORTANCE_WEIGHTED",
    "EarlyStopping",
    "LR_SCHEDULES",
    "PRESETS",
    "NonFiniteError",
    "ParamClashError",
    "Trainer",
    "TrainingInterrupted",
    "lr_factor",
    "make_elbo",
    "nonfinite_sites",
    "owner_modules",
    "seed_everything",
    "stop_on_sigint",
]

ELBOS: dict[str, type[ELBO]] = dict(
    zip(
        ELBO_NAMES,
        (Trace_ELBO, TraceMeanField_ELBO, JitTrace_ELBO, TraceEnum_ELBO, IWAE, DReG),
        strict=True,
    )
)

Callback = Callable[["Trainer", dict[str, Any]], None]


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of (1-based) ``epoch`` of ``epochs`` as a fraction of the base rate:
    ``constant`` 1; ``cosine`` half a cosine from 1 at the first epoch towards 0 after the
    last (Loshchilov & Hutter 2017, without restarts)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose from {LR_SCHEDULES}")


class EarlyStopping:
    """A ``fit`` callback that ends training when the validation metric ``metric`` (higher is
    better) has not improved for ``patience`` epochs, or once the epochs so far took
    ``max_seconds`` in all.  Both are read off the trainer's history, so a resumed run
    stops where an uninterrupted one would have.  0 / None switch a criterion off.
    """

    def __init__(self, metric: str, patience: int = 0, max_seconds: float | None = None) -> None:
        if patience < 0:
            raise ValueError(f"patience must be non-negative, got {patience}")
        if max_seconds is not None and not max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        self.metric, self.patience, self.max_seconds = metric, patience, max_seconds

    def reason(self, history: Sequence[dict[str, Any]]) -> str | None:
        """Why training should stop after the last epoch of ``history``, or None."""
        if not history:
            return None
        if self.patience:
            values = [m[self.metric] for m in history]
            best = max(range(len(values)), key=lambda i: (values[i], -i))  # first best
            if len(values) - 1 - best >= self.patience:
                return (
                    f"{self.metric} has not improved for {self.patience} epochs "
                    f"(best {values[best]:.4g} at epoch {history[best]['epoch']})"
                )
        if self.max_seconds is not None:
            seconds = sum(m["seconds"] for m in history)
            if seconds >= self.max_seconds:
                return f"the time budget of {self.max_seconds / 60:.1f} min is spent"
        return None

    def __call__(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        trainer.stop_reason = self.reason(trainer.history)


def make_elbo(
    name: str = "trace", num_particles: int = 1, max_plate_nesting: int = 1, num_groups: int = 1
) -> ELBO:
    """The objective named ``name``: Pyro's ``trace`` (``Trace_ELBO``), ``meanfield``,
    ``jit``, ``enum``, or the importance-weighted ``iwae`` and ``dreg`` (K =
    ``num_particles`` draws per datapoint; ``num_groups`` M > 1 averages M such bounds).

    Several particles are vectorised in one extra plate rather than looped over; for the
    ELBOs they average the single-sample estimate, for ``iwae``/``dreg`` they tighten the
    bound.
    """
    if name not in ELBOS:
        raise ValueError(f"unknown ELBO {name!r}; choose from {', '.join(ELBOS)}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be positive, got {num_particles}")
    if name in IMPORTANCE_WEIGHTED:
        return ELBOS[name](
            num_particles, num_groups=num_groups, max_plate_nesting=max_plate_nesting
        )
    if num_groups != 1:
        raise ValueError("num_groups applies to the iwae and dreg objectives only")
    kwargs = {}
    if name == "enum":
        # labelled batches of a semi-supervised model have nothing to enumerate, by design
        kwargs["strict_enumeration_warning"] = False
    return ELBOS[name](
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=max_plate_nesting,
        **kwargs,
    )


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite; names the epoch, step and culprit sites."""

    def __init__(self, what: str, epoch: int, step: int, sites: Sequence[str]) -> None:
        where = f"; non-finite log-probs at sites: {', '.join(sites)}" if sites else ""
        super().__init__(f"non-finite {what} at epoch {epoch}, step {step}{where}")
        self.what, self.epoch, self.step, self.sites = what, epoch, step, list(sites)


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary on request (e.g. Ctrl-C); the state is consistent."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"interrupted during epoch {epoch}, after step {step}")
        self.epoch, self.step = epoch, step
        self.run_dir = None  # set by whoever saved a checkpoint for it


@contextlib.contextmanager
def stop_on_sigint(trainer: Trainer):
    """While active, Ctrl-C asks ``trainer`` to stop after the current step (it then raises
    ``TrainingInterrupted``); a second Ctrl-C interrupts at once.  Outside the main thread,
    where handlers cannot be installed, it does nothing."""

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@torch.no_grad()
def nonfinite_sites(model: Callable, guide: Callable, *args, **kwargs) -> list[str]:
    """Names of the sample sites whose log-prob is not finite in one guide/model trace."""
    with pyro.validation_enabled(False):  # distributions with NaN parameters must still build
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    bad = []
    for prefix, trace in (("model", model_trace), ("guide", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                if not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                    bad.append(f"{prefix}:{name}")
    return bad


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """``torch.optim.Adam``, fused where torch has a fused kernel for these parameters (one
    kernel for all tensors: 0.6 ms instead of 2.0 ms a step for 784-400-50 on one thread);
    the arithmetic is Adam's either way."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.Adam(params, lr=lr)


class _Objective(nn.Module):
    """The trainer's objective as a module holding the owners' parameters: what
    DistributedDataParallel wraps (it needs a module whose forward returns the loss)."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.owners = nn.ModuleList(trainer.modules)
        self._trainer = [trainer]  # a list: not a submodule

    def forward(self, *batch: Tensor) -> Tensor:
        trainer = self._trainer[0]
        return trainer.elbo.differentiable_loss(trainer.model, trainer.guide, *batch)


def _distributed_objective(trainer: Trainer, find_unused_parameters: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: for models whose steps may leave some parameters out (the
    # semi-supervised model's classifier on a labelled batch without the auxiliary term)
    return DistributedDataParallel(
        _Objective(trainer), find_unused_parameters=find_unused_parameters
    )


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


class ParamClashError(ValueError):
    """Two modules registered under one ``pyro.module`` name (one line)."""


class Trainer:
    """Trains a model/guide pair by SVI, one minibatch per ``step``, one pass per epoch.

    Parameters come from their owner: when ``model``/``guide`` are methods of an
    ``nn.Module`` (the project's models, a user's subclass), the optimiser holds that
    module's parameters from the start, whatever else lives in Pyro's global param store.
    Parameters declared with ``pyro.param`` outside such a module (plain model/guide
    functions) are collected as the pair first creates them; a ``pyro.module`` name that
    already holds another module's tensors is an error, not a silent no-op.  Losses are in
    nats (sums over the batch); metrics are in nats per image.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        *,
        lr: float = 1e-3,
        elbo: str | ELBO = "trace",
        num_particles: int = 1,
        max_plate_nesting: int = 1,
        clip_norm: float | None = None,
        skip_nonfinite: bool = False,
        validate: bool | str | None = "first",
        lr_schedule: str = "constant",
        ranks: Ranks | None = None,
        find_unused_parameters: bool = False,
        eval_model: Callable | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown learning-rate schedule {lr_schedule!r}; choose from {LR_SCHEDULES}"
            )
        self.model, self.guide = model, guide
        # the model the validation ELBO scores: the pure model, when ``model`` carries terms
        # that only training adds (the semi-supervised model's auxiliary and balance terms)
        self.eval_model = model if eval_model is None else eval_model
        self.elbo = (
            make_elbo(elbo, num_particles, max_plate_nesting) if isinstance(elbo, str) else elbo
        )
        self.lr, self.clip_norm, self.skip_nonfinite = lr, clip_norm, skip_nonfinite
        # The rate of each epoch is a function of the epoch and the planned number of epochs
        # only, so a resumed run replays it without saving any scheduler state.
        self.lr_schedule = lr_schedule
        self._lr_now = lr
        # Pyro's distribution argument checks cost about 10% of a step on a small MLP.
        # "first": on for this trainer's first step (a model, guide or batch that breaks a
        # distribution's constraints fails there, with Pyro's message), off afterwards;
        # True/False: always on/off; None: Pyro's global setting.
        if validate not in (True, False, None, "first"):
            raise ValueError(f"validate must be True, False, None or 'first', got {validate!r}")
        self.validate = validate
        self.max_plate_nesting = max_plate_nesting
        self.modules = owner_modules(model, guide)
        self.params: list[Tensor] = []
        self._param_ids: set[int] = set()
        for module in self.modules:
            for p in module.parameters():
                if p.requires_grad and id(p) not in self._param_ids:
                    self._param_ids.add(id(p))
                    self.params.append(p)
        self.optimizer: torch.optim.Optimizer | None = (
            _adam(self.params, lr) if self.params else None
        )
        # a saved optimiser state for parameters the pair has not declared yet (plain
        # functions with pyro.param): loaded once the first step has found them
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
            self._ddp = _distributed_objective(self, find_unused_parameters)
        self.epoch = 0
        self.step_count = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        self.stop_requested = False
        # why a callback ended training before ``epochs`` (None: it did not)
        self.stop_reason: str | None = None
        # running totals of an epoch stopped midway: {"total", "count", "seconds"}
        self._partial: dict[str, float] | None = None

    def request_stop(self) -> None:
        """Ask ``fit`` to stop after the current step, raising ``TrainingInterrupted``."""
        self.stop_requested = True

    def _validation(self):
        if self.validate is None:
            return contextlib.nullcontext()
        if self.validate == "first":
            return pyro.validation_enabled(self.step_count == 0)
        return pyro.validation_enabled(self.validate)

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
            self._param_ids.add(id(p))
            new.append(p)
        if new:
            self.params.extend(new)
            if self.optimizer is None:
                self.optimizer = _adam(new, self.lr)
            else:
                self.optimizer.add_param_group({"params": new})
            self._apply_lr()
        if self._pending_optimizer_state is not None:
            self._load_optimizer(self._pending_optimizer_state)

    def _apply_lr(self) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr_now

    def step(self, *batch: Tensor) -> float:
        """One SVI step on a minibatch; returns the loss (negative objective) in nats.

        On several processes ``batch`` is this rank's shard and the value returned is this
        shard's; the update is the one a single process would make on the whole batch.
        """
        with poutine.trace(param_only=True) as capture, self._validation():
            if self._ddp is not None:
                loss = self._ddp(*batch)
            else:
                loss = self.elbo.differentiable_loss(self.model, self.guide, *batch)
        self._collect_params(capture.trace)
        self.step_count += 1
        value = float(loss.detach())
        if self.optimizer is None:
            raise ValueError("the model and guide declare no parameters to train")
        if not math.isfinite(value) and self._ddp is None:
            return self._nonfinite("loss", batch)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients; scaled by the world size, the average is the
        # gradient of the sum over the whole batch, as on one process.  A rank whose loss
        # is not finite still joins the all-reduce; the non-finite gradient then stops (or
        # skips) every rank alike.
        (loss * self.ranks.world_size if self._ddp is not None else loss).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(norm):
            return self._nonfinite("gradient", batch)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, norm)
        self.optimizer.step()
        return value

    def _nonfinite(self, what: str, batch: Sequence[Tensor]) -> float:
        if self.skip_nonfinite:
            self.skipped_steps += 1
            return float("nan")
        sites = nonfinite_sites(self.model, self.guide, *batch)
        raise NonFiniteError(what, self.epoch + 1, self.step_count, sites)

    def evaluate_elbo(self, *data: Tensor, num_particles: int = 1) -> float:
        """Mean ELBO of the model as written (no KL weight), in nats per image (on several
        processes, each scores its share of ``data`` and the sums are combined)."""
        start, stop = shard_bounds(data[0].shape[0], self.ranks)
        total, count = 0.0, stop - start
        if count:
            result = estimate_log_px(
                self.eval_model,
                self.guide,
                *(t[start:stop] for t in data),
                num_particles=num_particles,
                ks=(),
                psis=False,
                max_plate_nesting=self.max_plate_nesting,
                validate=self.validate if self.validate != "first" else False,
            )
            total = float(result.elbo.sum())
        total, count = all_sum([total, count], self.ranks)
        return total / count

    def fit(
        self,
        loader: Iterable[tuple[Tensor, ...]],
        epochs: int,
        *,
        val_data: Sequence[Tensor] | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done (counting those already done).

        After each epoch, appends ``{"epoch", "step", "train_loss", "val_elbo"?, "seconds",
        "skipped_steps"}`` to ``history`` (nats per image; ``train_loss`` is the objective
        minimised, i.e. -ELBO when beta = 1) and calls each callback with the trainer and it.
        """
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        self.stop_requested = False
        for epoch in range(self.epoch + 1, epochs + 1):
            self._lr_now = self.lr * lr_factor(self.lr_schedule, epoch, epochs)
            self._apply_lr()
            partial = self._partial or {"total": 0.0, "count": 0, "seconds": 0.0}
            self._partial = None
            start = time.perf_counter() - partial["seconds"]
            # a stopped epoch's totals are global sums (see below): rank 0 carries them
            total, count = (
                (partial["total"], int(partial["count"])) if self.ranks.is_main else (0.0, 0)
            )
            bar = tqdm(
                loader,
                desc=f"epoch {epoch}/{epochs}",
                disable=None if progress and self.ranks.is_main else True,
                leave=False,
                dynamic_ncols=True,
            )
            for i, batch in enumerate(bar):
                loss = self.step(*batch)
                if math.isfinite(loss):
                    total += loss
                    count += batch[0].shape[0]
                if i % 20 == 0 and count:
                    bar.set_postfix(loss=f"{total / count:.2f}")
                if self.ranks.active:  # every rank stops after the same step
                    self.stop_requested = all_sum([self.stop_requested], self.ranks)[0] > 0
                if self.stop_requested:
                    bar.close()
                    total, count = all_sum([total, count], self.ranks)
                    self._partial = {
                        "total": total,
                        "count": int(count),
                        "seconds": time.perf_counter() - start,
                    }
                    raise TrainingInterrupted(epoch, self.step_count)
            bar.close()
            total, count = all_sum([total, count], self.ranks)
            count = int(count)
            metrics: dict[str, Any] = {
                "epoch": epoch,
                "step": self.step_count,
                "train_loss": total / count if count else float("nan"),
                "lr": self._lr_now,
            }
            if val_data is not None:
                metrics["val_elbo"] = self.evaluate_elbo(*val_data)
            metrics["seconds"] = time.perf_counter() - start
            metrics["skipped_steps"] = self.skipped_steps
            self.epoch = epoch
            self.history.append(metrics)
            for callback in callbacks:
                callback(self, metrics)
            if self.stop_reason is not None:  # set by a callback, e.g. EarlyStopping
                break
        return self.history

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state, counters and history, as tensors and plain values."""
        return {
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "history": list(self.history),
            "partial_epoch": self._partial,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters now and the optimiser state once the parameters are known."""
        self.epoch = int(state["epoch"])
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.history = list(state["history"])
        self._partial = state.get("partial_epoch")
        saved = state["optimizer"]
        if saved is None:
            return
        groups = 0 if self.optimizer is None else len(self.optimizer.param_groups)
        if len(saved["param_groups"]) > groups:
            # parameters of plain functions appear at the first step: load it then
            self._pending_optimizer_state = saved
        else:
            self._load_optimizer(saved)

    def _load_optimizer(self, saved: dict) -> None:
        """Load a saved optimiser state, or raise if it does not fit these parameters."""
        self._pending_optimizer_state = None
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
            self.optimizer.load_state_dict(saved)
        except (ValueError, IndexError) as e:
            raise ValueError(f"the saved optimiser state does not fit this model: {e}") from None
        self._apply_lr()
