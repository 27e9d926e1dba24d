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
import time
from pathlib import Path

from pyro_vae.choices import COMPRESSORS, DATASETS, MADE
from pyro_vae.cli import (
    ArgumentParser,
    UsageError,
    add_force_arg,
    add_runtime_args,
    apply_threads,
    output_dir,
    outputs_for,
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
        choices=DATASETS,
        help="in-distribution test images (default: the checkpoint's training data)",
    )
    p.add_argument(
        "--ood",
        dest="outside",
        required=True,
        choices=(*DATASETS, *MADE),
        help="out-of-distribution test images: a data set, or noise / flipped made from the "
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
    if args.compressor != "auto" and args.select_images is not None:
        raise UsageError("--select-images applies to --compressor auto")
    if args.select_images is not None and args.select_images < 3:
        # a correlation over fewer than three images chooses nothing
        raise UsageError(f"--select-images {args.select_images}: at least 3 images are needed")
    # torch and Pyro load here, after the arguments are parsed
    import torch

    from pyro_vae.apps.ood import (
        choose_compressor,
        detection_metrics,
        log_px_per_image,
        made_images,
        ood_scores,
        roc,
    )
    from pyro_vae.apps.plots import plot_ood_histograms, plot_roc
    from pyro_vae.data import as_dataset, heldout_images
    from pyro_vae.io.checkpoints import resolve_checkpoint
    from pyro_vae.seeding import seed_everything
    from pyro_vae.training.runs import Run

    device = resolve_device(args.device)
    apply_threads(args)
    trained = Run.load(args.checkpoint, device=device)
    model, path, data = trained.model, trained.path, trained.data
    if getattr(model, "likelihood_name", None) != "bernoulli":
        raise UsageError("OOD scores here need a VAE checkpoint with a Bernoulli likelihood")
    if data.binarize == "none":
        raise UsageError("the checkpoint was trained on grey images; OOD scores need binary ones")
    inside_name = args.inside or data.dataset
    if inside_name == args.outside:
        raise UsageError(f"--in and --ood are both {args.outside}: nothing to tell apart")
    background, background_info = None, None
    if args.background is not None:
        if resolve_checkpoint(args.background).resolve() == path.resolve():
            raise UsageError(
                "--background is the model itself: the ratio would be zero for every image"
            )
        other = Run.load(args.background, device=device)
        background = other.model
        if getattr(background, "likelihood_name", None) != "bernoulli":
            raise UsageError("--background needs a VAE checkpoint with a Bernoulli likelihood")
        if background.x_dim != model.x_dim:
            raise UsageError(f"--background has {background.x_dim} pixels, the model {model.x_dim}")
        if other.data.dataset != data.dataset:
            raise UsageError(
                f"--background was trained on {other.data.dataset}, the model on "
                f"{data.dataset}: a likelihood ratio needs the same data"
            )
        weights, own = other.state["model"], trained.state["model"]
        if weights.keys() == own.keys() and all(torch.equal(weights[k], own[k]) for k in own):
            raise UsageError(
                "--background has the model's own weights: the ratio would be zero for every image"
            )
        background_info = {"checkpoint": str(other.path), "perturb": other.config.get("perturb")}
    tag = f"ood_{inside_name}_vs_{args.outside}"
    outputs = outputs_for(
        output_dir(args.out or trained.directory),
        args,
        f"{tag}.json",
        f"{tag}.npz",
        protect=(path,),
    )
    seed_everything(args.seed)
    data_dir = args.data_dir or data.data_dir
    binarize, seed = data.binarize, data.seed
    inside = heldout_images(inside_name, data_dir, "test", binarize, seed, args.images)
    if args.outside in MADE:
        outside = as_dataset(made_images(args.outside, inside, args.seed)).images
    else:
        outside = heldout_images(args.outside, data_dir, "test", binarize, seed, args.images)
    for name, x in ((inside_name, inside), (args.outside, outside)):
        if x.shape[1] != model.x_dim:
            raise UsageError(f"the model expects {model.x_dim} pixels, {name} has {x.shape[1]}")

    progress = not args.quiet
    compressor, selection = args.compressor, None
    if compressor == "auto":
        valid = heldout_images(
            inside_name,
            data_dir,
            "valid",
            binarize,
            seed,
            args.select_images or 1000,
            "--select-images",
        )
        if progress:
            print(
                f"choosing the compressor: log p(x) of {len(valid)} {inside_name} validation "
                f"images at K={args.num_particles} (--compressor NAME skips this; "
                "--select-images sets how many)"
            )
        chose_from = time.perf_counter()
        log_px = log_px_per_image(
            model,
            valid.to(device),
            num_particles=args.num_particles,
            seed=args.seed + 2,
            progress=progress,
        )
        compressor, correlations = choose_compressor(log_px, valid, model.image_shape)
        selection = {
            "split": "valid",
            "images": len(valid),
            "correlations": correlations,
            "seconds": time.perf_counter() - chose_from,
        }
    options = {
        "num_particles": args.num_particles,
        "compressor": compressor,
        "background": background,
    }
    scores_in = ood_scores(model, inside.to(device), seed=args.seed, progress=progress, **options)
    scores_out = ood_scores(
        model, outside.to(device), seed=args.seed + 1, progress=progress, **options
    )
    names = list(scores_in)  # SCORES, and the background ratio when a background is given
    # LLR^{>1} needs q(z_{>1} | x), which the bottom-up guide has not: say so
    llr_note = None
    if getattr(model, "guide_kind", None) == "bottom-up":
        llr_note = (
            "llr_above_1 not scored: the bottom-up guide draws z2 from z1 and has no q(z2 | x) "
            "(train with --guide deterministic or top-down for it)"
        )
    metrics = {s: detection_metrics(scores_in[s], scores_out[s]) for s in names}
    report = {
        "in": inside_name,
        "out": args.outside,
        "images": {"in": len(inside), "out": len(outside)},
        "num_particles": args.num_particles,
        "compressor": compressor,
        "compressor_selection": selection,
        "background": background_info,
        "notes": [llr_note] if llr_note else [],
        "binarize": binarize,
        "checkpoint": str(path),
        "metrics": metrics,
        "mean_score": {
            s: {"in": float(scores_in[s].mean()), "out": float(scores_out[s].mean())} for s in names
        },
        "positive_class": "out-of-distribution images; detector = -score",
        "units": "scores in nats per image, higher = more like the training data",
    }
    curves = {s: (*roc(scores_in[s], scores_out[s]), metrics[s]["auroc"]) for s in names}
    title = f"model trained on {data.dataset}: {inside_name} vs {args.outside}"
    arrays = {f"{s}_in": scores_in[s].numpy() for s in names}
    arrays |= {f"{s}_out": scores_out[s].numpy() for s in names}
    with outputs:
        outputs.write_json(f"{tag}.json", report)
        outputs.write_bytes(f"{tag}.npz", _npz(arrays))
        plot_roc(curves, outputs.path(f"figures/{tag}_roc.png"), title=title)
        plot_ood_histograms(
            scores_in,
            scores_out,
            outputs.path(f"figures/{tag}_scores.png"),
            labels=(inside_name, args.outside),
        )
        outputs.commit()
    if not args.quiet:
        print(f"{title}, {len(inside)} + {len(outside)} test images, K={args.num_particles}")
        if selection is not None:
            table = ", ".join(
                f"{c} {shown(r, '.3f')}" for c, r in selection["correlations"].items()
            )
            print(
                f"  compressor {compressor}: corr(L(x), -log p(x)) on {len(valid)} "
                f"{inside_name} validation images: {table} (chosen in "
                f"{selection['seconds']:.0f} s)"
            )
        print(f"  {'score':<17} {'AUROC':>6} {'AUPRC':>6} {'FPR@95':>7}   mean in / out (nats)")
        for s in names:
            m, mean = metrics[s], report["mean_score"][s]
            print(
                f"  {s:<17} {m['auroc']:6.3f} {m['auprc']:6.3f} {m['fpr_at_95_tpr']:7.3f}"
                f"   {mean['in']:9.2f} / {mean['out']:9.2f}"
            )
        if llr_note:
            print(f"  ({llr_note})")
    # the report's path even under --quiet, as every script prints its result
    print(f"report: {outputs.directory / (tag + '.json')}")
    return report


def _npz(arrays: dict) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


if __name__ == "__main__":
    arguments = build_parser().parse_args()
    sys.exit(run(main, arguments, grad=False))
