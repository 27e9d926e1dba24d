"""Jobs on a trained run, one call each: log p(x) (``evaluate_log_px``), the gap
decomposition (``decompose_gaps``) and the out-of-distribution scores (``score_ood``).  Each
takes a loaded ``Run`` and a typed config, refuses before any work what it could not write,
computes, and writes its report and figures into ``directory`` when one is given (the run's
own by default in the scripts; an existing report is replaced only with ``force``).  The
evaluation scripts parse flags into the config, call one of these and print.  Every report
records its config (``"config"``, read back with ``EvalConfig.from_dict`` and the like).

    from pyro_vae import EvalConfig, Run, evaluate_log_px

    run = Run.load("runs/vae-...")
    result = evaluate_log_px(run, EvalConfig(num_particles=1000, eval_size=500))
    print(result.report["log_px"], result.report["gap"])
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pyro_vae.apps.compression import model_hash
from pyro_vae.apps.gaps import GapReport, inference_gaps
from pyro_vae.apps.ood import (
    choose_compressor,
    detection_metrics,
    log_px_per_image,
    made_images,
    ood_scores,
    roc,
)
from pyro_vae.apps.plots import (
    plot_gaps,
    plot_ood_histograms,
    plot_roc,
    save_marginal_likelihood_figures,
)
from pyro_vae.checks import ConfigError
from pyro_vae.choices import DATASETS, MADE
from pyro_vae.config import EvalConfig, GapsConfig, OODConfig
from pyro_vae.data import as_dataset, heldout_images
from pyro_vae.faults import pause_point
from pyro_vae.inference.evaluate import (
    MarginalLikelihood,
    estimate_log_px,
    eval_batch_size,
    rows_per_pass,
)
from pyro_vae.io.rundir import Outputs, RunDirError, write_file_atomically
from pyro_vae.seeding import seed_everything
from pyro_vae.training.distributed import Ranks, all_gather_objects
from pyro_vae.training.runs import Run

__all__ = [
    "EvalResult",
    "EvaluationInterrupted",
    "decompose_gaps",
    "evaluate_log_px",
    "score_ood",
]


@dataclass
class EvalResult:
    """What an evaluation job returns: ``report`` (what the JSON report holds; nats per
    image), ``result`` (the estimator's own object: a ``MarginalLikelihood``, a
    ``GapReport``, or the per-image scores of each set), and ``written``, the report's path
    (None when nothing was written)."""

    report: dict[str, Any]
    result: Any
    written: Path | None = None


def _outputs(
    directory: Path | str | None, names: tuple[str, ...], run: Run, force: bool, flag: str
) -> Outputs | None:
    """The staged result files, refused now (before the work) if they cannot be written."""
    if directory is None:
        return None
    return Outputs(directory, force=force, flag=flag, protect=(run.path,)).check(*names)


def evaluate_log_px(
    run: Run,
    config: EvalConfig | None = None,
    directory: Path | str | None = None,
    *,
    force: bool = False,
    data_dir: Path | str | None = None,
    progress: bool = False,
    ranks: Ranks | None = None,
    flag: str = "directory",
) -> EvalResult:
    """Importance-weighted log p(x), the ELBO and their gap on the run's held-out images
    (``config``: the split, how many images, K, the seed); writes
    ``marginal_likelihood_k<K>.json`` and its figures into ``directory`` when given.  Under
    torchrun every process (``ranks``) scores a share of the images; the figures are those of
    one process, bit for bit, and rank 0 alone writes (the others get an empty report)."""
    config = config or EvalConfig()
    ranks = ranks or Ranks()
    name = f"marginal_likelihood_k{config.num_particles}"
    outputs, problem = None, None
    if ranks.is_main:
        try:
            outputs = _outputs(directory, (f"{name}.json",), run, force, flag)
        except RunDirError as e:
            problem = e
    problem = all_gather_objects(problem, ranks)[0]
    if problem is not None:
        raise problem
    seed_everything(config.seed)
    if outputs is not None and not ranks.active:
        # one process writing a report: its finished images are kept as it goes
        result = _log_px_kept(
            run, config, outputs.directory / f"{name}{PROGRESS_SUFFIX}", data_dir, progress
        )
    else:
        result = run.log_px(
            config.split,
            config.eval_size,
            num_particles=config.num_particles,
            seed=config.seed,
            max_rows=config.max_rows,
            psis=config.psis,
            progress=progress and ranks.is_main,
            data_dir=data_dir,
            ranks=ranks,
            what="--eval-size",
        )
    if not ranks.is_main:
        return EvalResult({}, result)
    report = {**run.log_px_report(result, config.split), "config": config.recorded_in_report()}
    written = None
    if outputs is not None:
        with outputs:
            written = outputs.write_json(f"{name}.json", report)
            save_marginal_likelihood_figures(result, outputs.directory_path("figures"), f"{name}_")
            outputs.commit()
        (outputs.directory / f"{name}{PROGRESS_SUFFIX}").unlink(missing_ok=True)
    return EvalResult(report, result, written)


#: the file beside an evaluation's report that holds its finished images while it runs
PROGRESS_SUFFIX = ".progress.pt"
#: chunks of the estimator (``eval_batch_size`` images each) between two saves of progress
PROGRESS_CHUNKS = 16
_FIELDS = ("log_px", "elbo", "ess", "khat", "elbo_sem")


def _log_px_kept(
    run: Run,
    config: EvalConfig,
    path: Path,
    data_dir: Path | str | None,
    progress: bool,
) -> MarginalLikelihood:
    """``run.log_px`` in blocks of ``PROGRESS_CHUNKS`` chunks, the finished blocks saved to
    ``path`` after each, so that an evaluation stopped part way (Ctrl-C, a crash, a machine
    switched off) goes on from its last block when run again with the same config on the
    same weights and images, and gives the numbers of an uninterrupted run bit for bit (each
    chunk draws from a generator seeded by the seed and its position).  A saved file of
    another evaluation is not used (and is replaced)."""
    from tqdm.auto import tqdm

    images = run.heldout(config.split, config.eval_size, data_dir=data_dir, what="--eval-size")
    x = images.images.to(next(run.model.parameters()).device)
    identity = {
        "config": config.recorded_in_report(),
        "weights": model_hash(run.model).hex(),
        "images": hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest(),
    }
    parts = _read_progress(path, identity)
    done = kept = sum(len(p.log_px) for p in parts)
    block = eval_batch_size(config.num_particles) * PROGRESS_CHUNKS
    bar = tqdm(
        total=len(x),
        initial=done,
        desc=f"log p(x), K={config.num_particles}",
        unit="image",
        disable=None if progress else True,
    )
    try:
        with bar:
            for start in range(done, len(x), block):
                parts.append(
                    estimate_log_px(
                        run.model.model,
                        run.model.guide,
                        x[start : start + block],
                        num_particles=config.num_particles,
                        max_rows=config.max_rows or rows_per_pass(run.model),
                        psis=config.psis,
                        seed=config.seed,
                        first_index=start,
                        validate=False,  # the images were prepared by the run, for its model
                    )
                )
                if start + block < len(x):  # the last block goes straight into the report
                    _write_progress(path, identity, parts)
                    kept = start + block
                bar.update(len(parts[-1].log_px))
                pause_point("evaluation-block")
    except KeyboardInterrupt:
        if not kept:
            raise
        raise EvaluationInterrupted(
            f"interrupted; {kept} of {len(x)} images are scored and kept in {path}: the same "
            "command goes on from there"
        ) from None
    return MarginalLikelihood.join(parts)


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during an evaluation whose finished images are kept: says how many and where."""


def _read_progress(path: Path, identity: dict[str, Any]) -> list[MarginalLikelihood]:
    """The blocks an earlier run of this evaluation finished, or none (no file, another
    evaluation's, or a file that cannot be read)."""
    try:
        saved = torch.load(path, weights_only=True)
    except Exception:  # no file, or a cut or foreign one: work to redo, not an error
        return []
    if not isinstance(saved, dict) or saved.get("identity") != identity:
        return []
    try:
        return [
            MarginalLikelihood(
                **{f: part.get(f) for f in _FIELDS},
                num_particles=identity["config"]["num_particles"],
                bound_vs_k={int(k): v for k, v in part["bound_vs_k"].items()},
            )
            for part in saved["parts"]
        ]
    except (KeyError, TypeError, AttributeError):
        return []


def _write_progress(path: Path, identity: dict[str, Any], parts: list[MarginalLikelihood]) -> None:
    """Save the finished blocks atomically (a temporary file renamed over ``path``)."""
    payload = {
        "identity": identity,
        "parts": [
            {
                **{f: getattr(p, f) for f in _FIELDS},
                "bound_vs_k": {str(k): v for k, v in p.bound_vs_k.items()},
            }
            for p in parts
        ],
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, buffer.getvalue(), force=True)


def decompose_gaps(
    run: Run,
    config: GapsConfig | None = None,
    directory: Path | str | None = None,
    *,
    force: bool = False,
    data_dir: Path | str | None = None,
    flag: str = "directory",
) -> EvalResult:
    """The approximation and amortisation gaps (nats per image) of the run's model on its
    held-out images: a per-image q* fitted in ``config.family``, log p̂(x) from the best
    proposal.  Writes ``inference_gaps_<family>.json`` (and its figure when the fit held)
    into ``directory`` when given.  A fit that failed is in the report (``status``) and
    ``result.check()`` raises ``GapFitError``: nothing there should be read as a gap."""
    config = config or GapsConfig()
    model = run.model
    if not hasattr(model, "posterior_parameters"):
        raise ConfigError(
            "checkpoint", "the gap decomposition needs a VAE or hierarchical VAE checkpoint"
        )
    name = f"inference_gaps_{config.family}"
    outputs = _outputs(directory, (f"{name}.json",), run, force, flag)
    seed_everything(config.seed)
    x = run.heldout(config.split, config.images, data_dir=data_dir, what="--images").images
    gaps: GapReport = inference_gaps(
        model.model,
        model.guide,
        x,
        family=config.family,
        num_particles=config.num_particles,
        elbo_particles=config.elbo_particles,
        fit_options={"lr": config.fit_lr, "max_steps": config.fit_steps},
    )
    report = {
        **gaps.summary(),
        "family": config.family,
        "split": config.split,
        "binarize": run.data.binarize,
        "checkpoint": str(run.path),
        "fit_lr": config.fit_lr,
        "config": config.recorded_in_report(),
    }
    written = None
    if outputs is not None:
        with outputs:
            written = outputs.write_json(f"{name}.json", report)
            if report["status"] == "ok":
                title = f"q* {config.family}, {len(x)} {config.split} images"
                plot_gaps(gaps, outputs.path(f"figures/{name}.png"), title=title)
            outputs.commit()
    return EvalResult(report, gaps, written)


def _label(name: str) -> str:
    """A data set's name as it goes into a file name: your own file or folder by its name."""
    return name if name in (*DATASETS, *MADE) else Path(name).stem


def _same_weights(a: Run, b: Run) -> bool:
    mine, theirs = a.state["model"], b.state["model"]
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _background_of(run: Run, background: Run) -> dict[str, Any]:
    """The background model's record for the report; a one-line error when it cannot be
    the run's background."""
    if background.path.resolve() == run.path.resolve():
        raise ConfigError(
            "background", "is the model itself: the ratio would be zero for every image"
        )
    other = background.model
    if getattr(other, "likelihood_name", None) != "bernoulli":
        raise ConfigError("background", "needs a VAE checkpoint with a Bernoulli likelihood")
    if other.x_dim != run.model.x_dim:
        raise ConfigError("background", f"has {other.x_dim} pixels, the model {run.model.x_dim}")
    if background.data.dataset != run.data.dataset:
        raise ConfigError(
            "background",
            f"was trained on {background.data.dataset}, the model on {run.data.dataset}: a "
            "likelihood ratio needs the same data",
        )
    if _same_weights(run, background):
        raise ConfigError(
            "background", "has the model's own weights: the ratio would be zero for every image"
        )
    return {"checkpoint": str(background.path), "perturb": background.config.get("perturb")}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def score_ood(
    run: Run,
    config: OODConfig | None = None,
    directory: Path | str | None = None,
    *,
    background: Run | None = None,
    force: bool = False,
    data_dir: Path | str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    flag: str = "directory",
) -> EvalResult:
    """Out-of-distribution scores (nats per image, higher = more like the training data) of
    the run's test images of its own kind against ``config.ood``, with AUROC, AUPRC and FPR
    at 95 % TPR per score; with ``background`` (a run trained on perturbed images of the same
    data) also the likelihood ratio.  The complexity ratio's compressor is chosen on
    in-distribution validation images (``compressor="auto"``), never on OOD data.  Writes
    ``ood_<in>_vs_<ood>.json``, the per-image scores (``.npz``) and two figures into
    ``directory`` when given; ``result`` is ``{"in": scores, "out": scores}``.  ``progress``:
    progress bars; ``log``: where to say what the compressor's choice is about to cost."""
    config = config or OODConfig()
    model, data = run.model, run.data
    if getattr(model, "likelihood_name", None) != "bernoulli":
        raise ConfigError(
            "checkpoint", "OOD scores here need a VAE checkpoint with a Bernoulli likelihood"
        )
    if data.binarize == "none":
        raise ConfigError(
            "checkpoint", "the run was trained on grey images; OOD scores need binary ones"
        )
    inside_name = config.inside or data.dataset
    if inside_name == config.ood:
        raise ConfigError(
            "ood", f"{config.ood} is also the in-distribution set: nothing to tell apart"
        )
    background_info = None if background is None else _background_of(run, background)
    tag = f"ood_{_label(inside_name)}_vs_{_label(config.ood)}"
    outputs = _outputs(directory, (f"{tag}.json", f"{tag}.npz"), run, force, flag)
    seed_everything(config.seed)
    device = next(model.parameters()).device
    data_dir = data_dir or data.data_dir
    binarize, seed = data.binarize, data.seed
    if inside_name == data.dataset:  # the run's own test images (its data file's hash checked)
        inside = run.heldout("test", config.images, data_dir=data_dir, what="--images").images
    else:
        inside = heldout_images(inside_name, data_dir, "test", binarize, seed, config.images)
    if config.ood in MADE:
        outside = as_dataset(made_images(config.ood, inside, config.seed)).images
    else:
        outside = heldout_images(config.ood, data_dir, "test", binarize, seed, config.images)
    for name, x in ((inside_name, inside), (config.ood, outside)):
        if x.shape[1] != model.x_dim:
            raise ConfigError(
                "ood", f"the model expects {model.x_dim} pixels, {name} has {x.shape[1]}"
            )

    compressor, selection = config.compressor, None
    if compressor == "auto":
        valid = heldout_images(
            inside_name,
            data_dir,
            "valid",
            binarize,
            seed,
            config.select_images or 1000,
            "--select-images",
        )
        if log is not None:
            log(
                f"choosing the compressor: log p(x) of {len(valid)} {inside_name} validation "
                f"images at K={config.num_particles} (a compressor given by name skips this)"
            )
        chose_from = time.perf_counter()
        log_px = log_px_per_image(
            model,
            valid.to(device),
            num_particles=config.num_particles,
            seed=config.seed + 2,
            progress=progress,
        )
        compressor, correlations = choose_compressor(log_px, valid, model.image_shape)
        selection = {
            "split": "valid",
            "images": len(valid),
            "correlations": correlations,
            "seconds": time.perf_counter() - chose_from,
        }
    options = {
        "num_particles": config.num_particles,
        "compressor": compressor,
        "background": None if background is None else background.model,
    }
    scores_in = ood_scores(model, inside.to(device), seed=config.seed, progress=progress, **options)
    scores_out = ood_scores(
        model, outside.to(device), seed=config.seed + 1, progress=progress, **options
    )
    names = list(scores_in)  # SCORES, and the background ratio when a background is given
    notes = []
    if getattr(model, "guide_kind", None) == "bottom-up":  # LLR^{>1} needs q(z_{>1} | x)
        notes.append(
            "llr_above_1 not scored: the bottom-up guide draws z2 from z1 and has no q(z2 | x) "
            "(train with --guide deterministic or top-down for it)"
        )
    metrics = {s: detection_metrics(scores_in[s], scores_out[s]) for s in names}
    report = {
        "in": inside_name,
        "out": config.ood,
        "images": {"in": len(inside), "out": len(outside)},
        "num_particles": config.num_particles,
        "compressor": compressor,
        "compressor_selection": selection,
        "background": background_info,
        "notes": notes,
        "binarize": binarize,
        "checkpoint": str(run.path),
        "metrics": metrics,
        "mean_score": {
            s: {"in": float(scores_in[s].mean()), "out": float(scores_out[s].mean())} for s in names
        },
        "positive_class": "out-of-distribution images; detector = -score",
        "units": "scores in nats per image, higher = more like the training data",
        "config": config.recorded_in_report(),
    }
    written = None
    if outputs is not None:
        curves = {s: (*roc(scores_in[s], scores_out[s]), metrics[s]["auroc"]) for s in names}
        title = f"model trained on {data.dataset}: {inside_name} vs {config.ood}"
        arrays = {f"{s}_in": scores_in[s].numpy() for s in names}
        arrays |= {f"{s}_out": scores_out[s].numpy() for s in names}
        with outputs:
            written = outputs.write_json(f"{tag}.json", report)
            outputs.write_bytes(f"{tag}.npz", _npz(arrays))
            plot_roc(curves, outputs.path(f"figures/{tag}_roc.png"), title=title)
            plot_ood_histograms(
                scores_in,
                scores_out,
                outputs.path(f"figures/{tag}_scores.png"),
                labels=(inside_name, config.ood),
            )
            outputs.commit()
    return EvalResult(report, {"in": scores_in, "out": scores_out}, written)
