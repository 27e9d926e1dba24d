"""One library call per job: ``train_vae(config, directory)`` trains a VAE or a hierarchical VAE
from a ``TrainConfig`` into a run directory (checkpoint every epoch, exact resume, the test
evaluation and the standard figures) and returns the trained run; ``train_ssvae`` does the same
for the semi-supervised model from an ``SSVAEConfig``.  The training scripts only parse flags
into the config, call one of them and print.

    from pyro_vae import TrainConfig, train_vae

    result = train_vae(TrainConfig(epochs=5, train_size=5000), "runs/small")
    print(result.report["elbo"], result.run.epoch)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyro_vae.apps.plots import plot_analogies, plot_confusion, plot_curves, save_vae_figures
from pyro_vae.checks import ConfigError
from pyro_vae.choices import DISCRETE_LIKELIHOODS
from pyro_vae.config import SSVAEConfig, TrainConfig
from pyro_vae.data import (
    BatchLoader,
    DataError,
    SemiSupervisedLoader,
    file_sha256,
    is_dataset_file,
    labelled_subset,
    training_splits,
)
from pyro_vae.inference.evaluate import predict_labels, semi_supervised_report
from pyro_vae.io.checkpoints import load_checkpoint
from pyro_vae.models import SSVAE, VAE, HierarchicalVAE, StackedSSVAE
from pyro_vae.networks.distributions import in_bits_per_dim
from pyro_vae.seeding import child_seed, seed_everything
from pyro_vae.training.distributed import Ranks, ShardedLoader, sharded_log_px
from pyro_vae.training.runs import Run, TrainingRun
from pyro_vae.training.schedules import warmup_epochs
from pyro_vae.training.trainer import EarlyStopping, Trainer

__all__ = [
    "TrainResult",
    "accuracy",
    "build_model",
    "curve_label",
    "load_m1",
    "train_ssvae",
    "train_vae",
]


def build_model(
    config: TrainConfig, x_dim: int, image_shape, levels: int | None = None
) -> tuple[nn.Module, str]:
    """(model, its class name) for ``config``: the one-layer VAE or the hierarchical one;
    ``levels``: the data's grey levels (for the discretised logistic)."""
    common = dict(
        x_dim=x_dim,
        activation=config.activation,
        image_shape=image_shape,
        scale_link=config.scale_link,
        weight_norm=config.weight_norm,
        batch_norm=config.batch_norm,
    )
    if config.model == "vae":
        vae = VAE(
            z_dim=config.z_dim,
            hidden=config.hidden,
            likelihood=config.likelihood,
            x_scale=config.x_scale,
            beta=config.beta,
            flow=config.flow,
            flow_depth=config.flow_depth or 2,
            covariance=config.covariance,
            levels=levels or 256,
            arch=config.arch,
            channels=config.channels,
            pixel_uniform=config.pixel_uniform,
            **common,
        )
        return vae, "VAE"
    layers = {}
    if config.z_dims is not None:
        layers["z_dims"] = config.z_dims
    if config.layer_hidden is not None:
        layers["hidden"] = config.layer_hidden
    if config.guide is not None:
        layers["guide"] = config.guide
    if config.skip_connections:
        layers["skip"] = True
    return HierarchicalVAE(**layers, **common), "HierarchicalVAE"


def curve_label(config: TrainConfig) -> str:
    """What the training curve shows: the objective the run optimised."""
    if config.elbo in ("iwae", "dreg"):
        label = f"training bound L_{config.num_particles} ({config.elbo})"
    else:
        label = "training ELBO"
    return label + (", KL weighted" if config.kl_warmup or config.beta != 1 else "")


@dataclass
class _Job:
    """Where a training job runs and what it continues: its device and processes, the
    checkpoint it resumes (``state``), whether its directory must be new, where progress
    lines go and what ``config.json`` records (``record``; by default the config)."""

    device: torch.device
    ranks: Ranks
    state: dict[str, Any] | None
    new: bool
    log: Callable[[str], None] | None
    record: dict[str, Any] | None

    @classmethod
    def begin(cls, config, device, ranks, state, new, log, record) -> _Job:
        """The job, with every generator seeded from ``config.seed`` (rank r > 0 from a
        stream of its own; a resumed run then restores what it saved)."""
        ranks = ranks or Ranks()
        seed_everything(
            config.seed if ranks.is_main else child_seed(config.seed, f"rank-{ranks.rank}")
        )
        return cls(torch.device(device), ranks, state, new, log, record)

    def open(
        self, directory, config, model, model_class, trainer, loader, **recorded
    ) -> TrainingRun:
        """The run in ``directory`` started or restored; ``config.json`` holds the record,
        the model and ``recorded``."""
        saved = {**config.to_dict(), "device": str(self.device)}
        saved = dict(self.record) if self.record is not None else saved
        saved |= {"model_class": model_class, "model_config": model.config(), **recorded}
        return TrainingRun.open(
            directory,
            model=model,
            trainer=trainer,
            loader=ShardedLoader(loader, self.ranks) if self.ranks.active else loader,
            config=saved,
            model_class=model_class,
            state=self.state,
            new=self.new,
            log=self.log,
        )


def _fit(
    training: TrainingRun,
    config: TrainConfig | SSVAEConfig,
    metric: str,
    *,
    val_data: tuple,
    callbacks: list,
    progress: bool,
    log: Callable[[str], None] | None,
) -> str | None:
    """Train up to ``config.epochs``, stopped early by ``config.patience`` (epochs without a
    better ``metric``) or ``config.max_minutes``: why it stopped early, or None.  A resumed
    run that had stopped already trains no further."""
    trainer = training.trainer
    stopper = EarlyStopping(
        metric,
        patience=config.patience,
        max_seconds=None if config.max_minutes is None else 60 * config.max_minutes,
    )
    stopped = stopper.reason(trainer.history)
    if stopped is None and trainer.epoch < config.epochs:
        training.fit(
            config.epochs,
            val_data=val_data,
            callbacks=callbacks,
            stop_rules=[stopper],
            progress=progress,
        )
        stopped = trainer.stop_reason
    if stopped is not None and log is not None and training.is_main:
        log(f"stopped after epoch {trainer.epoch}: {stopped}")
    return stopped


@dataclass
class TrainResult:
    """What ``train_vae`` returns: the trained run (read back as a later job reads it), the
    test report also written to ``evaluation.json`` (nats per image), and the training run
    (its trainer, history and directory)."""

    run: Run | None
    report: dict[str, Any]
    training: TrainingRun


def train_vae(
    config: TrainConfig,
    directory: Path | str,
    *,
    state: dict[str, Any] | None = None,
    new: bool = True,
    device: str | torch.device = "cpu",
    ranks: Ranks | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    record: dict[str, Any] | None = None,
) -> TrainResult:
    """Train the model ``config`` describes into ``directory`` and evaluate it on the test
    split: a checkpoint after every epoch (``state``: a checkpoint of this run to continue
    from; ``new``: the directory must hold nothing yet), then ``evaluation.json`` (test ELBO,
    and log p(x) at ``config.eval_particles``) and the figures; ``config.patience`` and
    ``config.max_minutes`` stop training early (on the validation ELBO, on the time the epochs
    took; the report says why under ``stopped``).  With ``config.keep_best`` the weights of
    the epoch with the best validation ELBO are kept in ``best.pt``, and the report (its
    ``best_epoch``), the figures and every later job that reads the run directory use them.
    ``record`` is what ``config.json`` holds (default: the config, the device and the model);
    on several processes (``ranks``) rank 0 alone writes, and the other ranks get
    ``run=None``.

    Settings the data cannot satisfy (a batch larger than the training set) are a
    ``ConfigError`` naming them, before anything is written.
    """
    job = _Job.begin(config, device, ranks, state, new, log, record)
    device, ranks = job.device, job.ranks
    # a data file's hash goes into the run, so that every later job holds out the same images
    sha256 = None if state is None else (state.get("config") or {}).get("dataset_sha256")
    train_set, valid, test = training_splits(
        config.dataset,
        config.data_dir,
        likelihood=config.likelihood,
        binarize=config.binarize,
        seed=config.seed,
        train_size=config.train_size,
        eval_size=config.eval_size,
        sha256=sha256,
    )
    recorded = {}
    if is_dataset_file(config.dataset):
        recorded["dataset_sha256"] = sha256 or file_sha256(config.dataset)
    if config.elbo == "jit" and len(train_set) < config.batch_size:
        raise ConfigError(
            "batch_size",
            f"elbo jit needs at least one full batch: {len(train_set)} < {config.batch_size}",
        )
    if config.batch_size > len(train_set) and state is None:
        raise ConfigError(
            "batch_size", f"{config.batch_size} is more than the {len(train_set)} training images"
        )
    model, model_class = build_model(
        config, train_set.images.shape[1], train_set.image_shape, train_set.levels
    )
    if config.init_output_bias and state is None:  # a resumed run restores its weights
        model.init_output_bias(train_set.images.mean(0))
    model = model.to(device)
    # The data were checked when they were loaded: Pyro's per-step argument checks are off.
    trainer = Trainer(
        model.model,
        model.guide,
        lr=config.lr,
        lr_schedule=config.lr_schedule,
        elbo=config.elbo,
        num_particles=config.num_particles,
        adam_eps=config.adam_eps,
        adam_betas=config.adam_betas,
        skip_norm=config.skip_norm,
        clip_norm=config.clip_norm,
        skip_nonfinite=config.skip_nonfinite,
        kl_warmup=warmup_epochs(config.kl_warmup, config.epochs),
        kl_start=config.kl_start,
        free_bits=config.free_bits,
        free_bits_constant=config.free_bits_constant,
        free_bits_cooldown=config.free_bits_cooldown,
        validate=False,
        ranks=ranks,
    )
    loader = BatchLoader(
        train_set,
        config.batch_size,
        shuffle=True,
        binarize="dynamic" if config.binarize == "dynamic" else "none",
        # JitTrace_ELBO caches its trace by argument count, not shape: no short last batch.
        drop_last=config.elbo == "jit",
        seed=config.seed,
        device=device,
        perturb=config.perturb,
    )
    training = job.open(directory, config, model, model_class, trainer, loader, **recorded)
    quiet = not progress or not ranks.is_main
    stopped = _fit(
        training,
        config,
        "val_elbo",
        val_data=(valid.images.to(device),),
        callbacks=[training.keep_best("val_elbo")] if config.keep_best else [],
        progress=not quiet,
        log=log,
    )
    best = None
    if config.keep_best:
        # Every rank has passed the last epoch's checkpoint (a collective), which rank 0
        # writes after best.pt: the file is complete for all of them.
        best = load_checkpoint(training.best_path, map_location=device)
        model.load_state_dict(best["model"])
    model.eval()  # batch normalisation, if any, on its running statistics from here on

    test_x = test.images.to(device)
    report: dict[str, Any] = {
        "binarize": config.binarize,
        "dataset": config.dataset,
        "units": "nats per image",
    }
    if best is not None:
        report["best_epoch"] = int(best["epoch"])  # the weights scored here and by later jobs
    if stopped is not None:
        report["stopped"] = stopped
    if config.eval_particles:
        result = sharded_log_px(
            model.model,
            model.guide,
            test_x,
            ranks=ranks,
            num_particles=config.eval_particles,
            seed=config.seed,
            progress=not quiet,
            validate=False,  # checked when the data were loaded
        )
        report.update(result.summary())
    else:
        report["elbo"] = trainer.evaluate_elbo(test_x, num_particles=10)
    if getattr(model, "likelihood_name", None) in DISCRETE_LIKELIHOODS:
        report["bits_per_dim"] = in_bits_per_dim(report, test_x.shape[1])
    if not ranks.is_main:
        return TrainResult(None, report, training)
    training.dir.write_json("evaluation.json", report)
    save_vae_figures(
        model,
        test_x,
        test.labels,
        trainer.history,
        training.dir.figures,
        seed=config.seed,
        objective=curve_label(config),
    )
    # the run as a later job reads it: the last epoch's checkpoint, or best.pt (keep_best)
    return TrainResult(Run.load(training.dir.path, device=device), report, training)


NUM_CLASSES = 10  # the classes of MNIST and Fashion-MNIST


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of images whose most probable class under ``model.classify`` is ``y``."""
    return float((predict_labels(model.classify, x) == y).double().mean())


def load_m1(path: Path | str, dataset: str, device: str | torch.device = "cpu") -> VAE:
    """The trained VAE at ``path``, checked to be one M2 can stand on (``ConfigError`` naming
    ``m1`` otherwise)."""
    m1 = Run.load(path, device=device)
    vae = m1.model
    if not isinstance(vae, VAE):
        raise ConfigError("m1", f"{path} holds a {type(vae).__name__}, not a VAE")
    if vae.likelihood_name != "bernoulli" or m1.data.binarize == "none":
        raise ConfigError("m1", f"{path}: M1 must be a Bernoulli VAE trained on binary images")
    if m1.data.dataset != dataset:
        raise ConfigError("m1", f"{path} was trained on {m1.data.dataset}, not on {dataset}")
    return vae


def train_ssvae(
    config: SSVAEConfig,
    directory: Path | str,
    *,
    state: dict[str, Any] | None = None,
    new: bool = True,
    device: str | torch.device = "cpu",
    ranks: Ranks | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    record: dict[str, Any] | None = None,
) -> TrainResult:
    """Train the semi-supervised M2 (or M1+M2 on ``config.m1``'s codes) into ``directory``:
    a checkpoint every epoch and ``best.pt`` at the best validation accuracy (with
    ``config.patience`` / ``config.max_minutes`` as stopping rules), then the test report
    of the best weights (``evaluation.json``) and the figures.  The arguments are
    ``train_vae``'s; the report is rank 0's (other ranks get ``run=None`` and ``{}``)."""
    job = _Job.begin(config, device, ranks, state, new, log, record)
    device, ranks = job.device, job.ranks
    # M1 is checked before the data load; a resumed run has its weights in the checkpoint
    m1 = load_m1(config.m1, config.dataset) if config.m1 is not None and state is None else None
    train_set, valid, test = training_splits(
        config.dataset,
        config.data_dir,
        likelihood="bernoulli",
        binarize=config.binarize,
        seed=config.seed,
        train_size=config.train_size,
        eval_size=config.eval_size,
    )
    try:
        labelled, unlabelled = labelled_subset(train_set, config.labels, config.seed, NUM_CLASSES)
    except DataError as e:  # the settings that chose these numbers
        raise ConfigError("labels", f"{config.labels} (of the training images): {e}") from None
    if len(unlabelled) < config.batch_size:
        raise ConfigError(
            "batch_size",
            f"{config.batch_size}, but the {len(unlabelled)} unlabelled images are fewer than "
            "one batch",
        )
    binarize = "dynamic" if config.binarize == "dynamic" else "none"
    loader = SemiSupervisedLoader(
        BatchLoader(
            train_set.subset(unlabelled),
            config.batch_size,
            shuffle=True,
            binarize=binarize,
            seed=config.seed,
            device=device,
        ),
        BatchLoader(
            train_set.subset(labelled),
            min(config.batch_size, config.labels),
            shuffle=True,
            binarize=binarize,
            labels=True,
            seed=config.seed,
            stream="labelled-train",
            device=device,
            shift=config.label_shift,
            rotate=config.label_rotate,
            shear=config.label_shear,
        ),
        labelled_every=config.labelled_every,
    )
    m2 = dict(
        z_dim=config.z_dim,
        num_classes=NUM_CLASSES,
        hidden=config.hidden,
        classifier_hidden=config.classifier_hidden,
        activation=config.activation,
        aux_weight=config.aux_weight,
        beta=config.beta,
        image_shape=train_set.image_shape,
    )
    model_class = "SSVAE" if config.m1 is None else "StackedSSVAE"
    x_dim = train_set.images.shape[1]
    if config.m1 is None:
        model = SSVAE(x_dim=x_dim, classifier=config.classifier, balance=config.balance, **m2)
    elif state is not None:  # resumed: M1's weights are in the checkpoint
        model = StackedSSVAE(state["model_config"]["m1"], **m2)
    else:
        if m1.x_dim != x_dim:
            raise ConfigError("m1", f"{config.m1}: M1 takes {m1.x_dim} pixels, the data {x_dim}")
        model = StackedSSVAE.from_vae(m1, **m2)
    model = model.to(device)
    trainer = Trainer(
        partial(model.model, aux=True),
        partial(model.guide, aux=True),
        lr=config.lr,
        lr_schedule=config.lr_schedule,
        elbo="enum",
        adam_eps=config.adam_eps,
        adam_betas=config.adam_betas,
        skip_norm=config.skip_norm,
        clip_norm=config.clip_norm,
        skip_nonfinite=config.skip_nonfinite,
        validate=False,  # the data were checked when they were loaded
        ranks=ranks,
        # without the auxiliary term a labelled batch leaves the classifier out
        find_unused_parameters=config.aux_weight == 0,
        eval_model=model.model,  # the validation ELBO without the training-only terms
    )
    training = job.open(
        directory, config, model, model_class, trainer, loader, labelled_indices=labelled.tolist()
    )
    valid_x, valid_y = valid.images.to(device), valid.labels.to(device)

    def val_accuracy(trainer: Trainer, metrics: dict) -> None:
        metrics["val_accuracy"] = accuracy(model, valid_x, valid_y)

    quiet = not progress or not ranks.is_main
    # val_elbo: the pure model on unlabelled images, y drawn from q(y|x).
    stopped = _fit(
        training,
        config,
        "val_accuracy",
        val_data=(valid_x,),
        callbacks=[val_accuracy, training.keep_best("val_accuracy")],
        progress=not quiet,
        log=log,
    )
    if not ranks.is_main:  # the test evaluation is rank 0's (the labelled test set is small)
        return TrainResult(None, {}, training)

    # Model selection by validation accuracy, then the test split, once.
    best = load_checkpoint(training.best_path)
    model.load_state_dict(best["model"])
    model.eval()
    test_x, test_y = test.images.to(device), test.labels.to(device)
    report, confusion = semi_supervised_report(
        model,
        test_x,
        test_y,
        NUM_CLASSES,
        num_particles=config.eval_particles,
        likelihood_size=config.likelihood_size,
        validate=False,  # the data were checked when they were loaded
    )
    report.update(
        model=model_class,
        labels=config.labels,
        epochs_trained=trainer.epoch,
        stopped=stopped,
        best_epoch=best["epoch"],
        val_accuracy=max(m["val_accuracy"] for m in trainer.history),
        binarize=config.binarize,
    )
    training.dir.write_json("evaluation.json", report)
    figures = training.dir.figures
    error = 1 - report["test_accuracy"]
    plot_confusion(
        confusion,
        figures / "confusion.png",
        title=f"test error {error:.2%} with {config.labels} labels",
    )
    plot_analogies(
        test_x[:10], model.analogies(test_x[:10]), model.image_shape, figures / "style_content.png"
    )
    plot_curves(trainer.history, figures / "elbo_curves.png")
    return TrainResult(Run.load(training.best_path, device=device), report, training)
