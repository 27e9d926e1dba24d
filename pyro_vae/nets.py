"""Networks: an MLP builder, the encoder x -> (loc, scale) and the decoder z -> parameters.

Plain PyTorch; nothing here knows about Pyro.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "Decoder", "Encoder", "mlp"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def mlp(
    sizes: Sequence[int], activation: str = "relu", final_activation: bool = False
) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (and after the last
    one if ``final_activation``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (..., x_dim) -> (loc, scale), each (..., z_dim); scale = softplus(raw) + min_scale > 0."""

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        self.net = mlp([x_dim, *hidden, 2 * z_dim], activation)
        self.min_scale = min_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.link(self.net(x))

    def link(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(loc, scale) from the last layer's unconstrained output (..., 2 z_dim)."""
        loc, raw_scale = raw.chunk(2, dim=-1)
        # softplus grows linearly, so a large raw value cannot overflow as exp would.
        return loc, F.softplus(raw_scale) + self.min_scale


class Decoder(nn.Module):
    """z (..., z_dim) -> (..., x_dim) unconstrained outputs: Bernoulli logits or a Gaussian mean."""

    def __init__(
        self, z_dim: int, x_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu"
    ) -> None:
        super().__init__()
        self.net = mlp([z_dim, *reversed(list(hidden)), x_dim], activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)
