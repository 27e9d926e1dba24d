"""Trains a VAE whose guide is a point mass (so the objective has no sampling noise) for two
epochs, on one process or under torchrun, and saves its weights: with the same global batch
the two must agree to float tolerance.  Run by tests/test_distributed.py."""

import sys

import pyro
import pyro.distributions as dist
import torch

from pyro_vae import VAE, BatchLoader, Trainer, load_dataset
from pyro_vae.training.distributed import ShardedLoader, setup, teardown


class PointGuideVAE(VAE):
    def guide(self, x):
        self.register()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x)[0]).to_event(1))


def main(path: str) -> None:
    ranks, _ = setup(torch.device("cpu"))
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    vae = PointGuideVAE(z_dim=4, hidden=(16,))
    data = load_dataset("mnist")["train"].subset(slice(0, 250))  # the last batch is short
    loader = BatchLoader(data, 60, shuffle=True, binarize="dynamic", seed=0)
    trainer = Trainer(vae.model, vae.guide, lr=1e-2, ranks=ranks, validate=False)
    trainer.fit(ShardedLoader(loader, ranks) if ranks.active else loader, 2, progress=False)
    if ranks.is_main:
        torch.save({"model": vae.state_dict(), "history": trainer.history}, path)
    teardown()


if __name__ == "__main__":
    main(sys.argv[1])
