"""Sample-quality measures against exact answers, and the GAN baseline."""

import numpy as np
import pytest
import torch

from pyro_vae.apps.baselines import GAN, fit_gan, interpolate
from pyro_vae.apps.sample_metrics import (
    classifier_features,
    frechet_distance,
    gaussian_frechet_distance,
    precision_recall,
)


def random_spd(d, seed):
    g = np.random.default_rng(seed)
    a = g.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    # commuting (diagonal) covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert gaussian_frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected)
    # general covariances, against scipy's matrix square root of the product
    from scipy.linalg import sqrtm

    ca, cb = random_spd(5, 0), random_spd(5, 1)
    expected = np.trace(ca + cb - 2 * np.real(sqrtm(ca @ cb))) + 4.0
    got = gaussian_frechet_distance(np.zeros(5), ca, np.full(5, 2 / np.sqrt(5)), cb)
    assert got == pytest.approx(expected, rel=1e-9)
    # a singular covariance (a dead feature) against itself: exactly zero
    singular = np.diag([2.0, 1.0, 0.0])
    assert gaussian_frechet_distance(np.ones(3), singular, np.ones(3), singular) < 1e-12


def test_frechet_distance_of_sets_is_zero_against_itself_and_converges_to_the_gaussians():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x + 1.0) == pytest.approx(4.0, rel=1e-6)  # a shift of the mean
    # large samples of N(0, I) and N(0, 4 I) in 3 dimensions: 3 (2 - 1)^2 = 3
    a = torch.randn(200_000, 3, generator=g)
    b = 2.0 * torch.randn(200_000, 3, generator=g)
    assert frechet_distance(a, b) == pytest.approx(3.0, abs=0.05)


def test_precision_and_recall_tell_narrow_from_broad():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0]])
    real = torch.cat([c + torch.randn(400, 2, generator=g) for c in centres])
    same = torch.cat([c + torch.randn(400, 2, generator=g) for c in centres])
    r = precision_recall(real, same)
    assert r["precision"] > 0.95 and r["recall"] > 0.95
    # sharp but narrow: one of the two modes only
    narrow = centres[0] + torch.randn(800, 2, generator=g)
    r = precision_recall(real, narrow)
    assert r["precision"] > 0.95 and 0.4 < r["recall"] < 0.6
    # broad and off the data: few samples realistic
    broad = 10.0 * torch.randn(800, 2, generator=g) + torch.tensor([10.0, 15.0])
    r = precision_recall(real, broad)
    assert r["precision"] < 0.3
    # far away: nothing in common
    assert precision_recall(real, same + 1000.0) == {"precision": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(real, same[:3])


def test_classifier_features_are_the_penultimate_layer():
    from pyro_vae.networks.nets import mlp

    torch.manual_seed(0)
    net = mlp([6, 5, 4, 3], "relu")
    x = torch.rand(7, 6)
    expected = torch.relu(net[2](torch.relu(net[0](x))))
    assert torch.allclose(classifier_features(net, x, batch_size=3), expected.double())


def test_the_gan_trains_and_same_seed_gives_same_numbers():
    g = torch.Generator().manual_seed(0)
    # two kinds of 16-pixel binary "images"
    x = torch.zeros(400, 16)
    x[:200, :8] = 1.0
    x[200:, 8:] = 1.0
    x = (x + (torch.rand(400, 16, generator=g) < 0.05)).clamp(max=1.0)

    def run():
        torch.manual_seed(0)
        gan = GAN(16, 2, hidden=(32,))
        history = fit_gan(gan, x, epochs=30, batch_size=50, lr=2e-3, seed=0)
        return gan, history, gan.sample(200, torch.Generator().manual_seed(1))

    gan, history, samples = run()
    _, history_again, samples_again = run()
    assert history == history_again and torch.equal(samples, samples_again)
    assert set(history[0]) == {"d_loss", "g_loss", "d_real", "d_fake"}
    assert samples.shape == (200, 16) and 0 <= samples.min() and samples.max() <= 1
    # the generator has learnt the two kinds: most samples lie on one side or the other
    left, right = samples[:, :8].mean(1), samples[:, 8:].mean(1)
    assert ((left - right).abs() > 0.5).float().mean() > 0.7
    line = interpolate(gan.decode, torch.zeros(2), torch.ones(2), steps=5)
    assert line.shape == (5, 16)
    assert torch.allclose(line[0], gan.decode(torch.zeros(1, 2))[0])
