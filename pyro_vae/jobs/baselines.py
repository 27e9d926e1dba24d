"""The comparison of latent-variable models as one call: ``compare_baselines(config)`` fits
PCA, a linear and a deep autoencoder, the VAE and a GAN with each latent size of the config on
the same statically binarised images and scores their reconstructions and samples
(``pyro_vae.apps.baselines``); given a directory it writes ``comparison.json`` and the
figures there, all at once at the end.  ``compare_baselines.py`` parses its flags, calls it
and prints.

    from pyro_vae import BaselinesConfig, compare_baselines

    result = compare_baselines(BaselinesConfig(z_dims=(2, 10), epochs=5), "runs/baselines")
    print(result.report["results"]["10"]["VAE"]["samples"]["frechet_distance"])
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from pyro_vae.apps.baselines import LatentModelComparison, compare_latent_models, fit_classifier
from pyro_vae.apps.plots import plot_image_rows, plot_latent_maps
from pyro_vae.checks import ConfigError
from pyro_vae.choices import CAPABILITIES
from pyro_vae.config import BaselinesConfig
from pyro_vae.data import binarize_static, first_rows, load_dataset
from pyro_vae.io.rundir import Outputs
from pyro_vae.jobs.evaluate import EvalResult
from pyro_vae.seeding import seed_everything

__all__ = ["compare_baselines"]

REPORT = "comparison.json"


def compare_baselines(
    config: BaselinesConfig | None = None,
    directory: Path | str | None = None,
    *,
    force: bool = False,
    data_dir: Path | str | None = None,
    on_size: Callable[[int, LatentModelComparison], None] | None = None,
    flag: str = "directory",
) -> EvalResult:
    """Every method at every latent size of ``config``: ``report`` is what
    ``comparison.json`` holds (per size and method the reconstruction errors per pixel, in
    nats and squared probability, the sample quality in the eyes of a classifier of the data's classes, the
    training seconds), ``result`` the ``LatentModelComparison`` of each size.  With
    ``directory`` the report and the figures are written there together at the end (an
    existing report refused before any work, unless ``force``).  ``on_size(d, comparison)``
    is called as each size finishes."""
    config = config or BaselinesConfig()
    outputs = None
    if directory is not None:
        outputs = Outputs(directory, force=force, flag=flag).check(REPORT)
    seed_everything(config.seed)
    splits = load_dataset(config.dataset, data_dir)
    if (
        splits["train"].labels is None
    ):  # the samples are judged by a classifier of the data's classes
        raise ConfigError(
            "dataset",
            f"{config.dataset} has no labels: judging samples needs a classifier trained on "
            "them (give a .npz with labels, or a folder with one sub-folder per class)",
        )
    train = first_rows(splits["train"], config.train_size, "--train-size", "training")
    test = first_rows(splits["test"], config.test_size, "--test-size", "test")
    # PCA has at most min(images, pixels) components: checked before anything trains
    largest = min(len(train), train.images.shape[1])
    too_large = [d for d in config.z_dims if d > largest]
    if too_large:
        raise ConfigError(
            "z_dims",
            f"PCA has at most {largest} components with {len(train)} training images of "
            f"{train.images.shape[1]} pixels, got {too_large[0]}",
        )
    train = binarize_static(train, config.seed, "train")
    test = binarize_static(test, config.seed, "test")
    start = time.perf_counter()
    classifier = fit_classifier(train.images, train.labels, seed=config.seed)
    accuracy = float((classifier(test.images).argmax(-1) == test.labels).float().mean())
    report = {
        "classifier_test_accuracy": accuracy,
        "epochs": config.epochs,
        "hidden": list(config.hidden),
        "train_images": len(train),
        "test_images": len(test),
        "units": "per pixel, nats (cross-entropy) and squared probability error; Fréchet "
        "distance in squared classifier-feature units",
        "capabilities": CAPABILITIES,
        "results": {},
        "reference": {},
        "config": config.recorded_in_report(),
    }
    comparisons: dict[int, LatentModelComparison] = {}
    written = None
    # staged: a failure on the way leaves the previous set as it was
    with outputs if outputs is not None else contextlib.nullcontext():
        for d in config.z_dims:
            comparisons[d] = result = compare_latent_models(
                train.images,
                test.images,
                classifier,
                d,
                hidden=config.hidden,
                epochs=config.epochs,
                num_samples=config.samples,
                seed=config.seed,
            )
            report["results"][str(d)] = result.metrics
            report["reference"][str(d)] = result.reference
            if outputs is not None:
                _figures(outputs, d, result, test, train.image_shape)
            if on_size is not None:
                on_size(d, result)
        report["seconds"] = time.perf_counter() - start
        if outputs is not None:
            written = outputs.write_json(REPORT, report)
            outputs.commit()
    return EvalResult(report, comparisons, written)


def _figures(outputs: Outputs, d: int, result: LatentModelComparison, test, shape) -> None:
    plot_image_rows(
        {"test images": test.images} | result.reconstructions,
        shape,
        outputs.path(f"figures/reconstructions_d{d}.png"),
        title=f"reconstructions, d = {d}",
    )
    plot_image_rows(
        result.samples, shape, outputs.path(f"figures/samples_d{d}.png"), n=12,
        title=f"samples, d = {d}",
    )  # fmt: skip
    plot_image_rows(
        result.interpolations,
        shape,
        outputs.path(f"figures/interpolations_d{d}.png"),
        title=f"interpolations, d = {d}",
    )
    if d == 2:
        plot_latent_maps(result.codes, test.labels, outputs.path("figures/latent_maps_d2.png"))
