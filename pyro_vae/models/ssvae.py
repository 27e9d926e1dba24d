"""The semi-supervised VAE of Kingma et al. (2014), "M2", as one Pyro model/guide pair.

    p(y) = Categorical(1/C),  p(z) = N(0, I),  p(x | y, z) = Bernoulli(decoder([z, y]))
    q(y | x) = Categorical(classifier(x)),  q(z | x, y) = N(encoder([x, y]))

``model(x, y=None)`` and ``guide(x, y=None)``: labels are observed where given and a latent
site otherwise.  With ``TraceEnum_ELBO`` the guide's ``y`` is enumerated in parallel (it is
marked with ``infer={"enumerate": "parallel"}``), so unlabelled data sum over the classes
exactly instead of sampling them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor

from pyro_vae.checks import positive_int, sizes
from pyro_vae.choices import CLASSIFIERS
from pyro_vae.models.base import PyroModel
from pyro_vae.networks.distributions import BernoulliImage
from pyro_vae.networks.nets import ConvNet, Decoder, Encoder, mlp

__all__ = ["CLASSIFIERS", "SSVAE"]

# the classifier q(y|x): an MLP on the pixels, or 5x5 convolutions (16 and 32 filters,
# stride 2) before the same hidden layers


class ClassConditional:
    """M2's pieces over some features h (the pixels in ``SSVAE``, M1's z1 in the stack), for a
    model with ``classifier``, ``encoder``, ``z_dim``, ``num_classes``, ``beta`` and
    ``aux_weight`` (and, for its config, the sizes it was built with): the sites of y and z in model and guide, the auxiliary term; and, with
    ``encode(x)``, ``decode(z, y)`` and ``classify(x)``, reconstructions, samples and
    style-and-content grids.  Call the site methods inside the data plate."""

    def _set_m2(
        self,
        z_dim: int,
        num_classes: int,
        hidden: Sequence[int],
        classifier_hidden: Sequence[int],
        activation: str,
        aux_weight: float,
        beta: float,
    ) -> None:
        """Check M2's constructor arguments (one line naming each) and keep them."""
        self.z_dim, self.num_classes = (
            positive_int("z_dim", z_dim),
            positive_int("num_classes", num_classes),
        )
        self.hidden = sizes("hidden", hidden)
        self.classifier_hidden = sizes("classifier_hidden", classifier_hidden)
        if not aux_weight >= 0:
            raise ValueError(f"aux_weight must be non-negative, got {aux_weight}")
        if not beta > 0:  # poutine.scale needs a positive scale
            raise ValueError(f"beta must be positive, got {beta}")
        self.activation, self.aux_weight, self.beta = activation, aux_weight, beta

    def _m2_config(self) -> dict[str, Any]:
        """M2's constructor arguments (every model's config holds them)."""
        return {
            "z_dim": self.z_dim,
            "num_classes": self.num_classes,
            "hidden": list(self.hidden),
            "classifier_hidden": list(self.classifier_hidden),
            "activation": self.activation,
            "aux_weight": self.aux_weight,
            "beta": self.beta,
            "image_shape": list(self.image_shape),
        }

    def _model_y_z(self, y: Tensor | None, z_site: str) -> tuple[Tensor, Tensor]:
        """p(y) (observed when given) and p(z) = N(0, I) scaled by beta: (y, z)."""
        prior_y = dist.Categorical(logits=self._zero.expand(self.num_classes))
        y = pyro.sample("y", prior_y, obs=y)
        with poutine.scale(scale=self.beta):
            z = pyro.sample(z_site, dist.Normal(self._zero, 1.0).expand([self.z_dim]).to_event(1))
        return y, z

    def _aux(self, h: Tensor, y: Tensor | None, aux: bool) -> None:
        """alpha * log q(y|h) as the observed site ``"y_aux"``, on labelled batches with aux."""
        if aux and y is not None and self.aux_weight > 0:
            with poutine.scale(scale=self.aux_weight):
                pyro.sample("y_aux", dist.Categorical(logits=self.classifier(h)), obs=y)

    def _balance(self, h: Tensor, y: Tensor | None, aux: bool) -> None:
        """-gamma * N * KL(q̄(y) || p(y)) as the factor ``"y_balance"`` on unlabelled batches
        with aux, where q̄(y) is q(y|h) averaged over the batch; call before the data plate.

        The ELBO averaged over images holds this KL once (the mean of KL(q(y|x) || p(y)) is
        the mutual information of x and y under q plus KL(q̄ || p)), but weakly: a quarter of
        the 5s classified as 3s costs about 0.007 nats per image.  ``balance`` = gamma adds it
        again with that weight, as beta does for the KL of z; the evaluator never sees it.
        """
        if aux and y is None and self.balance > 0:
            q = torch.softmax(self.classifier(h), -1).mean(0)
            kl = (q * (q.clamp_min(1e-12).log() + math.log(self.num_classes))).sum()
            pyro.factor("y_balance", -self.balance * h.shape[0] * kl)

    def _guide_y_z(self, h: Tensor, y: Tensor | None, z_site: str) -> None:
        """q(y|h) (enumerated when y is not given) and q(z|h,y) scaled by beta."""
        if y is None:
            y = pyro.sample(
                "y", dist.Categorical(logits=self.classifier(h)), infer={"enumerate": "parallel"}
            )
        loc, scale = self.encoder.with_class(h, y, self.num_classes)
        with poutine.scale(scale=self.beta):
            pyro.sample(z_site, dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)[0], self.classify(x))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.z_dim, generator=generator).to(self._zero.device)
        y = torch.randint(self.num_classes, (n,), generator=generator).to(self._zero.device)
        return self.decode(z, y)

    @torch.no_grad()
    def analogies(self, x: Tensor) -> Tensor:
        """Style and content (Kingma et al. 2014, fig. 1): for each image, z from q(z|x, ŷ)
        decoded with every class, shape (N, num_classes, x_dim)."""
        loc, _ = self.encode(x)
        classes = torch.arange(self.num_classes, device=x.device)
        return self.decode(loc[:, None, :], classes[None, :].expand(len(x), -1))


class SSVAE(ClassConditional, PyroModel):
    """M2 with a classifier q(y|x) and an auxiliary classification loss on labelled data.

    ``classifier`` is ``"mlp"`` (through ``classifier_hidden``) or ``"conv"`` (``ConvNet``:
    two strided 5x5 convolutions, then ``classifier_hidden``).

    ``aux_weight`` (alpha) scales log q(y|x) on labelled batches, added as an observed site
    ``"y_aux"`` under ``poutine.scale`` in ``model`` when ``aux=True`` is passed (what the
    training loop does); Kingma et al. use alpha = 0.1 N.  The site is a training device, not
    part of the generative model: ``model(x, y)`` without ``aux`` is the pure model that the
    evaluator scores.

    ``beta`` weights KL(q(z|x,y) || p(z)) as in ``VAE``.  Above 1 it makes z dearer than y, so
    the decoder is pushed to carry the class through y (at beta = 1 the decoder tends to ignore
    y, since y can save at most log 10 nats per image); the evaluator ignores the scale.
    """

    name_prefix = "ssvae"
    plate_name = "data"

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 50,
        num_classes: int = 10,
        hidden: Sequence[int] = (500,),
        classifier_hidden: Sequence[int] = (500,),
        activation: str = "softplus",
        aux_weight: float = 50.0,
        beta: float = 1.0,
        image_shape: Sequence[int] = (28, 28),
        classifier: str = "mlp",
        balance: float = 0.0,
    ) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {classifier!r}; choose from {list(CLASSIFIERS)}")
        if classifier == "conv" and math.prod(image_shape) != x_dim:
            raise ValueError(
                f"a conv classifier needs x_dim = H * W, got {x_dim} for {image_shape}"
            )
        self._set_m2(z_dim, num_classes, hidden, classifier_hidden, activation, aux_weight, beta)
        x_dim = self.x_dim = positive_int("x_dim", x_dim)
        if not balance >= 0:
            raise ValueError(f"balance must be non-negative, got {balance}")
        self.balance = balance
        self.image_shape = tuple(image_shape)
        self.classifier_kind = classifier
        if classifier == "conv":
            self.classifier = ConvNet(
                self.image_shape, num_classes, hidden=classifier_hidden, activation=activation
            )
        else:
            self.classifier = mlp([x_dim, *classifier_hidden, num_classes], activation)
        self.encoder = Encoder(x_dim + num_classes, z_dim, hidden, activation)
        self.decoder = Decoder(z_dim + num_classes, x_dim, hidden, activation)
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain values (what a checkpoint stores)."""
        config = {"x_dim": self.x_dim, **self._m2_config()}
        return {**config, "classifier": self.classifier_kind, "balance": self.balance}

    # -- model and guide -----------------------------------------------------------------

    def model(self, x: Tensor, y: Tensor | None = None, aux: bool = False) -> None:
        """p(y) p(z) p(x|y,z) for x (N, x_dim); y (N,) observed when given.  With ``aux`` and
        labels, adds alpha * log q(y|x) as the observed site ``"y_aux"``."""
        self.register()
        self._balance(x, y, aux)
        with pyro.plate(self.plate_name, x.shape[0]):
            y_, z = self._model_y_z(y, "z")
            pyro.sample(
                "x", BernoulliImage(self.decoder.with_class(z, y_, self.num_classes)), obs=x
            )
            self._aux(x, y, aux)

    def guide(self, x: Tensor, y: Tensor | None = None, aux: bool = False) -> None:
        """q(y|x) (enumerated when y is not given) and q(z|x,y)."""
        self.register()
        with pyro.plate(self.plate_name, x.shape[0]):
            self._guide_y_z(x, y, "z")

    # -- conveniences --------------------------------------------------------------------

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """The most probable class under q(y|x), shape (N,)."""
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def class_probs(self, x: Tensor) -> Tensor:
        """q(y|x), shape (N, num_classes)."""
        return torch.softmax(self.classifier(x), -1)

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and sd of q(z|x,y); y defaults to the classifier's choice."""
        y = self.classify(x) if y is None else y
        return self.encoder.with_class(x, y, self.num_classes)

    @torch.no_grad()
    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        """Pixel probabilities of p(x|y,z)."""
        return torch.sigmoid(self.decoder.with_class(z, y, self.num_classes))
