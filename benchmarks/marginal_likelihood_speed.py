"""Importance-weighted log p(x) at K = 5000: wall time, peak memory and the ratio to the floor.

The floor is the encoder and decoder forward passes alone (z = loc + scale * eps between
them) over the same rows in the same chunks, with no Pyro, no log-densities and no
reductions. Blocks of images alternate between the evaluator and the floor so that machine
load affects both alike.

    python benchmarks/marginal_likelihood_speed.py --checkpoint runs/vae-... --num-particles 5000
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from pyro_vae import estimate_log_px, load_checkpoint, load_dataset, model_from_checkpoint
from pyro_vae.data import heldout_split
from pyro_vae.evaluate import DEFAULT_MAX_ROWS


@torch.no_grad()
def floor(vae, x, num_particles, max_rows):
    batch = max(1, min(len(x), max_rows // num_particles))
    chunk = max(1, min(num_particles, max_rows // batch))
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        for k0 in range(0, num_particles, chunk):
            k = min(chunk, num_particles - k0)
            loc, scale = vae.encoder(xb)
            z = loc + scale * torch.randn(k, *loc.shape)
            vae.decoder(z)


def main(args):
    state = load_checkpoint(args.checkpoint)
    vae = model_from_checkpoint(state).eval()
    config = state["config"]
    splits = load_dataset(config["dataset"], config.get("data_dir"))
    x = heldout_split(splits, "test", config["binarize"], config["seed"]).images[: args.eval_size]
    torch.manual_seed(0)
    # warm-up: imports (ArviZ), allocator, first-call costs stay out of both timings
    estimate_log_px(
        vae.model,
        vae.guide,
        x[:12],
        num_particles=args.num_particles,
        max_rows=args.max_rows,
        validate=False,
    )
    floor(vae, x[:12], args.num_particles, args.max_rows)
    ours_t = floor_t = 0.0
    results = []
    blocks = range(0, len(x), args.block)
    for i, start in enumerate(blocks):
        xb = x[start : start + args.block]
        t0 = time.perf_counter()
        results.append(
            estimate_log_px(
                vae.model,
                vae.guide,
                xb,
                num_particles=args.num_particles,
                max_rows=args.max_rows,
                validate=False,
            )
        )
        t1 = time.perf_counter()
        floor(vae, xb, args.num_particles, args.max_rows)
        t2 = time.perf_counter()
        ours_t += t1 - t0
        floor_t += t2 - t1
        print(
            f"block {i + 1}/{len(blocks)}: evaluator {t1 - t0:.1f} s, floor {t2 - t1:.1f} s",
            flush=True,
        )
    log_px = torch.cat([r.log_px for r in results])
    elbo = torch.cat([r.elbo for r in results])
    khat = torch.cat([r.khat for r in results])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(x)
    print(
        f"\n{n} test images, K={args.num_particles}, max_rows={args.max_rows}, {torch.get_num_threads()} threads"
    )
    print(f"  evaluator      {ours_t:8.1f} s  ({ours_t / n * 1e3:.1f} ms per image)")
    print(f"  floor          {floor_t:8.1f} s  ({floor_t / n * 1e3:.1f} ms per image)")
    print(f"  ratio          {ours_t / floor_t:8.2f}")
    print(f"  peak memory    {peak_mb:8.0f} MB (process RSS, data set included)")
    print(
        f"  log p(x)       {float(log_px.mean()):8.2f} ± {float(log_px.std() / math.sqrt(n)):.2f} nats per image"
    )
    print(f"  ELBO           {float(elbo.mean()):8.2f}")
    print(f"  gap            {float((log_px - elbo).mean()):8.2f}")
    print(f"  k̂ > 0.7        {float((khat > 0.7).double().mean()):8.1%}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--num-particles", type=int, default=5000)
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--block", type=int, default=500, help="images per alternation block")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS)
    main(p.parse_args())
