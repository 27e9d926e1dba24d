"""Bits-back coding: exact round trips, a code length equal to the information content,
a file format that refuses what it cannot decode, and the script."""

import math
import random

import numpy as np
import pytest
import torch
from helpers import run_script

from pyro_vae import (
    VAE,
    BatchLoader,
    HierarchicalVAE,
    Trainer,
    estimate_log_px,
    load_checkpoint,
)
from pyro_vae.apps.compression import BitsBackCoder, CompressedImages, CompressionError
from pyro_vae.models import model_from_checkpoint


def one_epoch(model, mnist, test_images):
    """``model`` trained for one epoch on 2,000 images, and ``test_images`` binarised test
    images."""
    train = mnist["train"].subset(slice(0, 2000))
    Trainer(model.model, model.guide, lr=3e-3).fit(
        BatchLoader(train, 100, shuffle=True, binarize="dynamic", seed=0), 1, progress=False
    )
    x = mnist["test"].images[:test_images]
    return model.eval(), torch.bernoulli(x, generator=torch.Generator().manual_seed(0))


def assert_at_most_the_elbo(model, x, info):
    """The code length per image (bits, images 2..N) is on average at most the continuous
    -ELBO, within Monte Carlo error, and not more than 5% below it."""
    elbo = estimate_log_px(model.model, model.guide, x, num_particles=200, psis=False, ks=()).elbo
    neg_elbo_bits = -elbo.numpy() / math.log(2)
    diff = info[1:] - neg_elbo_bits[1:]
    se = np.std(diff) / math.sqrt(len(diff))
    assert np.mean(diff) < 4 * se + 0.002 * neg_elbo_bits.mean()
    assert np.mean(diff) > -0.05 * neg_elbo_bits.mean()


@pytest.fixture(scope="module")
def trained(mnist):
    """A small VAE trained for one epoch on 2,000 images, and 300 binarised test images."""
    torch.manual_seed(0)
    return one_epoch(VAE(z_dim=8, hidden=(64,)), mnist, 300)


def test_round_trip_is_exact_for_every_image_the_first_and_the_empty_message(trained):
    vae, x = trained
    coder = BitsBackCoder(vae)
    for images in (x, x[:1], x[:0]):
        message = CompressedImages.from_bytes(coder.encode(images).to_bytes())
        assert message.count == len(images)
        assert torch.equal(coder.decode(message), images)


@pytest.mark.parametrize("bits", [6, 10, 12])
def test_each_image_costs_its_information_content_and_the_mean_is_the_elbo(trained, bits):
    vae, x = trained
    coder = BitsBackCoder(vae, latent_bits=bits)
    trace = []
    message = coder.encode(x, trace)
    lengths = np.array([b for b, _ in trace], dtype=np.float64)
    buckets = np.stack([z for _, z in trace])
    info = coder.information(x, buckets)
    # images 2..N: the message grows by exactly -log2 p(x|z) - log2 P(z) + log2 Q(z|x) of the
    # z the coder drew, up to the ANS coder's fixed-point rounding
    grown = np.diff(lengths)
    assert abs(grown.sum() - info[1:].sum()) < 1e-3 * info[1:].sum() + 64
    assert message.num_bits >= lengths[-1]
    # the first image has no bits to take back: it pays the prior's bits in full
    assert lengths[0] > vae.z_dim * bits
    # Averaged over images, the discretised code length is at most the continuous -ELBO:
    # KL(Q || P) between the bucket distributions is at most KL(q || p) (discretising
    # cannot add information), and the rest is -log p(x|z) at the bucket medians.  For
    # this one-epoch model, whose posteriors reach the coarse tail buckets, it is a few
    # percent below; for the trained default model the two agree to 0.1% (README).
    assert_at_most_the_elbo(vae, x, info)


def test_other_weights_and_settings_are_refused(trained):
    vae, x = trained
    message = BitsBackCoder(vae).encode(x[:5])
    other = VAE(z_dim=8, hidden=(64,))
    with pytest.raises(CompressionError, match="other model weights"):
        BitsBackCoder(other).decode(message)
    with pytest.raises(CompressionError, match="latent bits"):
        BitsBackCoder(vae, latent_bits=8).decode(message)
    with pytest.raises(ValueError, match="binary"):
        BitsBackCoder(vae).encode(x[:2] * 0.5)
    for guide in ({"flow": "iaf"}, {"covariance": "full"}):
        with pytest.raises(ValueError, match="diagonal Gaussian guide"):
            BitsBackCoder(VAE(z_dim=8, hidden=(64,), **guide))


@pytest.mark.parametrize("k", [1, 3])
def test_corrupted_files_fail_with_a_compression_error_and_never_hang(trained, k):
    vae, x = trained
    coder = BitsBackCoder(vae, particles=k)
    data = coder.encode(x[:20]).to_bytes()
    rng = random.Random(0)
    cases = []
    for _ in range(250):
        flipped = bytearray(data)
        i = rng.randrange(len(data))
        flipped[i] ^= 1 << rng.randrange(8)
        cases.append(bytes(flipped))
    cases += [data[: rng.randrange(len(data))] for _ in range(50)] + [b"", data + b"\x00"]
    for case in cases:
        with pytest.raises(CompressionError):
            coder.decode(CompressedImages.from_bytes(case))
    # a file cut inside its header says so (not that its version is unsupported)
    with pytest.raises(CompressionError, match="truncated|no header") as info:
        CompressedImages.from_bytes(data[:40])
    assert "not one of the supported" not in str(info.value)


def test_compress_script_round_trip_and_refusals(trained_run, data_dir, tmp_path):
    packed, unpacked = tmp_path / "test.pvbb", tmp_path / "test.npy"
    run = str(trained_run)
    result = run_script(
        "compress.py",
        [
            "--checkpoint",
            run,
            "encode",
            "--split",
            "test",
            "--count",
            "40",
            "--output",
            str(packed),
        ],
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bits per pixel" in result.stdout
    # the first image's latents have no bits to get back: the summary says what that costs
    assert "the start-up cost" in result.stdout and "without it" in result.stdout
    result = run_script(
        "compress.py",
        ["--checkpoint", run, "decode", "--input", str(packed), "--output", str(unpacked)],
        data_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    state = load_checkpoint(trained_run)
    from pyro_vae.data import heldout_split, load_dataset

    expected = heldout_split(
        load_dataset("mnist", data_dir), "test", "dynamic", state["config"]["seed"]
    )
    decoded = np.load(unpacked)
    assert decoded.shape == (40, 28, 28) and decoded.dtype == np.uint8
    assert np.array_equal(decoded.reshape(40, -1), expected.images[:40].numpy())
    assert model_from_checkpoint(state).x_dim == 784
    # a truncated file: one line, exit 2, nothing written
    broken = tmp_path / "broken.pvbb"
    broken.write_bytes(packed.read_bytes()[:-7])
    target = tmp_path / "never.npy"
    result = run_script(
        "compress.py",
        ["--checkpoint", run, "decode", "--input", str(broken), "--output", str(target)],
        data_dir,
    )
    assert result.returncode == 2 and "truncated" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not target.exists()
    assert not list(tmp_path.glob("*.tmp"))
    # decode reads the latent bits from the file, as it reads K; a --latent-bits that
    # contradicts the file is refused in one line
    head = ["--checkpoint", run, "--latent-bits", "6"]
    encode = ["encode", "--split", "test", "--count", "5", "--output", str(tmp_path / "b6")]
    assert run_script("compress.py", [*head, "--quiet", *encode], data_dir).returncode == 0
    decode = ["decode", "--input", str(tmp_path / "b6"), "--output", str(tmp_path / "b6.npy")]
    result = run_script("compress.py", ["--checkpoint", run, *decode], data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "b6.npy"), decoded[:5])
    decode[-1] = str(tmp_path / "b8.npy")
    result = run_script("compress.py", [*head[:2], "--latent-bits", "8", *decode], data_dir)
    assert result.returncode == 2 and "the file uses 6 latent bits" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "b8.npy").exists()
    # sizes out of range name their flag
    encode = ["encode", "--split", "test", "--count", "5", "--output", str(tmp_path / "x")]
    for flag, args in (
        ("--particles", [*encode, "--particles", "2000"]),
        ("--latent-bits", ["--latent-bits", "40", *encode]),
    ):
        result = run_script("compress.py", ["--checkpoint", run, *args], data_dir)
        assert result.returncode == 2 and f"error: {flag}: " in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


# -- importance-weighted bits-back (BB-IS) ------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5])
def test_importance_weighted_round_trips_are_exact(trained, k):
    vae, x = trained
    coder = BitsBackCoder(vae, particles=k)
    for images in (x[:60], x[:1], x[:0]):
        message = CompressedImages.from_bytes(coder.encode(images).to_bytes())
        assert message.count == len(images) and message.particles == k
        assert torch.equal(coder.decode(message), images)
    with pytest.raises(CompressionError, match="particles"):
        BitsBackCoder(vae).decode(coder.encode(x[:3]))


def test_one_particle_writes_the_format_earlier_releases_read(trained):
    vae, x = trained
    data = BitsBackCoder(vae, particles=1).encode(x[:10]).to_bytes()
    assert data[10:12] == (1).to_bytes(2, "little")  # format version 1, no particle field
    assert data == BitsBackCoder(vae).encode(x[:10]).to_bytes()


def test_each_image_costs_the_importance_weighted_information_and_k_buys_rate(trained):
    vae, x = trained
    rates = {}
    for k in (1, 8):
        coder = BitsBackCoder(vae, particles=k)
        trace = []
        coder.encode(x, trace)
        lengths = np.array([t[0] for t in trace], dtype=np.float64)
        buckets = np.stack([t[1] for t in trace])
        info = coder.information(x, buckets)
        grown = np.diff(lengths)
        # images 2..N: the message grows by -log2 of the mean weight of the K particles the
        # coder drew, up to the ANS coder's fixed-point rounding
        assert abs(grown.sum() - info[1:].sum()) < 1e-3 * info[1:].sum() + 64
        # and on average by -log2 p̂_K(x) of the discretised model: the same estimate from
        # independent draws agrees within Monte Carlo error
        fresh = coder.information(x[1:], seed=7)
        se = math.sqrt(np.var(grown) / len(grown) + np.var(fresh) / len(fresh))
        assert abs(grown.mean() - fresh.mean()) < 4 * se
        rates[k] = grown.mean()
    assert rates[8] < rates[1] - 2  # eight particles: a shorter code than the ELBO's


# -- several stochastic layers: the layers chained, one particle --------------------------------


@pytest.fixture(scope="module", params=["bottom-up", "top-down", "deterministic"])
def trained_layers(request, mnist):
    """A small two-layer VAE with either guide, one epoch on 2,000 images, and 200 binarised
    test images."""
    torch.manual_seed(0)
    return one_epoch(
        HierarchicalVAE(z_dims=(8, 4), hidden=((64,), (32,)), guide=request.param), mnist, 200
    )


def test_a_hierarchical_model_round_trips_exactly_and_costs_its_information(trained_layers):
    hvae, x = trained_layers
    coder = BitsBackCoder(hvae)
    for images in (x[:1], x[:0]):
        assert torch.equal(coder.decode(coder.encode(images)), images)
    trace = []
    message = CompressedImages.from_bytes(coder.encode(x, trace).to_bytes())
    assert torch.equal(coder.decode(message), x)
    lengths = np.array([b for b, _ in trace], dtype=np.float64)
    buckets = [z for _, z in trace]
    assert [len(z) for z in buckets[0]] == [8, 4]  # layer 1, then layer 2
    info = coder.information(x, buckets)
    # images 2..N: the message grows by -log2 p(x|ẑ1) - log2 P(ẑ1|ẑ2) - log2 P(ẑ2)
    # + log2 Q(ẑ1, ẑ2|x) of the buckets the coder drew, up to ANS rounding
    grown = np.diff(lengths)
    assert abs(grown.sum() - info[1:].sum()) < 1e-3 * info[1:].sum() + 64
    # the first image pays at least the top layer's prior bits in full (no bits back)
    assert lengths[0] > 4 * coder.latent_bits
    # on average the chained code costs at most the continuous -ELBO (discretising cannot
    # add information; the buckets also cap the far tails of log q - log p), and not much less
    assert_at_most_the_elbo(hvae, x, info)
    # and fresh draws from the discretised guide give the same mean as the coder's
    fresh = coder.information(x[1:], seed=3)
    se = math.sqrt(np.var(grown) / len(grown) + np.var(fresh) / len(fresh))
    assert abs(grown.mean() - fresh.mean()) < 4 * se


def test_a_hierarchical_message_refuses_other_weights_and_corruption(trained_layers):
    hvae, x = trained_layers
    coder = BitsBackCoder(hvae)
    data = coder.encode(x[:10]).to_bytes()
    other = HierarchicalVAE(z_dims=(8, 4), hidden=((64,), (32,)), guide=hvae.guide_kind)
    with pytest.raises(CompressionError, match="other model weights"):
        BitsBackCoder(other).decode(CompressedImages.from_bytes(data))
    rng = random.Random(1)
    for _ in range(60):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        with pytest.raises(CompressionError):
            coder.decode(CompressedImages.from_bytes(bytes(flipped)))
    with pytest.raises(ValueError, match="one-layer VAE"):
        BitsBackCoder(hvae, particles=4)


# -- the file format: files written by earlier releases still decode -----------------------------

# Seven 6x6 images coded by this release with three small untrained models (seeded), one file
# per latent structure: one layer, K = 3 particles, two layers. A change to the coder that
# alters a single bit of the format fails here.
WRITTEN = {
    "one": "5059524f5641452d42420100698b817d2468913fa6046f6cc34f5151e2d257214b7c9ef64cb995d813093535"
    "0700000006000600080a000000e9c267526a2f124927c9dba0507d31903b4849a4bf964925e2ca0826ec47a13e"
    "d5db03d53a81acdcacd54e00",
    "particles": "5059524f5641452d42420200698b817d2468913fa6046f6cc34f5151e2d257214b7c9ef64cb995d8"
    "1309353507000000060006000803000b000000149c8feb87f99a4891557d4b35f612ff507e94d707fb9a92b41e"
    "27e76b4b2b50115df6e7f1d8287b37268df77f085b17",
    "layers": "5059524f5641452d424201009ee70afbe9eeacb1baa168a6e732280e946cb265db3aba21411233b625"
    "edde170700000006000600080b000000c874873976462b7e9034553102b98cdde44073cb335710a09bd43bdfae"
    "11a5dd9d52f348e4114a5bdabd7207bdeec000",
}


def test_files_written_by_this_release_decode_and_encoding_gives_the_same_bytes():
    torch.manual_seed(0)
    vae = VAE(x_dim=36, z_dim=3, hidden=(16,), image_shape=(6, 6)).eval()
    hvae = HierarchicalVAE(x_dim=36, z_dims=(3, 2), hidden=((16,), (8,)), image_shape=(6, 6))
    x = torch.bernoulli(torch.full((7, 36), 0.3), generator=torch.Generator().manual_seed(1))
    for name, model, k in (("one", vae, 1), ("particles", vae, 3), ("layers", hvae.eval(), 1)):
        coder = BitsBackCoder(model, latent_bits=8, particles=k)
        written = bytes.fromhex(WRITTEN[name])
        assert torch.equal(coder.decode(CompressedImages.from_bytes(written)), x), name
        assert coder.encode(x).to_bytes() == written, name


@pytest.mark.parametrize("guide", ["bottom-up", "top-down", "deterministic"])
def test_a_model_with_skip_connections_round_trips_and_costs_its_information(guide, mnist):
    """Three layers, every generative network reading all the layers above it: the coder
    gives each conditional the layers it reads."""
    torch.manual_seed(0)
    hvae, x = one_epoch(
        HierarchicalVAE(z_dims=(8, 4, 2), hidden=((64,), (32,), (16,)), guide=guide, skip=True),
        mnist,
        60,
    )
    coder = BitsBackCoder(hvae)
    trace = []
    message = CompressedImages.from_bytes(coder.encode(x, trace).to_bytes())
    assert torch.equal(coder.decode(message), x)
    lengths = np.array([b for b, _ in trace], dtype=np.float64)
    info = coder.information(x, [z for _, z in trace])
    grown = np.diff(lengths)
    assert abs(grown.sum() - info[1:].sum()) < 1e-3 * info[1:].sum() + 64
    assert_at_most_the_elbo(hvae, x, info)


# -- grey levels: the discretised logistic's categorical per pixel -------------------------------


@pytest.mark.parametrize("levels,k,uniform", [(17, 1, 0), (256, 1, 0), (256, 4, 0), (256, 1, 0.01)])
def test_grey_images_round_trip_and_cost_the_discretised_likelihoods_information(
    levels, k, uniform
):
    torch.manual_seed(0)
    vae = VAE(
        x_dim=64,
        z_dim=4,
        hidden=(32,),
        image_shape=(8, 8),
        likelihood="logistic",
        levels=levels,
        pixel_uniform=uniform,
    ).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, levels, (40, 64), generator=g).float() / (levels - 1)
    coder = BitsBackCoder(vae, particles=k)
    trace = []
    message = CompressedImages.from_bytes(coder.encode(x, trace).to_bytes())
    assert torch.equal(coder.decode(message), x)
    lengths = np.array([t[0] for t in trace], dtype=np.float64)
    grown = np.diff(lengths)
    # the message grows by what the information says (the buckets drawn; K = 1), and on
    # average the code costs the -ELBO (or -log p̂_K) of the discretised model
    info = coder.information(x, [t[1] for t in trace] if k == 1 else None)
    if k == 1:
        assert abs(grown.sum() - info[1:].sum()) < 1e-3 * info[1:].sum() + 64
        assert_at_most_the_elbo(vae, x, info)
    else:
        se = math.sqrt(np.var(grown) / len(grown) + np.var(info) / len(info))
        assert abs(grown.mean() - info[1:].mean()) < 4 * se
    with pytest.raises(ValueError, match=f"{levels} levels"):
        coder.encode(x + 0.3 / (levels - 1))


def test_compress_and_decompress_an_8_bit_run_as_uint8_levels(data_dir, tmp_path, capsys):
    from helpers import run_in_process

    from pyro_vae import CompressConfig, Run, compress, decompress

    out = tmp_path / "run"
    args = ["--dataset", "digits", "--binarize", "none", "--likelihood", "logistic"]
    args += ["--z-dim", "4", "--hidden", "32", "--epochs", "1", "--eval-particles", "0"]
    assert run_in_process("train_svi.py", [*args, "--quiet", "--out", str(out)], capsys)[0] == 0
    run = Run.load(out)
    packed = compress(run, "test", CompressConfig(count=20))
    back = decompress(run, packed.result.to_bytes()).result
    expected = (run.heldout("test", 20).images * 16).round().reshape(20, 8, 8)
    assert back.dtype == np.uint8 and np.array_equal(back, expected.numpy().astype(np.uint8))
    # the levels as uint8 give the same bytes
    assert compress(run, back, CompressConfig()).result.to_bytes() == packed.result.to_bytes()


# -- colour: every value of an (H, W, C) image one symbol -----------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_colour_images_round_trip_and_cost_the_discretised_likelihoods_information(arch):
    torch.manual_seed(0)
    options = {"arch": "conv", "channels": (8,)} if arch == "conv" else {}
    vae = VAE(
        x_dim=8 * 8 * 3,
        z_dim=4,
        hidden=(32,),
        image_shape=(8, 8, 3),
        likelihood="logistic",
        levels=256,
        **options,
    ).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 8 * 8 * 3), generator=g).float() / 255
    coder = BitsBackCoder(vae)
    trace = []
    data = coder.encode(x, trace).to_bytes()
    message = CompressedImages.from_bytes(data)
    assert message.image_shape == (8, 8, 3)
    assert torch.equal(coder.decode(message), x)
    info = coder.information(x, [t[1] for t in trace])
    grown = np.diff(np.array([t[0] for t in trace], dtype=np.float64))
    assert abs(grown.sum() - info[1:].sum()) < 1e-3 * info[1:].sum() + 64
    assert_at_most_the_elbo(vae, x, info)
    # the channel count is in the header (format 3): a file cut in it, or altered, is refused
    with pytest.raises(CompressionError, match="truncated"):
        CompressedImages.from_bytes(data[:62])
    other = BitsBackCoder(
        VAE(x_dim=192, z_dim=4, hidden=(32,), image_shape=(8, 24), likelihood="logistic")
    )
    with pytest.raises(CompressionError, match="other model weights"):
        other.decode(message)
    with pytest.raises(ValueError, match="not vectors"):
        BitsBackCoder(VAE(x_dim=12, z_dim=2, hidden=(8,), image_shape=(12,), likelihood="logistic"))


def test_compress_and_decompress_colour_images_as_uint8(data_dir, tmp_path, capsys):
    from helpers import run_in_process

    from pyro_vae import CompressConfig, Run, compress, decompress

    g = np.random.default_rng(0)
    images = (g.random((60, 8, 8, 3)) * 255).astype(np.uint8)
    np.save(tmp_path / "colour.npy", images)
    out = tmp_path / "run"
    args = ["--dataset", str(tmp_path / "colour.npy"), "--binarize", "none"]
    args += ["--likelihood", "logistic", "--arch", "conv", "--channels", "8", "--z-dim", "4"]
    args += ["--hidden", "32", "--epochs", "1", "--batch-size", "16", "--eval-particles", "0"]
    assert run_in_process("train_svi.py", [*args, "--quiet", "--out", str(out)], capsys)[0] == 0
    run = Run.load(out)
    test = (run.heldout("test").images * 255).round().to(torch.uint8).reshape(-1, 8, 8, 3)
    packed = compress(run, test.numpy(), CompressConfig())
    assert packed.result.image_shape == (8, 8, 3)
    back = decompress(run, packed.result.to_bytes()).result
    assert back.dtype == np.uint8 and back.shape == (len(test), 8, 8, 3)
    assert np.array_equal(back, test.numpy())
    assert compress(run, "test", CompressConfig()).result.to_bytes() == packed.result.to_bytes()
