"""Starting or resuming a run from the command line: the saved flags of ``--resume``, the
preset, the device, the process group and the run directory (``begin_run``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_vae.cli.flags import RESUMABLE_FLAGS, UsageError, apply_preset, apply_threads
from pyro_vae.io.rundir import CHECKPOINT_NAME, RunDir, RunDirError

if TYPE_CHECKING:
    import torch

    from pyro_vae.training.distributed import Ranks


__all__ = [
    "begin_run",
    "merge_resumed_args",
    "resolve_device",
    "resume_state",
]


def resume_state(path: Path) -> tuple[dict | None, dict]:
    """(checkpoint or None, the run's config) for ``--resume path``.

    A run killed before its first checkpoint has only ``config.json``: it starts afresh in
    the same directory from that config.
    """
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    run = RunDir(run_dir)
    if (run_dir / CHECKPOINT_NAME).is_file() or path.is_file():
        from pyro_vae.io.checkpoints import load_checkpoint

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
    from pyro_vae.io.rundir import default_run_dir
    from pyro_vae.seeding import child_seed, seed_everything
    from pyro_vae.training.distributed import all_gather_objects, setup

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
