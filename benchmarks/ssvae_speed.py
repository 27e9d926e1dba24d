"""Seconds per training epoch of the semi-supervised M2: this project's SSVAE and Trainer
against Pyro's ``examples/vae/ss_vae_M2.py`` written out on the same networks and batches.

Arms (each with a model of its own, same architecture and initial weights):

- ``library``: ``SSVAE`` with ``Trainer(..., elbo="enum")`` as ``scripts/train_ssvae.py``
  builds it: one objective per batch, the auxiliary term alpha * log q(y|x) inside the model
  on labelled batches, Bernoulli logits, one Adam over all parameters.
- ``pyro_example``: the structure of Pyro's example: labels as ``OneHotCategorical``, a
  decoder that outputs probabilities (``Bernoulli(probs)``), the guide enumerated with
  ``config_enumerate(..., expand=True)``, two ``SVI`` objects (``TraceEnum_ELBO`` for the
  ELBO, ``Trace_ELBO`` for the auxiliary classification loss) both stepped on every batch,
  ``pyro.optim.Adam``.

Both see the same epoch: every unlabelled image once in batches of --batch-size and the
labelled images as one batch after every --labelled-every unlabelled ones (Pyro's example
interleaves its labelled batches the same way). Epochs alternate between the arms, so load
affects both alike. Reports the median seconds per epoch, the ratio, and how busy the machine
was.

    python benchmarks/ssvae_speed.py --labels 100 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from _machine import time_alternating
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from torch.nn import functional as F

from pyro_vae import SSVAE, BatchLoader, SemiSupervisedLoader, Trainer, load_dataset
from pyro_vae.data import labelled_subset

C = 10


def pyro_example_pairs(m: SSVAE, aux_weight: float):
    """Pyro's ss_vae_M2 model/guide and its auxiliary pair, on ``m``'s networks."""

    def decode(z, y1):
        return torch.sigmoid(m.decoder(torch.cat([z, y1], -1)))

    def model(xs, ys=None):
        pyro.module("ss_vae_example", m)
        with pyro.plate("data", xs.shape[0]):
            prior = torch.full((xs.shape[0], C), 1.0 / C)
            ys = pyro.sample("y", dist.OneHotCategorical(prior), obs=ys)
            z = pyro.sample("z", dist.Normal(torch.zeros(xs.shape[0], m.z_dim), 1.0).to_event(1))
            probs = decode(z.expand(ys.shape[:-1] + z.shape[-1:]), ys)
            pyro.sample("x", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=xs)

    def guide(xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                alpha = torch.softmax(m.classifier(xs), -1)
                ys = pyro.sample("y", dist.OneHotCategorical(alpha))
            h = torch.cat([xs.expand(ys.shape[:-1] + xs.shape[-1:]), ys], -1)
            loc, scale = m.encoder(h)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def model_classify(xs, ys=None):
        pyro.module("ss_vae_example", m)
        with pyro.plate("data", xs.shape[0]):
            if ys is not None:
                alpha = torch.softmax(m.classifier(xs), -1)
                with pyro.poutine.scale(scale=aux_weight):
                    pyro.sample("y_aux", dist.OneHotCategorical(alpha), obs=ys)

    def guide_classify(xs, ys=None):
        pass

    return model, config_enumerate(guide, "parallel", expand=True), model_classify, guide_classify


def main(args) -> None:
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    train = load_dataset("mnist", args.data_dir)["train"]
    labelled, unlabelled = labelled_subset(train, args.labels, seed=0)
    unlabelled = unlabelled[: args.images]

    def loader() -> SemiSupervisedLoader:
        return SemiSupervisedLoader(
            BatchLoader(
                train.subset(unlabelled), args.batch_size, shuffle=True, binarize="dynamic", seed=0
            ),
            BatchLoader(
                train.subset(labelled),
                min(args.batch_size, args.labels),
                shuffle=True,
                binarize="dynamic",
                labels=True,
                seed=0,
                stream="labelled-train",
            ),
            labelled_every=args.labelled_every,
        )

    template = SSVAE(z_dim=args.z_dim, hidden=(args.hidden,), classifier_hidden=(args.hidden,))
    arms = {}

    lib = copy.deepcopy(template)
    trainer = Trainer(
        partial(lib.model, aux=True),
        partial(lib.guide, aux=True),
        lr=args.lr,
        elbo="enum",
        validate=False,  # as train_ssvae.py: the data are checked on load
    )
    lib_batches = loader()
    arms["library"] = lambda: [trainer.step(*b) for b in lib_batches]

    example = copy.deepcopy(template)
    model, guide, model_aux, guide_aux = pyro_example_pairs(example, template.aux_weight)
    optim = pyro.optim.Adam({"lr": args.lr})
    losses = [
        SVI(model, guide, optim, TraceEnum_ELBO(max_plate_nesting=1)),
        SVI(model_aux, guide_aux, optim, Trace_ELBO()),
    ]
    example_batches = loader()

    def example_epoch():
        for batch in example_batches:
            xs = batch[0]
            ys = F.one_hot(batch[1], C).to(xs.dtype) if len(batch) > 1 else None
            for svi in losses:
                svi.step(xs, ys)

    arms["pyro_example"] = example_epoch

    times, quiet = time_alternating(arms, args.rounds)
    base = statistics.median(times["library"])
    print(
        f"\nM2, {args.labels} labels, batch {args.batch_size}, one labelled batch after every "
        f"{args.labelled_every} unlabelled, 784-{args.hidden}-{args.z_dim} softplus, "
        f"{args.threads} thread(s), {len(lib_batches)} steps per epoch; median of "
        f"{args.rounds} epochs:"
    )
    for name, t in times.items():
        m = statistics.median(t)
        print(f"  {name:<13} {m:6.2f} s/epoch  ratio to library {m / base:.3f}")
    print(f"  {quiet.report()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--labelled-every", type=int, default=5)
    p.add_argument("--hidden", type=int, default=500)
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images", type=int, default=None, help="unlabelled images (default: all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--data-dir", default=None)
    main(p.parse_args())
