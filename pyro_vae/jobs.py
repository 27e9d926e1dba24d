"""One library call per job: ``train_vae(config, directory)`` trains a VAE or a hierarchical VAE
from a ``TrainConfig`` into a run directory (checkpoint every epoch, exact resume, the test
evaluation and the standard figures) and returns the trained run; ``scripts/train_svi.py``
only parses flags into the config, calls it and prints.

    from pyro_vae import TrainConfig, train_vae

    result = train_vae(TrainConfig(epochs=5, train_size=5000), "runs/small")
    print(result.report["elbo"], result.run.epoch)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pyro_vae.checks import ConfigError
from pyro_vae.config import TrainConfig
from pyro_vae.data import BatchLoader, training_splits
from pyro_vae.distributed import Ranks, ShardedLoader, sharded_log_px
from pyro_vae.models import VAE, HierarchicalVAE
from pyro_vae.plots import save_vae_figures
from pyro_vae.runs import Run, TrainingRun
from pyro_vae.schedules import warmup_epochs
from pyro_vae.seeding import child_seed, seed_everything
from pyro_vae.train import Trainer

__all__ = ["TrainResult", "build_model", "curve_label", "train_vae"]


def build_model(config: TrainConfig, x_dim: int, image_shape) -> tuple[nn.Module, str]:
    """(model, its class name) for ``config``: the one-layer VAE or the hierarchical one."""
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
    return HierarchicalVAE(**layers, **common), "HierarchicalVAE"


def curve_label(config: TrainConfig) -> str:
    """What the training curve shows: the objective the run optimised."""
    if config.elbo in ("iwae", "dreg"):
        label = f"training bound L_{config.num_particles} ({config.elbo})"
    else:
        label = "training ELBO"
    return label + (", KL weighted" if config.kl_warmup or config.beta != 1 else "")


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
    and log p(x) at ``config.eval_particles``) and the figures.  ``record`` is what
    ``config.json`` holds (default: the config, the device and the model); on several
    processes (``ranks``) rank 0 alone writes, and the other ranks get ``run=None``.

    Settings the data cannot satisfy (a batch larger than the training set) are a
    ``ConfigError`` naming them, before anything is written.
    """
    device = torch.device(device)
    ranks = ranks or Ranks()
    # same seed, same run (a resumed run then restores the generators it saved)
    seed_everything(config.seed if ranks.is_main else child_seed(config.seed, f"rank-{ranks.rank}"))
    train_set, valid, test = training_splits(
        config.dataset,
        config.data_dir,
        likelihood=config.likelihood,
        binarize=config.binarize,
        seed=config.seed,
        train_size=config.train_size,
        eval_size=config.eval_size,
    )
    if config.elbo == "jit" and len(train_set) < config.batch_size:
        raise ConfigError(
            "batch_size",
            f"elbo jit needs at least one full batch: {len(train_set)} < {config.batch_size}",
        )
    if config.batch_size > len(train_set) and state is None:
        raise ConfigError(
            "batch_size", f"{config.batch_size} is more than the {len(train_set)} training images"
        )
    model, model_class = build_model(config, train_set.images.shape[1], train_set.image_shape)
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
    saved = dict(record) if record is not None else {**config.to_dict(), "device": str(device)}
    saved |= {"model_class": model_class, "model_config": model.config()}
    training = TrainingRun.open(
        directory,
        model=model,
        trainer=trainer,
        loader=ShardedLoader(loader, ranks) if ranks.active else loader,
        config=saved,
        model_class=model_class,
        state=state,
        new=new,
        log=log,
    )
    quiet = not progress or not ranks.is_main
    training.fit(config.epochs, val_data=(valid.images.to(device),), progress=not quiet)
    model.eval()  # batch normalisation, if any, on its running statistics from here on

    test_x = test.images.to(device)
    report: dict[str, Any] = {
        "binarize": config.binarize,
        "dataset": config.dataset,
        "units": "nats per image",
    }
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
    # the run as a later job reads it: the checkpoint the last epoch wrote
    return TrainResult(Run.load(training.dir.path, device=device), report, training)
