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

# the three modules' public names, each listed once in its own module's __all__
from pyro_vae.cli import exits, flags, resume  # noqa: E402
from pyro_vae.cli.exits import *  # noqa: E402, F403
from pyro_vae.cli.flags import *  # noqa: E402, F403
from pyro_vae.cli.resume import *  # noqa: E402, F403

__all__ = [*exits.__all__, *flags.__all__, *resume.__all__]
