"""Networks: an MLP builder, the encoder x -> (loc, scale) and the decoder z -> parameters.

Plain PyTorch; nothing here knows about Pyro.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae.choices import SCALE_LINKS

__all__ = [
    "ACTIVATIONS",
    "SCALE_LINKS",
    "ConvDecoder",
    "ConvEncoder",
    "ConvNet",
    "Decoder",
    "FlatBatchNorm",
    "Encoder",
    "mlp",
    "image_layout",
    "scale_from",
    "with_class",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def mlp(
    sizes: Sequence[int],
    activation: str = "relu",
    final_activation: bool = False,
    weight_norm: bool = False,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (and after the last
    one if ``final_activation``); ``weight_norm``: every weight as ``g v / ||v||`` per output unit
    (Salimans & Kingma 2016, torch's ``parametrizations.weight_norm``), as Havtorn et al.'s
    hierarchical VAEs use; ``batch_norm``: batch normalisation before each hidden activation
    (Sønderby et al.'s ladder VAE; ``FlatBatchNorm``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(n_in, n_out)
        layers.append(nn.utils.parametrizations.weight_norm(linear) if weight_norm else linear)
        hidden = i < len(sizes) - 2
        if batch_norm and hidden:
            layers.append(FlatBatchNorm(n_out))
        if hidden or final_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class FlatBatchNorm(nn.BatchNorm1d):
    """Batch normalisation over every leading dimension of (..., features): the particles and
    the images of a batch alike.  In training mode it normalises with the batch's statistics
    and updates the running ones; in evaluation mode (``model.eval()``, which every
    evaluation, the compressor and the OOD scores use) it uses the running statistics, so an
    image's figures do not depend on the others in its batch.  The running statistics are
    buffers: checkpoints carry them.  Under torchrun each process keeps its own (no
    synchronisation: their running statistics are those of rank 0's shards in the
    checkpoint)."""

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, x.shape[-1])


class ConvNet(nn.Module):
    """Flattened images x (..., H * W) -> (..., out_dim): 5x5 convolutions of stride 2 with
    ``channels`` filters each, then an ``mlp`` through ``hidden``.

    The semi-supervised model's classifier q(y|x) can be one (``SSVAE(classifier="conv")``).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        out_dim: int,
        channels: Sequence[int] = (16, 32),
        hidden: Sequence[int] = (500,),
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        if len(image_shape) != 2:
            raise ValueError(f"a ConvNet takes grey images (H, W), not shape {tuple(image_shape)}")
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = []
        h, w, c_in = *self.image_shape, 1
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), ACTIVATIONS[activation]()]
            h, w, c_in = (h + 1) // 2, (w + 1) // 2, c_out
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.head = mlp([c_in * h * w, *hidden, out_dim], activation)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = self.head(self.features(x.reshape(-1, 1, *self.image_shape)))
        return out.reshape(*lead, -1)


# The links from an unconstrained output s to a standard deviation:
#   softplus   softplus(s) + 1e-4 (the floor keeps the scale positive in float32; a unit whose
#              s runs far below zero sits on it with a vanishing gradient)
#   exp        exp(s), Burda et al.'s: no floor, the log-scale moves linearly with s
#   softclamp  exp(5 tanh(s / 5)), NVAE's soft clamp of the log-scale to (-5, 5)
# exp overflows float32 past 88; a log-scale this large is no posterior's
_MAX_LOG_SCALE = 30.0


class _GaussianOutput(nn.Module):
    """What every encoder shares: ``net(x)`` gives the raw output (..., 2 z_dim), ``link``
    splits it into (loc, scale), the scale through ``scale_link``."""

    def _set_link(self, scale_link: str, min_scale: float) -> None:
        if scale_link not in SCALE_LINKS:
            raise ValueError(f"unknown scale link {scale_link!r}; choose from {SCALE_LINKS}")
        self.min_scale, self.scale_link = min_scale, scale_link

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.link(self.net(x))

    def link(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(loc, scale) from the last layer's unconstrained output (..., 2 z_dim)."""
        loc, raw_scale = raw.chunk(2, dim=-1)
        return loc, scale_from(raw_scale, self.scale_link, self.min_scale)


class Encoder(_GaussianOutput):
    """x (..., x_dim) -> (loc, scale), each (..., z_dim); the scale from the second half of
    the last layer through ``scale_link`` (``SCALE_LINKS``; softplus(raw) + min_scale by
    default)."""

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        min_scale: float = 1e-4,
        scale_link: str = "softplus",
        weight_norm: bool = False,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self._set_link(scale_link, min_scale)
        self.net = mlp(
            [x_dim, *hidden, 2 * z_dim], activation, weight_norm=weight_norm, batch_norm=batch_norm
        )

    def with_class(self, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """``self([x, one_hot(y)])``, computed as ``with_class`` does."""
        return self.link(with_class(self.net, x, y, num_classes))


def scale_from(raw: Tensor, link: str = "softplus", min_scale: float = 1e-4) -> Tensor:
    """A standard deviation from unconstrained values through ``link`` (``SCALE_LINKS``)."""
    if link == "softplus":
        # softplus grows linearly, so a large raw value cannot overflow as exp would.
        return F.softplus(raw) + min_scale
    if link == "exp":
        return raw.clamp(max=_MAX_LOG_SCALE).exp()
    return torch.exp(5.0 * torch.tanh(raw / 5.0))


class Decoder(nn.Module):
    """z (..., z_dim) -> (..., x_dim) unconstrained outputs: Bernoulli logits or a Gaussian mean."""

    def __init__(
        self,
        z_dim: int,
        x_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        weight_norm: bool = False,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.net = mlp(
            [z_dim, *reversed(list(hidden)), x_dim],
            activation,
            weight_norm=weight_norm,
            batch_norm=batch_norm,
        )

    @torch.no_grad()
    def set_output_bias(self, bias: Tensor) -> None:
        """Set the last layer's bias (e.g. to the logit of the training images' mean, as
        Burda et al. start their decoders: the untrained model then already predicts each
        pixel's frequency)."""
        self.net[-1].bias.copy_(bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)

    def with_class(self, z: Tensor, y: Tensor, num_classes: int) -> Tensor:
        """``self([z, one_hot(y)])``, computed as ``with_class`` does."""
        return with_class(self.net, z, y, num_classes)


def image_layout(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(channels, height, width) of images stored flat in (H, W) or (H, W, C) order; a
    ``ValueError`` for any other shape (vectors have no neighbourhoods to convolve)."""
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        return 1, shape[0], shape[1]
    if len(shape) == 3:
        return shape[2], shape[0], shape[1]
    raise ValueError(f"convolutional networks take images (H, W) or (H, W, C), not shape {shape}")


def _halvings(size: int, steps: int) -> list[int]:
    """``size`` after each of ``steps`` stride-2 convolutions (3x3, padding 1): ceil(size/2)."""
    sizes = [size]
    for _ in range(steps):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class ConvEncoder(_GaussianOutput):
    """Flat images x (..., H * W * C) -> (loc, scale), each (..., z_dim): 3x3 convolutions
    of stride 2 with ``channels`` filters each, then an ``mlp`` through ``hidden`` to the
    2 z_dim outputs that ``link`` splits as ``Encoder``'s.  ``net(x)`` is the raw output."""

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int,
        channels: Sequence[int] = (32, 64),
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        min_scale: float = 1e-4,
        scale_link: str = "softplus",
        weight_norm: bool = False,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self._set_link(scale_link, min_scale)
        self.image_shape = tuple(image_shape)
        c, h, w = image_layout(image_shape)
        heights, widths = _halvings(h, len(channels)), _halvings(w, len(channels))
        layers: list[nn.Module] = [_ImagesIn(self.image_shape)]
        #: floats of working memory per image: the largest unfolded input of a convolution
        self.row_floats = max(
            [c_in * 9 * h * w for c_in, h, w in zip([c, *channels], heights[1:], widths[1:])],
            default=0,
        )
        for c_out in channels:
            conv = nn.Conv2d(c, c_out, 3, stride=2, padding=1)
            layers.append(nn.utils.parametrizations.weight_norm(conv) if weight_norm else conv)
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(ACTIVATIONS[activation]())
            c = c_out
        layers.append(nn.Flatten())
        features = c * heights[-1] * widths[-1]
        self.net = _KeepLeading(
            nn.Sequential(
                *layers,
                mlp(
                    [features, *hidden, 2 * z_dim],
                    activation,
                    weight_norm=weight_norm,
                    batch_norm=batch_norm,
                ),
            )
        )


class ConvDecoder(nn.Module):
    """z (..., z_dim) -> (..., outputs * H * W * C) unconstrained outputs, ``outputs`` values
    per pixel (1: logits or a mean; 2: a location and a raw scale, the first H * W * C values
    all locations): an ``mlp`` through ``hidden`` to the smallest feature map, then 3x3
    transposed convolutions of stride 2 mirroring ``ConvEncoder`` (``channels`` in reverse)
    up to the image's size, a last 3x3 convolution to the outputs, and a bias per output value
    (``set_output_bias``)."""

    def __init__(
        self,
        z_dim: int,
        image_shape: Sequence[int],
        channels: Sequence[int] = (32, 64),
        hidden: Sequence[int] = (256,),
        activation: str = "relu",
        outputs: int = 1,
        weight_norm: bool = False,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.image_shape, self.outputs = tuple(image_shape), outputs
        c, h, w = image_layout(image_shape)
        self.channels = c
        heights, widths = _halvings(h, len(channels)), _halvings(w, len(channels))
        top = list(channels)[-1] if channels else c
        self.start = (top, heights[-1], widths[-1])
        self.dense = mlp(
            [z_dim, *reversed(list(hidden)), top * heights[-1] * widths[-1]],
            activation,
            final_activation=True,
            weight_norm=weight_norm,
            batch_norm=batch_norm,
        )
        layers: list[nn.Module] = []
        sizes = list(zip(heights, widths))
        c_in, columns = top, []
        for i in range(len(channels) - 1, -1, -1):  # up from the smallest map
            (h_out, w_out), (h_in, w_in) = sizes[i], sizes[i + 1]
            c_out = channels[i - 1] if i > 0 else channels[0]
            columns.append(9 * c_out * h_in * w_in)
            up = nn.ConvTranspose2d(
                c_in, c_out, 3, stride=2, padding=1,
                output_padding=(h_out - (2 * h_in - 1), w_out - (2 * w_in - 1)),
            )  # fmt: skip
            layers.append(nn.utils.parametrizations.weight_norm(up) if weight_norm else up)
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(ACTIVATIONS[activation]())
            c_in = c_out
        layers.append(nn.Conv2d(c_in, outputs * c, 3, padding=1))
        self.convs = nn.Sequential(*layers)
        #: floats of working memory per z: the largest unfolded map of a convolution (the
        #: columns of a transposed one, the input of the last one)
        self.row_floats = max([*columns, 9 * c_in * h * w])
        # a bias per pixel and output (the convolutions' biases are per channel): the output
        # bias can then start at the data's mean image, as Burda et al. start theirs
        self.bias = nn.Parameter(torch.zeros(outputs * c * h * w))

    @torch.no_grad()
    def set_output_bias(self, bias: Tensor) -> None:
        """Set the per-value output bias (``outputs * H * W * C`` values, in output order)."""
        self.bias.copy_(bias)

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        maps = self.convs(self.dense(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start))
        c, h, w = self.channels, maps.shape[-2], maps.shape[-1]
        # (M, outputs * C, H, W) -> (M, outputs, H, W, C): flat in the images' own order
        out = maps.reshape(-1, self.outputs, c, h, w).permute(0, 1, 3, 4, 2).flatten(1)
        return (out + self.bias).reshape(*lead, -1)


class _ImagesIn(nn.Module):
    """Flat images (M, H * W * C) -> (M, C, H, W)."""

    def __init__(self, image_shape: Sequence[int]) -> None:
        super().__init__()
        self.layout = image_layout(image_shape)

    def forward(self, x: Tensor) -> Tensor:
        c, h, w = self.layout
        return x.reshape(-1, h, w, c).permute(0, 3, 1, 2)


class _KeepLeading(nn.Module):
    """Applies ``body`` to (M, D) with every leading dimension of the input folded into M,
    and unfolds them again."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return self.body(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


def with_class(net: nn.Sequential, h: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """``net([h, one_hot(y)])`` for an ``mlp`` whose input is h (..., d) followed by the
    ``num_classes`` one-hot columns of y; h's and y's batch shapes broadcast against each other
    (y may carry an enumeration dimension on the left).

    The first layer is computed as W_h h + W_y[:, y] + b: with y enumerated over C classes, h
    goes through the first layer once instead of C times, and no (C, N, d + C) concatenation
    is built.  Same weights, same result up to rounding.
    """
    first = net[0]
    if not isinstance(first, nn.Linear) or first.in_features != h.shape[-1] + num_classes:
        raise ValueError(
            f"net's first layer takes {getattr(first, 'in_features', '?')} inputs, "
            f"not {h.shape[-1]} + {num_classes} classes"
        )
    d = h.shape[-1]
    from_h = F.linear(h, first.weight[:, :d], first.bias)
    # column y of W_y for each label: an embedding lookup, (*y.shape, out)
    from_y = F.embedding(y, first.weight[:, d:].t())
    out = from_h + from_y  # broadcasts h's batch shape against y's
    return net[1:](out) if len(net) > 1 else out
