"""How good and how varied generated samples are, measured in a classifier's feature space.

- ``frechet_distance``: the Fréchet distance between Gaussians fitted to two sets of features
  (Heusel et al. 2017's FID, computed on the features of the project's own digit classifier
  rather than Inception's: the data are 28x28 binary digits, and no weights are downloaded).
  Zero for a set against itself; it grows with a shift of the mean and with a covariance that
  is too narrow (mode dropping) or too broad.
- ``precision_recall``: Kynkäänniemi et al. (2019)'s k-nearest-neighbour precision and recall.
  Each set's support is estimated as the union of balls around its points, each ball reaching
  the point's k-th nearest neighbour in its own set; precision is the share of generated
  points inside the real support (are samples realistic?), recall the share of real points
  inside the generated support (is every kind of real image produced?).  Sharp but narrow
  samples score high precision and low recall; broad but blurry ones the other way round.

Features come from ``classifier_features``: the penultimate layer of an ``mlp`` classifier.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "classifier_features",
    "frechet_distance",
    "gaussian_frechet_distance",
    "precision_recall",
]


@torch.no_grad()
def classifier_features(
    classifier: nn.Sequential, images: Tensor, batch_size: int = 2000
) -> Tensor:
    """The activations of ``classifier``'s penultimate layer (everything but its last linear
    layer) on ``images`` (N, D), as float64 (N, F)."""
    body = classifier[:-1]
    return torch.cat(
        [body(images[i : i + batch_size]).double() for i in range(0, len(images), batch_size)]
    )


def gaussian_frechet_distance(
    mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray
) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mean_a, cov_a) and
    N(mean_b, cov_b): the squared Euclidean distance between the means plus
    ``tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2))``."""
    from scipy.linalg import eigh, eigvalsh

    cov_a, cov_b = np.asarray(cov_a, dtype=float), np.asarray(cov_b, dtype=float)
    # tr((A B)^(1/2)) = sum of sqrt(eigenvalues of A^(1/2) B A^(1/2)), a symmetric PSD matrix:
    # eigen-decompositions stay exact where sqrtm of the non-symmetric A B warns and loses
    # accuracy, as it does on the singular covariances of classifier features (dead units)
    values, vectors = eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = np.asarray(mean_a, dtype=float) - np.asarray(mean_b, dtype=float)
    value = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross
    return float(max(value, 0.0))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted (mean, covariance) to two sets of
    features (N, F) and (M, F): 0 for a set against itself, in squared feature units."""
    stats = []
    for f in (features_a, features_b):
        f = f.double().numpy()
        stats += [f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))]
    return gaussian_frechet_distance(*stats)


def _kth_neighbour_radii(features: Tensor, k: int, chunk: int) -> Tensor:
    radii = []
    for i in range(0, len(features), chunk):
        d = torch.cdist(features[i : i + chunk], features)
        # the smallest distance is the point itself (0): the k-th neighbour is at index k
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int) -> float:
    inside = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i : i + chunk], centres)
        inside.append((d <= radii).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: Tensor, generated: Tensor, k: int = 3, chunk: int = 1000
) -> dict[str, float]:
    """k-nearest-neighbour precision and recall (Kynkäänniemi et al. 2019) of ``generated``
    features against ``real`` ones, both (N, F); fractions in [0, 1].

    Hand-written: scikit-learn's neighbour searches give the radii but not "is this point in
    any of the other set's balls", and the pairwise distances are a few chunked ``cdist``
    calls either way."""
    if min(len(real), len(generated)) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} points per set")
    real, generated = real.double(), generated.double()
    real_radii = _kth_neighbour_radii(real, k, chunk)
    generated_radii = _kth_neighbour_radii(generated, k, chunk)
    return {
        "precision": _coverage(generated, real, real_radii, chunk),
        "recall": _coverage(real, generated, generated_radii, chunk),
    }
