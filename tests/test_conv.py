"""Convolutional encoder and decoder (``--arch conv``): the images' own layout in and out,
any size the strides allow, grey and colour, and every tool on a conv VAE."""

import json

import numpy as np
import pytest
import torch
from helpers import run_in_process

from pyro_vae import VAE, Trainer, estimate_log_px, make_elbo
from pyro_vae.apps.compression import BitsBackCoder
from pyro_vae.checks import ConfigError
from pyro_vae.networks.nets import ConvDecoder, ConvEncoder, _ImagesIn


def test_images_are_read_in_their_own_layout_height_width_channels():
    images = torch.arange(2 * 4 * 5 * 3, dtype=torch.float32).reshape(2, 4, 5, 3)
    as_maps = _ImagesIn((4, 5, 3))(images.reshape(2, -1))
    assert torch.equal(as_maps, images.permute(0, 3, 1, 2))  # channel c of pixel (i, j)
    grey = images[..., 0]
    assert torch.equal(_ImagesIn((4, 5))(grey.reshape(2, -1)), grey[:, None])


@pytest.mark.parametrize("shape", [(28, 28), (8, 8), (7, 5), (32, 32, 3), (9, 6, 2)])
def test_the_decoder_mirrors_the_encoder_at_any_size_and_keeps_leading_dimensions(shape):
    d = int(np.prod(shape))
    encoder, decoder = (
        ConvEncoder(shape, 4, channels=(8, 16)),
        ConvDecoder(4, shape, (8, 16), outputs=2),
    )
    loc, scale = encoder(torch.rand(3, d))
    assert loc.shape == scale.shape == (3, 4) and (scale > 0).all()
    assert decoder(torch.randn(5, 3, 4)).shape == (5, 3, 2 * d)  # particles, images, values
    # the output bias is one value per pixel and output, in the images' flat order: with the
    # convolutions silenced the output is the bias itself
    with torch.no_grad():
        for p in decoder.convs.parameters():
            p.zero_()
    bias = torch.randn(2 * d)
    decoder.set_output_bias(bias)
    assert torch.equal(decoder(torch.randn(2, 4)), bias.expand(2, -1))


def test_a_conv_vae_trains_estimates_round_trips_and_codes_its_images(tmp_path):
    from pyro_vae.io.checkpoints import load_checkpoint, save_checkpoint
    from pyro_vae.models import model_from_checkpoint

    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((32, 100), 0.3), generator=torch.Generator().manual_seed(1))
    vae = VAE(x_dim=100, z_dim=4, hidden=(32,), image_shape=(10, 10), arch="conv", channels=(4, 8))
    elbo = make_elbo("dreg", num_particles=3)
    trainer = Trainer(vae.model, vae.guide, lr=3e-3, elbo=elbo)
    before = elbo.loss(vae.model, vae.guide, x)
    for _ in range(40):
        trainer.step(x)
    assert elbo.loss(vae.model, vae.guide, x) < before - 10
    state = {"model_class": "VAE", "model_config": vae.config(), "model": vae.state_dict()}
    save_checkpoint(tmp_path / "c.pt", state)
    again = model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))
    assert again.arch == "conv" and again.channels == (4, 8)
    a = estimate_log_px(vae.model, vae.guide, x, num_particles=20, psis=False, seed=0)
    b = estimate_log_px(again.model, again.guide, x, num_particles=20, psis=False, seed=0)
    assert torch.equal(a.log_px, b.log_px)
    coder = BitsBackCoder(vae.eval())
    assert torch.equal(coder.decode(coder.encode(x)), x)
    # a fully connected model's config (and so its compressed files' hash) is as before
    assert "arch" not in VAE(x_dim=100, z_dim=4, image_shape=(10, 10)).config()


def test_settings_conv_cannot_take_are_refused_naming_them():
    with pytest.raises(ConfigError, match="arch: conv: convolutional networks take images"):
        VAE(x_dim=12, image_shape=(12,), arch="conv")
    with pytest.raises(ConfigError, match="covariance: full takes the fully connected"):
        VAE(x_dim=784, arch="conv", covariance="full")
    with pytest.raises(ConfigError, match="unknown architecture"):
        VAE(arch="resnet")


def test_train_svi_trains_a_conv_vae_on_8_bit_digits_and_refuses_it_for_two_layers(
    tmp_path, capsys
):
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--binarize", "none", "--likelihood", "logistic"]
    args += ["--arch", "conv", "--channels", "8,16", "--hidden", "32", "--z-dim", "4"]
    args += ["--epochs", "2", "--eval-particles", "10", "--quiet", "--out", str(out)]
    status, err = run_in_process("train_svi.py", args, capsys)
    assert status == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "conv" and config["channels"] == [8, 16]
    report = json.loads((out / "evaluation.json").read_text())
    assert 0 < report["bits_per_dim"]["nll"] < 8
    status, err = run_in_process(
        "train_svi.py", ["--model", "hvae", "--arch", "conv", "--out", str(tmp_path / "h")], capsys
    )
    assert status == 2 and "--arch applies to --model vae" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "h").exists()


def test_conv_networks_get_smaller_evaluation_passes_that_change_no_number():
    """rows_per_pass: a conv model's default pass is sized by its networks' largest unfolded
    map (the last convolution's 9 x channels x H x W input); a fully connected model keeps
    DEFAULT_MAX_ROWS.  The sharded evaluator uses it (passes of at most that many rows) and gives the
    numbers of the default pass bit for bit."""
    from pyro_vae.choices import DEFAULT_MAX_ROWS, PASS_FLOATS
    from pyro_vae.inference.evaluate import rows_per_pass
    from pyro_vae.training.distributed import Ranks, sharded_log_px

    vae = VAE(x_dim=784, z_dim=4, hidden=(16,), image_shape=(28, 28), arch="conv", channels=(32, 8))
    assert vae.decoder.row_floats == 9 * 32 * 28 * 28
    rows = rows_per_pass(vae)
    assert rows == PASS_FLOATS // (9 * 32 * 28 * 28) and 16 <= rows < DEFAULT_MAX_ROWS
    assert rows_per_pass(VAE(x_dim=784, z_dim=4, hidden=(16,))) == DEFAULT_MAX_ROWS
    assert rows_per_pass("not a module") == DEFAULT_MAX_ROWS
    big = VAE(x_dim=3 * 64**2, z_dim=4, hidden=(16,), image_shape=(64, 64, 3), arch="conv")
    assert rows_per_pass(big) == max(16, PASS_FLOATS // big.decoder.row_floats)

    passes = []  # rows of z per pass of the decoder
    vae.decoder.register_forward_hook(lambda m, args, out: passes.append(args[0][..., 0].numel()))
    x = torch.bernoulli(torch.full((3, 784), 0.3), generator=torch.Generator().manual_seed(1))
    sized = sharded_log_px(vae.model, vae.guide, x, ranks=Ranks(), num_particles=rows + 5, seed=0)
    assert max(passes) <= rows
    passes.clear()
    whole = estimate_log_px(
        vae.model, vae.guide, x, num_particles=rows + 5, seed=0, max_rows=DEFAULT_MAX_ROWS
    )
    assert max(passes) == 3 * (rows + 5)
    assert torch.equal(sized.log_px, whole.log_px) and torch.equal(sized.elbo, whole.elbo)
