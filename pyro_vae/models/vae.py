"""The VAE: p(z) p(x|z) as ``model`` and q(z|x) as ``guide``, both methods of one ``nn.Module``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae.checks import ConfigError, positive_int, positive_number, sizes
from pyro_vae.choices import ARCHS, COVARIANCES, FLOWS, LIKELIHOODS, SCALE_LINKS
from pyro_vae.models.base import PyroModel
from pyro_vae.networks.distributions import BernoulliImage, DiscretizedLogistic
from pyro_vae.networks.nets import (
    ConvDecoder,
    ConvEncoder,
    Decoder,
    Encoder,
    image_layout,
    scale_from,
)

__all__ = ["COVARIANCES", "FLOWS", "LIKELIHOODS", "VAE"]


class VAE(PyroModel):
    """A VAE with a standard normal prior, a diagonal Gaussian guide and a factorised likelihood.

    ``model(x)`` and ``guide(x)`` are ordinary Pyro functions with one ``pyro.plate("data")``
    over the rows of ``x`` (N, x_dim), so ``SVI(vae.model, vae.guide, optim, Trace_ELBO())``
    trains them directly.  Subclass and override ``prior``/``guide``/``likelihood`` to extend.

    ``likelihood="bernoulli"`` decodes to logits; ``"gaussian"`` decodes to a mean with a fixed
    standard deviation ``x_scale``, or a learned per-pixel one when ``x_scale`` is ``None``;
    ``"continuous-bernoulli"`` decodes to the logits of a continuous Bernoulli (intensities in
    [0, 1]); ``"logistic"`` decodes to a location and a scale per pixel of a discretised
    logistic over ``levels`` values (256 for 8-bit images scaled to [0, 1]).

    ``arch="conv"`` makes encoder and decoder convolutional (``ConvEncoder`` /
    ``ConvDecoder``: 3x3 convolutions of stride 2 with ``channels`` filters, ``hidden`` the
    fully connected layers between them and z), for images (H, W) or (H, W, C) of any size;
    ``"mlp"`` (the default) fully connected ones through ``hidden``.

    The guide is a diagonal Gaussian by default; ``covariance="full"`` makes it a full-covariance
    one, ``flow="iaf"`` or ``"planar"`` pushes the diagonal Gaussian through ``flow_depth``
    conditional transforms.  Either way it is ``posterior_from(posterior_parameters(x))``: the
    encoder's unconstrained outputs, and the distribution they define.

    ``beta`` weights the KL term: the latent site sits inside the same ``poutine.scale(beta)``
    in model and guide, so ``Trace_ELBO`` optimises E_q[log p(x|z)] - beta * KL(q(z|x) || p(z))
    (and ``TraceMeanField_ELBO`` scales its analytic KL by the same beta).  The evaluator
    ignores such scales and always reports the true ELBO and log p(x).
    """

    name_prefix = "vae"
    plate_name = "data"

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 50,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        likelihood: str = "bernoulli",
        x_scale: float | None = None,
        beta: float = 1.0,
        image_shape: Sequence[int] = (28, 28),
        flow: str | None = None,
        flow_depth: int = 2,
        covariance: str = "diagonal",
        scale_link: str = "softplus",
        weight_norm: bool = False,
        batch_norm: bool = False,
        levels: int = 256,
        arch: str = "mlp",
        channels: Sequence[int] = (32, 64),
        pixel_uniform: float = 0.0,
    ) -> None:
        super().__init__()
        if not (isinstance(pixel_uniform, (int, float)) and 0.0 <= pixel_uniform < 1.0):
            raise ConfigError("pixel_uniform", f"must be a number in [0, 1), got {pixel_uniform!r}")
        if pixel_uniform and likelihood != "logistic":
            raise ConfigError("pixel_uniform", "applies to the logistic likelihood only")
        self.pixel_uniform = float(pixel_uniform)
        if covariance not in COVARIANCES:
            raise ValueError(f"unknown covariance {covariance!r}; choose from {COVARIANCES}")
        if covariance == "full" and flow is not None:
            raise ConfigError(
                "covariance", "a flow starts from a diagonal Gaussian: no full covariance with it"
            )
        if x_scale is not None and likelihood != "gaussian":
            raise ConfigError("x_scale", "applies to the gaussian likelihood only")
        if flow is not None and flow not in FLOWS:
            raise ValueError(f"unknown flow {flow!r}; choose from {FLOWS}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}")
        x_dim, z_dim = positive_int("x_dim", x_dim), positive_int("z_dim", z_dim)
        hidden = sizes("hidden", hidden)
        flow_depth = positive_int("flow_depth", flow_depth)
        beta = positive_number("beta", beta)  # poutine.scale needs a positive scale
        if x_scale is not None:
            x_scale = positive_number("x_scale", x_scale)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.hidden, self.activation = tuple(hidden), activation
        self.likelihood_name, self.x_scale, self.beta = likelihood, x_scale, beta
        self.levels = positive_int("levels", levels)
        if self.levels < 2:
            raise ConfigError("levels", f"must be at least 2, got {levels}")
        self.image_shape = tuple(image_shape)
        if scale_link not in SCALE_LINKS:
            raise ConfigError(
                "scale_link", f"unknown link {scale_link!r}; choose from {SCALE_LINKS}"
            )
        self.scale_link, self.weight_norm = scale_link, bool(weight_norm)
        self.batch_norm = bool(batch_norm)
        nets = {"weight_norm": self.weight_norm, "batch_norm": self.batch_norm}
        if arch not in ARCHS:
            raise ConfigError("arch", f"unknown architecture {arch!r}; choose from {ARCHS}")
        self.arch, self.channels = arch, sizes("channels", channels)
        # the discretised logistic has two outputs per pixel: a location and a scale
        per_pixel = 2 if likelihood == "logistic" else 1
        if arch == "conv":
            self._check_conv(covariance)
            self.encoder = ConvEncoder(
                self.image_shape, z_dim, self.channels, hidden, activation,
                scale_link=scale_link, **nets,
            )  # fmt: skip
            self.decoder = ConvDecoder(
                z_dim, self.image_shape, self.channels, hidden, activation, per_pixel, **nets
            )
        else:
            self.encoder = Encoder(x_dim, z_dim, hidden, activation, scale_link=scale_link, **nets)
            self.decoder = Decoder(z_dim, per_pixel * x_dim, hidden, activation, **nets)
        self.flow, self.flow_depth = flow, flow_depth
        self.flows = nn.ModuleList(_flows(flow, flow_depth, z_dim) if flow else [])
        self.covariance = covariance
        if covariance == "full":
            # zero at the start: the guide starts as the diagonal one
            width = self.hidden[-1] if self.hidden else x_dim
            self.tril_head = nn.Linear(width, z_dim * (z_dim - 1) // 2)
            nn.init.zeros_(self.tril_head.weight)
            nn.init.zeros_(self.tril_head.bias)
        if likelihood == "gaussian" and x_scale is None:
            # softplus(0.5413) = 1: a unit standard deviation to start from.
            self.x_raw_scale = nn.Parameter(torch.full((x_dim,), 0.5413))
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain values (what a checkpoint stores)."""
        return {
            "x_dim": self.x_dim,
            "z_dim": self.z_dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "likelihood": self.likelihood_name,
            "x_scale": self.x_scale,
            "beta": self.beta,
            "image_shape": list(self.image_shape),
            "flow": self.flow,
            "flow_depth": self.flow_depth,
            "covariance": self.covariance,
            "scale_link": self.scale_link,
            "weight_norm": self.weight_norm,
            "batch_norm": self.batch_norm,
            # older checkpoints have no levels: their likelihoods do not use it
            **({"levels": self.levels} if self.likelihood_name == "logistic" else {}),
            # only for conv: the config is part of the compressed files' weights hash, and
            # files made by fully connected models must still decode
            **({"arch": "conv", "channels": list(self.channels)} if self.arch == "conv" else {}),
            # only when on, for the same reason
            **({"pixel_uniform": self.pixel_uniform} if self.pixel_uniform else {}),
        }

    def _check_conv(self, covariance: str) -> None:
        """What convolutional networks need: images, and a guide they can feed."""
        if covariance == "full":
            raise ConfigError(
                "covariance", "full takes the fully connected encoder (arch mlp), not conv"
            )
        try:
            c, h, w = image_layout(self.image_shape)
        except ValueError as e:
            raise ConfigError("arch", f"conv: {e}") from None
        if c * h * w != self.x_dim:
            raise ConfigError(
                "arch", f"conv: images of shape {self.image_shape} are not {self.x_dim} values"
            )

    def init_output_bias(self, mean: Tensor) -> None:
        """Start the decoder's output at ``mean`` (the training images' mean): its logit,
        clamped into [1e-3, 1 - 1e-3], for Bernoulli pixels (Burda et al.'s start), the mean
        itself for a Gaussian."""
        if self.likelihood_name in ("bernoulli", "continuous-bernoulli"):
            mean = torch.logit(mean.clamp(1e-3, 1 - 1e-3))
        elif self.likelihood_name == "logistic":  # the location at the mean, raw scale 0
            mean = torch.cat([mean, torch.zeros_like(mean)])
        self.decoder.set_output_bias(mean)

    # -- the three distributions ---------------------------------------------------------

    def prior(self) -> dist.TorchDistribution:
        """p(z): a standard normal over ``z_dim`` dimensions (one event)."""
        return dist.Normal(self._zero, 1.0).expand([self.z_dim]).to_event(1)

    def likelihood(self, z: Tensor) -> dist.TorchDistribution:
        """p(x|z): one event of ``x_dim`` independent pixels."""
        out = self.decoder(z)
        if self.likelihood_name == "bernoulli":
            # Logits, not probabilities: no clamping, and no logit<->prob round trip per step.
            return BernoulliImage(logits=out)
        if self.likelihood_name == "continuous-bernoulli":
            return dist.ContinuousBernoulli(logits=out).to_event(1)
        if self.likelihood_name == "logistic":
            loc, raw = out.split(self.x_dim, dim=-1)
            # a scale of at least a tenth of a level's bin, reached smoothly (no hard floor)
            scale = scale_from(raw, self.scale_link, min_scale=0.1 / (self.levels - 1))
            return DiscretizedLogistic(
                loc, scale.log(), levels=self.levels, uniform=self.pixel_uniform
            )
        return dist.Normal(out, self._x_scale()).to_event(1)

    def posterior(self, x: Tensor) -> dist.TorchDistribution:
        """q(z|x): a normal from the encoder (one event; diagonal or full covariance), pushed
        through the flow's transforms when there is one."""
        return self.posterior_from(self.posterior_parameters(x))

    def posterior_parameters(self, x: Tensor) -> Tensor:
        """The encoder's unconstrained outputs for each row of x: (N, P), P = 2 z_dim, plus
        z_dim (z_dim - 1) / 2 for a full covariance."""
        if self.covariance == "diagonal":
            return self.encoder.net(x)
        layers = self.encoder.net
        hidden = layers[:-1](x)
        return torch.cat([layers[-1](hidden), self.tril_head(hidden)], dim=-1)

    def posterior_from(self, raw: Tensor) -> dist.TorchDistribution:
        """The guide's distribution for unconstrained parameters ``raw`` (N, P): what the
        encoder outputs, or any other point of the same family (a per-image optimum)."""
        loc, scale = self.encoder.link(raw[..., : 2 * self.z_dim])
        if self.covariance == "full":
            rows, cols = torch.tril_indices(self.z_dim, self.z_dim, -1, device=raw.device)
            tril = torch.diag_embed(scale)
            tril[..., rows, cols] = raw[..., 2 * self.z_dim :]
            return dist.MultivariateNormal(loc, scale_tril=tril)
        base = dist.Normal(loc, scale).to_event(1)
        if not self.flows:
            return base
        # each transform conditioned on the base Gaussian's (loc, log scale)
        context = torch.cat([loc, scale.log()], dim=-1)
        return dist.TransformedDistribution(base, [t.condition(context) for t in self.flows])

    def _x_scale(self) -> Tensor | float:
        if self.x_scale is not None:
            return self.x_scale
        return F.softplus(self.x_raw_scale) + 1e-3

    # -- model and guide -----------------------------------------------------------------

    def model(self, x: Tensor) -> None:
        """p(z) p(x|z) for a batch x (N, x_dim), observed at site ``"x"``."""
        self.register()
        with pyro.plate(self.plate_name, x.shape[0]):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: Tensor) -> None:
        """q(z|x) for a batch x (N, x_dim), at site ``"z"``."""
        self.register()
        with pyro.plate(self.plate_name, x.shape[0]):
            with poutine.scale(scale=self.beta):
                pyro.sample("z", self.posterior(x))

    # -- conveniences (no Pyro involved) -------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's mean and standard deviation of z for each row of x (with a flow: of
        the base Gaussian, before the transforms; with a full covariance: the marginal ones)."""
        if self.covariance == "diagonal":
            return self.encoder(x)
        q = self.posterior(x)
        return q.mean, q.variance.sqrt()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Mean image for each z: pixel probabilities (Bernoulli) or the likelihood's mean."""
        if self.likelihood_name == "bernoulli":
            return torch.sigmoid(self.decoder(z))
        if self.likelihood_name == "gaussian":
            return self.decoder(z)
        return self.likelihood(z).mean

    @torch.no_grad()
    def reconstruction_log_prob(self, x: Tensor) -> Tensor:
        """log p(x | z = the guide's mean of z) per row of x, nats: how well the mean code
        reconstructs each image."""
        return self.likelihood(self.encode(x)[0]).log_prob(x)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean image decoded from the posterior mean of z."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Mean images decoded from ``n`` draws of the prior, shape (n, x_dim)."""
        z = torch.randn(n, self.z_dim, generator=generator).to(self._zero.device)
        return self.decode(z)


def _flows(name: str, depth: int, z_dim: int) -> list[nn.Module]:
    from pyro.distributions import transforms

    context = 2 * z_dim  # the encoder's loc and log scale
    if name == "iaf":
        return [
            transforms.conditional_affine_autoregressive(z_dim, context, hidden_dims=[2 * z_dim])
            for _ in range(depth)
        ]
    return [
        transforms.conditional_planar(z_dim, context, hidden_dims=[2 * z_dim]) for _ in range(depth)
    ]
