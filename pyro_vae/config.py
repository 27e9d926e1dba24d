"""Typed, validated run configs: what a training run is, checked in one place, saved as the
run's ``config.json`` and read back typed.

``TrainConfig`` is a run of ``scripts/train_svi.py`` (the one-layer and the hierarchical VAE):
the model, the objective and optimiser with their schedules, the data and the evaluation.
Every value is checked when the config is made (``ConfigError`` naming the setting, which the
scripts print as its flag), and ``TrainConfig.from_dict`` reads a saved config back: a key it
does not know, or one it needs and cannot migrate, is an error naming the key; keys that runs
saved before a setting existed take the value those runs had (``MIGRATIONS``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pyro_vae.checks import ConfigError, is_user_data
from pyro_vae.choices import (
    ACTIVATIONS,
    ARCHS,
    BINARIZATIONS,
    CLASSIFIERS,
    COMPRESSORS,
    COVARIANCES,
    DATASETS,
    DEFAULT_PRESET,
    ELBO_NAMES,
    FAMILIES,
    FLOWS,
    HELDOUT_SPLITS,
    HVAE_GUIDES,
    LARGEST_SIZE,
    LIKELIHOODS,
    LR_SCHEDULES,
    MADE,
    MODEL_KINDS,
    PRESET_MODEL_OVERRIDES,
    PRESETS,
    SCALE_LINKS,
)

__all__ = [
    "MIGRATIONS",
    "MIN_SAMPLE_IMAGES",
    "RUNTIME_KEYS",
    "SSVAE_MIGRATIONS",
    "BaselinesConfig",
    "CompressConfig",
    "Config",
    "EvalConfig",
    "GapsConfig",
    "OODConfig",
    "RunConfig",
    "SSVAEConfig",
    "TrainConfig",
]

# Keys of a saved config that describe one invocation, not the run (where it was written, on
# which device, how many threads, how chatty): kept in config.json, not part of the config.
RUNTIME_KEYS = (
    "out",
    "resume",
    "device",
    "threads",
    "quiet",
    "model_class",
    "model_config",
    "dataset_sha256",  # a data file's hash, recorded by the run that trained on it
)

#: What runs saved before a setting existed did, where that differs from its default.
MIGRATIONS: dict[str, Any] = {
    "preset": "classic",
    "lr_schedule": "constant",
    "kl_warmup": 0,
    "kl_start": 0.0,
    "init_output_bias": False,
    "adam_eps": 1e-8,
    "adam_betas": (0.9, 0.999),
    "skip_norm": None,
    "scale_link": "softplus",
    "batch_norm": False,
    "weight_norm": False,
    "free_bits": 0.0,
    "free_bits_constant": None,
    "free_bits_cooldown": 0,
    "perturb": 0.0,
    "model": "vae",
    "z_dims": None,
    "layer_hidden": None,
    "guide": None,
    "skip_connections": False,
    "arch": "mlp",
    "channels": (32, 64),
    "flow": None,
    "flow_depth": None,
    "covariance": "diagonal",
    "pixel_uniform": 0.0,
    "keep_best": False,
    "patience": 0,
    "max_minutes": None,
}


# -- value checks: each returns the value normalised (lists from JSON become tuples) -----------


def _integer(low: int, high: int = LARGEST_SIZE) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(name, f"must be a whole number, got {value!r}")
        if not low <= value <= high:
            top = "2**63 - 1" if high == LARGEST_SIZE else str(high)
            raise ConfigError(name, f"must be a whole number from {low} to {top}, got {value}")
        return int(value)

    return check


def _number(low: float, high: float = math.inf, *, open_low=False, open_high=False):
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(name, f"must be a number, got {value!r}")
        value = float(value)
        above = value > low if open_low else value >= low
        below = value < high if open_high or math.isinf(high) else value <= high
        if not (math.isfinite(value) and above and below):
            left, right = "(" if open_low else "[", ")" if open_high or math.isinf(high) else "]"
            raise ConfigError(
                name, f"must be a number in {left}{low:g}, {high:g}{right}, got {value}"
            )
        return value

    return check


def _choice(choices) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(name, f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value

    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {value!r}")
    return value


def _sizes(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            name, f"must be a non-empty list of sizes such as [200, 200], got {value!r}"
        )
    return tuple(_integer(1)(name, v) for v in value)


def _layer_sizes(name: str, value: Any) -> tuple[tuple[int, ...], ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(name, f"must be one list of sizes per layer, got {value!r}")
    return tuple(_sizes(name, v) for v in value)


def _betas(name: str, value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(
            name, f"must be two numbers in [0, 1) such as (0.9, 0.999), got {value!r}"
        )
    return tuple(_number(0.0, 1.0, open_high=True)(name, b) for b in value)  # type: ignore[return-value]


def _warmup(name: str, value: Any) -> int | str:
    if isinstance(value, str):
        text = value.strip()
        try:
            share = float(text[:-1]) if text.endswith("%") else math.nan
        except ValueError:
            share = math.nan
        if not (math.isfinite(share) and 0 <= share <= 100):
            raise ConfigError(name, f"{value!r} is not a number of epochs or a share such as 10%")
        return f"{share:g}%"
    return _integer(0)(name, value)


def _degrees(name: str, value: Any) -> float:
    try:
        return _number(0.0, 180.0)(name, value)
    except ConfigError:
        raise ConfigError(name, f"is an angle in degrees in [0, 180], got {value!r}") from None


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(name, f"must be a path, got {value!r}")
    return value


def _seed(name: str, value: Any) -> int:
    value = _integer(0)(name, value)
    if value >= 2**32:  # numpy's generators take 32 bits
        raise ConfigError(name, f"must be below 2**32, got {value}")
    return value


def _dataset(name: str, value: Any) -> str:
    """A data set's name, or a ``.npy`` / ``.npz`` file or a folder of images (made
    absolute, so that a later job finds it from anywhere)."""
    if value in DATASETS:
        return value
    if isinstance(value, str) and is_user_data(value):
        return str(Path(value).expanduser().resolve())
    raise ConfigError(
        name,
        f"{value!r} is not one of {', '.join(DATASETS)}, nor a .npy or .npz file, nor a "
        "folder of images",
    )


#: the fewest images a sample-quality comparison takes
MIN_SAMPLE_IMAGES = 10


def _sample_count(name: str, value: Any) -> int:
    value = _integer(1)(name, value)
    if value < MIN_SAMPLE_IMAGES:
        raise ConfigError(
            name,
            f"at least {MIN_SAMPLE_IMAGES} (precision and recall compare neighbourhoods of "
            f"several images), got {value}",
        )
    return value


def _ood_set(name: str, value: Any) -> str:
    """A data set's name, your own images (``_dataset``) or one of the sets ``MADE`` from the
    in-distribution images."""
    return value if value in MADE else _dataset(name, value)


def _setting(default: Any, check: Callable[[str, Any], Any], doc: str) -> Any:
    return field(default=default, metadata={"check": check, "doc": doc})


_IW_FAST = PRESETS["iw-fast"]


@dataclass(frozen=True)
class Config:
    """A job's settings, checked in one place: ``__post_init__`` checks every value (its
    field's check) and then the settings that must go together (``check_together``), each
    failure a ``ConfigError`` naming the setting; ``to_dict`` / ``from_dict`` write and read
    it back as plain JSON values."""

    script: ClassVar[str] = "this job"
    memory_only: ClassVar[tuple[str, ...]] = ()
    recorded: ClassVar[tuple[str, ...]] = ()
    migrations: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        self.check_together()

    def check_together(self) -> None:
        """Settings that are fine alone and not together: a ``ConfigError`` naming one."""

    def recorded_in_report(self) -> dict[str, Any]:
        """``to_dict`` without the settings that change no number (``memory_only``): what a
        job's report records, so that the same job gives the same report whatever they are."""
        return {k: v for k, v in self.to_dict().items() if k not in self.memory_only}

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values (tuples as lists), for ``config.json``."""

        def plain(value: Any) -> Any:
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> Config:
        """A saved config read back typed: what it records besides the settings (the run
        directory, the device, the model's own config: ``recorded``) set aside, keys older
        runs lack migrated (``migrations``), ``memory_only`` keys a report leaves out at
        their defaults; an unknown key, or a missing key that has no migration, is a
        ``ConfigError`` naming it."""
        if not isinstance(saved, Mapping):
            raise ConfigError(
                "config", f"must be a mapping of settings, got {type(saved).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names - set(cls.recorded))
        if unknown:
            raise ConfigError(unknown[0], f"is not a setting of {cls.script}")
        values = {}
        for name in sorted(names):
            if name in saved:
                values[name] = saved[name]
            elif name in cls.migrations:
                values[name] = cls.migrations[name]
            elif name in cls.memory_only:  # not recorded in reports: any value gives them
                values[name] = next(f for f in dataclasses.fields(cls) if f.name == name).default
            else:
                raise ConfigError(name, "is missing from the saved config")
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes``, checked like a new config."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunConfig(Config):
    """What every training run has: the optimiser and its schedule, the data, the seed.
    Subclasses add their model's settings."""

    # the objective's optimiser and its schedule
    epochs: int = _setting(_IW_FAST["epochs"], _integer(1), "passes over the training images")
    batch_size: int = _setting(_IW_FAST["batch_size"], _integer(1), "images per step")
    lr: float = _setting(_IW_FAST["lr"], _number(0, open_low=True), "Adam's learning rate")
    lr_schedule: str = _setting(_IW_FAST["lr_schedule"], _choice(LR_SCHEDULES), "rate per epoch")
    adam_eps: float = _setting(1e-8, _number(0, open_low=True), "Adam's epsilon")
    adam_betas: tuple[float, float] = _setting((0.9, 0.999), _betas, "Adam's betas")
    clip_norm: float | None = _setting(None, _optional(_number(0, open_low=True)), "clip")
    skip_nonfinite: bool = _setting(False, _flag, "skip steps that are not finite")
    skip_norm: float | None = _setting(None, _optional(_number(0, open_low=True)), "skip above")
    # the data
    dataset: str = _setting("mnist", _dataset, "a data set's name, or a .npy / .npz file")
    data_dir: str | None = _setting(None, _text, "where the data sets live")
    binarize: str = _setting("dynamic", _choice(BINARIZATIONS), "how pixels become binary")
    seed: int = _setting(0, _seed, "the seed of every random draw")
    train_size: int | None = _setting(None, _optional(_integer(1)), "first N training images")
    eval_size: int | None = _setting(None, _optional(_integer(1)), "first N held-out images")
    # the script the settings are flags of, and what its saved configs hold besides them
    script: ClassVar[str] = "a training run"
    recorded: ClassVar[tuple[str, ...]] = RUNTIME_KEYS
    migrations: ClassVar[dict[str, Any]] = {}


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A training run of the VAE or the hierarchical VAE (``train_svi.py``): every setting,
    checked.

    The defaults are the default recipe (``train_svi.py`` with no flags: the ``iw-fast``
    preset). ``TrainConfig(lr=0)`` raises ``ConfigError("lr", ...)``; settings that do not go
    together (``flow="planar"`` with ``elbo="dreg"``) are refused naming one of them.
    """

    # the model
    model: str = _setting("vae", _choice(MODEL_KINDS), "vae (one stochastic layer) or hvae")
    z_dim: int = _setting(50, _integer(1), "latent dimensions of the VAE")
    hidden: tuple[int, ...] = _setting(_IW_FAST["hidden"], _sizes, "the VAE's hidden sizes")
    activation: str = _setting(_IW_FAST["activation"], _choice(ACTIVATIONS), "hidden activation")
    arch: str = _setting("mlp", _choice(ARCHS), "the VAE's networks: mlp or conv")
    channels: tuple[int, ...] = _setting((32, 64), _sizes, "conv: filters per convolution")
    z_dims: tuple[int, ...] | None = _setting(None, _optional(_sizes), "hvae: layer sizes")
    layer_hidden: tuple[tuple[int, ...], ...] | None = _setting(
        None, _optional(_layer_sizes), "hvae: hidden sizes per layer"
    )
    guide: str | None = _setting(None, _optional(_choice(HVAE_GUIDES)), "hvae: the guide")
    skip_connections: bool = _setting(False, _flag, "hvae: each generative net reads all above")
    likelihood: str = _setting("bernoulli", _choice(LIKELIHOODS), "p(x|z)")
    pixel_uniform: float = _setting(
        0.0, _number(0.0, 1.0, open_high=True), "logistic: each pixel's uniform share"
    )
    x_scale: float | None = _setting(None, _optional(_number(0, open_low=True)), "Gaussian std")
    beta: float = _setting(1.0, _number(0, open_low=True), "weight of the KL term")
    flow: str | None = _setting(None, _optional(_choice(FLOWS)), "a flow on the guide")
    flow_depth: int | None = _setting(None, _optional(_integer(1)), "steps of the flow")
    covariance: str = _setting("diagonal", _choice(COVARIANCES), "the guide's covariance")
    scale_link: str = _setting("softplus", _choice(SCALE_LINKS), "output -> standard deviation")
    weight_norm: bool = _setting(False, _flag, "weight normalisation")
    batch_norm: bool = _setting(False, _flag, "batch normalisation")
    init_output_bias: bool = _setting(False, _flag, "output bias at the data's logit")
    # the objective and its schedules
    elbo: str = _setting(_IW_FAST["elbo"], _choice(ELBO_NAMES), "the training objective")
    num_particles: int = _setting(_IW_FAST["num_particles"], _integer(1), "K per datapoint")
    kl_warmup: int | str = _setting(0, _warmup, "KL warm-up: epochs, or a share such as 10%")
    kl_start: float = _setting(0.0, _number(0.0, 1.0), "the warm-up's first weight")
    free_bits: float = _setting(0.0, _number(0.0), "free nats per latent layer")
    free_bits_constant: int | None = _setting(None, _optional(_integer(0)), "epochs at full")
    free_bits_cooldown: int = _setting(0, _integer(0), "epochs to cool free bits to 0")
    perturb: float = _setting(0.0, _number(0.0, 1.0, open_high=True), "pixel noise in training")
    # evaluation and the record
    eval_particles: int = _setting(500, _integer(0), "K for the test log p(x) (0: skip)")
    keep_best: bool = _setting(False, _flag, "keep and use the best validation epoch's weights")
    patience: int = _setting(0, _integer(0), "epochs without a better validation ELBO")
    max_minutes: float | None = _setting(
        None, _optional(_number(0, open_low=True)), "stop once the epochs took this long"
    )
    preset: str | None = _setting("iw-fast", _optional(_choice(tuple(PRESETS))), "the recipe")

    script: ClassVar[str] = "a train_svi.py run"
    migrations: ClassVar[dict[str, Any]] = MIGRATIONS

    def check_together(self) -> None:
        if self.flow == "planar" and self.elbo == "dreg":
            raise ConfigError(
                "flow", "planar has no inverse, which elbo dreg needs; use iaf or iwae"
            )
        if self.free_bits and self.elbo not in ("trace", "meanfield"):
            raise ConfigError(
                "free_bits", f"applies to the ELBO (elbo trace), not to elbo {self.elbo}"
            )
        if (self.free_bits_constant is not None or self.free_bits_cooldown) and not self.free_bits:
            raise ConfigError(
                "free_bits_constant", "free_bits_constant and free_bits_cooldown apply to free_bits"
            )
        if self.kl_warmup and self.elbo == "jit":
            raise ConfigError(
                "kl_warmup",
                "needs an objective that reads the weight at every step; elbo jit compiles it "
                "once (use trace)",
            )
        if self.pixel_uniform and self.likelihood != "logistic":
            raise ConfigError("pixel_uniform", "applies to likelihood logistic")
        if self.model == "vae":
            for name in ("z_dims", "layer_hidden", "guide"):
                if getattr(self, name) is not None:
                    raise ConfigError(name, "applies to model hvae, not to the one-layer VAE")
            if self.skip_connections:
                raise ConfigError(
                    "skip_connections", "applies to model hvae, not to the one-layer VAE"
                )
            if self.flow_depth is not None and self.flow is None:
                raise ConfigError("flow_depth", "applies to a flow (iaf or planar)")
            return
        for name in ("flow", "flow_depth", "x_scale"):
            if getattr(self, name) is not None:
                raise ConfigError(name, "applies to model vae, not to the hierarchical VAE")

        if self.arch != "mlp":
            raise ConfigError("arch", "conv applies to model vae; the hierarchical VAE's are mlp")
        for name, value in (("likelihood", "bernoulli"), ("covariance", "diagonal"), ("beta", 1.0)):
            if getattr(self, name) != value:
                raise ConfigError(name, "applies to model vae, not to the hierarchical VAE")
        if self.z_dims and self.layer_hidden and len(self.layer_hidden) != len(self.z_dims):
            raise ConfigError(
                "layer_hidden",
                f"needs one list of sizes per stochastic layer of z_dims ({len(self.z_dims)}), "
                f"got {len(self.layer_hidden)}",
            )

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **settings: Any) -> TrainConfig:
        """The run ``train_svi.py --preset NAME`` makes: the preset's recipe (with the values
        it has for ``settings["model"]``), then ``settings`` on top, as flags given win."""
        if name not in PRESETS:
            raise ConfigError("preset", f"must be one of {', '.join(PRESETS)}, got {name!r}")
        recipe = {**PRESETS[name], **PRESET_MODEL_OVERRIDES.get((name, settings.get("model")), {})}
        return cls(**{**recipe, **settings, "preset": name})

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> TrainConfig:
        if isinstance(saved, Mapping) and saved.get("model", MIGRATIONS["model"]) == "vae":
            # one-layer runs saved before the hierarchical settings defaulted to None hold
            # their defaults then; they mean nothing to a one-layer model
            saved = {k: v for k, v in saved.items() if k not in ("z_dims", "layer_hidden", "guide")}
        return super().from_dict(saved)  # type: ignore[return-value]


#: What semi-supervised runs saved before a setting existed did (its "off" value).
SSVAE_MIGRATIONS: dict[str, Any] = {
    "lr_schedule": "constant",
    "adam_eps": 1e-8,
    "adam_betas": (0.9, 0.999),
    "skip_norm": None,
    "classifier": "mlp",
    "balance": 0.0,
    "label_shift": 0,
    "label_rotate": 0.0,
    "label_shear": 0.0,
    "patience": 0,
    "max_minutes": None,
    "likelihood_size": 1000,
    "m1": None,
}


@dataclass(frozen=True)
class SSVAEConfig(RunConfig):
    """A training run of the semi-supervised M2, or of M1+M2 on a trained VAE's codes
    (``train_ssvae.py``): every setting, checked; the defaults are the script's."""

    epochs: int = _setting(30, _integer(1), "passes over the unlabelled images")
    batch_size: int = _setting(200, _integer(1), "unlabelled images per step")
    lr: float = _setting(1e-3, _number(0, open_low=True), "Adam's learning rate")
    lr_schedule: str = _setting("constant", _choice(LR_SCHEDULES), "rate per epoch")
    # the model
    z_dim: int = _setting(50, _integer(1), "latent dimensions")
    hidden: tuple[int, ...] = _setting((500,), _sizes, "encoder and decoder hidden sizes")
    activation: str = _setting("softplus", _choice(ACTIVATIONS), "hidden activation")
    classifier_hidden: tuple[int, ...] = _setting((500,), _sizes, "classifier hidden sizes")
    classifier: str = _setting("mlp", _choice(CLASSIFIERS), "q(y|x): mlp or conv")
    aux_weight: float = _setting(50.0, _number(0.0), "alpha, the weight of log q(y|x)")
    beta: float = _setting(3.0, _number(0, open_low=True), "weight of KL(q(z|x,y) || p(z))")
    balance: float = _setting(0.0, _number(0.0), "gamma, the weight of the label balance")
    m1: str | None = _setting(None, _text, "a trained VAE whose codes M2 learns on")
    # the labels
    labels: int = _setting(100, _integer(1), "labelled training images, class-balanced")
    labelled_every: int = _setting(5, _integer(1), "a labelled batch after every N")
    label_shift: int = _setting(0, _integer(0), "pixels a labelled image moves")
    label_rotate: float = _setting(0.0, _degrees, "degrees a labelled image turns")
    label_shear: float = _setting(0.0, _degrees, "degrees a labelled image slants")
    # stopping and evaluation
    patience: int = _setting(0, _integer(0), "epochs without a better validation accuracy")
    max_minutes: float | None = _setting(
        None, _optional(_number(0, open_low=True)), "stop once the epochs took this long"
    )
    eval_particles: int = _setting(100, _integer(0), "K per class for the test log p(x)")
    likelihood_size: int = _setting(1000, _integer(1), "test images scored for log p(x)")

    script: ClassVar[str] = "a train_ssvae.py run"
    recorded: ClassVar[tuple[str, ...]] = (*RUNTIME_KEYS, "labelled_indices")
    migrations: ClassVar[dict[str, Any]] = SSVAE_MIGRATIONS

    def check_together(self) -> None:
        if self.m1 is not None and self.balance > 0:
            raise ConfigError("balance", "is for M2 on pixels; the stack (m1) does not take it")
        if self.m1 is not None and self.classifier != "mlp":
            raise ConfigError(
                "classifier", "conv classifies pixels; with m1, q(y|z1) is an MLP on codes"
            )


# -- evaluation jobs: what is asked of a trained run ---------------------------------------------


@dataclass(frozen=True)
class EvalConfig(Config):
    """log p(x) of a trained run's held-out images (``evaluate_log_px``,
    ``evaluate_marginal_likelihood.py``)."""

    split: str = _setting("test", _choice(HELDOUT_SPLITS), "the held-out split")
    eval_size: int | None = _setting(None, _optional(_integer(1)), "first N images of the split")
    num_particles: int = _setting(5000, _integer(1), "K importance samples per image")
    max_rows: int | None = _setting(
        None, _optional(_integer(1)), "particles x images per pass (None: sized to the model)"
    )
    psis: bool = _setting(True, _flag, "the PSIS k-hat diagnostic")
    seed: int = _setting(0, _seed, "the seed of every random draw")
    script: ClassVar[str] = "an evaluation (evaluate_marginal_likelihood.py)"
    memory_only: ClassVar[tuple[str, ...]] = ("max_rows",)


@dataclass(frozen=True)
class GapsConfig(Config):
    """The approximation and amortisation gaps of a trained run (``decompose_gaps``,
    ``inference_gaps.py``)."""

    split: str = _setting("test", _choice(HELDOUT_SPLITS), "the held-out split")
    images: int = _setting(100, _integer(1), "first N images of the split")
    family: str = _setting("own", _choice(FAMILIES), "q*'s family")
    num_particles: int = _setting(5000, _integer(1), "K for log p(x)")
    elbo_particles: int = _setting(1000, _integer(1), "draws per ELBO")
    fit_lr: float = _setting(0.05, _number(0, open_low=True), "q*'s first Adam rate")
    fit_steps: int = _setting(3000, _integer(1), "at most this many SVI steps")
    seed: int = _setting(1, _seed, "the seed of every random draw")
    script: ClassVar[str] = "a gap decomposition (inference_gaps.py)"


@dataclass(frozen=True)
class OODConfig(Config):
    """Out-of-distribution scores of a trained run (``score_ood``, ``detect_ood.py``): its
    own kind of test images (``inside``, by default the data it was trained on) against
    ``ood`` (another data set, or ``noise`` / ``flipped`` made from the inside images)."""

    ood: str = _setting("fashion-mnist", _ood_set, "the other images")
    inside: str | None = _setting(None, _optional(_dataset), "its own kind")
    images: int | None = _setting(None, _optional(_integer(1)), "first N test images of each")
    num_particles: int = _setting(1000, _integer(1), "K for log p(x)")
    compressor: str = _setting("auto", _choice(("auto", *sorted(COMPRESSORS))), "complexity")
    select_images: int | None = _setting(None, _optional(_integer(1)), "images that choose it")
    seed: int = _setting(0, _seed, "the seed of every random draw")
    script: ClassVar[str] = "an OOD scoring (detect_ood.py)"

    def check_together(self) -> None:
        if self.select_images is not None:
            if self.compressor != "auto":
                raise ConfigError("select_images", "applies to compressor auto (it chooses one)")
            if self.select_images < 3:  # a correlation over fewer than three chooses nothing
                raise ConfigError(
                    "select_images", f"at least 3 images are needed, got {self.select_images}"
                )
        if self.inside is not None and self.inside == self.ood:
            raise ConfigError(
                "ood", f"{self.ood} is also the in-distribution set: nothing to tell apart"
            )


@dataclass(frozen=True)
class BaselinesConfig(Config):
    """PCA, a linear and a deep autoencoder, the VAE and a GAN side by side
    (``compare_baselines``, ``compare_baselines.py``): each fitted to the statically
    binarised training images with each latent size of ``z_dims``, for ``epochs`` epochs."""

    dataset: str = _setting("mnist", _dataset, "a data set's name, or a file or folder")
    z_dims: tuple[int, ...] = _setting((2, 10, 50), _sizes, "latent sizes to compare")
    epochs: int = _setting(10, _integer(1), "training epochs per model")
    hidden: tuple[int, ...] = _setting((400,), _sizes, "the autoencoder's and VAE's layers")
    train_size: int | None = _setting(None, _optional(_integer(1)), "first N training images")
    test_size: int | None = _setting(None, _optional(_sample_count), "first N test images")
    samples: int = _setting(10000, _sample_count, "samples per model, and reference images")
    seed: int = _setting(0, _seed, "the seed of every random draw")
    script: ClassVar[str] = "a comparison (compare_baselines.py)"


@dataclass(frozen=True)
class CompressConfig(Config):
    """Bits-back coding of images (binary, or 8-bit grey) with a trained run (``compress``, ``compress.py
    encode``): ``latent_bits`` buckets per latent dimension (2**bits of equal prior mass),
    ``particles`` latents per image (importance-weighted bits-back: about -log p̂_K(x) per
    image instead of the -ELBO), the first ``count`` images."""

    latent_bits: int = _setting(10, _integer(4, 16), "buckets per latent dimension, as bits")
    particles: int = _setting(1, _integer(1), "K latents per image")
    count: int | None = _setting(None, _optional(_integer(1)), "only the first N images")
    script: ClassVar[str] = "a compression (compress.py)"
