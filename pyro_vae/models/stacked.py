"""The stacked semi-supervised model of Kingma et al. (2014), "M1+M2", as one Pyro model/guide
pair.

M1 is a trained ``VAE`` (p(x|z1), q(z1|x)), held fixed; M2 is the semi-supervised model of
``SSVAE`` written on M1's latent space instead of on pixels:

    p(y) = Categorical(1/C),  p(z2) = N(0, I),  p(z1 | y, z2) = N(loc, diag(scale²)),
    p(x | z1) = M1's likelihood
    q(z1 | x) = M1's guide,  q(y | z1) = Categorical(classifier(z1)),
    q(z2 | z1, y) = N(encoder([z1, y]))

M2 learns from a fresh draw z1 ~ q(z1|x) at every step, as Kingma et al. trained it on samples
of M1's posterior: the draws act as data augmentation, and they make the loss the ELBO of the
whole stack, so log p(x) = log Σ_y ∫ p(y) p(z2) p(z1|y,z2) p(x|z1) is what the evaluator
estimates for it (M2's prior over z1 replaces M1's N(0, I)).  Training M1's posterior mean
instead would make M2 a model of codes, with no density over images.  M1's parameters do not
require gradients, so the trainer leaves them as they are; its term log p(x|z1) - log q(z1|x)
is then a constant of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyro_vae.models.base import PyroModel
from pyro_vae.models.ssvae import ClassConditional
from pyro_vae.models.vae import VAE
from pyro_vae.networks.nets import Encoder, mlp

__all__ = ["StackedSSVAE"]


class StackedSSVAE(ClassConditional, PyroModel):
    """M1+M2: ``m1`` is the config of a trained ``VAE`` (its weights are part of this module's
    ``state_dict``: use ``from_vae`` to start from a trained one); the other arguments are M2's,
    as in ``SSVAE`` (``z_dim`` is M2's z2; its inputs are M1's ``z_dim`` codes).

    ``classify(x)`` uses q(y | z1) at the mean of q(z1|x) (for a flow guide: of its base
    Gaussian).  ``model(x, y=None, aux=False)`` / ``guide(...)`` as ``SSVAE``'s, with the
    auxiliary term alpha * log q(y|z1) on labelled data.
    """

    name_prefix = "m1m2"
    plate_name = "data"

    def __init__(
        self,
        m1: dict[str, Any],
        z_dim: int = 50,
        num_classes: int = 10,
        hidden: Sequence[int] = (500,),
        classifier_hidden: Sequence[int] = (500,),
        activation: str = "softplus",
        aux_weight: float = 50.0,
        beta: float = 1.0,
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self._set_m2(z_dim, num_classes, hidden, classifier_hidden, activation, aux_weight, beta)
        self.m1 = VAE(**m1)
        self.m1.requires_grad_(False)  # M1 is trained already; M2 learns on its codes
        self.x_dim, self.z1_dim = self.m1.x_dim, self.m1.z_dim
        self.image_shape = self.m1.image_shape if image_shape is None else tuple(image_shape)
        self.classifier = mlp([self.z1_dim, *classifier_hidden, num_classes], activation)
        self.encoder = Encoder(self.z1_dim + num_classes, z_dim, hidden, activation)
        # p(z1 | y, z2): a diagonal Gaussian, (loc, scale) as the encoder's are made
        self.z1_decoder = Encoder(
            z_dim + num_classes, self.z1_dim, tuple(reversed(hidden)), activation
        )
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def register(self) -> None:
        """Register M2's networks with ``pyro.module``; M1's frozen ones stay out of the
        param store (Pyro would only warn about each of them)."""
        for part in ("classifier", "encoder", "z1_decoder"):
            pyro.module(f"{self.pyro_name}.{part}", getattr(self, part))

    @classmethod
    def from_vae(cls, vae: VAE, **m2: Any) -> StackedSSVAE:
        """A stack on top of the trained ``vae`` (its weights copied), M2 freshly initialised."""
        stacked = cls(vae.config(), **m2)
        stacked.m1.load_state_dict(vae.state_dict())
        return stacked.to(next(vae.parameters()).device)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, M1's config included, as plain values (what a checkpoint stores)."""
        return {"m1": self.m1.config(), **self._m2_config()}

    # -- model and guide -----------------------------------------------------------------

    def model(self, x: Tensor, y: Tensor | None = None, aux: bool = False) -> None:
        """p(y) p(z2) p(z1|y,z2) p(x|z1) for x (N, x_dim); y (N,) observed when given.  With
        ``aux`` and labels, adds alpha * log q(y|z1) as the observed site ``"y_aux"``."""
        self.register()
        with pyro.plate(self.plate_name, x.shape[0]):
            y_, z2 = self._model_y_z(y, "z2")
            loc, scale = self.z1_decoder.with_class(z2, y_, self.num_classes)
            z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", self.m1.likelihood(z1), obs=x)
            self._aux(z1, y, aux)

    def guide(self, x: Tensor, y: Tensor | None = None, aux: bool = False) -> None:
        """q(z1|x) (M1's), q(y|z1) (enumerated when y is not given) and q(z2|z1,y)."""
        self.register()
        with pyro.plate(self.plate_name, x.shape[0]):
            z1 = pyro.sample("z1", self.m1.posterior(x))
            self._guide_y_z(z1, y, "z2")

    # -- conveniences --------------------------------------------------------------------

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """M1's posterior mean of z1 for each row of x, shape (N, z1_dim)."""
        return self.m1.encode(x)[0]

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """The most probable class under q(y | z1 = E[z1|x]), shape (N,)."""
        return self.classifier(self.codes(x)).argmax(-1)

    @torch.no_grad()
    def class_probs(self, x: Tensor) -> Tensor:
        """q(y | z1 = E[z1|x]), shape (N, num_classes)."""
        return torch.softmax(self.classifier(self.codes(x)), -1)

    @torch.no_grad()
    def decode(self, z: Tensor, y: Tensor) -> Tensor:
        """Mean image of p(x | z1) at the mean of p(z1 | y, z2)."""
        return self.m1.decode(self.z1_decoder.with_class(z, y, self.num_classes)[0])

    @torch.no_grad()
    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and sd of q(z2 | E[z1|x], y); y defaults to the classifier's choice."""
        z1 = self.codes(x)
        y = self.classifier(z1).argmax(-1) if y is None else y
        return self.encoder.with_class(z1, y, self.num_classes)
