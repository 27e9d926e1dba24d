"""Importance-weighted log p(x) at K = 5000: time per image against the floor and against
pythae, on the same networks, weights and images; peak memory.

- evaluator: ``pyro_vae.estimate_log_px`` (log p̂(x), ELBO, ESS, PSIS k̂ per image).
- floor: the encoder and decoder forward passes alone (z = loc + scale * eps between them)
  over the same rows in the same chunks: no Pyro, no log-densities, no reductions.
- pythae (``--pythae``, needs ``pip install pythae==0.1.2``, the ``bench`` extra):
  ``pythae.models.VAE.get_nll`` with this checkpoint's encoder and decoder wrapped as
  pythae's ``BaseEncoder``/``BaseDecoder`` (log-variance = 2 log scale, sigmoid of the
  logits), ``batch_size`` = K so that each image is one pass, as in ours.

Blocks of images alternate between the arms so that machine load affects all alike.

    python benchmarks/marginal_likelihood_speed.py --checkpoint runs/vae-... --pythae
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time

import torch
from _machine import Quietness

from pyro_vae import Run, estimate_log_px
from pyro_vae.inference.evaluate import DEFAULT_MAX_ROWS


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


def pythae_model(vae):
    """The checkpoint's networks as a pythae VAE (Bernoulli likelihood: ``bce``)."""
    from pythae.models import VAE as PythaeVAE
    from pythae.models import VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = vae.encoder

        def forward(self, x):
            loc, scale = self.net(x.reshape(x.shape[0], -1))
            return ModelOutput(embedding=loc, log_covariance=2 * scale.log())

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = vae.decoder

        def forward(self, z):
            probs = torch.sigmoid(self.net(z))
            return ModelOutput(reconstruction=probs.reshape(z.shape[0], 1, *vae.image_shape))

    config = VAEConfig(
        input_dim=(1, *vae.image_shape), latent_dim=vae.z_dim, reconstruction_loss="bce"
    )
    return PythaeVAE(config, encoder=Encoder(), decoder=Decoder()).eval()


def main(args):
    torch.set_num_threads(args.threads)
    # the estimator itself, not the evaluate_log_px() job: its passes are what is timed
    trained = Run.load(args.checkpoint)
    vae = trained.model
    x = trained.heldout("test", args.eval_size, what="--eval-size").images
    k = args.num_particles

    def ours(xb):
        return estimate_log_px(
            vae.model, vae.guide, xb, num_particles=k, max_rows=args.max_rows, validate=False
        )

    arms = {"evaluator": ours, "floor": lambda xb: floor(vae, xb, k, args.max_rows)}
    if args.pythae:
        peer = pythae_model(vae)

        def pythae(xb):
            with torch.no_grad():
                return peer.get_nll(xb.reshape(-1, 1, *vae.image_shape), n_samples=k, batch_size=k)

        arms["pythae"] = pythae
    torch.manual_seed(0)
    for f in arms.values():  # warm-up: imports, allocator, first-call costs
        f(x[:6])
    seconds = dict.fromkeys(arms, 0.0)
    results, pythae_nll = [], []
    quiet = Quietness().__enter__()
    blocks = range(0, len(x), args.block)
    for i, start in enumerate(blocks):
        xb = x[start : start + args.block]
        line = []
        for name, f in arms.items():
            t0 = time.perf_counter()
            out = f(xb)
            dt = time.perf_counter() - t0
            seconds[name] += dt
            line.append(f"{name} {dt:.1f} s")
            if name == "evaluator":
                results.append(out)
            elif name == "pythae":
                pythae_nll.append((float(out), len(xb)))
        print(f"block {i + 1}/{len(blocks)}: " + ", ".join(line), flush=True)
    quiet.__exit__(None, None, None)
    log_px = torch.cat([r.log_px for r in results])
    elbo = torch.cat([r.elbo for r in results])
    khat = torch.cat([r.khat for r in results])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(x)
    print(f"\n{n} test images, K={k}, max_rows={args.max_rows}, {torch.get_num_threads()} threads")
    for name, s in seconds.items():
        print(f"  {name:<10} {s:8.1f} s  ({s / n * 1e3:.1f} ms per image)")
    print(f"  evaluator / floor   {seconds['evaluator'] / seconds['floor']:.2f}")
    if args.pythae:
        print(f"  pythae / evaluator  {seconds['pythae'] / seconds['evaluator']:.2f}")
        nll = sum(v * m for v, m in pythae_nll) / n
        print(f"  pythae log p(x)     {nll:.2f} nats per image (its own draws)")
    print(f"  {quiet.report()}")
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
    p.add_argument("--block", type=int, default=50, help="images per alternation block")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--pythae", action="store_true", help="time pythae's get_nll too")
    main(p.parse_args())
