"""Train the semi-supervised VAE (Kingma et al. 2014, M2) on MNIST with few labels.

    python scripts/train_ssvae.py --labels 100
    python scripts/train_ssvae.py --help

Unlabelled images sum over the ten classes exactly (TraceEnum_ELBO with parallel
enumeration); labelled images add alpha * log q(y|x). The validation split chooses the epoch
whose weights are kept (best.pt); the test split is used once, at the end. Writes
config.json, metrics.jsonl, checkpoint.pt, best.pt, evaluation.json and figures/*.png
(confusion matrix, style and content) into --out (default runs/ssvae-<timestamp>).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae.checkpoints import default_run_dir, load_checkpoint, save_checkpoint
from pyro_vae.cli import (
    ArgumentParser,
    UsageError,
    add_data_args,
    add_resume_arg,
    add_runtime_args,
    check_output_dir,
    hidden_sizes,
    merge_resumed_args,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    resolve_device,
    resume_state,
    run,
    run_config,
)
from pyro_vae.data import (
    BatchLoader,
    SemiSupervisedLoader,
    binarize_static,
    check_images,
    heldout_split,
    labelled_subset,
    load_dataset,
)
from pyro_vae.evaluate import estimate_log_px, estimate_log_px_over_labels
from pyro_vae.models import SSVAE
from pyro_vae.nets import ACTIVATIONS
from pyro_vae.plots import plot_analogies, plot_confusion, plot_curves
from pyro_vae.runs import TrainingRun
from pyro_vae.train import Trainer, seed_everything

NUM_CLASSES = 10


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--labels",
        type=positive_int,
        default=100,
        help="labelled training images, class-balanced (default: 100)",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=30,
        help="passes over the unlabelled images (default: 30)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=200, help="images per step (default: 200)"
    )
    p.add_argument(
        "--labelled-every",
        type=positive_int,
        default=5,
        help="one labelled batch after every N unlabelled ones (default: 5)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="Adam learning rate (default: 1e-3)"
    )
    p.add_argument("--z-dim", type=positive_int, default=50, help="latent dimensions (default: 50)")
    p.add_argument(
        "--hidden",
        type=hidden_sizes,
        default=(500,),
        help="encoder/decoder hidden sizes (default: 500)",
    )
    p.add_argument(
        "--classifier-hidden",
        type=hidden_sizes,
        default=(500,),
        help="classifier hidden sizes (default: 500)",
    )
    p.add_argument(
        "--activation",
        default="softplus",
        choices=sorted(ACTIVATIONS),
        help="hidden activation (default: softplus)",
    )
    p.add_argument(
        "--aux-weight",
        type=nonnegative_float,
        default=50.0,
        help="alpha, the weight of log q(y|x) on labelled data (default: 50)",
    )
    p.add_argument(
        "--clip-norm",
        type=positive_float,
        default=None,
        help="clip the gradient norm to this value (default: off)",
    )
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip (and count) non-finite steps instead of stopping",
    )
    p.add_argument(
        "--eval-particles",
        type=nonnegative_int,
        default=100,
        help="K per class for the test log p(x) (0: skip; default: 100)",
    )
    p.add_argument(
        "--eval-size",
        type=positive_int,
        default=None,
        help="use only the first N validation and test images",
    )
    p.add_argument(
        "--train-size", type=positive_int, default=None, help="use only the first N training images"
    )
    p.add_argument(
        "--likelihood-size",
        type=positive_int,
        default=1000,
        help="test images scored for log p(x) (default: 1000)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="run directory (default: runs/ssvae-<timestamp>)"
    )
    add_resume_arg(p)
    add_data_args(p)
    add_runtime_args(p)
    return p


@torch.no_grad()
def accuracy(model: SSVAE, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    predicted = torch.cat([model.classify(x[i : i + batch]) for i in range(0, len(x), batch)])
    return float((predicted == y).double().mean())


def main(args) -> dict:
    state, out = None, None
    if args.resume is not None:
        state, config = resume_state(args.resume)
        args = merge_resumed_args(build_parser(), args, config)
        out = args.out
    device = resolve_device(args.device)
    if out is None:
        out = check_output_dir(args.out or default_run_dir("ssvae"))
    seed_everything(args.seed)

    splits = load_dataset(args.dataset, args.data_dir)
    splits = {
        "train": splits["train"].subset(slice(0, args.train_size)),
        "valid": splits["valid"].subset(slice(0, args.eval_size)),
        "test": splits["test"].subset(slice(0, args.eval_size)),
    }
    for name, data in splits.items():
        check_images(data.images, "bernoulli", args.binarize, name)
    train = splits["train"]
    if args.binarize == "static":
        train = binarize_static(train, args.seed)
    labelled_idx, unlabelled_idx = labelled_subset(train, args.labels, args.seed, NUM_CLASSES)
    if len(unlabelled_idx) < args.batch_size:
        raise UsageError(
            f"{len(unlabelled_idx)} unlabelled images are fewer than one batch of {args.batch_size}"
        )
    valid = heldout_split(splits, "valid", args.binarize, args.seed)
    test = heldout_split(splits, "test", args.binarize, args.seed)
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
            seed=args.seed + 2,
            device=device,
        ),
        labelled_every=args.labelled_every,
    )

    pyro.clear_param_store()
    model = SSVAE(
        x_dim=train.images.shape[1],
        z_dim=args.z_dim,
        num_classes=NUM_CLASSES,
        hidden=args.hidden,
        classifier_hidden=args.classifier_hidden,
        activation=args.activation,
        aux_weight=args.aux_weight,
        image_shape=train.image_shape,
    ).to(device)
    trainer = Trainer(
        partial(model.model, aux=True),
        partial(model.guide, aux=True),
        lr=args.lr,
        elbo="enum",
        clip_norm=args.clip_norm,
        skip_nonfinite=args.skip_nonfinite,
        validate=False,  # data checked above
    )
    config = run_config(
        args,
        out=out,
        model_class="SSVAE",
        model_config=model.config(),
        device=device,
        labelled_indices=labelled_idx.tolist(),
    )
    run_ = TrainingRun(
        out,
        model=model,
        trainer=trainer,
        loader=loader,
        config=config,
        model_class="SSVAE",
        log=None if args.quiet else tqdm.write,
    )
    best_path = Path(out) / "best.pt"
    valid_x, valid_y = valid.images.to(device), valid.labels.to(device)

    def on_epoch(trainer: Trainer, metrics: dict) -> None:
        metrics["val_accuracy"] = accuracy(model, valid_x, valid_y)
        best = max(m["val_accuracy"] for m in trainer.history)
        if metrics["val_accuracy"] >= best:
            save_checkpoint(
                best_path,
                {
                    "model_class": "SSVAE",
                    "model_config": model.config(),
                    "model": model.state_dict(),
                    "config": config,
                    "epoch": metrics["epoch"],
                },
            )

    if state is None:
        run_.start()
    else:
        run_.restore(state)
        if not args.quiet:
            print(f"resuming {out} after epoch {trainer.epoch}, step {trainer.step_count}")
    # val_elbo: unlabelled, so the auxiliary term is absent and y is drawn from q(y|x).
    run_.fit(args.epochs, val_data=(valid_x,), callbacks=[on_epoch], progress=not args.quiet)

    # Model selection by validation accuracy, then the test split, once.
    best = load_checkpoint(best_path)
    model.load_state_dict(best["model"])
    test_x, test_y = test.images.to(device), test.labels.to(device)
    predicted = torch.cat(
        [model.classify(test_x[i : i + 2000]) for i in range(0, len(test_x), 2000)]
    )
    confusion = torch.bincount(test_y * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2).reshape(
        NUM_CLASSES, NUM_CLASSES
    )
    test_accuracy = float((predicted == test_y).double().mean())
    report = {
        "labels": args.labels,
        "best_epoch": best["epoch"],
        "val_accuracy": max(m["val_accuracy"] for m in trainer.history),
        "test_accuracy": test_accuracy,
        "test_error": 1 - test_accuracy,
        "binarize": args.binarize,
        "units": "nats per image",
    }
    n_lik = min(args.likelihood_size, len(test_x))
    if args.eval_particles:
        x_lik, y_lik = test_x[:n_lik], test_y[:n_lik]
        log_px, _ = estimate_log_px_over_labels(
            model.model,
            model.guide,
            x_lik,
            NUM_CLASSES,
            num_particles=args.eval_particles,
            validate=False,
        )
        joint = estimate_log_px(
            model.model,
            model.guide,
            x_lik,
            y_lik,
            num_particles=args.eval_particles,
            psis=False,
            ks=(),
            validate=False,
        )
        elbo = estimate_log_px(
            model.model,
            model.guide,
            x_lik,
            num_particles=args.eval_particles,
            psis=False,
            ks=(),
            validate=False,
        )
        report.update(
            likelihood_images=n_lik,
            log_px=float(log_px.mean()),
            log_px_sem=float(log_px.std() / n_lik**0.5) if n_lik > 1 else float("nan"),
            log_pxy=float(joint.log_px.mean()),
            elbo=float(elbo.elbo.mean()),
        )
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
            f"test log p(x)    {report['log_px']:.2f} nats/image (y summed out, K={args.eval_particles} per class, {n_lik} images)"
        )
        lines.append(f"test log p(x,y)  {report['log_pxy']:.2f};  ELBO {report['elbo']:.2f}")
    print("\n".join([*lines, f"run directory    {out}"]))
    return report


if __name__ == "__main__":
    sys.exit(run(main, build_parser().parse_args()))
