"""What one training step does in Python: cProfile over the library's ``Trainer`` steps
(random binary batches, one thread), the number of function calls and the functions that take
the most time. The call count does not depend on the machine's load, so two versions of the
code can be compared on a busy machine where their timings cannot.

    python benchmarks/step_profile.py --objective dreg --num-particles 5
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import pyro
import torch

from pyro_vae import VAE, Trainer


def main(args) -> None:
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(100, 784, generator=g) < 0.3).float() for _ in range(args.steps)]
    vae = VAE(z_dim=50, hidden=(200, 200), activation="tanh")
    trainer = Trainer(
        vae.model, vae.guide, lr=1e-3, elbo=args.objective, num_particles=args.num_particles
    )
    for x in batches[:5]:  # the first step validates the model; steps after it are profiled
        trainer.step(x)
    profile = cProfile.Profile()
    profile.enable()
    for x in batches:
        trainer.step(x)
    profile.disable()
    stats = pstats.Stats(profile)
    print(
        f"{args.steps} steps of {args.objective} (K={args.num_particles}), batch 100, "
        f"784-200-200-50 tanh: {stats.total_calls} function calls "
        f"({stats.total_calls / args.steps:.0f} per step)"
    )
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objective", default="dreg", choices=("trace", "iwae", "dreg"))
    p.add_argument("--num-particles", type=int, default=5)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--top", type=int, default=12)
    main(p.parse_args())
