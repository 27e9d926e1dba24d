"""The SVI training loop: objective choice, the epochs, learning-rate schedule, progress bar,
metrics, validation, callbacks and stop rules.

Each step is an ``SVIStepper`` (``pyro_vae.training.stepper``): the same loss that
``pyro.infer.SVI.step`` computes (``elbo.differentiable_loss(model, guide, *batch)``), then
``backward``, checks of the loss and gradients for non-finite values, optional clipping, and
one ``torch.optim.Adam`` step over all parameters.  ``SVI.step`` cannot check gradients
between backward and the update, and ``pyro.optim.Adam`` keeps one optimiser per parameter
tensor, which costs about 2 ms a step on a small MLP; the objective itself is Pyro's,
unchanged.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from pyro.infer import ELBO, JitTrace_ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch import Tensor, nn
from tqdm import tqdm

from pyro_vae.choices import ELBO_NAMES, IMPORTANCE_WEIGHTED, LR_SCHEDULES
from pyro_vae.inference.evaluate import estimate_log_px
from pyro_vae.inference.objectives import IWAE, DReG, FreeBitsELBO
from pyro_vae.training.distributed import Ranks, all_sum, shard_bounds
from pyro_vae.training.schedules import free_bits_level, kl_warmup_weight, lr_factor
from pyro_vae.training.stepper import SVIStepper

__all__ = [
    "ELBOS",
    "EarlyStopping",
    "StopRule",
    "Trainer",
    "TrainingInterrupted",
    "make_elbo",
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


class StopRule(Protocol):
    """Asked after every epoch: why training should stop now, or None (it does not act)."""

    def reason(self, history: Sequence[dict[str, Any]]) -> str | None:
        """Why training should stop after the last epoch of ``history``, or None."""


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
        """As a callback (the older way to pass it): the same decision, set on the trainer.
        Prefer ``fit(stop_rules=[...])``."""
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


@contextlib.contextmanager
def evaluation_mode(modules: Sequence[nn.Module]):
    """The modules in evaluation mode (batch normalisation on its running statistics) for
    the block, each back in the mode it had after it."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary on request (e.g. Ctrl-C); the state is consistent."""

    def __init__(self, epoch: int | str, step: int | None = None) -> None:
        # (a text alone: re-raised as cls(text), as Pyro does)
        text = epoch if step is None else f"interrupted during epoch {epoch}, after step {step}"
        super().__init__(text)
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


class Trainer:
    """Trains a model/guide pair by SVI, one minibatch per step, one pass per epoch.

    The step is an ``SVIStepper`` (``self.stepper``: objective, parameters, Adam, guards,
    optional DDP); the trainer runs the epochs around it: the learning-rate schedule, the
    progress bar, the history of per-epoch metrics, validation, callbacks and stop rules.
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
        kl_warmup: int = 0,
        kl_start: float = 0.0,
        adam_eps: float = 1e-8,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        skip_norm: float | None = None,
        free_bits: float = 0.0,
        free_bits_constant: int | None = None,
        free_bits_cooldown: int = 0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        kl_warmup_weight(1, kl_warmup, kl_start)  # checks both
        if kl_warmup and (elbo == "jit" or isinstance(elbo, JitTrace_ELBO)):
            raise ValueError(
                "a KL warm-up needs an objective that reads the weight at every step; "
                "JitTrace_ELBO compiles it once (use trace)"
            )
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown learning-rate schedule {lr_schedule!r}; choose from {LR_SCHEDULES}"
            )
        self.model, self.guide = model, guide
        # the model the validation ELBO scores: the pure model, when ``model`` carries terms
        # that only training adds (the semi-supervised model's auxiliary and balance terms)
        self.eval_model = model if eval_model is None else eval_model
        free_bits_level(1, free_bits, free_bits_constant, free_bits_cooldown)  # checks them
        if free_bits and not isinstance(elbo, FreeBitsELBO):
            if elbo not in ("trace", "meanfield"):
                raise ValueError(
                    "free bits apply to the ELBO (elbo='trace'), not to an importance-weighted "
                    f"bound or {elbo!r}"
                )
            elbo = FreeBitsELBO(free_bits, num_particles, max_plate_nesting=max_plate_nesting)
        self.free_bits = (free_bits, free_bits_constant, free_bits_cooldown)
        self.elbo = (
            make_elbo(elbo, num_particles, max_plate_nesting) if isinstance(elbo, str) else elbo
        )
        # The rate of each epoch is a function of the epoch and the planned number of epochs
        # only, so a resumed run replays it without saving any scheduler state.
        self.lr, self.lr_schedule = lr, lr_schedule
        self.max_plate_nesting = max_plate_nesting
        self.stepper = SVIStepper(
            model,
            guide,
            self.elbo,
            lr=lr,
            clip_norm=clip_norm,
            skip_nonfinite=skip_nonfinite,
            validate=validate,
            ranks=ranks,
            find_unused_parameters=find_unused_parameters,
            max_plate_nesting=max_plate_nesting,
            adam_eps=adam_eps,
            adam_betas=adam_betas,
            skip_norm=skip_norm,
        )
        self._start_loop(kl_warmup, kl_start)

    @classmethod
    def around(
        cls,
        stepper: SVIStepper,
        *,
        lr_schedule: str = "constant",
        kl_warmup: int = 0,
        kl_start: float = 0.0,
        eval_model: Callable | None = None,
    ) -> Trainer:
        """The loop around a stepper built by hand: the step's options (objective, rate,
        clipping, Adam's settings, processes) are the stepper's, given once; the trainer adds
        the epochs, the learning-rate schedule (on the stepper's rate), the KL warm-up,
        validation and the history.  Free bits come with the objective
        (``FreeBitsELBO``), their schedule fixed at the level it holds."""
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"unknown learning-rate schedule {lr_schedule!r}; choose from {LR_SCHEDULES}"
            )
        kl_warmup_weight(1, kl_warmup, kl_start)  # checks both
        if kl_warmup and isinstance(stepper.elbo, JitTrace_ELBO):
            raise ValueError(
                "a KL warm-up needs an objective that reads the weight at every step; "
                "JitTrace_ELBO compiles it once (use trace)"
            )
        self = cls.__new__(cls)
        self.model, self.guide, self.stepper = stepper.model, stepper.guide, stepper
        self.eval_model = stepper.model if eval_model is None else eval_model
        self.elbo, self.lr, self.lr_schedule = stepper.elbo, stepper.lr, lr_schedule
        self.max_plate_nesting = stepper.max_plate_nesting
        level = getattr(stepper.elbo, "free_bits", 0.0)
        self.free_bits = (level, None, 0)  # a constant level: the objective's own
        self._start_loop(kl_warmup, kl_start)
        return self

    def _start_loop(self, kl_warmup: int, kl_start: float) -> None:
        # The KL weight of each epoch is a function of the epoch only, like the rate.
        self.kl_warmup, self.kl_start = kl_warmup, kl_start
        self.ranks = self.stepper.ranks
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.stop_requested = False
        # why training ended before ``epochs`` (None: it did not): a stop rule's reason
        self.stop_reason: str | None = None
        # running totals of an epoch stopped midway: {"total", "count", "seconds"}
        self._partial: dict[str, float] | None = None

    # the stepper's state, read through the trainer as before
    @property
    def params(self) -> list[Tensor]:
        return self.stepper.params

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.stepper.optimizer

    @property
    def modules(self) -> list[nn.Module]:
        return self.stepper.modules

    @property
    def validate(self) -> bool | str | None:
        return self.stepper.validate

    @property
    def step_count(self) -> int:
        return self.stepper.step_count

    @property
    def skipped_steps(self) -> int:
        return self.stepper.skipped_steps

    def request_stop(self) -> None:
        """Ask ``fit`` to stop after the current step, raising ``TrainingInterrupted``."""
        self.stop_requested = True

    def step(self, *batch: Tensor) -> float:
        """One SVI step on a minibatch; returns the loss (negative objective) in nats (NaN
        for a skipped step).

        On several processes ``batch`` is this rank's shard and the value returned is this
        shard's; the update is the one a single process would make on the whole batch.
        """
        self.stepper.epoch = self.epoch
        return self.stepper.step(*batch).loss

    def evaluate_elbo(self, *data: Tensor, num_particles: int = 1) -> float:
        """Mean ELBO of the model as written (no KL weight), in nats per image (on several
        processes, each scores its share of ``data`` and the sums are combined)."""
        start, stop = shard_bounds(data[0].shape[0], self.ranks)
        total, count = 0.0, stop - start
        if count:
            with evaluation_mode(self.modules):
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
        stop_rules: Sequence[StopRule] = (),
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
        for module in self.modules:  # training mode: batch normalisation uses the batch
            module.train()
        for epoch in range(self.epoch + 1, epochs + 1):
            lr_now = self.lr * lr_factor(self.lr_schedule, epoch, epochs)
            self.stepper.set_lr(lr_now)
            self.stepper.kl_weight = kl_warmup_weight(epoch, self.kl_warmup, self.kl_start)
            if isinstance(self.elbo, FreeBitsELBO):
                self.elbo.free_bits = free_bits_level(epoch, *self.free_bits)
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
                "lr": lr_now,
            }
            if self.kl_warmup:
                metrics["kl_weight"] = self.stepper.kl_weight
            if isinstance(self.elbo, FreeBitsELBO):
                metrics["free_bits"] = self.elbo.free_bits
            if val_data is not None:
                metrics["val_elbo"] = self.evaluate_elbo(*val_data)
            metrics["seconds"] = time.perf_counter() - start
            metrics["skipped_steps"] = self.skipped_steps
            self.epoch = epoch
            self.history.append(metrics)
            for callback in callbacks:
                callback(self, metrics)
            for rule in stop_rules:  # asked, after the callbacks have added their metrics
                self.stop_reason = self.stop_reason or rule.reason(self.history)
            if self.stop_reason is not None:
                break
        return self.history

    def state_dict(self) -> dict[str, Any]:
        """Optimiser state, counters and history, as tensors and plain values."""
        return {
            **self.stepper.state_dict(),
            "epoch": self.epoch,
            "history": list(self.history),
            "partial_epoch": self._partial,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters now and the optimiser state once the parameters are known."""
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self._partial = state.get("partial_epoch")
        self.stepper.load_state_dict(state)
