"""Figures from tensors and results, each written to one PNG.

Uses matplotlib's object API (``matplotlib.figure.Figure``), so no GUI backend or global
pyplot state is touched, and ``torchvision.utils.make_grid`` for image grids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "plot_gaps",
    "image_grid",
    "plot_analogies",
    "plot_bound_vs_k",
    "plot_confusion",
    "plot_curves",
    "plot_histogram",
    "plot_image_rows",
    "plot_images",
    "plot_latent_maps",
    "plot_khat",
    "plot_latent_map",
    "plot_ood_histograms",
    "plot_roc",
    "plot_reconstructions",
    "save_marginal_likelihood_figures",
    "save_vae_figures",
]


def _save(fig: Figure, path: Path | str | None) -> Figure:
    """Write the figure to ``path`` (if given) and return it; in a notebook a returned
    Figure shows inline."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def image_grid(images: Tensor, image_shape: Sequence[int], nrow: int = 10) -> np.ndarray:
    """Rows of flat images (N, D) -> one grid array with values in [0, 1]: (H, W) for grey
    images of shape (H, W), (H, W, C) for colour ones (channels last, as stored), and for
    vectors of shape (D,) one strip of D values per item."""
    x = images.detach().float().cpu().clamp(0, 1)
    if len(image_shape) == 3:  # (H, W, C), channels last
        h, w, c = image_shape
        x = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)[:, :3]
    else:
        h, w = image_shape if len(image_shape) == 2 else (1, image_shape[-1])
        x = x.reshape(-1, 1, h, w)
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    return grid[0].numpy() if x.shape[1] == 1 else grid.permute(1, 2, 0).numpy()


def plot_images(
    images: Tensor,
    image_shape: Sequence[int],
    path: Path | str | None = None,
    *,
    nrow: int = 10,
    title: str = "",
) -> Figure:
    """A grid of images (N, D), e.g. samples from the prior or an interpolation."""
    grid = image_grid(images, image_shape, nrow)
    fig = Figure(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + (0.4 if title else 0)))
    ax = fig.add_subplot()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_reconstructions(
    originals: Tensor,
    reconstructions: Tensor,
    image_shape: Sequence[int],
    path: Path | str | None = None,
) -> Figure:
    """Originals (top row of each pair) above their reconstructions."""
    n = originals.shape[0]
    nrow = min(n, 10)
    rows = []
    for start in range(0, n, nrow):
        rows += [originals[start : start + nrow], reconstructions[start : start + nrow]]
    return plot_images(
        torch.cat(rows),
        image_shape,
        path,
        nrow=nrow,
        title="test images (odd rows) and reconstructions",
    )


def plot_curves(
    history: Sequence[Mapping[str, Any]],
    path: Path | str | None = None,
    objective: str = "train objective (ELBO if beta=1)",
) -> Figure:
    """Training objective (labelled ``objective``) and validation ELBO per epoch, in nats per
    image."""
    epochs = [m["epoch"] for m in history]
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    ax.plot(epochs, [-m["train_loss"] for m in history], label=objective)
    if history and "val_elbo" in history[0]:
        ax.plot(epochs, [m["val_elbo"] for m in history], label="validation ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_latent_map(z: Tensor, labels: Tensor | None, path: Path | str | None = None) -> Figure:
    """Posterior means in 2-D, coloured by label; a PCA projection when z has more dimensions."""
    z = z.detach().float().cpu()
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        z2, title = centred @ v[:2].T, "posterior means, first two principal components"
    elif z.shape[1] == 2:
        z2, title = z, "posterior means"
    else:
        z2, title = z, "posterior means (1-D)"
    if z2.shape[1] < 2:  # one dimension, or fewer images than two principal components
        z2 = torch.cat([z2, z2.new_zeros(z2.shape[0], 2 - z2.shape[1])], 1)
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    if labels is None:
        ax.scatter(z2[:, 0], z2[:, 1], s=2, alpha=0.5)
    else:
        labels = labels.cpu()
        for c in torch.unique(labels).tolist():
            m = labels == c
            ax.scatter(z2[m, 0], z2[m, 1], s=2, alpha=0.6, label=str(c), color=f"C{c % 10}")
        ax.legend(markerscale=5, fontsize=7, loc="best", ncols=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_bound_vs_k(
    ks: Sequence[int],
    means: Sequence[float],
    sems: Sequence[float],
    elbo: float,
    path: Path | str | None = None,
) -> Figure:
    """Mean log p̂_k(x) against k (log axis), with the ELBO as a reference line."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.errorbar(ks, means, yerr=sems, marker="o", capsize=3, label="log p̂_k(x)")
    ax.axhline(elbo, color="C3", ls="--", label="ELBO")
    ax.set_xscale("log")
    ax.set_xlabel("particles k")
    ax.set_ylabel("nats per image")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_histogram(
    values: Tensor, path: Path | str | None = None, *, xlabel: str, title: str = ""
) -> Figure:
    """A histogram of per-datapoint values."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.hist(values.detach().cpu().numpy(), bins=50)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("datapoints")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_khat(khat: Tensor, path: Path | str | None = None) -> Figure:
    """Pareto k̂ per datapoint with the 0.7 reliability threshold."""
    k = khat.detach().cpu().numpy()
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.add_subplot()
    ax.scatter(np.arange(len(k)), k, s=2, alpha=0.5)
    ax.axhline(0.7, color="C3", ls="--", label="0.7: unreliable above")
    ax.set_xlabel("datapoint")
    ax.set_ylabel("Pareto k̂")
    ax.set_title(f"{(k > 0.7).mean():.1%} of datapoints above 0.7", fontsize=9)
    ax.legend()
    return _save(fig, path)


def plot_gaps(report: Any, path: Path | str | None = None, *, title: str = "") -> Figure:
    """The inference gap of each image split into approximation and amortisation gaps
    (a ``GapReport``): the means as stacked bars with standard errors, and per image."""
    approx = report.approximation_gap.detach().cpu().numpy()
    amort = report.amortisation_gap.detach().cpu().numpy()
    n = len(approx)
    fig = Figure(figsize=(8, 3.4))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    means = [approx.mean(), amort.mean()]
    sems = [
        approx.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0,
        amort.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0,
    ]
    ax.bar([0], [means[0]], yerr=[sems[0]], color="C0", label="approximation", capsize=3)
    ax.bar(
        [0],
        [means[1]],
        bottom=[means[0]],
        yerr=[sems[1]],
        color="C1",
        label="amortisation",
        capsize=3,
    )
    ax.set_xticks([0], ["mean"])
    ax.set_ylabel("nats per image")
    ax.legend(fontsize=8)
    order = np.argsort(approx + amort)
    ax2.bar(np.arange(n), approx[order], color="C0", width=1.0)
    ax2.bar(np.arange(n), amort[order], bottom=approx[order], color="C1", width=1.0)
    ax2.set_xlabel("image (sorted by inference gap)")
    ax2.set_ylabel("log p(x) − ELBO[q] (nats)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def save_vae_figures(
    vae: Any,
    images: Tensor,
    labels: Tensor | None,
    history: Sequence[Mapping[str, Any]],
    directory: Path | str,
    *,
    seed: int = 0,
    objective: str = "train objective (ELBO if beta=1)",
) -> list[Figure]:
    """The standard figures of a trained VAE-like model (with ``encode``, ``decode``,
    ``reconstruct`` and ``sample``) on held-out images (N, D): ELBO curves (the training
    curve labelled ``objective``), reconstructions, prior samples, the latent map and an
    interpolation between two images of different labels.
    """
    directory = Path(directory)
    shape = vae.image_shape
    device = next(vae.parameters()).device
    x = images.to(device)
    figures = []
    if history:
        figures.append(plot_curves(history, directory / "elbo_curves.png", objective))
    originals = x[:30]
    figures.append(
        plot_reconstructions(
            originals, vae.reconstruct(originals), shape, directory / "reconstructions.png"
        )
    )
    gen = torch.Generator().manual_seed(seed)
    figures.append(
        plot_images(
            vae.sample(100, generator=gen),
            shape,
            directory / "prior_samples.png",
            title="samples from the prior (mean images)",
        )
    )
    n_map = min(len(x), 5000)
    loc = torch.cat([vae.encode(x[i : i + 1000])[0] for i in range(0, n_map, 1000)])
    figures.append(
        plot_latent_map(
            loc, None if labels is None else labels[:n_map], directory / "latent_map.png"
        )
    )
    j = 1
    if labels is not None:
        different = (labels != labels[0]).nonzero()
        j = int(different[0]) if len(different) else 1
    if len(x) > j:
        ends = vae.encode(torch.stack([x[0], x[j]]))[0]
        t = torch.linspace(0, 1, 10, device=device)[:, None]
        path = vae.decode((1 - t) * ends[0] + t * ends[1])
        row = torch.cat([x[0:1], path, x[j : j + 1]])
        figures.append(
            plot_images(
                row,
                shape,
                directory / "interpolation.png",
                nrow=12,
                title="interpolation between two test images in latent space",
            )
        )
    return figures


def save_marginal_likelihood_figures(
    result: Any, directory: Path | str, prefix: str = ""
) -> list[Figure]:
    """Bound vs K, the histogram of per-datapoint gaps and k̂ per datapoint (when computed)
    for a ``MarginalLikelihood`` result: ``<prefix>bound_vs_k.png``, ``<prefix>gap_histogram.png``
    and ``<prefix>khat.png`` in ``directory``."""
    directory = Path(directory)
    summary = result.summary()
    ks = sorted(result.bound_vs_k)
    figures = [
        plot_bound_vs_k(
            ks,
            [summary["bound_vs_k"][str(k)] for k in ks],
            [summary["bound_vs_k_sem"][str(k)] for k in ks],
            summary["elbo"],
            directory / f"{prefix}bound_vs_k.png",
        ),
        plot_histogram(
            result.gap,
            directory / f"{prefix}gap_histogram.png",
            xlabel="log p̂(x) − ELBO (nats)",
            title=f"gap per datapoint, K={result.num_particles}: mean {summary['gap']:.2f} nats",
        ),
    ]
    if result.khat is not None:
        figures.append(plot_khat(result.khat, directory / f"{prefix}khat.png"))
    return figures


def plot_confusion(matrix: Tensor, path: Path | str | None = None, *, title: str = "") -> Figure:
    """A confusion matrix (rows: true class, columns: predicted), with counts."""
    m = matrix.detach().cpu().numpy()
    n = m.shape[0]
    fig = Figure(figsize=(5, 4.5))
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                color = "white" if m[i, j] > m.max() / 2 else "black"
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=6, color=color)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_analogies(
    originals: Tensor, analogies: Tensor, image_shape: Sequence[int], path: Path | str | None = None
) -> Figure:
    """Each row: a test image, then its style (z) drawn as every class (Kingma et al. 2014)."""
    rows = torch.cat([originals[:, None, :], analogies], dim=1)
    n, per_row = rows.shape[:2]
    return plot_images(
        rows.reshape(n * per_row, -1),
        image_shape,
        path,
        nrow=per_row,
        title="test image, then its style drawn as each class",
    )


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: Path | str | None = None,
    *,
    title: str = "",
) -> Figure:
    """ROC curves, one per score: ``{name: (fpr, tpr, auroc)}``."""
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.add_subplot()
    for name, (fpr, tpr, auroc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=0.8)
    ax.set_xlabel("false-positive rate (in-distribution images flagged)")
    ax.set_ylabel("true-positive rate (OOD images flagged)")
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_ood_histograms(
    inside: Mapping[str, Tensor],
    outside: Mapping[str, Tensor],
    path: Path | str | None = None,
    *,
    labels: tuple[str, str] = ("in-distribution", "out-of-distribution"),
) -> Figure:
    """Histograms of every score for the two sets, one panel per score."""
    names = list(inside)
    fig = Figure(figsize=(3.6 * len(names), 3.2))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        a, b = inside[name].double().numpy(), outside[name].double().numpy()
        lo, hi = np.percentile(np.concatenate([a, b]), [0.5, 99.5])
        bins = np.linspace(lo, hi, 60)
        ax.hist(a, bins=bins, alpha=0.6, density=True, label=labels[0])
        ax.hist(b, bins=bins, alpha=0.6, density=True, label=labels[1])
        ax.set_xlabel(f"{name} (nats; higher = more typical)", fontsize=8)
        ax.set_yticks([])
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_image_rows(
    rows: Mapping[str, Tensor],
    image_shape: Sequence[int],
    path: Path | str | None = None,
    *,
    n: int = 10,
    title: str = "",
) -> Figure:
    """One labelled row of ``n`` images per entry of ``rows`` (name -> (N, D) images)."""
    fig = Figure(figsize=(n * 0.6 + 1.6, 0.7 * len(rows) + (0.4 if title else 0.1)))
    for i, (name, images) in enumerate(rows.items()):
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(image_grid(images[:n], image_shape, nrow=n), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_latent_maps(
    codes: Mapping[str, Tensor], labels: Tensor, path: Path | str | None = None
) -> Figure:
    """2-D codes of the same images under several models, side by side, coloured by label."""
    fig = Figure(figsize=(3.2 * len(codes), 3.2))
    labels = labels.cpu()
    for i, (name, z) in enumerate(codes.items()):
        ax = fig.add_subplot(1, len(codes), i + 1)
        z = z.detach().float().cpu()
        for c in torch.unique(labels).tolist():
            m = labels == c
            ax.scatter(z[m, 0], z[m, 1], s=1.5, alpha=0.6, color=f"C{c % 10}", label=str(c))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[-1].legend(markerscale=6, fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    return _save(fig, path)
