"""A user's own images from a .npy or .npz file: trained on, evaluated with the same held-out
images, and every bad file refused in one line."""

import json

import numpy as np
import pytest
import torch
from helpers import run_in_process

from pyro_vae import Run
from pyro_vae.apps.plots import image_grid
from pyro_vae.data import DataError, load_array_file, load_dataset


@pytest.fixture(scope="module")
def grey_file(tmp_path_factory):
    """scikit-learn's digits as 8-bit grey images in a .npy: (1797, 8, 8) uint8."""
    from sklearn.datasets import load_digits

    path = tmp_path_factory.mktemp("user") / "digits.npy"
    np.save(path, (load_digits().images * 255 / 16).round().astype(np.uint8))
    return path


def test_a_file_without_splits_is_split_the_same_way_every_time(grey_file):
    splits, again = load_array_file(grey_file), load_dataset(str(grey_file))
    assert {k: len(v) for k, v in splits.items()} == {"train": 1439, "valid": 179, "test": 179}
    for name in splits:
        assert torch.equal(splits[name].images, again[name].images)
        assert splits[name].image_shape == (8, 8) and splits[name].levels == 256
    every = torch.cat([s.images for s in splits.values()])
    every = (every * 255).round().to(torch.uint8).numpy()
    original = np.load(grey_file).reshape(1797, 64)
    # the three splits are a permutation of the file's images
    for a, b in zip(
        np.unique(every, axis=0, return_counts=True),
        np.unique(original, axis=0, return_counts=True),
    ):
        assert np.array_equal(a, b)


def test_an_npz_with_splits_keeps_them(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        s: rng.integers(0, 256, (n, 4, 4), dtype=np.uint8)
        for s, n in (("train", 7), ("valid", 2), ("test", 3))
    }
    np.savez(tmp_path / "s.npz", **arrays, train_labels=np.arange(7))
    splits = load_array_file(tmp_path / "s.npz")
    for name, array in arrays.items():
        assert torch.equal(
            splits[name].images, torch.as_tensor(array).reshape(len(array), 16) / 255
        )
    assert torch.equal(splits["train"].labels, torch.arange(7))


def test_train_and_evaluate_on_a_file_with_its_held_out_images(grey_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--dataset", str(grey_file), "--likelihood", "logistic", "--binarize", "none"]
    args += ["--epochs", "2", "--z-dim", "4", "--hidden", "32", "--batch-size", "50"]
    status, err = run_in_process(
        "train_svi.py", [*args, "--eval-particles", "20", "--out", str(out)], capsys
    )
    assert status == 0, err
    saved = json.loads((out / "config.json").read_text())
    assert saved["dataset"] == str(grey_file.resolve()) and len(saved["dataset_sha256"]) == 64
    run = Run.load(out)
    assert torch.equal(run.heldout("test").images, load_array_file(grey_file)["test"].images)
    assert (out / "figures" / "reconstructions.png").is_file()

    changed = tmp_path / "changed.npy"
    changed.write_bytes(grey_file.read_bytes())
    config = {**saved, "dataset": str(changed)}
    (out / "config.json").write_text(json.dumps(config))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["config"]["dataset"] = str(changed)
    torch.save(state, out / "checkpoint.pt")
    assert torch.equal(Run.load(out).heldout("test").images, run.heldout("test").images)
    images = np.load(changed)
    images[0, 0, 0] ^= 1
    np.save(changed, images)
    with pytest.raises(DataError, match="changed since the run was trained on it"):
        Run.load(out).heldout("test")
    status, err = run_in_process(
        "evaluate_marginal_likelihood.py",
        ["--checkpoint", str(out), "--num-particles", "2"],
        capsys,
    )
    assert status == 2 and "changed since" in err and len(err.strip().splitlines()) == 1


def bad_files(tmp_path):
    np.save(tmp_path / "nan.npy", np.full((10, 4, 4), np.nan, np.float32))
    np.save(tmp_path / "few.npy", np.zeros((2, 4, 4), np.uint8))
    np.save(tmp_path / "ints.npy", np.zeros((20, 4, 4), np.int64))
    np.save(tmp_path / "range.npy", np.full((20, 4, 4), 2.0, np.float32))
    np.save(tmp_path / "channels.npy", np.zeros((20, 4, 4, 5), np.uint8))
    np.save(tmp_path / "flat.npy", np.zeros(20, np.uint8))
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), np.uint8))
    np.save(tmp_path / "objects.npy", np.array([np.zeros(3), np.zeros(4)], dtype=object))
    np.savez(tmp_path / "two.npz", a=np.zeros((5, 4)), b=np.zeros((5, 4)))
    np.savez(tmp_path / "labels.npz", images=np.zeros((5, 4), np.uint8), labels=np.arange(4))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip")
    (tmp_path / "text.npy").write_text("0 1 2")


@pytest.mark.parametrize(
    "name,message",
    [
        ("nan.npy", "NaN or inf"),
        ("few.npy", "too few"),
        ("ints.npy", "uint8 or floating point"),
        ("range.npy", "intensities in \\[0, 1\\]"),
        ("channels.npy", "channels last"),
        ("flat.npy", "expected \\(N, D\\)"),
        ("empty.npy", "empty"),
        ("objects.npy", "not a readable"),
        ("two.npz", "name the images 'images'"),
        ("labels.npz", "5 images but 4 labels"),
        ("corrupt.npz", "not a readable"),
        ("text.npy", "not a readable"),
        ("absent.npy", "no such file"),
    ],
)
def test_a_bad_file_is_one_line(tmp_path, name, message):
    bad_files(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        load_array_file(tmp_path / name)
    assert "\n" not in str(caught.value) and str(tmp_path / name) in str(caught.value)


def test_the_script_refuses_a_bad_file_in_one_line_and_writes_nothing(tmp_path, capsys):
    bad_files(tmp_path)
    out = tmp_path / "run"
    status, err = run_in_process(
        "train_svi.py", ["--dataset", str(tmp_path / "nan.npy"), "--out", str(out)], capsys
    )
    assert status == 2 and "NaN or inf" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    status, err = run_in_process("train_svi.py", ["--dataset", "images.csv"], capsys)
    assert status == 2 and "nor a .npy or .npz file, nor a folder of images" in err


def test_float_intensities_take_a_continuous_likelihood_not_the_discretised_one(tmp_path, capsys):
    np.save(tmp_path / "vec.npy", np.random.default_rng(0).random((300, 20)).astype(np.float32))
    base = ["--dataset", str(tmp_path / "vec.npy"), "--binarize", "none", "--epochs", "1"]
    base += ["--z-dim", "2", "--hidden", "8", "--batch-size", "50", "--eval-particles", "5"]
    status, err = run_in_process(
        "train_svi.py", [*base, "--likelihood", "logistic", "--out", str(tmp_path / "a")], capsys
    )
    assert status == 2 and "known number of grey levels" in err
    status, err = run_in_process(
        "train_svi.py",
        [*base, "--likelihood", "continuous-bernoulli", "--out", str(tmp_path / "b")],
        capsys,
    )
    assert status == 0, err
    report = json.loads((tmp_path / "b" / "evaluation.json").read_text())
    assert "bits_per_dim" not in report  # a density: no code length


def test_figures_show_colour_and_vectors():
    grey = image_grid(torch.rand(4, 12), (3, 4), nrow=2)
    colour = image_grid(torch.rand(4, 36), (3, 4, 3), nrow=2)
    vectors = image_grid(torch.rand(4, 7), (7,), nrow=2)
    assert grey.ndim == 2 and colour.shape[-1] == 3 and vectors.ndim == 2
    assert colour.shape[:2] == grey.shape


# -- a folder of image files ---------------------------------------------------------------------


def digit_folder(root, with_classes=True, count=60):
    """The first ``count`` digits as 8-bit grey PNGs, one sub-folder per class (or none)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:count] * 255 / 16).round().astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, digits.target[:count])):
        folder = root / f"class_{label}" if with_classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:03d}.png")
    return images, digits.target[:count]


def test_a_folder_with_class_sub_folders_gives_images_and_labels(tmp_path):
    images, labels = digit_folder(tmp_path / "digits")
    splits = load_dataset(str(tmp_path / "digits"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 48, "valid": 6, "test": 6}
    assert splits["train"].image_shape == (8, 8) and splits["train"].levels == 256
    # every image comes back exactly, with its class (sub-folders in sorted name order)
    got = torch.cat([s.images for s in splits.values()])
    got_labels = torch.cat([s.labels for s in splits.values()])
    by_bytes = {
        (img * 255).round().to(torch.uint8).numpy().tobytes(): int(y)
        for img, y in zip(got, got_labels)
    }
    classes = sorted({f"class_{y}" for y in labels})
    for image, label in zip(images, labels):
        assert by_bytes[image.reshape(-1).tobytes()] == classes.index(f"class_{label}")
    # the same split every time
    again = load_dataset(str(tmp_path / "digits"))
    assert torch.equal(again["test"].images, splits["test"].images)


def test_a_flat_folder_with_one_colour_image_is_read_as_colour(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8), mode="L").save(
            tmp_path / f"g{i}.png"
        )
    colour = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "z.png")
    splits = load_dataset(str(tmp_path))
    assert splits["train"].image_shape == (5, 6, 3) and splits["train"].labels is None
    got = (torch.cat([s.images for s in splits.values()]) * 255).round().to(torch.uint8)
    assert any(np.array_equal(row.numpy(), colour.reshape(-1)) for row in got)


def bad_folders(tmp_path):
    from PIL import Image

    grey = np.zeros((4, 4), np.uint8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for name, sizes in (("sizes", [(4, 4)] * 4 + [(5, 4)]), ("beside", [(4, 4)] * 5)):
        (tmp_path / name / "a").mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / name / "a" / f"{i}.png")
    Image.fromarray(grey).save(tmp_path / "beside" / "loose.png")
    (tmp_path / "corrupt").mkdir()
    for i in range(4):
        Image.fromarray(grey).save(tmp_path / "corrupt" / f"{i}.png")
    (tmp_path / "corrupt" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "deep").mkdir()
    for i in range(4):
        Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(tmp_path / "deep" / f"{i}.png")
    (tmp_path / "few").mkdir()
    for i in range(2):
        Image.fromarray(grey).save(tmp_path / "few" / f"{i}.png")


@pytest.mark.parametrize(
    "name,message",
    [
        ("empty", "holds no image files"),
        ("sizes", "every image must have one size"),
        ("beside", "lies beside the class sub-folders"),
        ("corrupt", "9.png: not a readable image"),
        ("deep", "16-bit or floating point"),
        ("few", "too few"),
    ],
)
def test_a_bad_folder_is_one_line(tmp_path, name, message):
    from pyro_vae.data import load_image_folder

    bad_folders(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        load_image_folder(tmp_path / name)
    assert "\n" not in str(caught.value) and str(tmp_path / name) in str(caught.value)


def test_train_and_evaluate_on_a_folder_and_refuse_it_once_it_changed(tmp_path, capsys):
    digit_folder(tmp_path / "digits", count=120)
    out = tmp_path / "run"
    args = ["--dataset", str(tmp_path / "digits"), "--likelihood", "logistic", "--binarize"]
    args += ["none", "--arch", "conv", "--channels", "4,8", "--hidden", "16", "--z-dim", "2"]
    args += ["--epochs", "1", "--batch-size", "32", "--eval-particles", "5", "--quiet"]
    status, err = run_in_process("train_svi.py", [*args, "--out", str(out)], capsys)
    assert status == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == str((tmp_path / "digits").resolve()) and config["dataset_sha256"]
    run = Run.load(out)
    assert len(run.heldout("test").images) == 12
    # one image changed: the run's held-out images are not the folder's any more
    from PIL import Image

    first = sorted((tmp_path / "digits").rglob("*.png"))[0]
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(first)
    status, err = run_in_process(
        "evaluate_marginal_likelihood.py",
        ["--checkpoint", str(out), "--num-particles", "5", "--out", str(tmp_path / "e")],
        capsys,
    )
    assert status == 2 and "changed since" in err and len(err.strip().splitlines()) == 1, err


def test_the_baselines_compare_on_a_labelled_folder_and_refuse_one_without_labels(tmp_path):
    from pyro_vae import BaselinesConfig, compare_baselines
    from pyro_vae.checks import ConfigError

    digit_folder(tmp_path / "classes", count=150)
    config = BaselinesConfig(
        dataset=str(tmp_path / "classes"), z_dims=(2,), epochs=1, hidden=(16,), samples=20,
        test_size=15,
    )  # fmt: skip
    report = compare_baselines(config).report
    assert report["train_images"] == 120 and report["test_images"] == 15
    vae = report["results"]["2"]["VAE"]
    assert 0 <= vae["samples"]["class_balance"] <= 1 + 1e-9
    assert len(vae["samples"]["class_counts"]) == 10 and sum(vae["samples"]["class_counts"]) == 20
    digit_folder(tmp_path / "flat", with_classes=False, count=60)
    with pytest.raises(ConfigError, match="has no labels: judging samples needs a classifier"):
        compare_baselines(config.replace(dataset=str(tmp_path / "flat")))


def test_ood_scores_take_your_own_files_on_both_sides(grey_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--dataset", str(grey_file), "--z-dim", "4", "--hidden", "32", "--epochs", "1"]
    args += ["--eval-particles", "0", "--quiet", "--out", str(out)]
    assert run_in_process("train_svi.py", args, capsys)[0] == 0  # binarised, Bernoulli pixels
    blobs = tmp_path / "blobs.npy"
    rng = np.random.default_rng(0)
    np.save(blobs, (rng.random((300, 8, 8)) < 0.1).astype(np.uint8) * 255)
    args = ["--checkpoint", str(out), "--ood", str(blobs), "--images", "30"]
    args += ["--num-particles", "5", "--compressor", "bz2", "--quiet"]
    status, err = run_in_process("detect_ood.py", args, capsys)
    assert status == 0, err
    report = json.loads((out / "ood_digits_vs_blobs.json").read_text())
    assert report["images"] == {"in": 30, "out": 30}
    assert report["in"] == str(grey_file.resolve()) and report["out"] == str(blobs.resolve())
    assert 0 <= report["metrics"]["log_px"]["auroc"] <= 1
    # images of another size: one line
    np.save(tmp_path / "big.npy", np.zeros((300, 9, 9), np.uint8))
    args[3] = str(tmp_path / "big.npy")
    status, err = run_in_process("detect_ood.py", args, capsys)
    assert status == 2 and "expects 64 pixels" in err and len(err.strip().splitlines()) == 1, err
