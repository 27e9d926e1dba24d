"""How good is the guide? The approximation and amortisation gaps (Cremer, Li & Duvenaud 2018,
"Inference Suboptimality in Variational Autoencoders").

For an image x, with the model held fixed:

    log p(x) - ELBO[q]  =  (log p(x) - ELBO[q*])  +  (ELBO[q*] - ELBO[q])
         inference gap        approximation gap        amortisation gap

where q is the amortised guide (the encoder's q(z|x)) and q* the best member of the guide's
family for this one x, found by optimising a per-image guide with SVI.  A per-image guide is
just another Pyro guide: one set of variational parameters per image, vectorised over the
batch, initialised from the encoder.

``fit_local_guide`` finds q*; ``inference_gaps`` computes the decomposition per image with
standard errors, log p(x) estimated by importance sampling with the better of the two
proposals.  Every latent sample site has one event dimension.

The family of q*: ``"own"`` is the amortised guide's own family, for guides whose owner module
defines ``posterior_parameters(x)`` (the encoder's unconstrained outputs) and
``posterior_from(raw)`` (the distribution they define), as the project's VAE does: q* is then
the best distribution the guide could output for this x, whatever the encoder.  For a Gaussian
guide that is the whole diagonal or full-covariance family; for a conditional flow it is the
flow with its trained weights, conditioned on per-image parameters (Cremer et al. also
re-fitted the flow's weights per image, a larger family).  ``"diagonal"`` and ``"full"`` are
Gaussian families for any guide.  ``None`` picks ``"own"`` where it exists, else
``"diagonal"`` (``"full"`` for several sites).

Several latent sites (a hierarchical VAE's layers).  ``"own"``, for an owner with
``guide_from(raw)`` (``HierarchicalVAE``): per-image values in place of what the guide
computes from x (the top-down guide's bottom-up estimates of every layer, merged with the
model's conditionals as the guide does; the bottom-up guide's q(z_1 | x), the layers above
through their trained networks).  ``"diagonal"`` or ``"full"``: one Gaussian over all sites
together, their vectors concatenated in the guide's order, drawn site by site from the
blocks of its Cholesky factor so that the model sees each layer as its own site.  An
amortised guide of several layers, whose later layers depend on earlier draws through
networks, is not a member of that Gaussian family: the amortisation gap ELBO[q*] - ELBO[q]
then compares two families as well; where it would be negative (the Gaussian fits worse
than the guide), the image's decomposition is refused (``GapReport.failures``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyro_vae.choices import FAMILIES
from pyro_vae.inference.evaluate import estimate_log_px
from pyro_vae.training.stepper import Stepper

__all__ = [
    "FAMILIES",
    "GapFitError",
    "GapReport",
    "LocalGuide",
    "fit_local_guide",
    "inference_gaps",
]


class LocalGuide:
    """A non-amortised guide: one set of variational parameters per datapoint.  For the
    Gaussian families, one mean and one (diagonal or full) covariance per datapoint, as
    tensors of shape (N, D) and (N, D) / (N, D, D); for ``family="own"``, the rows (N, P) of
    unconstrained parameters ``loc`` that ``build`` turns into the guide's distribution.
    ``guide(x, index)`` samples the latent site ``site`` for the rows ``index`` of the data it
    was made for, inside ``pyro.plate(plate_name, len(x))``; ``with_index(model)`` is the
    matching model.

    ``site`` may name several sites, with their sizes in ``sizes`` (summing to D): the
    Gaussian over D is then drawn site by site (see the module's docstring).  For a guide's
    own family over several sites, ``draw(rows)`` samples all of them instead of ``build``
    (``HierarchicalVAE.guide_from``)."""

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor | None = None,
        family: str = "diagonal",
        site: str | Sequence[str] = "z",
        plate_name: str = "data",
        build: Callable[[Tensor], dist.TorchDistribution] | None = None,
        sizes: Sequence[int] | None = None,
        draw: Callable[[Tensor], None] | None = None,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
        if (family == "own") != ((build is None) != (draw is None)):
            raise ValueError("family 'own' and only it takes build or draw (one of them)")
        self.sites = (site,) if isinstance(site, str) else tuple(site)
        if len(self.sites) > 1 and family == "own" and draw is None:
            raise ValueError("family 'own' over several sites takes draw, not build")
        if len(self.sites) > 1 and family != "own":
            if sizes is None or len(sizes) != len(self.sites) or sum(sizes) != loc.shape[-1]:
                raise ValueError("several sites need their sizes, summing to loc's last dimension")
        self.sizes = tuple(sizes) if sizes is not None else (loc.shape[-1],)
        self.family, self.site, self.plate_name = family, site, plate_name
        self.loc = loc.detach().clone().requires_grad_()
        self.build, self.draw = build, draw
        # unconstrained: log-scales on the diagonal, and the strict lower triangle as is
        if family == "own":
            self.raw = None
        elif family == "diagonal":
            self.raw = scale.detach().log().clone().requires_grad_()
        else:
            d = loc.shape[-1]
            raw = torch.zeros(*loc.shape, d, dtype=loc.dtype, device=loc.device)
            raw.diagonal(dim1=-2, dim2=-1).copy_(scale.detach().log())
            self.raw = raw.requires_grad_()
        # Adam moves every raw entry by about the learning rate at first, so a row of the
        # factor's strict lower triangle moves by about lr * sqrt(D): over the D = 150 latents
        # of two layers that swamps the scales, and the fit first loses hundreds of nats.
        # Over several sites the triangle is therefore raw / D, which keeps the first steps
        # from lowering the ELBO (one site: raw, as the fits on the results pages were made).
        self.off_scale = 1.0 if len(self.sites) == 1 else 1.0 / loc.shape[-1]

    def parameters(self) -> list[Tensor]:
        """The variational parameters (leaf tensors) the fit optimises."""
        return [self.loc] if self.raw is None else [self.loc, self.raw]

    def distribution(self, index: Tensor | slice = slice(None)) -> dist.TorchDistribution:
        """q* for the rows ``index`` of the data the guide was made for."""
        loc = self.loc[index]
        if self.draw is not None:
            raise ValueError("q* over several sites in the guide's own family is drawn, not given")
        if self.build is not None:
            return self.build(loc)
        if self.family == "diagonal":
            return dist.Normal(loc, self.raw[index].exp()).to_event(1)
        raw = self.raw[index]
        tril = self._tril(raw)
        return dist.MultivariateNormal(loc, scale_tril=tril)

    def guide(self, x: Tensor, index: Tensor) -> None:
        """The Pyro guide: samples the latent site(s) for the rows ``index``, in the data
        plate."""
        with pyro.plate(self.plate_name, x.shape[0]):
            if self.draw is not None:
                self.draw(self.loc[index])
            elif len(self.sites) == 1:
                pyro.sample(self.sites[0], self.distribution(index))
            elif self.family == "diagonal":
                loc, scale = self.loc[index], self.raw[index].exp()
                for name, block in zip(self.sites, self._blocks()):
                    pyro.sample(name, dist.Normal(loc[..., block], scale[..., block]).to_event(1))
            else:
                self._chain(index)

    def _tril(self, raw: Tensor) -> Tensor:
        diagonal = torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
        return raw.tril(-1) * self.off_scale + diagonal

    def _blocks(self) -> list[slice]:
        ends = torch.tensor(self.sizes).cumsum(0).tolist()
        return [slice(end - size, end) for size, end in zip(self.sizes, ends)]

    def _chain(self, index: Tensor) -> None:
        """u = m + L eps over the concatenated sites, drawn block by block: site j is
        N(m_j + sum_{i<j} L_ji eps_i, L_jj L_jj^T), eps_i recovered from the value drawn (or
        replayed) at site i, so the joint density is the full-covariance Gaussian's."""
        loc = self.loc[index]
        raw = self.raw[index]
        tril = self._tril(raw)
        blocks, eps = self._blocks(), []
        for j, (name, bj) in enumerate(zip(self.sites, blocks)):
            mean = loc[..., bj]
            for i, bi in enumerate(blocks[:j]):
                mean = mean + _tril_mv(tril[..., bj, bi], eps[i])
            q = _SharedTrilGaussian(mean, tril[..., bj, bj])
            z = pyro.sample(name, q)
            if j + 1 < len(blocks):
                eps.append(q.whiten(z))

    @staticmethod
    def with_index(model: Callable) -> Callable:
        """``model`` taking (and ignoring) the row indices the local guide needs."""

        def indexed(x: Tensor, index: Tensor) -> None:
            model(x)

        return indexed


# torch's MultivariateNormal broadcasts its scale_tril over the particle dimensions in rsample
# (and the chain's solves would too), copying an (N, D, D) factor once per particle: for a
# q* over a hierarchical VAE's 150 latents, K = 5000 draws and 100 images, gigabytes.  Here
# the particle dimensions are folded into the columns of one batched product or solve.


def _columns(v: Tensor, n: int) -> tuple[Tensor, torch.Size]:
    """(..., N, d) -> (N, d, P), with the leading shape to undo it."""
    lead = v.shape[:-2]
    return v.reshape(-1, n, v.shape[-1]).permute(1, 2, 0), lead


def _uncolumns(c: Tensor, lead: torch.Size) -> Tensor:
    return c.permute(2, 0, 1).reshape(*lead, c.shape[0], c.shape[1])


def _tril_mv(matrix: Tensor, v: Tensor) -> Tensor:
    """matrix (N, a, b) times v (..., N, b), per row n: (..., N, a)."""
    c, lead = _columns(v, matrix.shape[0])
    return _uncolumns(matrix @ c, lead)


class _SharedTrilGaussian(dist.TorchDistribution):
    """N(loc, L Lᵀ) with loc (..., N, d) and one lower-triangular L (N, d, d) per row,
    shared by every leading (particle) index; one event dimension."""

    arg_constraints: dict = {}
    support = dist.constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, scale_tril: Tensor) -> None:
        self.loc, self.scale_tril = loc, scale_tril
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return _SharedTrilGaussian(self.loc.expand(shape), self.scale_tril)

    def rsample(self, sample_shape=()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + _tril_mv(self.scale_tril, eps)

    def whiten(self, value: Tensor) -> Tensor:
        """L⁻¹ (value − loc): the standard normal draw behind ``value``."""
        c, lead = _columns(value - self.loc, self.scale_tril.shape[0])
        return _uncolumns(torch.linalg.solve_triangular(self.scale_tril, c, upper=False), lead)

    def log_prob(self, value: Tensor) -> Tensor:
        d = self.loc.shape[-1]
        half_log_det = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        mahalanobis = self.whiten(value).square().sum(-1)
        return -0.5 * (mahalanobis + d * math.log(2 * math.pi)) - half_log_det


def latent_sites(guide: Callable, x: Tensor) -> list[tuple[str, int]]:
    """The guide's latent sample sites and their event sizes, in the order it draws them."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(x)
    return [
        (name, int(site["value"].shape[-1]))
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def _amortised_gaussian(
    guide: Callable, x: Tensor, sites: Sequence[str], draws: int = 256, chunk: int = 32
) -> tuple[Tensor, Tensor]:
    """The amortised guide's mean and standard deviations of ``sites`` concatenated (their
    first and second moments, for any guide distribution: the starting point of the local
    fit).  One site: from its distribution where it has them; several (each depending on the
    draws before it): from ``draws`` joint draws."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(x)
    for site in sites:
        if site not in trace.nodes:
            raise ValueError(f"the guide has no sample site {site!r}")
    if len(sites) == 1:
        fn = trace.nodes[sites[0]]["fn"]
        try:
            return fn.mean.detach(), fn.variance.detach().sqrt()
        except NotImplementedError:  # a flow: moments from draws
            samples = fn.sample((draws,))
            return samples.mean(0), samples.std(0)
    total = first = second = 0.0
    n = x.shape[0]
    with torch.no_grad(), poutine.block():
        for start in range(0, draws, chunk):
            m = min(chunk, draws - start)
            t = poutine.trace(guide).get_trace(x.repeat(m, *([1] * (x.dim() - 1))))
            u = torch.cat([t.nodes[s]["value"] for s in sites], -1).reshape(m, n, -1)
            first, second, total = first + u.sum(0), second + u.square().sum(0), total + m
    mean = first / total
    variance = (second / total - mean.square()) * total / (total - 1)
    return mean, variance.clamp_min(1e-12).sqrt()


def _own_family(guide: Callable):
    """The guide's owner module if it exposes its family (``posterior_parameters`` and
    ``posterior_from`` for one site, or ``guide_from`` for several), else None."""
    owner = getattr(guide, "__self__", None)
    if hasattr(owner, "posterior_parameters") and (
        hasattr(owner, "posterior_from") or hasattr(owner, "guide_from")
    ):
        return owner
    return None


def resolve_family(guide: Callable, family: str | None, num_sites: int = 1) -> str:
    """``family``, or for ``None`` the guide's own family where it has one, else diagonal
    (for several latent sites, full: the layers of a posterior are correlated)."""
    owner = _own_family(guide)
    own = owner is not None and hasattr(owner, "guide_from" if num_sites > 1 else "posterior_from")
    if family is None:
        return "own" if own else "full" if num_sites > 1 else "diagonal"
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if family == "own" and not own:
        needs = "guide_from(raw)" if num_sites > 1 else "posterior_from(raw)"
        raise ValueError(
            f"family 'own' needs a guide method of a module with posterior_parameters(x) and "
            f"{needs}, as the project's models have; use 'diagonal' or 'full'"
        )
    return family


def fit_local_guide(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    family: str | None = None,
    site: str | Sequence[str] | None = None,
    num_particles: int = 16,
    lr: float = 1e-2,
    max_steps: int = 5000,
    window: int = 200,
    tol: float = 0.01,
    halvings: int = 4,
) -> tuple[LocalGuide, dict]:
    """Fit q*, one member of ``family`` per image, to ``model`` for every row of ``x``, the
    model fixed (see the module's docstring for the families; ``None``: the guide's own, or
    for several latent sites the full Gaussian).  ``site``: the latent site(s) q* covers
    (``None``: every latent site of the guide).

    Starts at the amortised guide's output (the Gaussian families: at its mean and standard
    deviations, a full covariance starting diagonal) and maximises the ELBO (``num_particles`` vectorised draws, Adam from ``lr``).
    Convergence rule: whenever the mean ELBO over ``window`` steps improves by less than
    ``tol`` nats per image on the window before, the learning rate halves (a constant rate
    leaves the parameters jittering around the optimum); after ``halvings`` halvings the fit
    has converged.  It stops anyway after ``max_steps``.  Returns the guide and
    ``{"family", "steps", "converged", "elbo_trace"}`` (mean ELBO per image every ``window``
    steps).
    """
    found = dict(latent_sites(guide, x))
    sites = list(found) if site is None else [site] if isinstance(site, str) else list(site)
    for name in sites:
        if name not in found:
            raise ValueError(f"the guide has no sample site {name!r}")
    family = resolve_family(guide, family, len(sites))
    if family == "own":
        owner = _own_family(guide)
        with torch.no_grad():
            start = owner.posterior_parameters(x)
        if len(sites) > 1:
            local = LocalGuide(start, family="own", site=sites, draw=owner.guide_from)
        else:
            local = LocalGuide(start, family="own", site=sites[0], build=owner.posterior_from)
    else:
        loc, scale = _amortised_gaussian(guide, x, sites)
        one = sites[0] if len(sites) == 1 else sites
        local = LocalGuide(loc, scale, family, one, sizes=[found[name] for name in sites])
    indexed = LocalGuide.with_index(model)
    index = torch.arange(x.shape[0], device=x.device)
    frozen = [p for p in _model_parameters(model, x) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    # a step that meets a non-finite loss or gradient is skipped, not applied: a diverging
    # fit then ends where it was, and inference_gaps' checks judge the figures it reaches
    stepper = Stepper(
        functools.partial(elbo.differentiable_loss, indexed, local.guide),
        local.parameters(),
        lr=lr,
        skip_nonfinite=True,
    )
    n = x.shape[0]
    history: list[float] = []
    running, previous = 0.0, None
    converged = False
    step = halved = 0
    try:
        with pyro.validation_enabled(False), warnings.catch_warnings():
            # pyro.module notes each frozen parameter it leaves out of the store: by design here
            warnings.filterwarnings("ignore", message=".*not registered in the param store")
            for step in range(1, max_steps + 1):
                info = stepper.step(x, index)
                if not info.skipped:
                    running += info.loss
                if step % window == 0:
                    mean = -running / (window * n)
                    history.append(mean)
                    running = 0.0
                    if previous is not None and mean - previous < tol:
                        if halved == halvings:
                            converged = True
                            break
                        halved += 1
                        stepper.set_lr(0.5 * stepper.lr)
                    previous = mean
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return local, {
        "family": family,
        "sites": list(local.sites),
        "steps": step,
        "converged": converged,
        "skipped_steps": stepper.skipped_steps,
        "elbo_trace": history,
    }


def _model_parameters(model: Callable, x: Tensor) -> list[Tensor]:
    """The parameters the model reads (to hold them fixed): its owner module's, and its
    pyro.param sites."""
    owner = getattr(model, "__self__", None)
    params = list(owner.parameters()) if isinstance(owner, torch.nn.Module) else []
    with torch.no_grad(), poutine.trace(param_only=True) as capture:
        model(x)
    return params + [site["value"].unconstrained() for site in capture.trace.nodes.values()]


class GapFitError(ValueError):
    """A per-image fit whose figures the decomposition cannot produce (one line)."""


@dataclass
class GapReport:
    """Per-image figures (float64 tensors of shape (N,)), in nats per image; the ``*_sem``
    are the Monte Carlo standard errors of the two ELBO estimates."""

    log_px: Tensor
    elbo_local: Tensor
    elbo_amortised: Tensor
    num_particles: int
    fit: dict = field(default_factory=dict)
    elbo_local_sem: Tensor | None = None
    elbo_amortised_sem: Tensor | None = None
    # whether the amortised guide is a member of q*'s family (one latent site, or the guide's
    # own family); a Gaussian over several layers is not, and may fit worse than the guide
    nested: bool = True
    # log p̂(x) from each proposal (K draws of q*, K of the amortised guide) and their
    # standard errors (delta method: sqrt(1/ESS - 1/K)); ``log_px`` combines the two
    # (``combine_estimates``)
    log_px_local: Tensor | None = None
    log_px_amortised: Tensor | None = None
    log_px_local_sem: Tensor | None = None
    log_px_amortised_sem: Tensor | None = None

    def failures(self, z: float = 4.0, slack: float = 0.05) -> dict[int, str]:
        """Images whose decomposition cannot be true, by index, with the reason: a non-finite
        figure; q*'s ELBO below the amortised guide's (a negative amortisation gap: where the
        amortised guide is a member of q*'s family, the fit started there; where it is not,
        ``nested`` false, the family falls short of the guide, and the split means nothing);
        or log p̂(x) below either ELBO (log p̂ from q* is at least the mean log weight of its
        own draws, an ELBO[q*] estimate); or log p̂(x) from q* below the amortised guide's by
        more than ``z`` of their standard errors plus one nat (log p(x) belongs to the model:
        a fitted q* whose estimate falls that far short misses posterior mass that the
        amortised guide finds; the amortised guide's own estimate falling short is expected,
        it is the worse proposal, and the combination then leans on q*).  "Below"
        means by more than ``z`` Monte Carlo standard errors plus ``slack`` nats, the
        precision of a converged fit (an exact amortised guide leaves q* nothing to gain, and
        the fit ends a few hundredths of a nat short of it)."""

        def sem(t: Tensor | None) -> Tensor:
            return torch.zeros_like(self.log_px) if t is None else t.nan_to_num(0.0)

        se_local, se_amortised = sem(self.elbo_local_sem), sem(self.elbo_amortised_sem)
        margin_local, margin_amortised = z * se_local + slack, z * se_amortised + slack
        margin_both = z * (se_local.square() + se_amortised.square()).sqrt() + slack
        finite = (
            torch.isfinite(self.log_px)
            & torch.isfinite(self.elbo_local)
            & torch.isfinite(self.elbo_amortised)
        )
        checks = [
            (~finite, "non-finite figures"),
            (
                self.elbo_local < self.elbo_amortised - margin_both,
                "q*'s ELBO ends below the amortised guide's, where the fit started"
                if self.nested
                else "q*'s ELBO ends below the amortised guide's, which its family does not hold",
            ),
            (
                self.log_px < self.elbo_local - margin_local,
                "log p(x) below ELBO[q*]",
            ),
            (
                self.log_px < self.elbo_amortised - margin_amortised,
                "log p(x) below the amortised ELBO"
                + (
                    ""
                    if self.nested
                    else " (q*'s family may not follow this posterior as the amortised "
                    "guide does: then no fit of it will)"
                ),
            ),
        ]
        if self.log_px_local is not None and self.log_px_amortised is not None:
            shortfall = self.log_px_amortised - self.log_px_local
            se = sem(self.log_px_local_sem).square() + sem(self.log_px_amortised_sem).square()
            checks.append(
                (
                    shortfall > z * se.sqrt() + _PROPOSALS_SLACK,
                    "log p(x) from q* falls short of the amortised guide's beyond their "
                    "errors: the fit misses posterior mass",
                )
            )
        out: dict[int, str] = {}
        for mask, reason in checks:
            for i in mask.nonzero().flatten().tolist():
                out.setdefault(i, reason)
        return out

    def check(self) -> GapReport:
        """Raise ``GapFitError`` naming the failed images, if any."""
        failed = self.failures()
        if failed:
            shown = ", ".join(str(i) for i in sorted(failed)[:8])
            more = ", ..." if len(failed) > 8 else ""
            first = failed[min(failed)]
            raise GapFitError(
                f"the per-image fit failed for {len(failed)} of {self.log_px.numel()} images "
                f"(indices {shown}{more}; first: {first}); try a smaller fit learning rate"
                + ("" if self.nested else " or another family")
            )
        return self

    @property
    def approximation_gap(self) -> Tensor:
        return self.log_px - self.elbo_local

    @property
    def amortisation_gap(self) -> Tensor:
        return self.elbo_local - self.elbo_amortised

    @property
    def inference_gap(self) -> Tensor:
        return self.log_px - self.elbo_amortised

    def summary(self) -> dict:
        """Means with standard errors per figure (nats per image), or, when a fit failed, the failed images and why (``status``)."""

        def mean_sem(t: Tensor) -> dict:
            n = t.numel()
            sem = float(t.std() / math.sqrt(n)) if n > 1 else float("nan")
            return {"mean": float(t.mean()), "sem": sem}

        failed = self.failures()
        if failed:  # the means would mix figures that cannot be true into the others
            return {
                "status": "failed fit",
                "num_datapoints": int(self.log_px.numel()),
                "num_particles": self.num_particles,
                "failed_images": sorted(failed),
                "failure_reasons": {str(i): r for i, r in sorted(failed.items())},
                "fit": {k: v for k, v in self.fit.items() if k != "elbo_trace"},
                "units": "nats per image",
            }
        proposals = {}
        if self.log_px_local is not None and self.log_px_amortised is not None:
            weight = combine_estimates(
                self.log_px_local,
                self.log_px_local_sem,
                self.log_px_amortised,
                self.log_px_amortised_sem,
            )[1]
            proposals = {
                # the share of q*'s estimate in the combined log p̂(x), averaged over images
                "log_px_weight_of_q*": float(weight.mean()),
                "log_px_from_q*": mean_sem(self.log_px_local),
                "log_px_from_amortised_guide": mean_sem(self.log_px_amortised),
            }
        return {
            "status": "ok",
            "num_datapoints": int(self.log_px.numel()),
            "num_particles": self.num_particles,
            "log_px": mean_sem(self.log_px),
            **proposals,
            "elbo_local": mean_sem(self.elbo_local),
            "elbo_amortised": mean_sem(self.elbo_amortised),
            "approximation_gap": mean_sem(self.approximation_gap),
            "amortisation_gap": mean_sem(self.amortisation_gap),
            "inference_gap": mean_sem(self.inference_gap),
            "amortised_guide_in_family": self.nested,
            "fit": {k: v for k, v in self.fit.items() if k != "elbo_trace"},
            "units": "nats per image",
        }


def inference_gaps(
    model: Callable,
    guide: Callable,
    x: Tensor,
    *,
    family: str | None = None,
    num_particles: int = 5000,
    elbo_particles: int = 1000,
    fit_options: dict | None = None,
) -> GapReport:
    """The gap decomposition for every row of ``x``: the ELBO of the amortised guide and of
    the locally optimised one (``elbo_particles`` draws each), and log p̂(x) with K =
    ``num_particles`` draws from each of q* and the amortised guide, combined per image
    (``combine_estimates``; the summary gives each proposal's estimate and q*'s share, and
    an image whose two estimates disagree beyond their errors fails the check, see
    ``GapReport.failures``)."""
    local, fit = fit_local_guide(model, guide, x, family=family, **(fit_options or {}))
    indexed = LocalGuide.with_index(model)
    index = torch.arange(x.shape[0], device=x.device)
    common = {"psis": False, "ks": (), "validate": False}
    with torch.no_grad():
        amortised = estimate_log_px(model, guide, x, num_particles=elbo_particles, **common)
        optimised = estimate_log_px(
            indexed, local.guide, x, index, num_particles=elbo_particles, **common
        )
        evidence = estimate_log_px(
            indexed, local.guide, x, index, num_particles=num_particles, **common
        )
        evidence_amortised = estimate_log_px(model, guide, x, num_particles=num_particles, **common)
    se_local, se_amortised = _log_px_sem(evidence), _log_px_sem(evidence_amortised)
    log_px, _ = combine_estimates(
        evidence.log_px, se_local, evidence_amortised.log_px, se_amortised
    )
    return GapReport(
        log_px,
        optimised.elbo,
        amortised.elbo,
        num_particles,
        fit,
        elbo_local_sem=optimised.elbo_sem,
        elbo_amortised_sem=amortised.elbo_sem,
        nested=local.family == "own" or len(local.sites) == 1,
        log_px_local=evidence.log_px,
        log_px_amortised=evidence_amortised.log_px,
        log_px_local_sem=se_local,
        log_px_amortised_sem=se_amortised,
    )


def combine_estimates(
    log_a: Tensor, se_a: Tensor, log_b: Tensor, se_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Two independent importance-sampling estimates of the same p(x), given as log p̂ and
    the standard error of log p̂, combined with inverse-variance weights on p̂ (the relative
    variance of p̂ is the variance of log p̂, to first order): (log of the combined estimate,
    the weight of ``a``), both (N,).  Each p̂ is unbiased, so their weighted mean is too; an
    estimate with no spread (an exact proposal) takes all the weight.  Taking the larger of
    the two instead would pick the noise that lands high."""
    precision_a = 1.0 / (se_a.square() + 1e-12)
    precision_b = 1.0 / (se_b.square() + 1e-12)
    weight_a = precision_a / (precision_a + precision_b)
    stacked = torch.stack(
        [log_a + weight_a.log(), log_b + (1.0 - weight_a).clamp_min(1e-300).log()]
    )
    return torch.logsumexp(stacked, dim=0), weight_a


# nats by which the two proposals' log p̂(x) may differ beyond their standard errors (the
# delta-method errors understate the spread of heavy-tailed weights)
_PROPOSALS_SLACK = 1.0


def _log_px_sem(result) -> Tensor:
    """Per image, the standard error of log p̂(x) by the delta method: sqrt(1/ESS - 1/K)."""
    return (1.0 / result.ess - 1.0 / result.num_particles).clamp_min(0.0).sqrt()
