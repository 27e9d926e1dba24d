"""The command line: argument types and shared flags (``flags``), starting or resuming a run
(``resume``), and one-line errors with exit codes (``exits``).

Every bad value a user can type becomes one line on stderr and exit status 2, never a
traceback; a run that diverges exits with status 1 and a one-line message.  Nothing heavy is
imported here: the scripts parse their arguments with it before torch and Pyro are loaded, so
``--help`` and a bad flag answer at once.
"""

import os

# torch's CPU threads wait for work by spinning (OpenMP's active policy). When another
# process keeps a core busy, spinning threads take turns with it and an epoch of the default
# recipe took 12.5 s with two threads against 4.0 s with one; with passive waiting, 3.4 s
# (benchmarks/threads.py, docs/results/training-speed.md). Set before torch loads; a value
# the user gave wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pyro_vae.cli.exits import run  # noqa: E402
from pyro_vae.cli.flags import (  # noqa: E402
    RESUMABLE_FLAGS,
    ArgumentParser,
    ResultError,
    UsageError,
    adam_betas,
    add_data_args,
    add_force_arg,
    add_preset_arg,
    add_resume_arg,
    add_runtime_args,
    add_training_args,
    apply_preset,
    apply_threads,
    hidden_sizes,
    layer_sizes,
    nonnegative_float,
    nonnegative_int,
    number_type,
    optimizer_options,
    output_dir,
    outputs_for,
    positive_float,
    positive_int,
    probability,
    run_config,
    seed_value,
    shown,
    unit_interval,
    warmup_length,
)
from pyro_vae.cli.resume import (  # noqa: E402
    begin_run,
    merge_resumed_args,
    resolve_device,
    resume_state,
)

__all__ = [
    "RESUMABLE_FLAGS",
    "ArgumentParser",
    "ResultError",
    "UsageError",
    "adam_betas",
    "add_data_args",
    "add_force_arg",
    "add_preset_arg",
    "add_resume_arg",
    "add_runtime_args",
    "add_training_args",
    "apply_preset",
    "apply_threads",
    "begin_run",
    "hidden_sizes",
    "layer_sizes",
    "merge_resumed_args",
    "nonnegative_float",
    "nonnegative_int",
    "number_type",
    "optimizer_options",
    "output_dir",
    "outputs_for",
    "positive_float",
    "positive_int",
    "probability",
    "resolve_device",
    "resume_state",
    "run",
    "run_config",
    "seed_value",
    "shown",
    "unit_interval",
    "warmup_length",
]
