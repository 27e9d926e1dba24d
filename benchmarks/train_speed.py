"""Seconds per training epoch: this project's SVI loop against a plain PyTorch loop and Pyro's
own VAE example, on the same networks, data and batches.

Arms (each with a model of its own, all the same architecture and initial weights):

- ``plain``: a hand-written PyTorch loop: encoder, reparameterised z, decoder, the
  single-sample ELBO log p(x|z) + log p(z) - log q(z|x) with Bernoulli logits, one
  ``torch.optim.Adam``. The floor the Pyro loops are compared with.
- ``library``: ``Trainer(vae.model, vae.guide)`` with the library's defaults, as the
  README's snippet uses it.
- ``train_svi``: the ``Trainer`` as ``scripts/train_svi.py`` builds it (Pyro's argument
  checks off for data checked on load).
- ``pyro_example``: Pyro's ``examples/vae/vae.py`` written out on the same networks: a
  decoder that outputs probabilities, ``dist.Bernoulli(probs).to_event(1)``, ``pyro.module``
  registration, ``SVI.step`` with ``pyro.optim.Adam`` and ``Trace_ELBO``.
- with ``--objective iwae|dreg --num-particles K``: ``plain`` computes the K-sample bound
  (with DReG's surrogate for ``dreg``), the two ``Trainer`` arms use the library's
  objective, and the Pyro example is left out (it has no such objective).

Every arm trains its own copy of the weights on the same batches (one loader per arm, same
seed); epochs alternate between the arms so that machine load affects all alike. Reports
the median seconds per epoch, the ratio to ``plain`` and how busy the machine was.

    python benchmarks/train_speed.py --rounds 5
    python benchmarks/train_speed.py --rounds 3 --objective dreg --num-particles 5 \\
        --hidden 200,200 --activation tanh --batch-size 100
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics

import pyro
import pyro.distributions as dist
import torch
from _machine import time_alternating
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, BatchLoader, Trainer, load_dataset


def plain_loss(vae, x, objective, k):
    """The negative objective summed over the batch, written in plain PyTorch."""
    loc, scale = vae.encoder(x)
    eps = torch.randn((k, *loc.shape)) if objective != "trace" else torch.randn_like(loc)
    z = loc + scale * eps
    log_px = -torch.nn.functional.binary_cross_entropy_with_logits(
        vae.decoder(z), x.expand(z.shape[:-1] + x.shape[-1:]), reduction="none"
    ).sum(-1)
    log_pz = -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
    if objective == "dreg":  # guide density with its parameters held fixed
        loc, scale = loc.detach(), scale.detach()
    log_qz = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_w = log_px + log_pz - log_qz
    if objective == "trace":
        return -log_w.sum()
    bound = torch.logsumexp(log_w, 0) - math.log(k)
    if objective == "iwae":
        return -bound.sum()
    w = torch.softmax(log_w, 0).detach()
    z.register_hook(lambda g: g * w.unsqueeze(-1))  # the guide's gradient through z: w^2
    surrogate = (w * log_w).sum()
    return -(bound.detach().sum() + surrogate - surrogate.detach())


def pyro_example_pair(vae):
    """Pyro's examples/vae/vae.py model and guide, on ``vae``'s networks."""

    def model(x):
        pyro.module("decoder", vae.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros((x.shape[0], vae.z_dim))
            z = pyro.sample("latent", dist.Normal(z_loc, 1.0).to_event(1))
            loc_img = torch.sigmoid(vae.decoder(z))
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", vae.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = vae.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))

    return model, guide


def main(args):
    torch.set_num_threads(args.threads)
    train = load_dataset("mnist")["train"].subset(slice(0, args.images))
    pyro.set_rng_seed(0)
    template = VAE(z_dim=args.z_dim, hidden=args.hidden, activation=args.activation)
    k = args.num_particles

    def loader():
        return BatchLoader(train, args.batch_size, shuffle=True, binarize="dynamic", seed=0)

    arms = {}

    plain = copy.deepcopy(template)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    plain_loader = loader()

    def plain_epoch():
        for (x,) in plain_loader:
            loss = plain_loss(plain, x, args.objective, k)
            plain_opt.zero_grad(set_to_none=True)
            loss.backward()
            plain_opt.step()

    arms["plain"] = plain_epoch

    # "library": the Trainer's defaults, as the README's snippet uses it
    for name, options in (("library", {}), ("train_svi", {"validate": False})):
        vae = copy.deepcopy(template)
        trainer = Trainer(
            vae.model, vae.guide, lr=1e-3, elbo=args.objective, num_particles=k, **options
        )
        batches = loader()
        arms[name] = lambda trainer=trainer, batches=batches: [trainer.step(*b) for b in batches]

    if args.objective == "trace":
        example = copy.deepcopy(template)
        model, guide = pyro_example_pair(example)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        example_loader = loader()
        arms["pyro_example"] = lambda: [svi.step(x) for (x,) in example_loader]

    times, quiet = time_alternating(arms, args.rounds)
    base = statistics.median(times["plain"])
    hidden = "-".join(map(str, args.hidden))
    print(
        f"\n{args.objective} (K={k}), batch {args.batch_size}, 784-{hidden}-{args.z_dim} "
        f"{args.activation}, {args.threads} threads, {len(plain_loader)} steps per epoch of "
        f"{len(train)} images; median of {args.rounds} epochs:"
    )
    for name, t in times.items():
        m = statistics.median(t)
        per = m / len(train) * 10_000
        print(
            f"  {name:<13} {m:6.2f} s/epoch  {per:6.3f} s per 10,000 images  ratio {m / base:.3f}"
        )
    print(f"  {quiet.report()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=50_000, help="training images per epoch")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=lambda s: tuple(int(h) for h in s.split(",")), default=(400,))
    p.add_argument("--activation", default="relu")
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--objective", default="trace", choices=("trace", "iwae", "dreg"))
    p.add_argument("--num-particles", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    main(p.parse_args())
