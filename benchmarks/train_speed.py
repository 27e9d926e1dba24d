"""Seconds per training epoch: this project's SVI loop against a plain PyTorch loop.

Both use the same encoder/decoder, the same data loader with dynamic binarisation, the same
single-sample Monte-Carlo ELBO (log p(x|z) + log p(z) - log q(z|x), what Trace_ELBO
estimates) and one torch Adam over all parameters. Epochs alternate between the two so that
machine load affects both alike. Pyro's textbook loop, ``SVI.step`` with ``pyro.optim.Adam``,
is timed too, for reference.

    python benchmarks/train_speed.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, BatchLoader, Trainer, load_dataset


def plain_epoch(vae, opt, loader):
    for (x,) in loader:
        loc, scale = vae.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        log_px = (
            torch.distributions.Bernoulli(logits=vae.decoder(z), validate_args=False)
            .log_prob(x)
            .sum()
        )
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        log_qz = torch.distributions.Normal(loc, scale, validate_args=False).log_prob(z).sum()
        loss = -(log_px + log_pz - log_qz)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main(args):
    torch.set_num_threads(args.threads)
    train = load_dataset("mnist")["train"]
    loader = BatchLoader(train, args.batch_size, shuffle=True, binarize="dynamic", seed=0)
    pyro.set_rng_seed(0)
    ours = VAE(z_dim=args.z_dim, hidden=(args.hidden,))
    trainer = Trainer(ours.model, ours.guide, lr=1e-3, validate=False)
    plain = VAE(z_dim=args.z_dim, hidden=(args.hidden,))
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    textbook = VAE(z_dim=args.z_dim, hidden=(args.hidden,))
    svi = SVI(textbook.model, textbook.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())

    def ours_epoch():
        with pyro.validation_enabled(False):
            for batch in loader:
                trainer.step(*batch)

    def svi_epoch():
        with pyro.validation_enabled(False):
            for (x,) in loader:
                svi.step(x)

    runs = {
        "pyro_vae Trainer": ours_epoch,
        "plain PyTorch": lambda: plain_epoch(plain, plain_opt, loader),
    }
    if args.svi:
        runs["Pyro SVI.step + pyro.optim.Adam"] = svi_epoch
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for r in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(
            f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
            flush=True,
        )
    base = statistics.median(times["plain PyTorch"])
    print(
        f"\nbatch {args.batch_size}, 784-{args.hidden}-{args.z_dim}, {args.threads} threads, "
        f"{len(loader)} steps per epoch; median of {args.rounds} epochs:"
    )
    for name, t in times.items():
        m = statistics.median(t)
        print(f"  {name:<34} {m:6.2f} s/epoch  ratio to plain {m / base:.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--svi", action="store_true", help="also time SVI.step with pyro.optim.Adam")
    main(p.parse_args())
