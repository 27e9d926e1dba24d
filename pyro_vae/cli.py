"""Shared command-line pieces: argument types, common flags, one-line errors with exit code 2.

Every bad value a user can type becomes one line on stderr and exit status 2, never a
traceback; a run that diverges exits with status 1 and a one-line message.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_vae.choices import ACTIVATIONS, BINARIZATIONS, DATASETS, LARGEST_SIZE, LR_SCHEDULES
from pyro_vae.rundir import CHECKPOINT_NAME, Outputs, RunDir, RunDirError, release_all

if TYPE_CHECKING:
    import torch

    from pyro_vae.distributed import Ranks

# This module imports nothing heavy at the top: the scripts parse their arguments with it
# before torch and Pyro are loaded, so --help and a bad flag answer at once.

# torch's CPU threads wait for work by spinning (OpenMP's active policy). When another
# process keeps a core busy, spinning threads take turns with it and an epoch of the default
# recipe took 12.5 s with two threads against 4.0 s with one; with passive waiting, 3.4 s
# (benchmarks/threads.py, docs/results/training-speed.md). Set before torch loads; a value
# the user gave wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = [
    "ArgumentParser",
    "ResultError",
    "UsageError",
    "add_data_args",
    "add_force_arg",
    "output_dir",
    "hidden_sizes",
    "number_type",
    "positive_float",
    "positive_int",
    "resolve_device",
    "run",
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


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--dataset --data-dir --binarize``, spelled the same in every script."""
    parser.add_argument(
        "--dataset", default="mnist", choices=DATASETS, help="data set (default: mnist)"
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


def resume_state(path: Path) -> tuple[dict | None, dict]:
    """(checkpoint or None, the run's config) for ``--resume path``.

    A run killed before its first checkpoint has only ``config.json``: it starts afresh in
    the same directory from that config.
    """
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    run = RunDir(run_dir)
    if (run_dir / CHECKPOINT_NAME).is_file() or path.is_file():
        from pyro_vae.checkpoints import load_checkpoint

        state = load_checkpoint(path)
        _check_saved_config(run, state)
        return state, {**state["config"], "out": str(run_dir)}
    if not run.config_path.is_file():
        raise UsageError(f"--resume {path}: no checkpoint.pt or config.json there")
    try:
        config = run.read_config()
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume {path}: unreadable config.json ({e})") from None
    return None, {**config, "out": str(run_dir)}


def _check_saved_config(run: RunDir, state: dict) -> None:
    """The checkpoint is the source of truth; a ``config.json`` beside it that says otherwise
    (corrupt, or another run's) is refused rather than left in place or silently replaced."""
    if not run.config_path.exists():
        return
    try:
        saved = run.read_config()
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or _identity(saved) != _identity(state.get("config")):
        raise UsageError(
            f"--resume {run.path}: config.json does not match the checkpoint's config (corrupt "
            "or from another run); restore it, or remove it to have it rewritten from the "
            "checkpoint"
        )


def _identity(config) -> dict:
    """A config without the flags a resumed run may change, as plain JSON values."""
    import json

    if not isinstance(config, dict):
        return {}
    kept = {k: v for k, v in config.items() if k not in (*RESUMABLE_FLAGS, "out")}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def _legacy_defaults() -> dict:
    """What runs from before a flag existed did, where that differs from the flag's default:
    the typed configs' migrations (imported here, after the flags are parsed: they load
    torch)."""
    from pyro_vae.config import MIGRATIONS, SSVAE_MIGRATIONS

    return {**SSVAE_MIGRATIONS, **MIGRATIONS}


def merge_resumed_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, config: dict
) -> argparse.Namespace:
    """The saved run's flags, with the command line's resumable flags where given.

    Any other flag set to a non-default value is an error: it would silently not apply.
    """
    merged = dict(config)
    known = {a.dest for a in parser._actions}
    for key, value in vars(args).items():
        default = parser.get_default(key)
        if key in RESUMABLE_FLAGS:
            if value != default or key not in merged:
                merged[key] = value
        elif key == "out":
            continue  # the run directory is the one being resumed
        elif value != default and value != merged.get(key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(
                f"{flag} cannot change when resuming (only "
                + ", ".join(
                    "--" + f.replace("_", "-")
                    for f in RESUMABLE_FLAGS
                    if f in known and f != "resume"
                )
                + ")"
            )
        elif key not in merged:  # a flag newer than the run: the behaviour it had then
            merged[key] = _legacy_defaults().get(key, default)
    for key in ("data_dir", "out", "resume"):
        if merged.get(key) is not None:
            merged[key] = Path(merged[key])
    for key, value in merged.items():
        if isinstance(value, list):
            merged[key] = tuple(value)
    return argparse.Namespace(**{k: v for k, v in merged.items() if k in known})


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


def begin_run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    name: str,
    presets: dict | None = None,
    overrides: dict[tuple[str, str], dict] | None = None,
) -> tuple[argparse.Namespace, dict | None, Path, torch.device, Ranks]:
    """Resolve ``--resume`` (the saved flags, the checkpoint or None), the preset, the device,
    the process group when launched by ``torchrun``, and the run directory (checked, not
    created), and seed everything: (args, state, out, device, ranks).

    On several processes rank 0 chooses and checks the run directory and tells the others;
    ``--batch-size`` is the global batch and must be a multiple of the number of processes;
    rank r > 0 draws from a random stream of its own.
    """
    from pyro_vae.distributed import all_gather_objects, setup
    from pyro_vae.rundir import default_run_dir
    from pyro_vae.seeding import child_seed, seed_everything

    state, out = None, None
    if args.resume is not None:
        if int(os.environ.get("RANK", "0")) == 0:  # refused at once if a live process writes there
            resumed = Path(args.resume)
            RunDir(resumed if resumed.is_dir() else resumed.parent).check(flag="--resume")
        state, config = resume_state(args.resume)
        args = merge_resumed_args(parser, args, config)
        out = args.out
        done = None if state is None else int(state["trainer"]["epoch"])
        if done is not None and getattr(args, "epochs", None) is not None and args.epochs < done:
            raise UsageError(
                f"--epochs {args.epochs}: the run has trained {done} epochs already (give "
                f"{done} or more)"
            )
    # Flags whose default is None on the parser, so that a resume can tell a given value from
    # none and a preset can set them: their value when neither the command line nor the
    # preset gives one.  The model comes first, since the preset's overrides depend on it.
    late = getattr(parser, "late_defaults", {})
    if "model" in late and getattr(args, "model", None) is None:
        args.model = late["model"]
    if presets is not None:
        args = apply_preset(args, presets, overrides)
    for key, value in late.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = resolve_device(args.device)
    ranks, device = setup(device)
    apply_threads(args)
    batch = getattr(args, "batch_size", None)
    if batch is not None and batch % ranks.world_size:
        raise UsageError(
            f"--batch-size {batch} (the global batch) is not a multiple of the "
            f"{ranks.world_size} processes"
        )
    if out is None:
        # checked here, before any work; TrainingRun.start claims it (acquire, new=True)
        chosen: Path | Exception | None = None
        if ranks.is_main:
            try:
                chosen = RunDir(args.out or default_run_dir(name)).check(new=True).path
            except RunDirError as e:
                chosen = e
        chosen = all_gather_objects(chosen, ranks)[0]
        if isinstance(chosen, Exception):
            raise chosen
        out = chosen
    seed_everything(args.seed if ranks.is_main else child_seed(args.seed, f"rank-{ranks.rank}"))
    return args, state, out, device, ranks


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error if there is no GPU) or ``auto``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


class _Terminated(Exception):
    """SIGTERM arrived (torchrun stopping the run)."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the report below must get out
    raise _Terminated


# torch reports a failed CPU allocation as a plain RuntimeError with this text
_CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def run(
    main: Callable[[argparse.Namespace], object], args: argparse.Namespace, *, grad: bool = True
) -> int:
    """Call ``main(args)``; turn known errors into one line on stderr and an exit status.
    ``grad=False``: with torch's gradients off throughout (the evaluation scripts).

    Under ``torchrun`` every rank meets the same errors; rank 0 alone reports them, except a
    lost process group, which each surviving rank reports with its rank.
    """
    # the errors main may raise, from modules main has loaded anyway (they import torch: a
    # Ctrl-C while they load is an interruption like any other, not a traceback)
    try:
        from pyro_vae.checkpoints import CheckpointError
        from pyro_vae.checks import ConfigError
        from pyro_vae.data import DataError
        from pyro_vae.distributed import DistributedError, RendezvousError, is_lost_peer, teardown
        from pyro_vae.stepper import NonFiniteError
        from pyro_vae.train import TrainingInterrupted
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    distributed = "RANK" in os.environ
    rank = int(os.environ.get("RANK", "0"))

    def say(line: str) -> None:
        if rank == 0:
            print(line, file=sys.stderr)

    if distributed:  # torchrun ends every process when one fails: say so, in one line
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if not grad:
            import torch

            torch.set_grad_enabled(False)
        main(args)
    except ConfigError as e:  # a model's settings that do not go together: name the flag
        say(f"error: --{e.field.replace('_', '-')}: {e.message}")
        return 2
    except (UsageError, DataError, CheckpointError, RunDirError) as e:
        say(f"error: {e}")
        return 2
    except NonFiniteError as e:
        out = getattr(e, "run_dir", None)
        if out is not None and not (Path(out) / CHECKPOINT_NAME).is_file():
            say(
                f"error: {e}; no epoch had finished, so there is no checkpoint to resume: "
                f"remove {out} and start again with other settings (a smaller --lr, say)"
            )
        else:
            say(f"error: {e}; the last checkpoint was kept")
        return 1
    except ResultError as e:
        say(f"error: {e}")
        return 1
    except MemoryError:
        say("error: not enough memory for these settings; lower the sizes or particles")
        return 2
    except TrainingInterrupted as e:
        out = getattr(e, "run_dir", None)
        where = f" --resume {out}" if out else " --resume <run directory>"
        # the interpreter that is running (a venv's python), so the command works as printed
        say(f"{e}; checkpoint saved. Resume with: {sys.executable} {sys.argv[0]}{where}")
        return 130
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except _Terminated:
        print(
            f"error: rank {rank}: stopped by torchrun because another process of the run "
            "failed (torchrun's report names it); the last checkpoint was kept",
            file=sys.stderr,
        )
        return 143
    except RendezvousError as e:  # each rank has its own reason
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DistributedError, RuntimeError) as e:
        text = " ".join(str(e).split())
        if _CPU_OUT_OF_MEMORY in text or type(e).__name__ == "OutOfMemoryError":
            wanted = text.partition("you tried to allocate ")[2].split(" bytes")[0]
            size = f" ({int(wanted) / 1e9:.3g} GB at once)" if wanted.isdigit() else ""
            say(f"error: not enough memory for these settings{size}; lower the sizes or particles")
            return 2
        if not distributed or not is_lost_peer(e):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(
            f"error: rank {rank}: the process group was lost (another process of the run "
            f"stopped): {text[:160]}; the last checkpoint was kept",
            file=sys.stderr,
        )
        return 1
    finally:
        release_all()
        teardown()
    return 0
