"""Argument types and the flags the scripts share: every bad value becomes one line on
stderr and exit status 2 (``ArgumentParser``, ``UsageError``), never a traceback.

Nothing heavy is imported here: the scripts parse their arguments before torch loads.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from pyro_vae.choices import (
    ACTIVATIONS,
    ARRAY_SUFFIXES,
    BINARIZATIONS,
    DATASETS,
    LARGEST_SIZE,
    LR_SCHEDULES,
    MADE,
)
from pyro_vae.io.rundir import Outputs, RunDir

__all__ = [
    "ArgumentParser",
    "RESUMABLE_FLAGS",
    "ResultError",
    "UsageError",
    "adam_betas",
    "add_data_args",
    "add_force_arg",
    "add_preset_arg",
    "add_resume_arg",
    "add_runtime_args",
    "add_training_args",
    "dataset_name",
    "ood_set",
    "apply_preset",
    "apply_threads",
    "hidden_sizes",
    "layer_sizes",
    "nonnegative_float",
    "nonnegative_int",
    "number_type",
    "optimizer_options",
    "output_dir",
    "outputs_for",
    "positive_float",
    "positive_int",
    "probability",
    "run_config",
    "seed_value",
    "shown",
    "unit_interval",
    "warmup_length",
]


class UsageError(ValueError):
    """A bad flag value or combination detected after parsing."""


class ResultError(Exception):
    """A result the method cannot produce (a diverged fit, say): reported in one line with
    exit status 1, never printed as a number."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# more CPU threads than this per core is a typing error, not a setting
_MAX_THREADS_PER_CORE = 64


def shown(value: float, spec: str) -> str:
    """``format(value, spec)`` without a minus sign on a figure that rounds to zero
    ("-0.000" reads as a negative result)."""
    text = format(value, spec)
    return format(0.0, spec) if float(text) == 0 else text


def number_type(kind: type, *, allow_zero: bool) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) above zero (or zero too, if
    ``allow_zero``); anything else is a one-line error naming what was expected."""
    what = ("a non-negative " if allow_zero else "a positive ") + (
        "integer" if kind is int else "number"
    )

    def parse(s: str):
        try:
            value = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}")
        if kind is int and value > LARGEST_SIZE:
            raise argparse.ArgumentTypeError(f"{s!r} is larger than torch can hold (2**63 - 1)")
        return value

    parse.__name__ = what.removeprefix("a ").replace(" ", "_").replace("-", "")
    parse.__doc__ = f"An argparse type: {what}, else a one-line error."
    return parse


positive_int = number_type(int, allow_zero=False)
nonnegative_int = number_type(int, allow_zero=True)
positive_float = number_type(float, allow_zero=False)
nonnegative_float = number_type(float, allow_zero=True)


def seed_value(s: str) -> int:
    """An argparse type: a seed, a whole number in [0, 2**32) (numpy's global generator,
    which Pyro seeds, takes no more)."""
    try:
        value = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a seed in [0, 2**32)") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{s!r} is not a seed in [0, 2**32)")
    return value


def probability(s: str) -> float:
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number in [0, 1)") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number in [0, 1)")
    return value


def warmup_length(s: str) -> int | str:
    """An argparse type: a number of epochs, or a share of --epochs such as '10%'."""
    text = s.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if math.isfinite(share) and 0 <= share <= 100:
                return f"{share:g}%"
        else:
            value = int(text)
            if 0 <= value <= LARGEST_SIZE:
                return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{s!r} is not a number of epochs or a share such as 10%")


def unit_interval(s: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        value = float(s)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number in [0, 1]")
    return value


def hidden_sizes(s: str) -> tuple[int, ...]:
    """'400' or '500,300' -> (500, 300)."""
    try:
        sizes = tuple(int(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of sizes") from None
    if not sizes or any(h <= 0 for h in sizes):
        raise argparse.ArgumentTypeError(f"{s!r}: sizes must be positive")
    if any(h > LARGEST_SIZE for h in sizes):
        raise argparse.ArgumentTypeError(f"{s!r}: a size is larger than torch can hold (2**63 - 1)")
    return sizes


def adam_betas(s: str) -> tuple[float, float]:
    """'0.9,0.999' -> (0.9, 0.999): two numbers in [0, 1)."""
    try:
        betas = tuple(float(p) for p in s.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise argparse.ArgumentTypeError(f"{s!r} is not two numbers in [0, 1) such as 0.9,0.999")
    return betas


def optimizer_options(args: argparse.Namespace) -> dict:
    """The ``Trainer`` keywords of the optimiser flags (``--adam-eps --adam-betas
    --skip-norm --clip-norm --skip-nonfinite``)."""
    return {
        "adam_eps": args.adam_eps,
        "adam_betas": tuple(args.adam_betas),
        "skip_norm": args.skip_norm,
        "clip_norm": args.clip_norm,
        "skip_nonfinite": args.skip_nonfinite,
    }


def layer_sizes(s: str) -> tuple[tuple[int, ...], ...]:
    """'200,200/100,100' -> ((200, 200), (100, 100)): hidden sizes per stochastic layer."""
    try:
        return tuple(hidden_sizes(part) for part in s.split("/"))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a list of sizes per layer such as 200,200/100,100"
        ) from None


def dataset_name(s: str) -> str:
    """A data set's name, or a ``.npy`` / ``.npz`` file or a folder of images that exists."""
    if s in DATASETS:
        return s
    if Path(s).suffix.lower() in ARRAY_SUFFIXES:
        if not Path(s).is_file():
            raise argparse.ArgumentTypeError(f"{s}: no such file")
        return str(Path(s).expanduser().resolve())
    if Path(s).is_dir():
        return str(Path(s).expanduser().resolve())
    raise argparse.ArgumentTypeError(
        f"{s!r} is not one of {', '.join(DATASETS)}, nor a .npy or .npz file, nor a folder "
        "of images"
    )


def ood_set(s: str) -> str:
    """``dataset_name``, or one of the sets made from the in-distribution images (``MADE``)."""
    return s if s in MADE else dataset_name(s)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--dataset --data-dir --binarize``, spelled the same in every script."""
    parser.add_argument(
        "--dataset",
        default="mnist",
        type=dataset_name,
        metavar="NAME_OR_FILE",
        help="mnist, fashion-mnist, digits (scikit-learn's 8 x 8, bundled with it), or a .npy / "
        ".npz file of your images: uint8 (0-255) or floats in [0, 1], shaped (N, H, W), "
        "(N, H, W, C) or (N, D); an .npz holds 'images' (and 'labels'), or the splits 'train', "
        "'valid', 'test'; a file without splits is split a tenth each for validation and test "
        "(default: mnist)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where data sets live (default: $PYRO_VAE_DATA_DIR or ~/.cache/pyro-vae)",
    )
    parser.add_argument(
        "--binarize",
        default="dynamic",
        choices=BINARIZATIONS,
        help="dynamic: a fresh Bernoulli draw per use (the protocol of published MNIST "
        "likelihoods); static: one seeded draw; none: grey levels (default: dynamic)",
    )


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """``--seed --device --quiet``."""
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="cpu, cuda or auto (default: cpu)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's own choice, one per core; idle threads "
        "wait passively, so a busy machine does not slow them down, see OMP_WAIT_POLICY)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def output_dir(path: Path | str, flag: str = "--out") -> RunDir:
    """The output directory ``path``, checked (not made): a one-line ``RunDirError`` naming
    ``flag`` if it cannot be made or another live process writes there.  ``Outputs.commit``
    claims it when the results are ready."""
    return RunDir(path).check(flag=flag)


def add_force_arg(parser: argparse.ArgumentParser) -> None:
    """``--force``: replace results an earlier invocation left (never a script's input)."""
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing results of the same name (without it, the script refuses "
        "before it starts; its own inputs are never replaced)",
    )


def outputs_for(
    out: RunDir, args: argparse.Namespace, *names: str, flag: str = "--out", protect=()
) -> Outputs:
    """The staged result files for ``out``, refused now if one of ``names`` exists and
    ``--force`` was not given."""
    return Outputs(out.path, force=getattr(args, "force", False), flag=flag, protect=protect).check(
        *names
    )


def apply_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(--threads)`` when the flag is given."""
    if getattr(args, "threads", None) is not None:
        cores = os.cpu_count() or 1
        if args.threads > _MAX_THREADS_PER_CORE * cores:
            # torch would try to start them all and fail for want of memory
            raise UsageError(
                f"--threads {args.threads}: more than {_MAX_THREADS_PER_CORE} per core of this "
                f"machine's {cores}"
            )
        import torch

        torch.set_num_threads(args.threads)


def add_preset_arg(
    parser: argparse.ArgumentParser,
    presets: dict,
    default: str,
    overrides: dict[tuple[str, str], dict] | None = None,
) -> None:
    """``--preset NAME``: a named recipe that sets the flags left at ``None``; ``overrides``
    maps (preset, --model) to the flags that model takes instead."""

    def flags_text(flags: dict) -> str:
        words = []
        for key, value in flags.items():
            flag = "--" + key.replace("_", "-")
            words.append(flag if value is True else f"{flag} {_plain(value)}")
        return " ".join(words).replace("%", "%%")  # argparse formats help with %

    described = "; ".join(f"{name}: {flags_text(flags)}" for name, flags in presets.items())
    for (preset, model), flags in (overrides or {}).items():
        described += f"; {preset} with --model {model}: {flags_text(flags)}"
    parser.add_argument(
        "--preset",
        default=default,
        choices=sorted(presets),
        help=f"training recipe; flags given explicitly win ({described}) (default: {default})",
    )


def _plain(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else f"{value}"


def apply_preset(
    args: argparse.Namespace,
    presets: dict,
    overrides: dict[tuple[str, str], dict] | None = None,
) -> argparse.Namespace:
    """Fill every flag still ``None`` from the chosen preset, where ``overrides`` has an entry
    for (preset, ``args.model``) from that entry first."""
    model_flags = (overrides or {}).get((args.preset, getattr(args, "model", None)), {})
    for key, value in {**presets[args.preset], **model_flags}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# Flags a resumed run may change; everything else comes from the run's config.json.  The
# stopping rules are among them so that a run which stopped on its budget can be given more.
RESUMABLE_FLAGS = (
    "epochs",
    "quiet",
    "device",
    "resume",
    "data_dir",
    "threads",
    "patience",
    "max_minutes",
)


def add_resume_arg(parser: argparse.ArgumentParser) -> None:
    """``--resume RUN_DIR``: continue a run from its last checkpoint."""
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue the run in this directory from its last checkpoint (its config is "
        "reused; only --epochs, --device, --threads, --data-dir, --quiet and, where the "
        "script has them, --patience and --max-minutes may change)",
    )


def run_config(args: argparse.Namespace, **extra) -> dict:
    """A run's config.json: every flag as a plain value, plus ``extra``."""
    config = {}
    for key, value in {**vars(args), **extra}.items():
        if isinstance(value, Path) or type(value).__name__ == "device":
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        config[key] = value
    return config


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    name: str,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    hidden: tuple[int, ...] | None,
    activation: str | None,
    eval_particles: int,
    eval_particles_help: str,
    lr_schedule: str | None = "constant",
) -> None:
    """The flags both training scripts share, spelled and checked the same way, plus
    ``--out``, ``--resume``, the data flags and the runtime flags.  A default of ``None``
    means "set by ``--preset``" (see ``apply_preset``)."""

    def default(value, shown=None):
        return "set by --preset" if value is None else (shown or f"{value}")

    add = parser.add_argument
    add(
        "--epochs",
        type=positive_int,
        default=epochs,
        help=f"passes over the training images (default: {default(epochs)})",
    )
    add(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        help=f"images per step (default: {default(batch_size)})",
    )
    add(
        "--lr",
        type=positive_float,
        default=lr,
        help=f"Adam learning rate (default: {default(lr, lr and f'{lr:g}')})",
    )
    add("--z-dim", type=positive_int, default=50, help="latent dimensions (default: 50)")
    add(
        "--hidden",
        type=hidden_sizes,
        default=hidden,
        help="encoder/decoder hidden sizes, comma-separated "
        f"(default: {default(hidden, hidden and ','.join(map(str, hidden)))})",
    )
    add(
        "--activation",
        default=activation,
        choices=sorted(ACTIVATIONS),
        help=f"hidden activation (default: {default(activation)})",
    )
    add(
        "--lr-schedule",
        default=lr_schedule,
        choices=LR_SCHEDULES,
        help="constant; cosine: decay to zero over --epochs; step: Burda et al.'s eight "
        "stages from 1 to 0.1 times --lr, stage i 3^i/3280 of the epochs long "
        f"(default: {default(lr_schedule)})",
    )
    add(
        "--clip-norm",
        type=positive_float,
        default=None,
        help="clip the gradient norm to this value (default: off)",
    )
    add(
        "--skip-nonfinite",
        action="store_true",
        help="skip (and count) steps whose loss or gradient is not finite, instead of stopping",
    )
    add(
        "--skip-norm",
        type=positive_float,
        default=None,
        help="skip (and count) updates whose gradient norm exceeds this value, as VDVAE does "
        "(default: off)",
    )
    add(
        "--adam-eps",
        type=positive_float,
        default=None,  # 1e-8 unless a preset says otherwise (the parser's late_defaults)
        help="Adam's epsilon (Burda et al. and Sønderby et al. use 1e-4) (default: 1e-8, or "
        "set by --preset)",
    )
    late = getattr(parser, "late_defaults", {})
    parser.late_defaults = {**late, "adam_eps": 1e-8}
    add(
        "--adam-betas",
        type=adam_betas,
        default=(0.9, 0.999),
        help="Adam's two moment decay rates, comma-separated (default: 0.9,0.999)",
    )
    add("--eval-particles", type=nonnegative_int, default=eval_particles, help=eval_particles_help)
    add(
        "--train-size", type=positive_int, default=None, help="use only the first N training images"
    )
    add(
        "--eval-size",
        type=positive_int,
        default=None,
        help="use only the first N validation and test images",
    )
    add("--out", type=Path, default=None, help=f"run directory (default: runs/{name}-<timestamp>)")
    add_resume_arg(parser)
    add_data_args(parser)
    add_runtime_args(parser)
