"""Importance-weighted log p(x) and the ELBO, per datapoint, for any Pyro model/guide pair.

For each datapoint x and K draws z_k ~ q(z|x), with log weights
log w_k = log p(x, z_k) - log q(z_k|x)::

    log p̂_K(x) = logsumexp_k(log w_k) - log K     (a lower bound on log p(x) in expectation,
                                                   tightening as K grows; Burda et al. 2015)
    ELBO(x)    = mean_k(log w_k)                   (unbiased for E_q[log w])
    gap(x)     = log p̂_K(x) - ELBO(x)              (estimates KL(q(z|x) || p(z|x)))

The log weights come from ``pyro_vae.inference.weights`` (each site's own, unscaled ``log_prob``
with the data dimension kept), the same computation the training objectives use; here they
are drawn in chunks of particles and datapoints and reduced in float64.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from torch import Tensor
from tqdm import tqdm

from pyro_vae.checks import as_tensor, positive_int
from pyro_vae.choices import DEFAULT_KS, DEFAULT_MAX_ROWS, PASS_FLOATS
from pyro_vae.faults import pause_point
from pyro_vae.inference.weights import ImportanceTraces, replay_model, trace_guide, trace_particles
from pyro_vae.seeding import child_seed

__all__ = [
    "LabelMarginalLikelihood",
    "MarginalLikelihood",
    "estimate_log_px",
    "estimate_log_px_over_labels",
    "eval_batch_size",
    "predict_labels",
    "rows_per_pass",
    "semi_supervised_report",
    "log_weights",
    "psis_khat",
]

# log weights held at once: particles x datapoints per forward pass
# chunks between two hand-backs of freed heap pages: the pages a chunk frees are reused by
# the next ones; handing them back after every chunk cost page faults for 15% of the time
_TRIM_EVERY = 16


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Each chunk allocates and frees temporaries of many sizes. glibc's adaptive mmap
    threshold then serves them from the heap and keeps the freed pages, so without this
    the process grew by about 0.6 MB per image at K = 5000 (over 5 GB on the MNIST test
    set) while the live tensors stayed under 0.5 GB.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@torch.no_grad()
def log_weights(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int = 1,
    max_plate_nesting: int = 1,
    plate_name: str = "data",
    **kwargs,
) -> Tensor:
    """Log importance weights log p(x, z_k) - log q(z_k | x), shape (K, N), in nats.

    The guide runs inside a vectorised ``"_particles"`` plate left of every model plate; the
    model is replayed against its trace.  Scales from ``poutine.scale`` (a KL weight, label
    weights, subsampling) are ignored: the weights are those of the model as written.
    A model latent site that the guide does not sample is drawn from the prior, where its
    prior and proposal densities cancel, so it adds nothing to the weight.
    """
    return trace_particles(
        model,
        guide,
        *args,
        num_particles=num_particles,
        max_plate_nesting=max_plate_nesting,
        plate_name=plate_name,
        **kwargs,
    ).log_weights()


def psis_khat(log_w: np.ndarray) -> np.ndarray:
    """Pareto k̂ of each row's importance weights (rows: datapoints, columns: particles).

    k̂ > 0.7 marks an estimate that cannot be trusted (Vehtari et al. 2024).  This is the
    one place that calls ArviZ (``arviz.psislw`` in ArviZ 0.x).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

        _, khat = arviz.psislw(np.asarray(log_w, dtype=np.float64), reff=1.0)
    return np.asarray(khat, dtype=np.float64)


@dataclass
class MarginalLikelihood:
    """Per-datapoint estimates, each a float64 tensor of shape (N,), in nats per image."""

    log_px: Tensor
    elbo: Tensor
    ess: Tensor
    khat: Tensor | None
    num_particles: int
    bound_vs_k: dict[int, Tensor] = field(default_factory=dict)
    # the Monte Carlo standard error of each ELBO estimate, std(log w) / sqrt(K)
    elbo_sem: Tensor | None = None

    @classmethod
    def join(cls, parts: Sequence[MarginalLikelihood]) -> MarginalLikelihood:
        """The estimates of consecutive shards of one data set, as one result."""
        if not parts:
            raise ValueError("no results to join")
        first = parts[0]

        def cat(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return cls(
            log_px=cat("log_px"),
            elbo=cat("elbo"),
            ess=cat("ess"),
            khat=cat("khat"),
            num_particles=first.num_particles,
            bound_vs_k={k: torch.cat([p.bound_vs_k[k] for p in parts]) for k in first.bound_vs_k},
            elbo_sem=cat("elbo_sem"),
        )

    @property
    def gap(self) -> Tensor:
        """log p̂_K(x) - ELBO(x): the estimated KL(q(z|x) || p(z|x)), nats per image."""
        return self.log_px - self.elbo

    def summary(self) -> dict:
        """Means with standard errors, in nats per image; NLL = -log p̂_K(x)."""

        mean_sem = _mean_sem
        log_px, log_px_sem = mean_sem(self.log_px)
        elbo, elbo_sem = mean_sem(self.elbo)
        gap, gap_sem = mean_sem(self.gap)
        out = {
            "num_datapoints": int(self.log_px.numel()),
            "num_particles": self.num_particles,
            "log_px": log_px,
            "log_px_sem": log_px_sem,
            "nll": -log_px,
            "elbo": elbo,
            "elbo_sem": elbo_sem,
            "gap": gap,
            "gap_sem": gap_sem,
            "ess_mean": float(self.ess.mean()),
            "ess_median": float(self.ess.median()),
            "bound_vs_k": {str(k): float(v.mean()) for k, v in self.bound_vs_k.items()},
            "bound_vs_k_sem": {str(k): mean_sem(v)[1] for k, v in self.bound_vs_k.items()},
        }
        if self.khat is not None:
            out["khat_median"] = float(self.khat.median())
            out["khat_share_over_0.7"] = float((self.khat > 0.7).double().mean())
        return out


@contextlib.contextmanager
def _chunk_rng(seed: int | None, position: int):
    """The global RNG seeded for the chunk at ``position`` (then restored), or untouched."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(child_seed(seed, f"log-px-chunk-{position}"))
        yield


def _split(tensors: Sequence[Tensor], start: int, stop: int) -> list[Tensor]:
    return [t[start:stop] for t in tensors]


def estimate_log_px(
    model: Callable,
    guide: Callable,
    *data: Tensor,
    num_particles: int = 1000,
    ks: Sequence[int] | None = None,
    batch_size: int | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    psis: bool = True,
    progress: bool = False,
    max_plate_nesting: int = 1,
    plate_name: str = "data",
    validate: bool | None = None,
    seed: int | None = None,
    first_index: int = 0,
    **kwargs,
) -> MarginalLikelihood:
    """Importance-weighted log p(x), ELBO, ESS and PSIS k̂ for every row of ``data``.

    ``data`` are tensors with one row per datapoint (e.g. ``x`` or ``x, y``), cut into chunks
    along dim 0 and passed to ``model``/``guide`` as positional arguments; ``kwargs`` go as
    they are.  The guide draws all K particles of a chunk of ``batch_size`` datapoints at
    once (default ``eval_batch_size(K)``); the model, which holds the large per-particle
    tensors, is replayed on at most ``max_rows`` = particles x datapoints per pass, so peak
    memory stays bounded whatever K is, and ``max_rows`` changes no number.  ``bound_vs_k[k]`` is the mean of log p̂_k(x) over the
    K // k disjoint groups of k particles, for each k in ``ks`` (default: those of
    ``DEFAULT_KS`` up to K; a given k above K is refused): one run gives the whole curve.  k̂ needs at least 20 particles (``None`` otherwise, or when ``psis=False``).
    ``validate=False`` switches Pyro's distribution checks off for data checked beforehand;
    ``None`` leaves the global setting alone.

    With ``seed``, every chunk of ``batch_size`` rows draws its particles from a generator
    seeded by ``seed`` and the chunk's position ``first_index + start`` (the global RNG
    state is left as it was): a chunk's values then do not depend on what was evaluated
    before it, so shards of a data set cut at multiples of ``batch_size`` (see
    ``eval_batch_size``) give exactly the values of the whole.
    """
    data, num_particles, ks = _checked_arguments(
        model, data, num_particles, ks, batch_size, max_rows, first_index
    )
    checks = contextlib.nullcontext() if validate is None else pyro.validation_enabled(validate)
    with checks:
        return _estimate(
            model,
            guide,
            data,
            kwargs,
            num_particles=num_particles,
            ks=ks,
            batch_size=batch_size,
            max_rows=max_rows,
            psis=psis,
            progress=progress,
            max_plate_nesting=max_plate_nesting,
            plate_name=plate_name,
            seed=seed,
            first_index=first_index,
        )


def _checked_arguments(model, data, num_particles, ks, batch_size, max_rows, first_index):
    """One-line errors naming the argument, before any work: tensors (numpy arrays are
    converted) with one row per datapoint, sizes that are positive integers, and, for the
    project's models (``model.__self__.check_data``), data of the shape and support the model
    is defined on (one image given as a 1-D tensor would otherwise pass as 784 datapoints)."""
    num_particles = positive_int("num_particles", num_particles)
    if ks is None:
        ks = tuple(k for k in DEFAULT_KS if k <= num_particles)
    ks = tuple(positive_int("ks", k) for k in ks)
    if any(k > num_particles for k in ks):
        raise ValueError(
            f"ks {list(ks)}: every k needs at most num_particles ({num_particles}) particles"
        )
    max_rows = positive_int("max_rows", max_rows)
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    positive_int("first_index", first_index, allow_zero=True)
    if not data:
        raise ValueError("no data given")
    data = tuple(as_tensor(f"data[{i}]", t) for i, t in enumerate(data))
    # the networks' dtype: float64 data would meet float32 weights deep inside the model
    params = getattr(getattr(model, "__self__", None), "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    if first is not None and first.is_floating_point():
        data = tuple(t.to(first.dtype) if t.is_floating_point() else t for t in data)
    if any(t.dim() == 0 for t in data):
        raise ValueError("data must have one row per datapoint (not a scalar)")
    n = data[0].shape[0]
    if n == 0:
        raise ValueError("the data set is empty")
    if any(t.shape[0] != n for t in data):
        raise ValueError(
            f"data tensors disagree on the number of rows: {[t.shape[0] for t in data]}"
        )
    check = getattr(getattr(model, "__self__", None), "check_data", None)
    if callable(check):
        check(*data)
    return data, num_particles, ks


def rows_per_pass(*modules: object) -> int:
    """The default ``max_rows`` for a model made of ``modules`` (anything else is skipped):
    ``DEFAULT_MAX_ROWS``, or fewer where a network says it needs much working memory per row
    (``row_floats``, the convolutional networks' unfolded maps), so that a pass stays near
    ``PASS_FLOATS`` floats and at least 16 rows.  Changes no number, only the speed: the conv
    VAE of 8-bit MNIST evaluates 1.9 times faster at K = 1000 with its 148 rows per pass than
    with 32,768 (``benchmarks/pass_rows.py``, docs/results/evaluation-speed.md)."""
    floats = max(
        (
            getattr(sub, "row_floats", 0)
            for module in modules
            if isinstance(module, torch.nn.Module)
            for sub in module.modules()
        ),
        default=0,
    )
    if not floats:
        return DEFAULT_MAX_ROWS
    return max(16, min(DEFAULT_MAX_ROWS, PASS_FLOATS // floats))


def eval_batch_size(num_particles: int) -> int:
    """Datapoints per chunk of ``estimate_log_px`` at K = ``num_particles`` (the unit of its
    seeded draws): ``DEFAULT_MAX_ROWS // K``, at least one; it does not depend on
    ``max_rows``."""
    return max(1, DEFAULT_MAX_ROWS // num_particles)


def _estimate(
    model: Callable,
    guide: Callable,
    data: Sequence[Tensor],
    kwargs: dict,
    *,
    num_particles: int,
    ks: Sequence[int],
    batch_size: int | None,
    max_rows: int,
    psis: bool,
    progress: bool,
    max_plate_nesting: int,
    plate_name: str,
    seed: int | None,
    first_index: int,
) -> MarginalLikelihood:
    if num_particles < 1:
        raise ValueError(f"num_particles must be positive, got {num_particles}")
    if not data:
        raise ValueError("no data given")
    n_total = data[0].shape[0]
    if n_total == 0:
        raise ValueError("the data set is empty")
    # The draws are made per chunk of images with all K particles at once: a geometry that
    # depends on K only, so max_rows (memory) changes no number.  It bounds the model's
    # passes, which take the particles of a chunk in slices.
    if batch_size is None:
        batch_size = eval_batch_size(num_particles)
    model_particles = max(1, min(num_particles, max_rows // min(batch_size, n_total)))
    psis = psis and num_particles >= 20
    ks = [k for k in ks if k <= num_particles]
    results: dict[str, list[Tensor]] = {
        "log_px": [],
        "elbo": [],
        "elbo_sem": [],
        "ess": [],
        "khat": [],
    }
    curves: dict[int, list[Tensor]] = {k: [] for k in ks}
    starts = range(0, n_total, batch_size)
    chunk_index = 0
    for start in tqdm(
        starts, desc=f"log p(x), K={num_particles}", disable=None if progress else True
    ):
        chunk = _split(data, start, start + batch_size)
        with _chunk_rng(seed, first_index + start):
            lw = _chunk_log_weights(
                model,
                guide,
                chunk,
                kwargs,
                num_particles=num_particles,
                model_particles=model_particles,
                max_plate_nesting=max_plate_nesting,
                plate_name=plate_name,
            )
        lse = torch.logsumexp(lw, dim=0)
        results["log_px"].append(lse - math.log(num_particles))
        results["elbo"].append(lw.mean(dim=0))
        sd = lw.std(dim=0) if num_particles > 1 else torch.full_like(lse, math.nan)
        results["elbo_sem"].append(sd / math.sqrt(num_particles))
        results["ess"].append(torch.exp(2 * lse - torch.logsumexp(2 * lw, dim=0)))
        if psis:
            results["khat"].append(torch.from_numpy(psis_khat(lw.T.numpy())))
        if chunk_index % _TRIM_EVERY == _TRIM_EVERY - 1:
            _release_freed_memory()
        chunk_index += 1
        pause_point("evaluation-chunk")
        for k in ks:
            groups = num_particles // k
            grouped = lw[: groups * k].reshape(groups, k, -1)
            curves[k].append((torch.logsumexp(grouped, dim=1) - math.log(k)).mean(dim=0))
    return MarginalLikelihood(
        log_px=torch.cat(results["log_px"]),
        elbo=torch.cat(results["elbo"]),
        ess=torch.cat(results["ess"]),
        khat=torch.cat(results["khat"]) if psis else None,
        num_particles=num_particles,
        bound_vs_k={k: torch.cat(v) for k, v in curves.items()},
        elbo_sem=torch.cat(results["elbo_sem"]),
    )


@torch.no_grad()
def _chunk_log_weights(
    model: Callable,
    guide: Callable,
    chunk: Sequence[Tensor],
    kwargs: dict,
    *,
    num_particles: int,
    model_particles: int,
    max_plate_nesting: int,
    plate_name: str,
) -> Tensor:
    """Log weights (K, n) of one chunk, float64 on the CPU: the guide draws all K particles
    at once, the model is replayed on slices of ``model_particles`` of them."""
    guide_trace = trace_guide(
        guide, *chunk, num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs
    )
    log_q: Tensor | float | None = None
    pieces = []
    for k0 in range(0, num_particles, model_particles):
        k1 = min(num_particles, k0 + model_particles)
        model_trace = replay_model(
            model,
            guide_trace,
            *chunk,
            max_plate_nesting=max_plate_nesting,
            particles=None if k1 - k0 == num_particles else slice(k0, k1),
            **kwargs,
        )
        traces = ImportanceTraces(
            model_trace, guide_trace, num_particles, -(max_plate_nesting + 1), plate_name
        )
        if log_q is None:
            log_q = traces.log_q()
        lq = log_q if isinstance(log_q, float) or log_q.shape[0] == 1 else log_q[k0:k1]
        lw = traces.log_p() - lq
        pieces.append(lw.expand(k1 - k0, -1).double())
    return torch.cat(pieces).cpu()


def _mean_sem(t: Tensor) -> tuple[float, float]:
    n = t.numel()
    sem = float(t.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(t.mean()), sem


@dataclass
class LabelMarginalLikelihood:
    """log p̂(x) with a discrete label summed out, and the joint per class, float64, nats."""

    log_px: Tensor  # (N,)
    log_pxy: Tensor  # (N, num_classes)
    num_particles: int

    def predictions(self) -> Tensor:
        """argmax_y p̂(x, y): the generative model's own classifier, shape (N,)."""
        return self.log_pxy.argmax(dim=1)

    def summary(self, labels: Tensor | None = None) -> dict:
        """Means with standard errors in nats per image; with ``labels``, also log p̂(x, y)
        at the true label and the accuracy of ``predictions``."""
        log_px, log_px_sem = _mean_sem(self.log_px)
        out = {
            "num_datapoints": int(self.log_px.numel()),
            "num_particles_per_class": self.num_particles,
            "log_px": log_px,
            "log_px_sem": log_px_sem,
            "nll": -log_px,
        }
        if labels is not None:
            labels = labels.to(self.log_pxy.device)
            true = self.log_pxy.gather(1, labels[:, None]).squeeze(1)
            out["log_pxy"], out["log_pxy_sem"] = _mean_sem(true)
            out["generative_accuracy"] = float((self.predictions() == labels).double().mean())
        return out


def estimate_log_px_over_labels(
    model: Callable,
    guide: Callable,
    x: Tensor,
    num_classes: int,
    *,
    num_particles: int = 1000,
    **kwargs,
) -> LabelMarginalLikelihood:
    """log p(x) with a discrete label summed out exactly: logsumexp over c of log p̂(x, y=c).

    Calls ``model(x, y)`` / ``guide(x, y)`` with y set to each class in turn, so log p(y)
    is part of each joint; ``kwargs`` go to ``estimate_log_px``.
    """
    joint = []
    for c in range(num_classes):
        y = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
        result = estimate_log_px(
            model, guide, x, y, num_particles=num_particles, psis=False, ks=(), **kwargs
        )
        joint.append(result.log_px)
    joint = torch.stack(joint, dim=1)
    return LabelMarginalLikelihood(torch.logsumexp(joint, dim=1), joint, num_particles)


@torch.no_grad()
def predict_labels(classify: Callable[[Tensor], Tensor], x: Tensor, batch: int = 2000) -> Tensor:
    """``classify`` over ``x`` in batches: the predicted label of every row, shape (N,)."""
    return torch.cat([classify(x[i : i + batch]) for i in range(0, len(x), batch)])


def semi_supervised_report(
    model,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    num_particles: int = 100,
    likelihood_size: int = 1000,
    validate: bool | None = None,
) -> tuple[dict, Tensor]:
    """How a semi-supervised model (``classify``, ``model(x, y)``, ``guide(x, y)``) does on
    labelled held-out data: (report, confusion matrix (true, predicted) as counts).

    The report holds accuracy and error of ``classify`` on all of ``x``; with
    ``num_particles`` > 0, on the first ``likelihood_size`` images also log p̂(x) with y
    summed out, log p̂(x, y) at the true label, the ELBO with y drawn from the guide, and the
    accuracy of argmax_y p̂(x, y) (near chance when the decoder ignores y).  Nats per image.
    """
    predicted = predict_labels(model.classify, x).to(y.device)
    confusion = torch.bincount(y * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    accuracy = float((predicted == y).double().mean())
    report: dict = {
        "test_accuracy": accuracy,
        "test_error": 1 - accuracy,
        "units": "nats per image",
    }
    if num_particles:
        n = min(likelihood_size, len(x))
        over = estimate_log_px_over_labels(
            model.model,
            model.guide,
            x[:n],
            num_classes,
            num_particles=num_particles,
            validate=validate,
        )
        elbo = estimate_log_px(
            model.model,
            model.guide,
            x[:n],
            num_particles=num_particles,
            psis=False,
            ks=(),
            validate=validate,
        )
        summary = over.summary(y[:n])
        report.update(
            likelihood_images=n,
            log_px=summary["log_px"],
            log_px_sem=summary["log_px_sem"],
            log_pxy=summary["log_pxy"],
            generative_accuracy=summary["generative_accuracy"],
            elbo=float(elbo.elbo.mean()),
        )
    return report, confusion
