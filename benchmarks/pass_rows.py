"""The evaluator's pass size: time per image of ``estimate_log_px`` at K particles with
several ``max_rows`` (particles x images per forward pass of the model), on the same
weights, images and seed; the numbers must agree bit for bit (``max_rows`` is memory only).

``auto`` is ``rows_per_pass(model)``, the default the library uses (fewer rows for networks
with large per-row working memory, the convolutional ones).  Blocks of images alternate
between the settings so that machine load affects all alike.

    python benchmarks/pass_rows.py --checkpoint runs/conv8 --num-particles 1000 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from _machine import Quietness

from pyro_vae import Run, estimate_log_px
from pyro_vae.choices import DEFAULT_MAX_ROWS
from pyro_vae.inference.evaluate import rows_per_pass


def main(args) -> None:
    torch.set_num_threads(args.threads)
    run = Run.load(args.checkpoint)
    x = run.heldout("test", args.eval_size).images
    auto = rows_per_pass(run.model)
    settings = {str(r) if r != auto else f"{r} (auto)": r for r in [*args.max_rows, auto]}
    estimate_log_px(run.model.model, run.model.guide, x[:1], num_particles=10, seed=0)  # warm
    seconds = dict.fromkeys(settings, 0.0)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in settings}
    with Quietness() as quiet:
        for start in range(0, len(x), args.block):
            line = []
            for name, rows in settings.items():
                t0 = time.perf_counter()
                out = estimate_log_px(
                    run.model.model,
                    run.model.guide,
                    x[start : start + args.block],
                    num_particles=args.num_particles,
                    max_rows=rows,
                    seed=args.seed,
                    first_index=start,
                    validate=False,
                )
                seconds[name] += time.perf_counter() - t0
                values[name].append(out.log_px)
                line.append(f"{name} {time.perf_counter() - t0:.1f} s")
            print(
                f"images {start}-{start + len(x[start : start + args.block])}: " + ", ".join(line)
            )
    reference = torch.cat(next(iter(values.values())))
    same = all(torch.equal(torch.cat(v), reference) for v in values.values())
    print(f"\n{len(x)} test images, K={args.num_particles}, {args.threads} thread(s)")
    for name, s in seconds.items():
        print(f"  max_rows {name:<14} {s / len(x):.3f} s per image")
    slowest = seconds[str(DEFAULT_MAX_ROWS)] if str(DEFAULT_MAX_ROWS) in seconds else None
    if slowest:
        name = f"{auto} (auto)"
        print(f"  {DEFAULT_MAX_ROWS} / auto: {slowest / seconds[name]:.2f}")
    print(f"  the same log p(x) under every setting: {same}")
    print(f"  {quiet.report()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num-particles", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--block", type=int, default=8, help="images per alternation block")
    p.add_argument(
        "--max-rows", type=int, nargs="+", default=[DEFAULT_MAX_ROWS, 1024], help="settings"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    main(p.parse_args())
