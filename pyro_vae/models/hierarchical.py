"""A VAE with several stochastic layers: p(z_L) p(z_{L-1} | z_L) ... p(z_1 | z_2) p(x | z_1).

Sites are named ``z1`` (next to x) to ``zL`` (top), every one inside ``pyro.plate("data")``,
so the objectives, the evaluator and the diagnostics treat them as any other sites.  Two
guides share the same inference networks:

- ``"bottom-up"`` (Burda et al. 2015): q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}), each
  layer a diagonal Gaussian from the sample below it.
- ``"top-down"`` (the ladder VAE's inference, Sønderby et al. 2016): a deterministic
  bottom-up pass gives every layer an estimate N(mu_hat_l, sigma_hat_l) (layer l's network
  takes layer l-1's estimated mean); then, from the top down, z_L ~ N(mu_hat_L, sigma_hat_L)
  and each lower layer merges its estimate with the generative conditional p(z_l | z_{l+1})
  by precision: sigma_l^-2 = sigma_hat_l^-2 + sigma_p^-2,
  mu_l = sigma_l^2 (mu_hat_l sigma_hat_l^-2 + mu_p sigma_p^-2).  The guide thus shares the
  generative networks, and every layer but the top is drawn given the one above it.
- ``"deterministic"`` (the bottom-up inference of Havtorn et al. 2021): the same
  deterministic bottom-up pass, and every layer drawn from its own estimate,
  q(z_l | x) = N(mu_hat_l, sigma_hat_l), independently of the draws of the other layers.
  No layer's proposal depends on a sample, so q(z_{>k} | x) is known for every k.

Training options every guide takes: ``scale_link`` (how a network output becomes a standard
deviation, ``pyro_vae.networks.nets.SCALE_LINKS``) and ``weight_norm`` (every linear layer weight
normalised).

``skip=True`` gives the generative path skip connections (Havtorn et al. 2021 use them between
latent layers): every generative network reads all the layers above it, p(z_l | z_{>l}) and
p(x | z_1, ..., z_L), their draws concatenated from the nearest layer up (``context``).  The
guides are unchanged; the top-down guide merges with p(z_l | z_{>l}).

The default sizes are Burda et al.'s two-layer architecture: 784-200-200-100 (stochastic)
-100-100-50 (stochastic), tanh units; the generative path mirrors it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_vae.checks import ConfigError, positive_int, sizes
from pyro_vae.choices import HVAE_GUIDES
from pyro_vae.models.base import PyroModel
from pyro_vae.networks.distributions import BernoulliImage
from pyro_vae.networks.nets import SCALE_LINKS, Decoder, Encoder

__all__ = ["HierarchicalVAE"]


class HierarchicalVAE(PyroModel):
    """A Bernoulli VAE with ``len(z_dims)`` stochastic layers (see the module docstring).

    ``z_dims[l]`` is the size of layer l + 1 (``z_dims[0]`` next to x); ``hidden[l]`` the
    deterministic layers between layer l (x for l = 0) and layer l + 1 on the way up, mirrored
    on the way down.  ``guide`` is ``"bottom-up"``, ``"top-down"`` or ``"deterministic"``.
    """

    name_prefix = "hvae"
    plate_name = "data"
    likelihood_name = "bernoulli"

    def __init__(
        self,
        x_dim: int = 784,
        z_dims: Sequence[int] = (100, 50),
        hidden: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        activation: str = "tanh",
        guide: str = "bottom-up",
        image_shape: Sequence[int] = (28, 28),
        scale_link: str = "softplus",
        weight_norm: bool = False,
        batch_norm: bool = False,
        skip: bool = False,
    ) -> None:
        super().__init__()
        self.x_dim = positive_int("x_dim", x_dim)
        self.z_dims = sizes("z_dims", z_dims, allow_empty=False)
        if isinstance(hidden, (str, bytes)) or len(hidden) != len(self.z_dims):
            raise ConfigError(
                "hidden", f"needs one list of sizes per stochastic layer ({len(self.z_dims)})"
            )
        self.hidden = tuple(sizes(f"hidden[{i}]", h) for i, h in enumerate(hidden))
        if guide not in HVAE_GUIDES:
            raise ConfigError("guide", f"unknown guide {guide!r}; choose from {HVAE_GUIDES}")
        if scale_link not in SCALE_LINKS:
            raise ConfigError(
                "scale_link", f"unknown link {scale_link!r}; choose from {SCALE_LINKS}"
            )
        self.activation, self.guide_kind = activation, guide
        self.scale_link, self.weight_norm = scale_link, bool(weight_norm)
        self.batch_norm = bool(batch_norm)
        self.skip = bool(skip)
        self.image_shape = tuple(image_shape)
        below = (self.x_dim, *self.z_dims[:-1])
        nets = {
            "scale_link": scale_link,
            "weight_norm": self.weight_norm,
            "batch_norm": self.batch_norm,
        }
        # inference: layer l's network reads layer l-1 (x for the first)
        self.encoders = nn.ModuleList(
            Encoder(below[i], z, h, activation, **nets)
            for i, (z, h) in enumerate(zip(self.z_dims, self.hidden))
        )
        # generation: p(z_l | z_{l+1}) for every layer but the top, and p(x | z_1); with skip
        # connections each reads every layer above it
        self.conditionals = nn.ModuleList(
            Encoder(
                self._context_size(i + 1),
                self.z_dims[i],
                tuple(reversed(self.hidden[i + 1])),
                activation,
                **nets,
            )
            for i in range(len(self.z_dims) - 1)
        )
        self.decoder = Decoder(
            self._context_size(0),
            self.x_dim,
            self.hidden[0],
            activation,
            weight_norm=self.weight_norm,
            batch_norm=self.batch_norm,
        )
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain values (what a checkpoint stores)."""
        return {
            "x_dim": self.x_dim,
            "z_dims": list(self.z_dims),
            "hidden": [list(h) for h in self.hidden],
            "activation": self.activation,
            "guide": self.guide_kind,
            "image_shape": list(self.image_shape),
            "scale_link": self.scale_link,
            "weight_norm": self.weight_norm,
            "batch_norm": self.batch_norm,
            # only when on: the config is part of the compressed files' weights hash, and
            # files made by models without the option must still decode
            **({"skip": True} if self.skip else {}),
        }

    def _context_size(self, layer: int) -> int:
        """The input size of the generative network of ``layer`` (1-based; 0 for x)."""
        return sum(self.z_dims[layer:]) if self.skip else self.z_dims[layer]

    def context(self, layer: int, z: Mapping[int, Tensor]) -> Tensor:
        """What the generative network of ``layer`` (1-based, 0 for p(x | ...)) reads, from
        the draws ``z`` of the layers above it keyed by their 1-based layer: z_{layer+1}, or
        with skip connections z_{layer+1}, ..., z_L concatenated."""
        if not self.skip:
            return z[layer + 1]
        return torch.cat([z[i] for i in range(layer + 1, len(self.z_dims) + 1)], dim=-1)

    def init_output_bias(self, mean: Tensor) -> None:
        """Start p(x | z_1)'s logits at the logit of ``mean`` (the training images' mean,
        clamped into [1e-3, 1 - 1e-3]), as Burda et al. do."""
        self.decoder.set_output_bias(torch.logit(mean.clamp(1e-3, 1 - 1e-3)))

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """The latent sites from the layer next to x to the top: ``("z1", ..., "zL")``."""
        return tuple(f"z{i + 1}" for i in range(len(self.z_dims)))

    # -- the distributions -------------------------------------------------------------------

    def top_prior(self) -> dist.TorchDistribution:
        """p(z_L): a standard normal (one event)."""
        return dist.Normal(self._zero, 1.0).expand([self.z_dims[-1]]).to_event(1)

    def conditional(self, layer: int, z_above: Tensor) -> dist.TorchDistribution:
        """p(z_layer | z_{layer+1}) (``layer`` 1-based, below the top), one event;
        ``z_above`` is ``context(layer, ...)`` (z_{layer+1} without skip connections)."""
        loc, scale = self.conditionals[layer - 1](z_above)
        return dist.Normal(loc, scale).to_event(1)

    def likelihood(self, z1: Tensor) -> dist.TorchDistribution:
        """p(x | z_1): independent Bernoulli pixels from logits; ``z1`` is ``context(0,
        ...)`` (z_1 without skip connections)."""
        return BernoulliImage(logits=self.decoder(z1))

    # -- model and guides ----------------------------------------------------------------------

    def model(self, x: Tensor) -> None:
        """p(z_L) ... p(z_1 | z_2) p(x | z_1) for a batch x (N, x_dim), observed at ``"x"``."""
        self.register()
        names = self.latent_sites
        with pyro.plate(self.plate_name, x.shape[0]):
            z = {len(names): pyro.sample(names[-1], self.top_prior())}
            for layer in range(len(names) - 1, 0, -1):
                p = self.conditional(layer, self.context(layer, z))
                z[layer] = pyro.sample(names[layer - 1], p)
            pyro.sample("x", self.likelihood(self.context(0, z)), obs=x)

    def guide(self, x: Tensor) -> None:
        """q(z_1, ..., z_L | x), bottom-up or top-down (``guide`` of the constructor)."""
        self.register()
        with pyro.plate(self.plate_name, x.shape[0]):
            self.guide_from(self.posterior_parameters(x))

    # -- the guide's family: what it computes from x alone, and its draws given that -----------

    def posterior_parameters(self, x: Tensor) -> Tensor:
        """The part of the guide that reads x, unconstrained, (N, P): for the top-down guide
        the bottom-up estimates of every layer (P = 2 (d_1 + ... + d_L)), for the bottom-up
        guide q(z_1 | x) (P = 2 d_1; the layers above are drawn through their networks).
        ``guide_from`` of these is the guide; of any other values, another member of its
        family (a per-image optimum, ``pyro_vae.apps.gaps``)."""
        if self.guide_kind == "bottom-up":
            return self.encoders[0].net(x)
        return self._chain_of_means(x)

    def _chain_of_means(self, x: Tensor) -> Tensor:
        """The inference networks' raw outputs, layer by layer from x up, each network
        reading the layer below's mean, concatenated: (N, 2 (d_1 + ... + d_L))."""
        out, h = [], x
        for encoder in self.encoders:
            out.append(encoder.net(h))
            h = out[-1].chunk(2, dim=-1)[0]  # the loc half, as ``Encoder.link`` splits it
        return torch.cat(out, dim=-1)

    def guide_from(self, raw: Tensor) -> None:
        """The guide's draws of every layer given ``posterior_parameters``-shaped ``raw``
        (N, P) in place of x; call inside the data plate."""
        names = self.latent_sites
        if self.guide_kind == "bottom-up":
            h = pyro.sample(names[0], dist.Normal(*self.encoders[0].link(raw)).to_event(1))
            for name, encoder in zip(names[1:], self.encoders[1:]):
                h = pyro.sample(name, dist.Normal(*encoder(h)).to_event(1))
            return
        est = self._estimates_from(raw)
        z = {len(names): pyro.sample(names[-1], dist.Normal(*est[-1]).to_event(1))}
        for layer in range(len(names) - 1, 0, -1):
            if self.guide_kind == "deterministic":
                q = dist.Normal(*est[layer - 1]).to_event(1)
            else:
                q = self.merged(layer, est[layer - 1], self.context(layer, z))
            z[layer] = pyro.sample(names[layer - 1], q)

    def _estimates_from(self, raw: Tensor) -> list[tuple[Tensor, Tensor]]:
        pieces = raw.split([2 * d for d in self.z_dims], dim=-1)
        return [encoder.link(r) for encoder, r in zip(self.encoders, pieces)]

    def estimates(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The deterministic bottom-up pass: (mu_hat, sigma_hat) per layer, each network
        reading the layer below's estimated mean (the top-down guide's estimates; for the
        bottom-up guide, its layers followed through their means)."""
        return self._estimates_from(self._chain_of_means(x))

    def merged(self, layer: int, estimate: tuple[Tensor, Tensor], z_above: Tensor):
        """q(z_layer | x, z_{layer+1}) of the top-down guide: the bottom-up estimate and
        p(z_layer | z_{layer+1}) merged by precision (``layer`` 1-based, below the top;
        ``z_above`` as ``conditional``'s)."""
        loc_hat, scale_hat = estimate
        prior = self.conditionals[layer - 1](z_above)
        precision_hat, precision_p = scale_hat.pow(-2), prior[1].pow(-2)
        variance = 1.0 / (precision_hat + precision_p)
        loc = variance * (loc_hat * precision_hat + prior[0] * precision_p)
        return dist.Normal(loc, variance.sqrt()).to_event(1)

    def guide_above(self, x: Tensor, k: int = 1) -> None:
        """The proposal of the bound L^{>k} (Havtorn et al. 2021): the top-down guide's
        q(z_{>k} | x) for the layers above k, and the lowest k layers drawn from their
        conditional prior p(z_{<=k} | z_{k+1}).  In an importance weight p(x, z) / proposal
        those priors cancel, leaving p(x | z_1) p(z_{>k}) / q(z_{>k} | x).  Needs the top-down
        guide: the bottom-up guide has no q(z_{>k} | x) without the layers below."""
        if self.guide_kind == "bottom-up":
            raise ConfigError(
                "guide", "L^{>k} needs q(z_{>k} | x): the top-down or deterministic guide's"
            )
        names = self.latent_sites
        if not 1 <= k < len(names):
            raise ValueError(f"k must be in [1, {len(names) - 1}] for {len(names)} layers, got {k}")
        self.register()
        with pyro.plate(self.plate_name, x.shape[0]):
            est = self.estimates(x)
            z = {len(names): pyro.sample(names[-1], dist.Normal(*est[-1]).to_event(1))}
            for layer in range(len(names) - 1, 0, -1):
                if layer > k and self.guide_kind == "deterministic":
                    q = dist.Normal(*est[layer - 1]).to_event(1)
                elif layer > k:
                    q = self.merged(layer, est[layer - 1], self.context(layer, z))
                else:
                    q = self.conditional(layer, self.context(layer, z))
                z[layer] = pyro.sample(names[layer - 1], q)

    # -- conveniences (no Pyro involved) -------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of the top layer z_L under the guide, following the
        means of the layers below (bottom-up) or the bottom-up estimates (top-down)."""
        return self.estimates(x)[-1]

    def _down_means(self, z_top: Tensor) -> Tensor:
        """p(x | ...)'s input with the layers below the top at their conditional means."""
        z = {len(self.z_dims): z_top}
        for layer in range(len(self.z_dims) - 1, 0, -1):
            z[layer] = self.conditionals[layer - 1](self.context(layer, z))[0]
        return self.context(0, z)

    @torch.no_grad()
    def decode(self, z_top: Tensor) -> Tensor:
        """Pixel probabilities for top-layer codes, the layers below at their conditional
        means."""
        return torch.sigmoid(self.decoder(self._down_means(z_top)))

    @torch.no_grad()
    def reconstruction_log_prob(self, x: Tensor) -> Tensor:
        """log p(x | z_1 = the decoded mean of the top code) per row of x, nats."""
        return self.likelihood(self._down_means(self.encode(x)[0])).log_prob(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean image decoded from the guide's mean of the top layer."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Mean images decoded from ``n`` draws of the top prior, shape (n, x_dim)."""
        z = torch.randn(n, self.z_dims[-1], generator=generator).to(self._zero.device)
        return self.decode(z)
