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
from pathlib import Path

from pyro_vae.choices import CLASSIFIERS
from pyro_vae.cli import (
    ArgumentParser,
    add_training_args,
    begin_run,
    hidden_sizes,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    run,
    run_config,
)


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


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    from tqdm import tqdm

    from pyro_vae.config import SSVAEConfig
    from pyro_vae.jobs import train_ssvae

    args, state, out, device, ranks = begin_run(args, build_parser(), "ssvae")
    # every setting checked in one place (a ConfigError names the flag), then one call
    config = SSVAEConfig.from_dict(run_config(args))
    result = train_ssvae(
        config,
        out,
        state=state,
        new=args.resume is None,  # a resumed run may not have finished its first epoch
        device=device,
        ranks=ranks,
        progress=not args.quiet,
        log=None if args.quiet else tqdm.write,
        record=run_config(args, out=out, device=device),
    )
    report = result.report
    if not ranks.is_main:
        return report
    error = 1 - report["test_accuracy"]
    lines = [
        f"test accuracy    {report['test_accuracy']:.2%} (error {error:.2%}) with "
        f"{config.labels} labels, best epoch {report['best_epoch']}",
    ]
    if config.eval_particles:
        lines.append(
            f"test log p(x)    {report['log_px']:.2f} nats/image (y summed out, "
            f"K={config.eval_particles} per class, {report['likelihood_images']} images)"
        )
        lines.append(f"test log p(x,y)  {report['log_pxy']:.2f};  ELBO {report['elbo']:.2f}")
        lines.append(
            f"argmax_y p(x,y)  {report['generative_accuracy']:.2%} accuracy (the model's own "
            "classifier)"
        )
    print("\n".join([*lines, f"run directory    {out}"]))
    return report


if __name__ == "__main__":
    sys.exit(run(main, build_parser().parse_args()))
