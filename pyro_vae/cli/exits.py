"""``run(main, args)``: a script's known errors as one line on stderr and an exit status
(2 for bad input, 1 for a result that cannot be had, 130 for an interruption)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from pyro_vae.cli.flags import ResultError, UsageError
from pyro_vae.io.rundir import CHECKPOINT_NAME, RunDirError, release_all

__all__ = [
    "run",
]


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
        from pyro_vae.checks import ConfigError
        from pyro_vae.data import DataError
        from pyro_vae.io.checkpoints import CheckpointError
        from pyro_vae.training.distributed import (
            DistributedError,
            RendezvousError,
            is_lost_peer,
            teardown,
        )
        from pyro_vae.training.stepper import NonFiniteError
        from pyro_vae.training.trainer import TrainingInterrupted
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
    except KeyboardInterrupt as e:
        say(str(e) or "interrupted")  # an evaluation says what it kept
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
