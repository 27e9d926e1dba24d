"""The baselines of the PCA / autoencoder / VAE comparison against exact answers."""

import math

import pytest
import torch

from pyro_vae.apps.baselines import (
    Autoencoder,
    GaussianCodes,
    LinearAutoencoder,
    PCAModel,
    fit_autoencoder,
    fit_classifier,
    principal_angles,
    reconstruction_errors,
    sample_quality,
)


def low_rank_data(n=600, x_dim=12, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(x_dim, rank, generator=g))[0]
    scales = torch.tensor([3.0, 2.0, 1.5])
    codes = torch.randn(n, rank, generator=g) * scales
    return 0.5 + codes @ basis.T + 0.05 * torch.randn(n, x_dim, generator=g)


def test_a_linear_autoencoder_spans_the_pca_subspace():
    """Baldi & Hornik (1989): at the optimum of the squared error, the decoder's columns span
    the top principal subspace (principal angles near zero), though not the same basis."""
    x = low_rank_data()
    torch.manual_seed(0)
    ae = LinearAutoencoder(12, 3)
    history = fit_autoencoder(ae, x, epochs=2000, batch_size=600, lr=0.01)
    assert history[-1] < history[0] / 50
    pca = PCAModel(x, 3)
    components = torch.from_numpy(pca.pca.components_.T)
    angles = principal_angles(ae.decoder.weight, components)
    assert angles.max() < 0.02
    # and its squared error reaches PCA's, the optimum of all rank-3 linear maps
    projected = torch.from_numpy(pca.pca.inverse_transform(pca.encode(x).double().numpy()))
    pca_error = float(((projected - x.double()) ** 2).mean())
    ae_error = float(((ae.decoder(ae.encode(x)).double() - x.double()) ** 2).mean().detach())
    assert pca_error * (1 - 1e-6) <= ae_error < 1.02 * pca_error
    # a subspace of the wrong rank is far from it
    assert principal_angles(components[:, :2], torch.eye(12)[:, :2]).max() > 0.3


def test_gaussian_codes_recover_mean_and_covariance():
    g = torch.Generator().manual_seed(1)
    cov = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    codes = torch.distributions.MultivariateNormal(torch.tensor([1.0, -1.0]).double(), cov)
    fitted = GaussianCodes.fit(codes.sample((20000,)).float())
    draws = fitted.sample(20000, g).double()
    assert torch.allclose(draws.mean(0), torch.tensor([1.0, -1.0]).double(), atol=0.05)
    assert torch.allclose(torch.cov(draws.T), cov, atol=0.08)


def test_reconstruction_errors_and_sample_quality_by_hand():
    x = torch.tensor([[1.0, 0.0]])
    errors = reconstruction_errors(x, torch.tensor([[0.8, 0.4]]))
    assert errors["bce_per_pixel"] == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert errors["squared_error_per_pixel"] == pytest.approx((0.04 + 0.16) / 2)

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return images  # the "images" are logits over 10 classes

    logits = torch.full((4, 10), -20.0)
    logits[0, 3] = logits[1, 3] = logits[2, 5] = logits[3, 7] = 20.0
    q = sample_quality(Fixed(), logits)
    assert q["confidence"] == pytest.approx(1.0)
    assert q["class_counts"][3] == 2 and sum(q["class_counts"]) == 4
    share = torch.tensor([0.5, 0.25, 0.25])
    assert q["class_balance"] == pytest.approx(float(-(share * share.log()).sum()) / math.log(10))


def test_the_deep_autoencoder_and_classifier_learn(mnist):
    x = (mnist["train"].images[:5000] > 0.5).float()
    y = mnist["train"].labels[:5000]
    torch.manual_seed(0)
    ae = Autoencoder(784, 10, hidden=(64,))
    history = fit_autoencoder(ae, x, epochs=3)
    assert history[-1] < 0.7 * history[0]
    classifier = fit_classifier(x, y, epochs=3)
    test = (mnist["test"].images[:500] > 0.5).float()
    accuracy = (classifier(test).argmax(-1) == mnist["test"].labels[:500]).float().mean()
    assert accuracy > 0.88
