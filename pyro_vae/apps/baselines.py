"""What the VAE is compared with: PCA, a linear autoencoder and a deep autoencoder with the
VAE's own networks, each as a latent-variable model of binary images with d dimensions, and
a digit classifier that judges generated samples.

Every method gives (1) reconstructions of held-out images, as pixel probabilities, and (2)
samples from its latent space:

- PCA (scikit-learn): codes are the projections on the d principal directions; samples are
  Gaussian in the principal subspace with the explained variances, mapped back and clipped.
- The linear autoencoder x -> Wx + b -> Vz + c with squared error: at its optimum the decoder
  spans the same subspace as PCA (Baldi & Hornik 1989); samples decode a Gaussian fitted to
  the codes of the training images.
- The deep autoencoder: the VAE's encoder layers to d codes, the VAE's decoder to Bernoulli
  logits, cross-entropy loss; samples as for the linear one.
- The VAE: codes are the encoder's means; samples decode draws of the prior.
- A GAN (Goodfellow et al. 2014) with the VAE's decoder layers as generator and its encoder
  layers as discriminator, trained with the non-saturating loss and Adam (the DCGAN recipe's
  lr 2e-4, beta1 0.5; Radford et al. 2015): samples only, no encoder and no likelihood.

``sample_quality`` scores samples with a classifier trained here on the labelled training
images (no downloaded weights): its mean confidence (the largest class probability) and the
balance of the predicted classes (entropy of their histogram over log 10: 1 when every
digit is equally common); given the features of real images, also the Fréchet distance and
the k-NN precision and recall in the classifier's feature space (``pyro_vae.apps.sample_metrics``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyro_vae.apps.sample_metrics import classifier_features, frechet_distance, precision_recall
from pyro_vae.choices import CAPABILITIES, METHODS
from pyro_vae.networks.nets import Decoder, mlp
from pyro_vae.training.stepper import Stepper

__all__ = [
    "CAPABILITIES",
    "GAN",
    "METHODS",
    "Autoencoder",
    "GaussianCodes",
    "LatentModelComparison",
    "LinearAutoencoder",
    "PCAModel",
    "compare_latent_models",
    "fit_autoencoder",
    "fit_classifier",
    "fit_gan",
    "interpolate",
    "principal_angles",
    "reconstruction_errors",
    "sample_quality",
]


class LinearAutoencoder(nn.Module):
    """x -> z = W x + b (d codes) -> V z + c; trained on squared error."""

    loss_name = "squared error"

    def __init__(self, x_dim: int, z_dim: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(x_dim, z_dim)
        self.decoder = nn.Linear(z_dim, x_dim)

    def encode(self, x: Tensor) -> Tensor:
        """Codes of the rows of x, shape (N, d)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Pixel values, clipped to [0, 1] to read as probabilities."""
        return self.decoder(z).clamp(0.0, 1.0)

    def loss(self, x: Tensor) -> Tensor:
        """The training loss on the batch x, summed over it."""
        return F.mse_loss(self.decoder(self.encoder(x)), x, reduction="sum")


class Autoencoder(nn.Module):
    """The VAE's encoder layers to ``z_dim`` codes (no variance) and its decoder to Bernoulli
    logits; trained on the binary cross-entropy."""

    loss_name = "binary cross-entropy"

    def __init__(
        self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu"
    ) -> None:
        super().__init__()
        self.encoder = mlp([x_dim, *hidden, z_dim], activation)
        self.decoder = Decoder(z_dim, x_dim, hidden, activation)

    def encode(self, x: Tensor) -> Tensor:
        """Codes of the rows of x, shape (N, d)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities for the codes z, shape (N, D)."""
        return torch.sigmoid(self.decoder(z))

    def loss(self, x: Tensor) -> Tensor:
        """The training loss on the batch x, summed over it."""
        logits = self.decoder(self.encoder(x))
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum")


def fit_autoencoder(
    ae: nn.Module,
    x: Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """Train ``ae`` (anything with ``loss(x)``) with Adam on the rows of ``x``; returns the
    mean loss per image of every epoch."""
    generator = torch.Generator().manual_seed(seed)
    stepper = Stepper(ae.loss, ae.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            total += stepper.step(x[order[start : start + batch_size]]).loss
        history.append(total / len(x))
    return history


class GAN(nn.Module):
    """A generator z (d) -> pixel probabilities with the VAE decoder's layers, and a
    discriminator x -> logit with the VAE encoder's layers (leaky ReLU, slope 0.2, as GAN
    discriminators use: a ReLU unit that is off passes no gradient to the generator).  Its
    latent prior is N(0, I), as the VAE's."""

    def __init__(
        self, x_dim: int, z_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu"
    ) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.generator = Decoder(z_dim, x_dim, hidden, activation)
        sizes = [x_dim, *hidden, 1]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU(0.2))
        self.discriminator = nn.Sequential(*layers)

    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities generated from latent codes z, shape (N, D)."""
        return torch.sigmoid(self.generator(z))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` images generated from draws of N(0, I), shape (n, D)."""
        return self.decode(torch.randn(n, self.z_dim, generator=generator))


def fit_gan(
    gan: GAN,
    x: Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    seed: int = 0,
) -> list[dict[str, float]]:
    """Train ``gan`` on the rows of ``x`` with the non-saturating loss: per minibatch one
    discriminator step on softplus(-D(x)) + softplus(D(G(z))), then one generator step on
    softplus(-D(G(z))) (Goodfellow et al. 2014), each with its own Adam.  The discriminator
    sees the generator's pixel probabilities against binary images, which pushes the
    generator towards confident pixels.  Returns per epoch the mean losses (nats per image)
    and the mean D(x) and D(G(z)) probabilities."""
    generator = torch.Generator().manual_seed(seed)
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=lr, betas=betas)
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=lr, betas=betas)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        sums = dict.fromkeys(("d_loss", "g_loss", "d_real", "d_fake"), 0.0)
        for start in range(0, len(x), batch_size):
            real = x[order[start : start + batch_size]]
            z = torch.randn(len(real), gan.z_dim, generator=generator)
            fake = gan.decode(z)
            real_logit = gan.discriminator(real)
            fake_logit = gan.discriminator(fake.detach())
            d_loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            g_loss = F.softplus(-gan.discriminator(fake)).mean()
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
            d_value, g_value = float(d_loss.detach()), float(g_loss.detach())
            if not (math.isfinite(d_value) and math.isfinite(g_value)):
                raise FloatingPointError(
                    f"the GAN's losses are not finite at epoch {len(history) + 1}"
                )
            n = len(real)
            sums["d_loss"] += d_value * n
            sums["g_loss"] += g_value * n
            sums["d_real"] += float(torch.sigmoid(real_logit.detach()).mean()) * n
            sums["d_fake"] += float(torch.sigmoid(fake_logit.detach()).mean()) * n
        history.append({key: value / len(x) for key, value in sums.items()})
    return history


@torch.no_grad()
def interpolate(decoder, start: Tensor, end: Tensor, steps: int = 10) -> Tensor:
    """Images decoded along the straight line from latent code ``start`` to ``end`` (each
    (d,)): ``decoder`` maps (steps, d) codes to (steps, D) pixel probabilities."""
    t = torch.linspace(0.0, 1.0, steps).unsqueeze(1)
    return decoder((1 - t) * start + t * end)


class PCAModel:
    """scikit-learn's PCA with d components, with the same interface as the autoencoders."""

    def __init__(self, x: Tensor, z_dim: int, seed: int = 0) -> None:
        from sklearn.decomposition import PCA

        self.pca = PCA(n_components=z_dim, random_state=seed).fit(x.double().numpy())

    def encode(self, x: Tensor) -> Tensor:
        """Codes of the rows of x, shape (N, d)."""
        return torch.from_numpy(self.pca.transform(x.double().numpy())).float()

    def decode(self, z: Tensor) -> Tensor:
        """Pixel probabilities for the codes z, shape (N, D)."""
        return torch.from_numpy(self.pca.inverse_transform(z.double().numpy())).float().clamp(0, 1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Gaussian in the principal subspace, with the explained variances."""
        std = torch.from_numpy(self.pca.explained_variance_).float().sqrt()
        return self.decode(torch.randn(n, len(std), generator=generator) * std)


@dataclass
class GaussianCodes:
    """A full-covariance Gaussian fitted to an encoder's codes of the training images."""

    mean: Tensor
    scale_tril: Tensor

    @classmethod
    def fit(cls, codes: Tensor) -> GaussianCodes:
        """The Gaussian (mean, covariance) of ``codes``, to sample new codes from."""
        codes = codes.double()
        cov = torch.atleast_2d(torch.cov(codes.T)) + 1e-6 * torch.eye(codes.shape[1])
        return cls(codes.mean(0), torch.linalg.cholesky(cov))

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` images decoded from draws of the codes' Gaussian, shape (n, D)."""
        eps = torch.randn(n, len(self.mean), generator=generator, dtype=torch.float64)
        return (self.mean + eps @ self.scale_tril.T).float()


@torch.no_grad()
def reconstruction_errors(x: Tensor, probs: Tensor) -> dict[str, float]:
    """Mean per-pixel binary cross-entropy (nats; probabilities clipped to [1e-6, 1 - 1e-6])
    and squared error of reconstructions ``probs`` of binary images ``x``."""
    p = probs.double().clamp(1e-6, 1 - 1e-6)
    x = x.double()
    return {
        "bce_per_pixel": float(F.binary_cross_entropy(p, x)),
        "squared_error_per_pixel": float(F.mse_loss(probs.double(), x)),
    }


def fit_classifier(
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 5,
    hidden: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    num_classes: int | None = None,
) -> nn.Module:
    """A D-``hidden``-C ReLU classifier of images ``x`` (N, D) with labels ``y`` in
    0..C-1 (C = ``num_classes``, by default the largest label + 1), trained with Adam on the
    cross-entropy; returns it in eval mode."""
    torch.manual_seed(seed)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    net = mlp([x.shape[1], hidden, num_classes], "relu")
    generator = torch.Generator().manual_seed(seed)
    stepper = Stepper(lambda xb, yb: F.cross_entropy(net(xb), yb), net.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 128):
            index = order[start : start + 128]
            stepper.step(x[index], y[index])
    return net.eval()


@torch.no_grad()
def sample_quality(
    classifier: nn.Sequential, images: Tensor, reference_features: Tensor | None = None
) -> dict:
    """The classifier's mean confidence on ``images`` (mean of the largest class
    probability), the class balance of its predictions (entropy of their histogram / log C,
    C the classifier's classes)
    and the histogram itself.  Given the classifier's features of real images
    (``classifier_features``), also the Fréchet distance to them and the k-NN precision and
    recall (k = 3) of the images' features against them."""
    probs = F.softmax(classifier(images), dim=-1)
    classes = probs.shape[-1]
    counts = torch.bincount(probs.argmax(-1), minlength=classes).double()
    share = counts / counts.sum()
    entropy = -(share[share > 0] * share[share > 0].log()).sum()
    out = {
        "confidence": float(probs.max(-1).values.mean()),
        "class_balance": float(entropy / math.log(classes)) if classes > 1 else 1.0,
        "class_counts": [int(c) for c in counts],
    }
    if reference_features is not None:
        features = classifier_features(classifier, images)
        out["frechet_distance"] = frechet_distance(reference_features, features)
        out |= precision_recall(reference_features, features)
    return out


def principal_angles(a: Tensor, b: Tensor) -> np.ndarray:
    """Principal angles (radians) between the column spaces of ``a`` and ``b``."""
    from scipy.linalg import subspace_angles

    return subspace_angles(a.detach().double().numpy(), b.detach().double().numpy())


@dataclass
class LatentModelComparison:
    """What ``compare_latent_models`` found for one latent size ``z_dim``: per method the
    reconstruction errors (None without an encoder) and sample quality (``metrics``); the
    sample quality of as many training images (``reference``: the floor of the Fréchet
    distance and the ceiling of precision and recall at this sample size); and tensors for
    the figures: reconstructions and samples (N, D), test codes (N, z_dim), and
    interpolations (rows of images along a line in latent space, name -> (steps, D))."""

    z_dim: int
    metrics: dict[str, dict]
    reconstructions: dict[str, Tensor]
    samples: dict[str, Tensor]
    codes: dict[str, Tensor]
    reference: dict = field(default_factory=dict)
    interpolations: dict[str, Tensor] = field(default_factory=dict)


def compare_latent_models(
    train: Tensor,
    test: Tensor,
    classifier: nn.Module,
    z_dim: int,
    *,
    hidden: Sequence[int] = (400,),
    activation: str = "relu",
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    num_samples: int = 1000,
    seed: int = 0,
) -> LatentModelComparison:
    """Fit PCA, a linear autoencoder, a deep autoencoder, a VAE and a GAN (``hidden``/
    ``activation`` networks, ``epochs`` of Adam; the autoencoders and the VAE (``Trace_ELBO``)
    at ``lr``, the GAN at its own recipe's rate, ``fit_gan``) with ``z_dim`` latent dimensions
    on the binary images ``train``; reconstruct ``test`` (every method with an encoder), draw
    ``num_samples`` samples from each latent space and score them with ``classifier``,
    against the features of ``test``."""
    from pyro_vae.data import BatchLoader, as_dataset
    from pyro_vae.models.vae import VAE
    from pyro_vae.training.trainer import Trainer

    x_dim = train.shape[1]
    torch.manual_seed(seed)
    seconds: dict[str, float] = {}  # training time of each method (wall clock)
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = time.perf_counter() - clock, time.perf_counter()

    pca = PCAModel(train, z_dim, seed)
    lap("PCA")
    linear = LinearAutoencoder(x_dim, z_dim)
    fit_autoencoder(linear, train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    lap("linear autoencoder")
    deep = Autoencoder(x_dim, z_dim, hidden, activation)
    fit_autoencoder(deep, train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    lap("autoencoder")
    vae = VAE(x_dim=x_dim, z_dim=z_dim, hidden=hidden, activation=activation)
    trainer = Trainer(vae.model, vae.guide, lr=lr)
    loader = BatchLoader(as_dataset(train), batch_size, shuffle=True, seed=seed)
    for _ in range(epochs):
        for (x,) in loader:
            trainer.step(x)
    vae.eval()
    lap("VAE")
    gan = GAN(x_dim, z_dim, hidden, activation)
    fit_gan(gan, train, epochs=epochs, batch_size=batch_size, seed=seed)
    lap("GAN")

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        codes = {
            "PCA": pca.encode(test),
            "linear autoencoder": linear.encode(test),
            "autoencoder": deep.encode(test),
            "VAE": vae.encode(test)[0],
        }
        decoders = {"PCA": pca, "linear autoencoder": linear, "autoencoder": deep}
        reconstructions = {name: decoders[name].decode(codes[name]) for name in decoders}
        reconstructions["VAE"] = vae.decode(codes["VAE"])
        samples = {"PCA": pca.sample(num_samples, generator)}
        for name, ae, data in (("linear autoencoder", linear, train), ("autoencoder", deep, train)):
            fitted = GaussianCodes.fit(ae.encode(data))
            samples[name] = ae.decode(fitted.sample(num_samples, generator))
        samples["VAE"] = vae.sample(num_samples, generator)
        samples["GAN"] = gan.sample(num_samples, generator)
        # the same two prior draws through both generators, and the VAE between two test
        # images' codes (the GAN has no encoder to give it one)
        ends = torch.randn(2, z_dim, generator=generator)
        interpolations = {
            "VAE, prior draws": interpolate(vae.decode, ends[0], ends[1]),
            "GAN, prior draws": interpolate(gan.decode, ends[0], ends[1]),
            "VAE, test images": interpolate(vae.decode, codes["VAE"][0], codes["VAE"][1]),
        }
    real = classifier_features(classifier, test)
    no_encoder = dict.fromkeys(("bce_per_pixel", "squared_error_per_pixel"))
    metrics = {
        name: {
            **(
                reconstruction_errors(test, reconstructions[name])
                if name in reconstructions
                else no_encoder
            ),
            "samples": sample_quality(classifier, samples[name], real),
            "can": CAPABILITIES[name],
            "train_seconds": seconds[name],
        }
        for name in METHODS
    }
    reference = sample_quality(classifier, train[: min(num_samples, len(train))], real)
    return LatentModelComparison(
        z_dim, metrics, reconstructions, samples, codes, reference, interpolations
    )
