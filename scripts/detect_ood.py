"""Out-of-distribution detection with a trained VAE: does the model tell its own kind of
images from others?

    python scripts/detect_ood.py --checkpoint runs/vae-... --in mnist --ood fashion-mnist

Scores every test image of the in-distribution set (``--in``, default: the data the model was
trained on) and of the OOD set (``--out``: another data set, or ``noise`` / ``flipped``, made
from the in-distribution test images: independent pixels with their mean intensities, or
the images upside down), binarised as in training, by log p̂(x) (K = --num-particles), the
ELBO, the reconstruction and the input-complexity ratio (Serrà et al. 2020); reports AUROC,
AUPRC and FPR at 95% TPR per score; with ``--background RUN`` (a VAE trained by
``train_svi.py --perturb``) also the likelihood ratio against that background model (Ren et
al. 2019). The compressor of the complexity ratio is chosen on the
in-distribution validation images (``--compressor auto``, see ``pyro_vae.apps.ood``), never on
OOD data. Writes ood_<in>_vs_<ood>.json, the per-image scores
ood_<in>_vs_<ood>.npz, and figures/ood_<in>_vs_<ood>_roc.png and _scores.png into the run
directory (or --out, as in every script); an existing set is replaced only with --force.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyro_vae.choices import COMPRESSORS
from pyro_vae.cli import (
    ArgumentParser,
    add_force_arg,
    add_runtime_args,
    apply_threads,
    dataset_name,
    ood_set,
    positive_int,
    resolve_device,
    run,
    shown,
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint file or run directory"
    )
    p.add_argument(
        "--in",
        dest="inside",
        default=None,
        type=dataset_name,
        help="in-distribution test images: a data set's name, a .npy/.npz file or a folder "
        "of images (default: the checkpoint's training data)",
    )
    p.add_argument(
        "--ood",
        dest="outside",
        required=True,
        type=ood_set,
        help="out-of-distribution test images: a data set's name (mnist, fashion-mnist, "
        "digits), a .npy/.npz file or a folder of images, or noise / flipped made from the "
        "in-distribution ones",
    )
    p.add_argument(
        "--images",
        type=positive_int,
        default=None,
        help="use only the first N test images of each set (default: all 10,000)",
    )
    p.add_argument(
        "--num-particles",
        type=positive_int,
        default=1000,
        help="K importance samples per image for log p(x) (default: 1000)",
    )
    p.add_argument(
        "--compressor",
        default="auto",
        choices=("auto", *sorted(COMPRESSORS)),
        help="the generic compressor that measures input complexity; auto: the one whose code "
        "lengths track the model's -log p(x) best on in-distribution validation images "
        "(default: auto)",
    )
    p.add_argument(
        "--select-images",
        type=positive_int,
        default=None,
        help="validation images that choose the compressor with --compressor auto (default: 1000)",
    )
    p.add_argument(
        "--background",
        type=Path,
        default=None,
        help="checkpoint or run directory of a background model (train_svi.py --perturb) on the "
        "same images: adds the likelihood-ratio score log p(x) - log p_background(x)",
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="where data sets live (default: as in training)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the report (default: the run directory)",
    )
    add_force_arg(p)
    add_runtime_args(p)
    return p


def main(args) -> dict:
    # torch and Pyro load here, after the arguments are parsed
    from pyro_vae.config import OODConfig
    from pyro_vae.jobs import score_ood
    from pyro_vae.training.runs import Run

    config = OODConfig(
        ood=args.outside,
        inside=args.inside,
        images=args.images,
        num_particles=args.num_particles,
        compressor=args.compressor,
        select_images=args.select_images,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    apply_threads(args)
    trained = Run.load(args.checkpoint, device=device)
    background = None if args.background is None else Run.load(args.background, device=device)
    result = score_ood(
        trained,
        config,
        args.out or trained.directory,
        background=background,
        force=args.force,
        data_dir=args.data_dir,
        progress=not args.quiet,
        log=None if args.quiet else print,
        flag="--out",
    )
    report = result.report
    if not args.quiet:
        inside, outside, selection = report["in"], report["out"], report["compressor_selection"]
        print(
            f"model trained on {trained.data.dataset}: {inside} vs {outside}, "
            f"{report['images']['in']} + {report['images']['out']} test images, "
            f"K={args.num_particles}"
        )
        if selection is not None:
            table = ", ".join(
                f"{c} {shown(r, '.3f')}" for c, r in selection["correlations"].items()
            )
            print(
                f"  compressor {report['compressor']}: corr(L(x), -log p(x)) on "
                f"{selection['images']} {inside} validation images: {table} (chosen in "
                f"{selection['seconds']:.0f} s)"
            )
        print(f"  {'score':<17} {'AUROC':>6} {'AUPRC':>6} {'FPR@95':>7}   mean in / out (nats)")
        for s, m in report["metrics"].items():
            mean = report["mean_score"][s]
            print(
                f"  {s:<17} {m['auroc']:6.3f} {m['auprc']:6.3f} {m['fpr_at_95_tpr']:7.3f}"
                f"   {mean['in']:9.2f} / {mean['out']:9.2f}"
            )
        for note in report["notes"]:
            print(f"  ({note})")
    # the report's path even under --quiet, as every script prints its result
    print(f"report: {result.written}")
    return report


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(run(main, arguments, grad=False))
