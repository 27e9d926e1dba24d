"""Out-of-distribution detection with a trained VAE: per-image scores and detection metrics.

Every score is oriented the same way, **higher = more like the training data**, in nats per
image (the complexity measure in nats too), so that one sign convention holds for all:

- ``log_px``: the importance-weighted log p̂(x) of the evaluator.
- ``elbo``: the ELBO of the amortised guide (same draws as ``log_px``).
- ``reconstruction``: minus the reconstruction error, log p(x | z = the encoder's mean), the
  score of a plain autoencoder.
- ``complexity_ratio``: log p̂(x) + L(x) ln 2, where L(x) is the length in bits of the image
  under a generic lossless compressor (Serrà et al. 2020, "Input complexity and
  out-of-distribution detection with likelihood-based generative models"). The compressor
  is a universal model p₀ with −log₂ p₀(x) = L(x), so the score is the log likelihood ratio
  log p(x) / p₀(x): it discounts what any model finds easy (large blank areas, few strokes),
  the reason a model trained on Fashion-MNIST gives MNIST digits a higher likelihood than its
  own test images (Nalisnick et al. 2019, "Do Deep Generative Models Know What They Don't
  Know?").
- ``background_ratio``: log p̂(x) − log p̂_b(x), where p_b is a background model: the same
  kind of VAE trained on the same images with each pixel replaced by a random value with
  some probability (``train_svi.py --perturb``; Ren et al. 2019, "Likelihood Ratios for
  Out-of-Distribution Detection").  The perturbed model is meant to learn the population
  statistics (how many pixels are on, how smooth the strokes are) but less of the semantics,
  so that the ratio keeps what is specific to the training data.  Scored only when a background model
  is given.

The compressor matters (on Fashion-MNIST against MNIST, AUROC from 0.78 to 0.98 between
zlib and bz2), and choosing it by its AUROC would need OOD data.  ``choose_compressor`` picks
it from in-distribution held-out images only: L(x) is meant to stand in for the part of
−log p(x) that any model pays for the input's complexity, so the compressor whose code
lengths track the model's own −log p̂(x) most closely (Pearson correlation) is the best
stand-in.  ``compressor="auto"`` in ``scripts/detect_ood.py`` does this on the validation split.

``detection_metrics`` treats the out-of-distribution images as the positive class (the ones
to detect) and the negated score as the detector's output: AUROC, AUPRC (average precision,
OOD positive) and the false-positive rate at 95% true-positive rate (the share of
in-distribution images flagged when 95% of the OOD images are), all from scikit-learn.
"""

from __future__ import annotations

import bz2
import functools
import io
import lzma
import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from pyro.poutine.messenger import Messenger
from torch import Tensor

from pyro_vae.choices import DEFAULT_MAX_ROWS, MADE
from pyro_vae.inference.evaluate import _chunk_rng, estimate_log_px
from pyro_vae.seeding import child_seed

__all__ = [
    "BACKGROUND_SCORE",
    "COMPRESSORS",
    "LLR_SAMPLED_SCORE",
    "LLR_SCORE",
    "MADE",
    "SCORES",
    "choose_compressor",
    "complexity_bits",
    "detection_metrics",
    "log_px_per_image",
    "made_images",
    "bound_above",
    "llr_above",
    "llr_above_sampled",
    "ood_scores",
    "roc",
]

SCORES = ("log_px", "elbo", "reconstruction", "complexity_ratio")
# log p̂(x) − log p̂_background(x), scored when a background model is given
BACKGROUND_SCORE = "background_ratio"
# L^{>k}(x) − L(x), the negated LLR^{>k} of Havtorn et al. (2021) as their code computes it
# (k = 1: the lowest layer at the mean of its conditional prior), scored for hierarchical
# models whose guide gives q(z_{>1} | x) (top-down and deterministic)
LLR_SCORE = "llr_above_1"
# the same ratio with the lowest layer drawn from its conditional prior instead of set to its
# mean (``llr_above_sampled``)
LLR_SAMPLED_SCORE = "llr_above_1_sampled"


def _png(image: np.ndarray) -> int:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=True)
    return buffer.tell()


def _packed(compress: Callable[[bytes], bytes]) -> Callable[[np.ndarray], int]:
    return lambda image: len(compress(np.packbits(image > 127).tobytes()))


# image (uint8, H x W, 0 or 255) -> bytes; PNG (8-bit grey, Pillow's best effort) is what
# Serrà et al. found to work; the others compress the pixels packed 8 to a byte.
COMPRESSORS: dict[str, Callable[[np.ndarray], int]] = {
    "png": _png,
    "zlib": _packed(lambda b: zlib.compress(b, 9)),
    "bz2": _packed(lambda b: bz2.compress(b, 9)),
    "lzma": _packed(lambda b: _lzma_9e(b)),
}


def _lzma_9e(data: bytes) -> bytes:
    """``lzma.compress(data, preset=9 | PRESET_EXTREME)`` with a dictionary no larger than it
    needs: preset 9 allocates 64 MiB per call (47 ms for one 98-byte image, almost all of it in
    the kernel), and a dictionary at least as long as the input gives the same matches, so the
    same length (only the header's dictionary-size field differs)."""
    filters = [
        {
            "id": lzma.FILTER_LZMA2,
            "preset": 9 | lzma.PRESET_EXTREME,
            "dict_size": max(1 << 16, len(data)),
        }
    ]
    return lzma.compress(data, filters=filters)


def complexity_bits(
    x: Tensor, image_shape: Sequence[int] = (28, 28), compressor: str = "png"
) -> Tensor:
    """L(x): the length in bits of each binary image (rows of ``x``) under ``compressor``,
    one image per file, headers included (the same for every image of a shape)."""
    if compressor not in COMPRESSORS:
        raise ValueError(f"unknown compressor {compressor!r}; choose from {sorted(COMPRESSORS)}")
    size = COMPRESSORS[compressor]
    images = (x.detach().cpu().reshape(len(x), *image_shape).numpy() > 0.5).astype(np.uint8) * 255
    return torch.tensor([8.0 * size(image) for image in images], dtype=torch.float64)


def choose_compressor(
    log_px: Tensor,
    x: Tensor,
    image_shape: Sequence[int] = (28, 28),
    compressors: Sequence[str] | None = None,
) -> tuple[str, dict[str, float]]:
    """(the chosen compressor, {compressor: correlation}) for in-distribution held-out images
    ``x`` with the model's log p̂(x) ``log_px`` (N,): the compressor whose code lengths L(x)
    have the highest Pearson correlation with −log p̂(x).  Uses no OOD data."""
    names = list(COMPRESSORS) if compressors is None else list(compressors)
    if len(x) < 3 or len(log_px) != len(x):
        raise ValueError("choosing a compressor needs at least 3 images, each with its log p(x)")
    nll = -log_px.detach().double().cpu().numpy()
    correlations = {}
    for name in names:
        bits = complexity_bits(x, image_shape, name).numpy()
        # a constant code length (or likelihood) correlates with nothing: rank it last
        r = np.corrcoef(nll, bits)[0, 1] if bits.std() > 0 and nll.std() > 0 else -1.0
        correlations[name] = float(r)
    return max(names, key=correlations.__getitem__), correlations


# OOD sets made from the in-distribution images themselves, so that no other data set is needed


def made_images(kind: str, inside: Tensor, seed: int) -> Tensor:
    """``noise``: independent pixels with the in-distribution images' mean intensity per
    pixel; ``flipped``: the in-distribution images (square) upside down."""
    if kind not in MADE:
        raise ValueError(f"unknown made OOD set {kind!r}; choose from {MADE}")
    if kind == "flipped":
        side = int(round(inside.shape[1] ** 0.5))
        return inside.reshape(len(inside), side, side).flip(1).reshape(len(inside), -1)
    gen = torch.Generator().manual_seed(child_seed(seed, "ood-noise"))
    return torch.bernoulli(inside.mean(0).expand_as(inside), generator=gen)


def _estimate(model, x: Tensor, num_particles: int, seed: int | None, progress: bool):
    # per image only: no PSIS diagnostics, no bound against K, the data checked by the caller
    return estimate_log_px(
        model.model,
        model.guide,
        x,
        num_particles=num_particles,
        ks=(),
        psis=False,
        seed=seed,
        progress=progress,
        validate=False,
    )


@torch.no_grad()
def log_px_per_image(
    model, x: Tensor, *, num_particles: int = 1000, seed: int | None = 0, progress: bool = False
) -> Tensor:
    """The evaluator's importance-weighted log p̂(x) of every row of ``x`` under ``model``'s
    model/guide pair, nothing else (no PSIS, no bound against K): (N,) float64, nats."""
    return _estimate(model, x, num_particles, seed, progress).log_px


class _AtConditionalMean(Messenger):
    """Sets each of the sites ``names`` to the mean of its distribution as the model builds
    it (given the values above it) instead of drawing it."""

    def __init__(self, names) -> None:
        super().__init__()
        self.names = set(names)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] in self.names:
            msg["value"] = msg["fn"].mean
            msg["done"] = True


@torch.no_grad()
def bound_above(
    model: Callable,
    guide: Callable,
    x: Tensor,
    lower_sites: Sequence[str],
    *,
    num_particles: int = 1,
    seed: int | None = 0,
    plate_name: str = "data",
) -> Tensor:
    """L^{>k}(x) per row of ``x``, nats, as Havtorn et al. (2021) compute it: z_{>k} drawn
    from the guide, the layers ``lower_sites`` (z_1 .. z_k) set to the mean of
    p(z_{<=k} | z_{>k}) (each at its conditional mean given the layer above, from the top
    down), and

        L^{>k}(x) = log p(x | z_{<=k}, z_{>k}) - sum_{i>k} [log q(z_i | ...) - log p(z_i | z_{i+1})],

    the KL terms of the layers above k estimated at the drawn values, averaged over
    ``num_particles`` draws.  (N,) float64.

    The guide must draw every site above k before any of ``lower_sites`` (a top-down or
    deterministic bottom-up guide), so that those sites' densities are q(z_{>k} | x); a
    guide that draws the upper layers from the lower ones (q(z_2 | z_1)) is refused."""
    if num_particles < 1:
        raise ValueError(f"num_particles must be positive, got {num_particles}")
    rows = max(1, DEFAULT_MAX_ROWS // num_particles)
    out = []
    for position, start in enumerate(range(0, x.shape[0], rows)):
        with _chunk_rng(seed, position):
            out.append(
                _bound_above(
                    model, guide, x[start : start + rows], lower_sites, num_particles, plate_name
                )
            )
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float64)


def _bound_above(model, guide, x, lower_sites, num_particles, plate_name) -> Tensor:
    from pyro import poutine

    from pyro_vae.inference.weights import replay_model, sample_sites, site_log_prob, trace_guide

    guide_trace = trace_guide(guide, x, num_particles=num_particles)
    latents = [n for n, site in sample_sites(guide_trace) if not site["is_observed"]]
    lower = list(lower_sites)
    if not lower or any(n not in latents for n in lower):
        raise ValueError(f"lower_sites {lower} must name latent sites of the guide {latents}")
    upper = [n for n in latents if n not in lower]
    if not upper:
        raise ValueError("lower_sites name every latent site: no layer is left above them")
    first_lower = min(latents.index(n) for n in lower)
    late = [n for n in upper if latents.index(n) > first_lower]
    if late:
        raise ValueError(
            f"the guide draws {late[0]!r} after {latents[first_lower]!r}: it has no "
            "q(z_{>k} | x) apart from the lower layers (a bottom-up guide); L^{>k} needs a "
            "top-down or deterministic guide"
        )
    kept = poutine.Trace()
    for name, site in guide_trace.nodes.items():
        if name not in lower:
            kept.add_node(name, **site)
    model_trace = replay_model(_AtConditionalMean(lower)(model), kept, x)
    particle_dim = -2

    def total(trace, names) -> Tensor:
        out = 0.0
        for name in names:
            out = out + site_log_prob(trace.nodes[name], plate_name, particle_dim)
        return out

    observed = [n for n, site in sample_sites(model_trace) if site["is_observed"]]
    log_w = total(model_trace, observed) + total(model_trace, upper) - total(guide_trace, upper)
    return log_w.double().mean(0)


@torch.no_grad()
def llr_above(
    model: Callable,
    guide: Callable,
    x: Tensor,
    lower_sites: Sequence[str],
    *,
    num_particles: int = 1000,
    seed: int | None = 0,
    progress: bool = False,
) -> Tensor:
    """L^{>k}(x) - L(x) per row of ``x``, nats: the negated likelihood ratio LLR^{>k} of
    Havtorn et al. (2021, "Hierarchical VAEs know what they don't know"), as their code
    computes it: L^{>k} is ``bound_above`` (the layers ``lower_sites`` at the mean of their
    conditional prior), L(x) the ELBO, both averaged over ``num_particles`` draws.  The paper's
    LLR^{>k} = L - L^{>k} is larger for out-of-distribution images; this score is its
    negation, so that higher = more like the training data, as every score here."""
    common = {"num_particles": num_particles, "ks": (), "psis": False, "validate": False}
    full = estimate_log_px(model, guide, x, seed=seed, progress=progress, **common)
    above = bound_above(
        model,
        guide,
        x,
        lower_sites,
        num_particles=num_particles,
        seed=None if seed is None else seed + 1,
    )
    return above - full.elbo


@torch.no_grad()
def llr_above_sampled(
    model: Callable,
    guide: Callable,
    guide_above: Callable,
    x: Tensor,
    *,
    num_particles: int = 1000,
    seed: int | None = 0,
    progress: bool = False,
) -> Tensor:
    """L^{>k}(x) - L(x) per row of ``x``, nats, with the lowest k layers *drawn* from their
    conditional prior (``llr_above`` sets them to its mean, as Havtorn et al.'s code does).

    L(x) is the ELBO with ``guide``; L^{>k}(x) the bound whose proposal is ``guide_above``
    (the guide's q(z_{>k} | x) for the upper layers, the lowest k layers drawn from their
    conditional prior; ``HierarchicalVAE.guide_above``).  Both are expectations of a log
    weight, estimated here by the mean over ``num_particles`` draws (the evaluator's ELBO
    column), so their difference is an unbiased estimate of the ratio of bounds the paper
    defines.  (Not of a ratio of importance-weighted log p̂: with many particles both
    proposals' estimates converge to the same log p(x), and their difference to 0.)
    In-distribution images are explained by their upper latents, so drawing the lowest layer
    from the prior costs them little; an image the upper layers do not explain loses more,
    so it scores lower (higher = more like the training data, as every score here)."""
    common = {"num_particles": num_particles, "ks": (), "psis": False, "validate": False}
    full = estimate_log_px(model, guide, x, seed=seed, progress=progress, **common)
    above = estimate_log_px(
        model, guide_above, x, seed=None if seed is None else seed + 1, progress=progress, **common
    )
    return above.elbo - full.elbo


@torch.no_grad()
def ood_scores(
    vae,
    x: Tensor,
    *,
    num_particles: int = 1000,
    compressor: str = "png",
    background=None,
    seed: int | None = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The scores of ``SCORES`` for every row of ``x`` (binary images), float64 tensors of
    shape (N,), nats per image, higher = more like the training data; for a hierarchical
    model with the top-down or deterministic guide also ``llr_above_1`` (``LLR_SCORE``),
    ``llr_above_k`` for every other k below the top layer, and ``llr_above_1_sampled``
    (``LLR_SAMPLED_SCORE``); with a
    ``background`` model also ``background_ratio`` (``BACKGROUND_SCORE``)."""
    for m in (vae, background):
        if m is not None and getattr(m, "likelihood_name", None) != "bernoulli":
            raise ValueError(
                "the scores here need VAEs with a Bernoulli likelihood (binary images)"
            )
    r = _estimate(vae, x, num_particles, seed, progress)
    recon = torch.cat([vae.reconstruction_log_prob(chunk).double() for chunk in x.split(4096)])
    bits = complexity_bits(x, vae.image_shape, compressor)
    scores = {
        "log_px": r.log_px,
        "elbo": r.elbo,
        "reconstruction": recon,
        "complexity_ratio": r.log_px + bits * math.log(2),
    }
    if getattr(vae, "guide_kind", None) in ("top-down", "deterministic"):
        scores[LLR_SCORE] = llr_above(
            vae.model,
            vae.guide,
            x,
            vae.latent_sites[:1],
            num_particles=num_particles,
            seed=seed,
            progress=progress,
        )
        for k in range(2, len(vae.latent_sites)):  # three layers and more: every k
            scores[f"llr_above_{k}"] = llr_above(
                vae.model,
                vae.guide,
                x,
                vae.latent_sites[:k],
                num_particles=num_particles,
                seed=seed,
                progress=progress,
            )
        scores[LLR_SAMPLED_SCORE] = llr_above_sampled(
            vae.model,
            vae.guide,
            functools.partial(vae.guide_above, k=1),
            x,
            num_particles=num_particles,
            seed=seed,
            progress=progress,
        )
    if background is not None:
        # the model's seed: the two estimates share their standard-normal draws
        log_bg = log_px_per_image(
            background, x, num_particles=num_particles, seed=seed, progress=progress
        )
        scores[BACKGROUND_SCORE] = r.log_px - log_bg
    return scores


def _detector(inside: Tensor, outside: Tensor) -> tuple[np.ndarray, np.ndarray]:
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError("both sets need at least one image")
    scores = -torch.cat([inside, outside]).double().numpy()
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return np.concatenate([np.zeros(len(inside)), np.ones(len(outside))]), scores


def roc(inside: Tensor, outside: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the detector ``-score``, OOD positive."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(*_detector(inside, outside))
    return fpr, tpr


def detection_metrics(inside: Tensor, outside: Tensor) -> dict[str, float]:
    """AUROC, AUPRC and FPR at 95% TPR of the detector ``-score``, with the ``outside``
    (out-of-distribution) images as positives; ``inside`` and ``outside`` are scores,
    higher = more like the training data."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    labels, scores = _detector(inside, outside)
    fpr, tpr, _ = roc_curve(labels, scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "auprc": float(average_precision_score(labels, scores)),
        "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
    }
