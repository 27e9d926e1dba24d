"""Runs: a training run tied to its directory, and a trained run read back.

``TrainingRun`` writes a checkpoint after every epoch, metrics, resumes exactly, and saves
before a Ctrl-C stops it.  Scripts and notebooks build the model, trainer and loader and hand
them to ``TrainingRun.open``, which starts the run, or restores it from a checkpoint on the
freshly built pieces; then ``fit``.  ``keep_best(metric)`` keeps ``best.pt``, the weights of
the epoch with the best validation metric so far.

``Run.load(path)`` reads a trained run back for every later job (evaluation, compression,
OOD scores, the gap decomposition): its model in evaluation mode, its config, and its
held-out images prepared exactly as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pyro_vae.checks import ConfigError
from pyro_vae.choices import BINARIZATIONS, DISCRETE_LIKELIHOODS
from pyro_vae.config import SSVAEConfig, TrainConfig
from pyro_vae.data import (
    BatchLoader,
    Dataset,
    SemiSupervisedLoader,
    first_rows,
    heldout_split,
    load_dataset,
)
from pyro_vae.faults import pause_point
from pyro_vae.inference.evaluate import MarginalLikelihood
from pyro_vae.io.checkpoints import (
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from pyro_vae.io.rundir import RunDir
from pyro_vae.networks.distributions import in_bits_per_dim
from pyro_vae.seeding import child_seed, seed_everything
from pyro_vae.training.distributed import Ranks, all_gather_objects, sharded_log_px
from pyro_vae.training.stepper import NonFiniteError
from pyro_vae.training.trainer import StopRule, Trainer, TrainingInterrupted, stop_on_sigint

__all__ = ["BEST_NAME", "CONFIG_CLASSES", "Run", "RunData", "TrainingRun"]

#: the weights of the best validation epoch, beside ``checkpoint.pt`` (``keep_best``)
BEST_NAME = "best.pt"

#: the config class of each model class's training runs
CONFIG_CLASSES = {
    "VAE": TrainConfig,
    "HierarchicalVAE": TrainConfig,
    "SSVAE": SSVAEConfig,
    "StackedSSVAE": SSVAEConfig,
}


class TrainingRun:
    """Trains ``model`` with ``trainer`` on ``loader``, saving to ``directory`` as it goes.

    The checkpoint (``checkpoint.pt``) holds the model's ``state_dict``, the trainer's state
    (optimiser, counters, history, a stopped epoch's running totals), the loader's generator
    states and position, every global RNG state, the model class and its config, and the
    run's config: with it a killed run resumes bit for bit where its last checkpoint stood.

    On several processes (``trainer.ranks``) rank 0 alone writes files and logs; the
    checkpoint also holds every rank's RNG states (``rng_ranks``), so a run resumed with the
    same number of processes continues bit for bit, and with another number each new rank
    without saved states draws from a stream of its own.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        model: nn.Module,
        trainer: Trainer,
        loader: BatchLoader | SemiSupervisedLoader,
        config: dict[str, Any],
        model_class: str,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.dir = RunDir(directory)
        self.model, self.trainer, self.loader = model, trainer, loader
        self.config, self.model_class, self.log = config, model_class, log

    @classmethod
    def open(
        cls,
        directory: Path | str,
        *,
        state: dict[str, Any] | None = None,
        new: bool = True,
        **parts: Any,
    ) -> TrainingRun:
        """The run in ``directory`` built from ``parts`` (the constructor's keywords):
        restored from the checkpoint ``state``, or started (in a new directory with ``new``;
        else in one whose run had no checkpoint yet)."""
        run = cls(directory, **parts)
        trainer, log = run.trainer, run.log
        if state is None:
            run.start(new=new)
        else:
            run.restore(state)
            if log is not None and run.is_main:
                log(
                    f"resuming {run.dir.path} after epoch {trainer.epoch}, step {trainer.step_count}"
                )
        return run

    @property
    def is_main(self) -> bool:
        return self.trainer.ranks.is_main

    @property
    def best_path(self) -> Path:
        return self.dir.path / BEST_NAME

    def keep_best(self, metric: str) -> Callable[[Trainer, dict[str, Any]], None]:
        """A ``fit`` callback that writes ``best.pt`` (the model, its config, the epoch)
        whenever ``metric`` (higher is better) is at its best so far; put it after the
        callbacks that compute the metric."""

        def callback(trainer: Trainer, metrics: dict[str, Any]) -> None:
            best = max(m[metric] for m in trainer.history)
            if metrics[metric] >= best and self.is_main:
                save_checkpoint(
                    self.best_path,
                    {
                        "model_class": self.model_class,
                        "model_config": self.model.config(),
                        "model": self.model.state_dict(),
                        "config": self.config,
                        "epoch": metrics["epoch"],
                    },
                )

        return callback

    def start(self, *, new: bool = True) -> TrainingRun:
        """Claim the run directory (this process becomes its only writer; with ``new`` it
        must hold nothing yet) and write ``config.json``.  ``new=False``: a run killed before
        its first checkpoint starts here again (temporary files of killed writes are
        removed)."""
        if self.is_main:
            self.dir.acquire(new=new)
            self.dir.create()
            remove_stale_temporaries(self.dir.path)
            self.dir.write_json("config.json", self.config)
        pause_point("run-started")
        return self

    def close(self) -> None:
        """Give the run directory up (a script's exit does this for it)."""
        self.dir.release()

    def state(self) -> dict[str, Any]:
        """The checkpoint's contents (on several processes, every rank must call it: the
        RNG states are gathered)."""
        rng = get_rng_state()
        return {
            "model_class": self.model_class,
            "model_config": self.model.config(),
            "model": self.model.state_dict(),
            "trainer": self.trainer.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": rng,
            "rng_ranks": all_gather_objects(rng, self.trainer.ranks),
            "world_size": self.trainer.ranks.world_size,
            "config": self.config,
        }

    def save(self) -> Path:
        """Write the checkpoint (rank 0; every rank must call this)."""
        state = self.state()
        if self.is_main:
            save_checkpoint(self.dir.checkpoint_path, state)
        return self.dir.checkpoint_path

    def restore(self, state: dict[str, Any]) -> None:
        """Claim the run directory, then load a checkpoint's weights, trainer, loader and RNG
        states into this run; ``config.json`` is rewritten with this run's config."""
        if self.is_main:
            self.dir.acquire(flag="--resume")
        if state.get("model_class") != self.model_class:
            raise CheckpointError(
                f"checkpoint holds a {state.get('model_class')}, not a {self.model_class}"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.trainer.load_state_dict(state["trainer"])
            self.loader.load_state_dict(state["loader"])
            ranks = self.trainer.ranks
            saved = state.get("rng_ranks") or [state["rng"]]
            if ranks.rank < len(saved):
                set_rng_state(saved[ranks.rank])
            else:  # more processes than the run had: a stream of this rank's own
                seed = int(self.config.get("seed", 0))
                seed_everything(
                    child_seed(seed, f"rank-{ranks.rank}-from-step-{self.trainer.step_count}")
                )
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            detail = " ".join(str(e).split())[:200]
            raise CheckpointError(f"checkpoint does not fit this run: {detail}") from None
        if self.is_main:
            remove_stale_temporaries(self.dir.path)
            # the resumed run's flags (a longer --epochs, say): the checkpoint will hold them too
            self.dir.write_json("config.json", self.config)

    def _on_epoch(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.is_main:
            self.dir.write_metrics(trainer.history)
        self.save()
        pause_point("epoch-saved")
        if self.log is not None and self.is_main:
            val = f"  val ELBO {metrics['val_elbo']:.2f}" if "val_elbo" in metrics else ""
            extra = "".join(
                f"  {k} {v:.4g}"
                for k, v in metrics.items()
                if k.startswith("val_") and k != "val_elbo"
            )
            self.log(
                f"epoch {metrics['epoch']:>3}  train objective {-metrics['train_loss']:.2f}"
                f"{val}{extra}  ({metrics['seconds']:.1f} s)"
            )

    def fit(
        self,
        epochs: int,
        *,
        val_data: Sequence[Tensor] | None = None,
        callbacks: Sequence[Callable] = (),
        stop_rules: Sequence[StopRule] = (),
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Train up to ``epochs``; on Ctrl-C, save a checkpoint at the step boundary and
        re-raise ``TrainingInterrupted``."""
        with stop_on_sigint(self.trainer):
            try:
                return self.trainer.fit(
                    self.loader,
                    epochs,
                    val_data=val_data,
                    callbacks=[*callbacks, self._on_epoch],  # theirs first: they may add metrics
                    stop_rules=stop_rules,
                    progress=progress,
                )
            except TrainingInterrupted as e:
                self.save()
                e.run_dir = self.dir.path
                raise
            except NonFiniteError as e:
                e.run_dir = self.dir.path  # where the last checkpoint is, if any
                raise


@dataclass(frozen=True)
class RunData:
    """Which images a run was trained on and how they were prepared, as its config records
    them: the held-out splits of a later job are made from these alone."""

    dataset: str
    binarize: str
    seed: int
    data_dir: str | None = None
    sha256: str | None = None  # of a data file, as the run recorded it

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, where: Path | str) -> RunData:
        """The data settings of a run's ``config`` (every run directory has written these
        keys since the first release); a ``CheckpointError`` naming the key that is missing
        or wrong, never a silent default."""
        if not isinstance(config, Mapping):
            raise CheckpointError(
                f"{where}: holds a model but no run config, so which data it was trained on is "
                "unknown (save runs with TrainingRun, or evaluate the model from Python)"
            )
        for key in ("dataset", "binarize", "seed"):
            if key not in config:
                raise CheckpointError(f"{where}: the run's config has no {key!r}")
        dataset, binarize, seed = config["dataset"], config["binarize"], config["seed"]
        data_dir = config.get("data_dir")  # None: the default place of the data sets
        if not isinstance(dataset, str) or not dataset:
            raise CheckpointError(f"{where}: the run's config has dataset {dataset!r}")
        if binarize not in BINARIZATIONS:
            raise CheckpointError(f"{where}: the run's config has binarize {binarize!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise CheckpointError(f"{where}: the run's config has seed {seed!r}")
        if data_dir is not None and not isinstance(data_dir, str):
            raise CheckpointError(f"{where}: the run's config has data_dir {data_dir!r}")
        sha256 = config.get("dataset_sha256")
        return cls(dataset, binarize, seed, data_dir, sha256)


class Run:
    """A trained run read back: ``Run.load(path)``.

    ``model`` is the checkpoint's model in evaluation mode (batch normalisation on its running
    statistics), ``config`` the run's config as saved in the checkpoint (the source of truth;
    ``config.json`` is its copy), ``data`` its data settings and ``heldout(split)`` its
    validation or test images prepared as training prepared them.
    """

    def __init__(self, path: Path, state: dict[str, Any], model: nn.Module) -> None:
        self.path, self.state, self.model = path, state, model
        self.config: dict[str, Any] | None = state.get("config")

    @classmethod
    def load(cls, path: Path | str, *, device: str | torch.device = "cpu") -> Run:
        """The run in ``path`` (a run directory or a checkpoint file), its model on
        ``device``.  A directory of a run trained with ``keep_best`` stands for the weights
        its report scored, ``best.pt``; ``checkpoint.pt`` (the last epoch) is read when named.
        One-line ``CheckpointError`` when there is none or it cannot be read."""
        from pyro_vae.models import model_from_checkpoint

        checkpoint = resolve_checkpoint(path)
        state = load_checkpoint(checkpoint, map_location=device)
        best = Path(path) / BEST_NAME
        if Path(path).is_dir() and (state.get("config") or {}).get("keep_best"):
            if not best.is_file():  # written before each epoch's checkpoint: removed since
                raise CheckpointError(f"{path}: the run keeps its best epoch, but has no {best}")
            checkpoint, state = best, load_checkpoint(best, map_location=device)
        model = model_from_checkpoint(state).to(device).eval()
        return cls(checkpoint, state, model)

    @property
    def directory(self) -> Path:
        """The run directory (where later jobs write their reports by default)."""
        return self.path.parent

    @property
    def epoch(self) -> int | None:
        """Epochs trained, when the checkpoint says."""
        epoch = self.state.get("trainer", {}).get("epoch", self.state.get("epoch"))
        return None if epoch is None else int(epoch)

    @property
    def train_config(self) -> TrainConfig | SSVAEConfig:
        """The run's settings, typed: a ``TrainConfig`` for a run of the VAE or the
        hierarchical VAE, an ``SSVAEConfig`` for a semi-supervised one (older runs migrated);
        a one-line ``CheckpointError`` naming a key that is unknown, missing or wrong."""
        kind = CONFIG_CLASSES.get(self.state.get("model_class"))
        if kind is None:
            raise CheckpointError(
                f"{self.path}: a {self.state.get('model_class')} run has no training config"
            )
        try:
            return kind.from_dict(self.config)
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: its config: {e}") from None

    @property
    def data(self) -> RunData:
        """The run's data settings (``CheckpointError`` for a checkpoint without a config)."""
        return RunData.from_config(self.config, self.path)

    def heldout(
        self,
        split: str = "test",
        size: int | None = None,
        *,
        data_dir: Path | str | None = None,
        what: str = "size",
    ) -> Dataset:
        """The first ``size`` images (all when None) of the ``valid`` or ``test`` split of the
        run's data set, binarised as evaluation binarises them (once, from the run's seed);
        ``data_dir`` in place of the recorded one; ``what`` names ``size`` in errors (a flag).
        A one-line ``DataError`` when the images do not fit the model."""
        from pyro_vae.data import DataError

        data = self.data
        splits = load_dataset(data.dataset, data_dir or data.data_dir, data.sha256)
        images = first_rows(
            heldout_split(splits, split, data.binarize, data.seed), size, what, split
        )
        x_dim = getattr(self.model, "x_dim", None)
        if x_dim is not None and images.images.shape[1] != x_dim:
            raise DataError(
                f"the checkpoint's model expects {x_dim} pixels, {data.dataset} has "
                f"{images.images.shape[1]}"
            )
        return images

    def log_px(
        self,
        split: str = "test",
        size: int | None = None,
        *,
        num_particles: int = 5000,
        seed: int = 0,
        max_rows: int | None = None,
        psis: bool = True,
        progress: bool = False,
        data_dir: Path | str | None = None,
        ranks: Ranks | None = None,
        what: str = "size",
    ) -> MarginalLikelihood:
        """Importance-weighted log p(x) (nats per image) of the first ``size`` images of the
        held-out ``split`` at K = ``num_particles``: the ELBO, the bound against K, ESS and
        PSIS k̂ beside it.  The same ``seed`` gives the same numbers whatever ``max_rows``
        (memory) and however many processes (``ranks``) share the images; ``what`` names
        ``size`` in errors."""
        images = self.heldout(split, size, data_dir=data_dir, what=what).images
        device = next(self.model.parameters()).device
        return sharded_log_px(
            self.model.model,
            self.model.guide,
            images.to(device),
            ranks=ranks or Ranks(),
            num_particles=num_particles,
            seed=seed,
            max_rows=max_rows,
            psis=psis,
            progress=progress,
            validate=False,  # the images were prepared here, for the run's own model
        )

    def log_px_report(self, result: MarginalLikelihood, split: str = "test") -> dict[str, Any]:
        """``result`` (from ``log_px``) as the report the evaluation script writes: its summary,
        where the images came from, the checkpoint and its epoch, the units."""
        report = {
            **result.summary(),
            "split": split,
            "binarize": self.data.binarize,
            "dataset": self.data.dataset,
            "checkpoint": str(self.path),
            "epoch": self.epoch,
            "units": "nats per image",
        }
        if getattr(self.model, "likelihood_name", None) in DISCRETE_LIKELIHOODS:
            report["bits_per_dim"] = in_bits_per_dim(report, self.model.x_dim)
        return report
