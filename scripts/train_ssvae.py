"""Train the semi-supervised VAE (Kingma et al. 2014, M2) on MNIST with few labels.

    python scripts/train_ssvae.py --labels 100
    python scripts/train_ssvae.py --help

Unlabelled images sum over the ten classes exactly (TraceEnum_ELBO with parallel
enumeration); labelled images add alpha * log q(y|x). With ``--m1 RUN`` (a VAE trained by
train_svi.py) the model is the stacked M1+M2: M2 learns on that VAE's latent codes, drawn
afresh from q(z1|x) at every step, and classifies them (``StackedSSVAE``).

The validation split chooses the epoch whose weights are kept (best.pt) and, with
``--patience``, when training stops; ``--max-minutes`` caps the training time. The test split
is used once, at the end. Writes
config.json, metrics.jsonl, checkpoint.pt, best.pt, evaluation.json and figures/*.png
(confusion matrix, style and content) into --out (default runs/ssvae-<timestamp>).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_vae.choices import CLASSIFIERS
from pyro_vae.cli import (
    ArgumentParser,
    UsageError,
    add_training_args,
    begin_run,
    hidden_sizes,
    nonnegative_float,
    nonnegative_int,
    optimizer_options,
    positive_float,
    positive_int,
    run,
    run_config,
)

if TYPE_CHECKING:
    import torch

    from pyro_vae.models import SSVAE, VAE, StackedSSVAE

NUM_CLASSES = 10


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_args(
        p,
        name="ssvae",
        epochs=30,
        batch_size=200,
        lr=1e-3,
        hidden=(500,),
        activation="softplus",
        eval_particles=100,
        eval_particles_help="K per class for the test log p(x) (0: skip; default: 100)",
    )
    p.add_argument(
        "--labels",
        type=positive_int,
        default=100,
        help="labelled training images, class-balanced (default: 100)",
    )
    p.add_argument(
        "--labelled-every",
        type=positive_int,
        default=5,
        help="one labelled batch after every N unlabelled ones (default: 5)",
    )
    p.add_argument(
        "--label-shift",
        type=nonnegative_int,
        default=0,
        help="translate each labelled image by up to N pixels along each axis, afresh every "
        "time it is used (default: 0, off)",
    )
    p.add_argument(
        "--label-rotate",
        type=nonnegative_float,
        default=0.0,
        help="rotate each labelled image by up to DEG degrees (default: 0, off)",
    )
    p.add_argument(
        "--label-shear",
        type=nonnegative_float,
        default=0.0,
        help="shear (slant) each labelled image by up to DEG degrees (default: 0, off)",
    )
    p.add_argument(
        "--classifier-hidden",
        type=hidden_sizes,
        default=(500,),
        help="classifier hidden sizes (default: 500)",
    )
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default="mlp",
        help="q(y|x): an MLP on the pixels, or two 5x5 convolutions before it (default: mlp)",
    )
    p.add_argument(
        "--aux-weight",
        type=nonnegative_float,
        default=50.0,
        help="alpha, the weight of log q(y|x) on labelled data (default: 50)",
    )
    p.add_argument(
        "--beta",
        type=positive_float,
        default=3.0,
        help="weight of KL(q(z|x,y) || p(z)); above 1 the decoder uses y (default: 3)",
    )
    p.add_argument(
        "--balance",
        type=nonnegative_float,
        default=0.0,
        help="gamma, the weight of KL(batch mean of q(y|x) || p(y)) on unlabelled batches "
        "(default: 0, off)",
    )
    p.add_argument(
        "--m1",
        type=Path,
        default=None,
        help="a trained VAE (run directory or checkpoint): train M1+M2 on its codes",
    )
    p.add_argument(
        "--patience",
        type=nonnegative_int,
        default=0,
        help="stop after N epochs without a better validation accuracy (default: 0, off)",
    )
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        default=None,
        help="stop once the epochs so far took this long (default: no limit)",
    )
    p.add_argument(
        "--likelihood-size",
        type=positive_int,
        default=1000,
        help="test images scored for log p(x) (default: 1000)",
    )
    return p


def load_m1(path: Path, dataset: str) -> VAE:
    """The trained VAE at ``path``, checked to be one M2 can stand on."""
    from pyro_vae.models import VAE
    from pyro_vae.runs import Run

    m1 = Run.load(path)
    vae = m1.model
    if not isinstance(vae, VAE):
        raise UsageError(f"--m1 {path}: holds a {type(vae).__name__}, not a VAE")
    if vae.likelihood_name != "bernoulli" or m1.data.binarize == "none":
        raise UsageError(f"--m1 {path}: M1 must be a Bernoulli VAE trained on binary images")
    if m1.data.dataset != dataset:
        raise UsageError(f"--m1 {path}: trained on {m1.data.dataset}, not on --dataset {dataset}")
    return vae


def accuracy(model: SSVAE | StackedSSVAE, x: torch.Tensor, y: torch.Tensor) -> float:
    from pyro_vae.evaluate import predict_labels

    return float((predict_labels(model.classify, x) == y).double().mean())


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    from tqdm import tqdm

    from pyro_vae.checkpoints import load_checkpoint
    from pyro_vae.data import (
        BatchLoader,
        DataError,
        SemiSupervisedLoader,
        labelled_subset,
        training_splits,
    )
    from pyro_vae.distributed import ShardedLoader
    from pyro_vae.evaluate import semi_supervised_report
    from pyro_vae.models import SSVAE, StackedSSVAE
    from pyro_vae.plots import plot_analogies, plot_confusion, plot_curves
    from pyro_vae.runs import TrainingRun
    from pyro_vae.train import EarlyStopping, Trainer

    args, state, out, device, ranks = begin_run(args, build_parser(), "ssvae")
    if args.m1 is not None and args.balance > 0:
        raise UsageError("--balance is for M2 on pixels; the stack does not take it")
    if args.m1 is not None and args.classifier != "mlp":
        raise UsageError(
            "--classifier conv classifies pixels; with --m1 q(y|z1) is an MLP on codes"
        )
    # M1 is checked before the data load; a resumed run has its weights in the checkpoint
    m1 = load_m1(args.m1, args.dataset) if args.m1 is not None and state is None else None
    train, valid, test = training_splits(
        args.dataset,
        args.data_dir,
        likelihood="bernoulli",
        binarize=args.binarize,
        seed=args.seed,
        train_size=args.train_size,
        eval_size=args.eval_size,
    )
    try:
        labelled_idx, unlabelled_idx = labelled_subset(train, args.labels, args.seed, NUM_CLASSES)
    except DataError as e:  # the flags that chose these numbers
        raise UsageError(f"--labels {args.labels} (of --train-size images): {e}") from None
    if len(unlabelled_idx) < args.batch_size:
        raise UsageError(
            f"--batch-size {args.batch_size}: {len(unlabelled_idx)} unlabelled images are "
            "fewer than one batch"
        )
    binarize = "dynamic" if args.binarize == "dynamic" else "none"
    loader = SemiSupervisedLoader(
        BatchLoader(
            train.subset(unlabelled_idx),
            args.batch_size,
            shuffle=True,
            binarize=binarize,
            seed=args.seed,
            device=device,
        ),
        BatchLoader(
            train.subset(labelled_idx),
            min(args.batch_size, args.labels),
            shuffle=True,
            binarize=binarize,
            labels=True,
            seed=args.seed,
            stream="labelled-train",
            device=device,
            shift=args.label_shift,
            rotate=args.label_rotate,
            shear=args.label_shear,
        ),
        labelled_every=args.labelled_every,
    )

    m2 = dict(
        z_dim=args.z_dim,
        num_classes=NUM_CLASSES,
        hidden=args.hidden,
        classifier_hidden=args.classifier_hidden,
        activation=args.activation,
        aux_weight=args.aux_weight,
        beta=args.beta,
        image_shape=train.image_shape,
    )
    model_class = "SSVAE" if args.m1 is None else "StackedSSVAE"
    if args.m1 is None:
        model = SSVAE(
            x_dim=train.images.shape[1], classifier=args.classifier, balance=args.balance, **m2
        )
    elif state is not None:  # resumed: M1's weights are in the checkpoint
        model = StackedSSVAE(state["model_config"]["m1"], **m2)
    else:
        if m1.x_dim != train.images.shape[1]:
            raise UsageError(
                f"--m1 {args.m1}: M1 takes {m1.x_dim} pixels, the data have {train.images.shape[1]}"
            )
        model = StackedSSVAE.from_vae(m1, **m2)
    model = model.to(device)
    trainer = Trainer(
        partial(model.model, aux=True),
        partial(model.guide, aux=True),
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        elbo="enum",
        **optimizer_options(args),
        validate=False,  # data checked above
        ranks=ranks,
        # without the auxiliary term a labelled batch leaves the classifier out
        find_unused_parameters=args.aux_weight == 0,
        eval_model=model.model,  # the validation ELBO without the training-only terms
    )
    config = run_config(
        args,
        out=out,
        model_class=model_class,
        model_config=model.config(),
        device=device,
        labelled_indices=labelled_idx.tolist(),
    )
    run_ = TrainingRun.open(
        out,
        model=model,
        trainer=trainer,
        loader=ShardedLoader(loader, ranks) if ranks.active else loader,
        config=config,
        model_class=model_class,
        state=state,
        new=args.resume is None,  # a resumed run may not have finished its first epoch
        log=None if args.quiet else tqdm.write,
    )
    valid_x, valid_y = valid.images.to(device), valid.labels.to(device)

    def val_accuracy(trainer: Trainer, metrics: dict) -> None:
        metrics["val_accuracy"] = accuracy(model, valid_x, valid_y)

    quiet = args.quiet or not ranks.is_main
    stopper = EarlyStopping(
        "val_accuracy",
        patience=args.patience,
        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes,
    )
    stopped = stopper.reason(trainer.history)  # a resumed run that had stopped already
    if stopped is None and trainer.epoch < args.epochs:
        # val_elbo: the pure model on unlabelled images, y drawn from q(y|x).
        run_.fit(
            args.epochs,
            val_data=(valid_x,),
            callbacks=[val_accuracy, run_.keep_best("val_accuracy")],
            stop_rules=[stopper],
            progress=not quiet,
        )
        stopped = trainer.stop_reason
    if stopped is not None and not quiet:
        print(f"stopped after epoch {trainer.epoch}: {stopped}")
    if not ranks.is_main:  # the test evaluation is rank 0's (the labelled test set is small)
        return {}

    # Model selection by validation accuracy, then the test split, once.
    best = load_checkpoint(run_.best_path)
    model.load_state_dict(best["model"])
    test_x, test_y = test.images.to(device), test.labels.to(device)
    report, confusion = semi_supervised_report(
        model,
        test_x,
        test_y,
        NUM_CLASSES,
        num_particles=args.eval_particles,
        likelihood_size=args.likelihood_size,
        validate=False,  # data checked above
    )
    report.update(
        model=model_class,
        labels=args.labels,
        epochs_trained=trainer.epoch,
        stopped=stopped,
        best_epoch=best["epoch"],
        val_accuracy=max(m["val_accuracy"] for m in trainer.history),
        binarize=args.binarize,
    )
    test_accuracy = report["test_accuracy"]
    run_.dir.write_json("evaluation.json", report)
    figures = run_.dir.figures
    plot_confusion(
        confusion,
        figures / "confusion.png",
        title=f"test error {1 - test_accuracy:.2%} with {args.labels} labels",
    )
    plot_analogies(
        test_x[:10], model.analogies(test_x[:10]), model.image_shape, figures / "style_content.png"
    )
    plot_curves(trainer.history, figures / "elbo_curves.png")

    lines = [
        f"test accuracy    {test_accuracy:.2%} (error {1 - test_accuracy:.2%}) with {args.labels} labels, best epoch {best['epoch']}",
    ]
    if args.eval_particles:
        lines.append(
            f"test log p(x)    {report['log_px']:.2f} nats/image (y summed out, K={args.eval_particles} per class, {report['likelihood_images']} images)"
        )
        lines.append(f"test log p(x,y)  {report['log_pxy']:.2f};  ELBO {report['elbo']:.2f}")
        lines.append(
            f"argmax_y p(x,y)  {report['generative_accuracy']:.2%} accuracy (the model's own classifier)"
        )
    print("\n".join([*lines, f"run directory    {out}"]))
    return report


if __name__ == "__main__":
    sys.exit(run(main, build_parser().parse_args()))
