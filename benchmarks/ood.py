"""Out-of-distribution detection in both directions, MNIST and Fashion-MNIST, with every
score, and the complexity ratio with every compressor.

    python benchmarks/ood.py --mnist runs/vae-... --fashion runs/fashion-... --images 10000

For each model (trained on one data set) the test images of its own data set are the
in-distribution set and those of the other the OOD set, binarised as in training. Scores as
in ``scripts/detect_ood.py`` (K = --num-particles), the complexity ratio with the compressor
chosen on the model's own validation images (``choose_compressor``); the ratio is also
reported for each compressor, with its validation correlation, to show how much the choice
matters and whether the validation criterion ranks them as the OOD test would; and, on the
first --made-images test images, every compressor against the ``flipped`` and ``noise``
sets made from them (shifts the criterion was not written on). Prints a table and writes ``results.json`` into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from pyro_vae import OODConfig, Run, RunData, score_ood
from pyro_vae.apps.ood import (
    COMPRESSORS,
    MADE,
    SCORES,
    complexity_bits,
    detection_metrics,
    log_px_per_image,
    made_images,
)
from pyro_vae.data import heldout_images


def images(name: str, data: RunData, split: str, n: int | None) -> torch.Tensor:
    """The first ``n`` images of data set ``name``'s split, prepared as a run's own."""
    return heldout_images(name, data.data_dir, split, data.binarize, data.seed, n)


def made_pairs(vae, inside: torch.Tensor, num_particles: int) -> dict:
    """AUROC of log p̂(x) and of the complexity ratio with each compressor, ``inside``
    against the ``flipped`` and ``noise`` sets made from it: how the compressor choice fares
    on shifts other than the one it is usually tuned on."""

    lp_in = log_px_per_image(vae, inside, num_particles=num_particles, seed=0)
    result = {}
    for kind in MADE:
        outside = made_images(kind, inside, 0)
        lp_out = log_px_per_image(vae, outside, num_particles=num_particles, seed=1)
        auroc = {"log_px": detection_metrics(lp_in, lp_out)["auroc"]}
        for name in COMPRESSORS:
            b_in = complexity_bits(inside, vae.image_shape, name) * math.log(2)
            b_out = complexity_bits(outside, vae.image_shape, name) * math.log(2)
            auroc[name] = detection_metrics(lp_in + b_in, lp_out + b_out)["auroc"]
        result[kind] = auroc
        print(f"  vs {kind}: " + ", ".join(f"{k} {v:.3f}" for k, v in auroc.items()))
    return result


def main(args) -> int:
    torch.set_num_threads(args.threads)
    rows = []
    start = time.perf_counter()
    for run, own, other in (
        (args.mnist, "mnist", "fashion-mnist"),
        (args.fashion, "fashion-mnist", "mnist"),
    ):
        trained = Run.load(run)
        vae, config = trained.model, trained.data
        if config.dataset != own:
            print(f"error: {run} was trained on {config.dataset}, not {own}", file=sys.stderr)
            return 2
        # the scores as scripts/detect_ood.py gives them (one call): the compressor chosen on
        # the in-distribution validation images only (seeds: 0 inside, 1 outside, 2 choosing)
        scored = score_ood(
            trained,
            OODConfig(
                ood=other,
                images=args.images,
                num_particles=args.num_particles,
                select_images=args.select_images,
            ),
        )
        report, s_in, s_out = scored.report, scored.result["in"], scored.result["out"]
        inside = images(own, config, "test", args.images)
        outside = images(other, config, "test", args.images)
        chosen = report["compressor"]
        correlations = report["compressor_selection"]["correlations"]
        row = {
            "model": own,
            "ood": other,
            "images": [len(inside), len(outside)],
            "num_particles": args.num_particles,
            "mean_log_px": [float(s_in["log_px"].mean()), float(s_out["log_px"].mean())],
            "compressor": chosen,
            "compressor_selection": {
                k: report["compressor_selection"][k] for k in ("split", "images", "correlations")
            },
            "metrics": {s: report["metrics"][s] for s in SCORES},
            "complexity_ratio_by_compressor": {},
        }
        for name in COMPRESSORS:
            bits_in = complexity_bits(inside, vae.image_shape, name)
            bits_out = complexity_bits(outside, vae.image_shape, name)
            row["complexity_ratio_by_compressor"][name] = detection_metrics(
                s_in["log_px"] + bits_in * math.log(2), s_out["log_px"] + bits_out * math.log(2)
            )
        if args.made_images:
            row["made"] = made_pairs(vae, inside[: args.made_images], args.num_particles)
        rows.append(row)
        print(f"model trained on {own}, OOD {other}: {len(inside)} + {len(outside)} test images")
        print(
            f"  mean log p(x): {row['mean_log_px'][0]:.2f} (own) / {row['mean_log_px'][1]:.2f} (other)"
        )
        for s, m in row["metrics"].items():
            print(
                f"  {s:<17} AUROC {m['auroc']:.4f}  AUPRC {m['auprc']:.4f}  FPR@95 {m['fpr_at_95_tpr']:.4f}"
            )
        for c, m in row["complexity_ratio_by_compressor"].items():
            r = correlations[c]
            mark = "  <- chosen on validation" if c == chosen else ""
            print(f"  complexity ratio, {c:<5} AUROC {m['auroc']:.4f}  (valid corr {r:.3f}){mark}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"({time.perf_counter() - start:.0f} s, {args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", required=True, help="run directory of a model trained on MNIST")
    p.add_argument("--fashion", required=True, help="run directory of a Fashion-MNIST model")
    p.add_argument("--images", type=int, default=None, help="test images per set (default: all)")
    p.add_argument("--num-particles", type=int, default=1000)
    p.add_argument(
        "--select-images", type=int, default=1000, help="validation images choosing the compressor"
    )
    p.add_argument(
        "--made-images",
        type=int,
        default=2000,
        help="test images scored against their flipped and noise versions (0: skip)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ood")
    sys.exit(main(p.parse_args()))
