"""OOD scores and metrics: the metrics against hand counts, the complexity measure, the
scores' identities, and detection on data the suite can always make (MNIST against noise and
flipped MNIST); Fashion-MNIST where Debian's package is installed."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import run_script

from pyro_vae import VAE, BatchLoader, Trainer
from pyro_vae.apps.ood import (
    BACKGROUND_SCORE,
    COMPRESSORS,
    SCORES,
    choose_compressor,
    complexity_bits,
    detection_metrics,
    log_px_per_image,
    made_images,
    ood_scores,
)
from pyro_vae.data import binarize_static
from pyro_vae.data.sources import FASHION_DEBIAN_DIR


def pairwise_auroc(inside, outside):
    """P(a random OOD image scores lower than a random in-distribution one), ties half."""
    a, b = inside[:, None], outside[None, :]
    return float(((a > b).double() + 0.5 * (a == b).double()).mean())


def test_metrics_match_hand_counts_and_the_orientation():
    inside = torch.tensor([3.0, 2.0, 1.0, 0.5, 2.5])
    outside = torch.tensor([0.0, 2.5, -1.0, 1.5])
    m = detection_metrics(inside, outside)
    assert m["auroc"] == pytest.approx(pairwise_auroc(inside, outside))
    separated = detection_metrics(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([1.0, 2.0]))
    assert separated == {"auroc": 1.0, "auprc": 1.0, "fpr_at_95_tpr": 0.0}
    backwards = detection_metrics(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0, 7.0]))
    assert backwards["auroc"] == 0.0 and backwards["fpr_at_95_tpr"] == 1.0
    g = torch.Generator().manual_seed(0)
    same = detection_metrics(torch.randn(4000, generator=g), torch.randn(4000, generator=g))
    assert abs(same["auroc"] - 0.5) < 0.03
    with pytest.raises(ValueError, match="finite"):
        detection_metrics(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="at least one"):
        detection_metrics(torch.tensor([]), torch.tensor([1.0]))


@pytest.mark.parametrize("compressor", sorted(COMPRESSORS))
def test_complexity_grows_with_the_content_of_the_image(compressor):
    g = torch.Generator().manual_seed(1)
    blank = torch.zeros(1, 784)
    stripe = torch.zeros(1, 28, 28)
    stripe[:, 10:14] = 1
    noise = torch.bernoulli(torch.full((1, 784), 0.5), generator=g)
    bits = complexity_bits(torch.cat([blank, stripe.reshape(1, -1), noise]), compressor=compressor)
    assert bits[0] <= bits[1] < bits[2] and (bits % 8 == 0).all()
    assert bits[2] > 700  # a random image does not compress below its 784 bits by much
    with pytest.raises(ValueError, match="unknown compressor"):
        complexity_bits(blank, compressor="jpeg")


@pytest.mark.parametrize("target", ["bz2", "zlib"])
def test_the_compressor_whose_lengths_track_the_likelihood_is_chosen(mnist, target):
    x = binarize_static(mnist["valid"].subset(slice(0, 60)), 0, "v").images
    bits = {c: complexity_bits(x, compressor=c) for c in COMPRESSORS}
    # a "model" whose -log p(x) is exactly the target's code length, plus a little noise
    noise = torch.randn(len(x), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_px = -(bits[target] * math.log(2) + noise)
    chosen, correlations = choose_compressor(log_px, x)
    assert chosen == target and set(correlations) == set(COMPRESSORS)
    assert correlations[target] > 0.99 and max(correlations.values()) == correlations[target]
    # the correlation is Pearson's: the other compressors' lengths correlate less
    r = np.corrcoef(-log_px.numpy(), bits["png"].numpy())[0, 1]
    assert correlations["png"] == pytest.approx(r)
    with pytest.raises(ValueError, match="at least 3"):
        choose_compressor(log_px[:2], x[:2])


def test_made_ood_sets():
    x = torch.bernoulli(torch.full((200, 16), 0.4), generator=torch.Generator().manual_seed(1))
    flipped = made_images("flipped", x, seed=0)
    assert torch.equal(flipped.reshape(200, 4, 4), x.reshape(200, 4, 4).flip(1))
    assert torch.equal(made_images("flipped", flipped, seed=0), x)
    noise = made_images("noise", x, seed=3)
    assert torch.equal(noise, made_images("noise", x, seed=3))
    assert not torch.equal(noise, made_images("noise", x, seed=4))
    assert ((noise == 0) | (noise == 1)).all()
    assert torch.allclose(noise.mean(0), x.mean(0), atol=0.15)  # the pixels' own frequencies
    with pytest.raises(ValueError, match="unknown made OOD set"):
        made_images("blur", x, seed=0)


@pytest.fixture(scope="module")
def mnist_vae(mnist):
    """A small VAE trained for a few epochs on 3,000 binarised MNIST images."""
    torch.manual_seed(0)
    train = binarize_static(mnist["train"].subset(slice(0, 3000)), 0, "t")
    vae = VAE(z_dim=16, hidden=(200,))
    trainer = Trainer(vae.model, vae.guide, lr=3e-3)
    loader = BatchLoader(train, batch_size=100, shuffle=True, seed=0)
    for _ in range(8):
        for (x,) in loader:
            trainer.step(x)
    test = binarize_static(mnist["test"].subset(slice(0, 300)), 0, "test").images
    return vae.eval(), test


def test_scores_identities_and_noise_is_detected(mnist_vae):
    vae, x = mnist_vae
    s = ood_scores(vae, x, num_particles=50)
    assert all(v.shape == (len(x),) and v.dtype == torch.float64 for v in s.values())
    assert (s["log_px"] >= s["elbo"] - 1e-6).all()
    bits = complexity_bits(x)
    assert torch.allclose(s["complexity_ratio"], s["log_px"] + bits * math.log(2))
    recon = vae.likelihood(vae.encode(x)[0]).log_prob(x).double()
    assert torch.allclose(s["reconstruction"], recon)
    g = torch.Generator().manual_seed(2)
    # independent pixels with the digits' own mean intensities: the likelihood sees the
    # missing strokes; the complexity ratio does not, as the model still codes such noise
    # better than a generic compressor (it knows where the background is)
    noise = torch.bernoulli(x.mean(0).expand_as(x), generator=g)
    n = ood_scores(vae, noise, num_particles=50)
    for name in ("log_px", "elbo"):
        assert detection_metrics(s[name], n[name])["auroc"] > 0.95, name
    # uniform noise: every score sees it
    uniform = ood_scores(
        vae, torch.bernoulli(torch.full_like(x, 0.5), generator=g), num_particles=50
    )
    for name in SCORES:
        assert detection_metrics(s[name], uniform[name])["auroc"] > 0.99, name
    with pytest.raises(ValueError, match="Bernoulli"):
        ood_scores(VAE(likelihood="gaussian"), x)


def test_background_ratio(mnist, mnist_vae):
    vae, x = mnist_vae
    x = x[:100]
    # against itself the ratio is exactly zero: the two estimates share their draws
    s = ood_scores(vae, x, num_particles=20, background=vae, seed=3)
    assert set(s) == {*SCORES, BACKGROUND_SCORE} and torch.equal(s[BACKGROUND_SCORE], 0 * x[:, 0])
    # a background model trained on the same images with 20% of the pixels replaced by coin
    # flips (Ren et al.'s recipe) knows noise better than the clean model does
    torch.manual_seed(1)
    train = binarize_static(mnist["train"].subset(slice(0, 3000)), 0, "t")
    bg = VAE(z_dim=16, hidden=(200,))
    trainer = Trainer(bg.model, bg.guide, lr=3e-3)
    loader = BatchLoader(train, batch_size=100, shuffle=True, seed=1, perturb=0.2)
    for _ in range(4):
        for (batch,) in loader:
            trainer.step(batch)
    bg.eval()
    s = ood_scores(vae, x, num_particles=20, background=bg, seed=3)
    lp_bg = log_px_per_image(bg, x, num_particles=20, seed=3)
    assert torch.allclose(s[BACKGROUND_SCORE], s["log_px"] - lp_bg)
    g = torch.Generator().manual_seed(4)
    uniform = torch.bernoulli(torch.full_like(x, 0.5), generator=g)
    n = ood_scores(vae, uniform, num_particles=20, background=bg, seed=3)
    assert (log_px_per_image(bg, uniform, num_particles=20) > n["log_px"]).all()
    assert detection_metrics(s[BACKGROUND_SCORE], n[BACKGROUND_SCORE])["auroc"] > 0.99
    with pytest.raises(ValueError, match="Bernoulli"):
        ood_scores(vae, x, background=VAE(likelihood="gaussian"))


def test_same_seed_same_scores(mnist_vae):
    vae, x = mnist_vae
    a = ood_scores(vae, x[:20], num_particles=30, seed=5)
    b = ood_scores(vae, x[:20], num_particles=30, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_script_on_fashion_mnist(data_dir, trained_run, tmp_path):
    if not FASHION_DEBIAN_DIR.is_dir():
        pytest.skip(
            f"Fashion-MNIST is not installed ({FASHION_DEBIAN_DIR} missing): "
            "apt-get install dataset-fashion-mnist"
        )
    out = tmp_path / "ood"
    args = ["--checkpoint", str(trained_run), "--in", "mnist", "--ood", "fashion-mnist"]
    args += ["--images", "40", "--num-particles", "10", "--out", str(out), "--quiet"]
    result = run_script("detect_ood.py", args, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "ood_mnist_vs_fashion-mnist.json").read_text())
    assert report["images"] == {"in": 40, "out": 40}
    scores = np.load(out / "ood_mnist_vs_fashion-mnist.npz")
    assert scores["log_px_out"].shape == (40,)


def test_the_lzma_code_length_is_preset_9e_s():
    """The per-image lzma compressor keeps preset 9e's code lengths with a small dictionary."""
    import lzma

    from pyro_vae.apps.ood import complexity_bits

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(40, 784, generator=g) < torch.rand(40, 1, generator=g) * 0.5).float()
    images = (x.reshape(40, 28, 28).numpy() > 0.5).astype(np.uint8) * 255
    expected = [
        8.0 * len(lzma.compress(np.packbits(i > 127).tobytes(), preset=9 | lzma.PRESET_EXTREME))
        for i in images
    ]
    assert complexity_bits(x, (28, 28), "lzma").tolist() == expected
