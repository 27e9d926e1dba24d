"""Run directories: who may write in them, and how results get there without destroying
earlier ones.

**One process owns a directory while it writes.**  ``RunDir.acquire`` takes an exclusive
``fcntl.flock`` on ``<dir>/.lock`` (and writes the owner's pid into it).  The kernel releases
the lock when the process ends, however it ends, so a killed run never leaves a stale lock and
its directory can be resumed at once.  A second writer, or a ``--resume`` of a run another
live process is writing, is refused with one line naming the holder.  ``acquire(new=True)``
also refuses a directory that already holds files: a new run never mixes with an old one.

**Results are staged, then moved into place together.**  ``Outputs`` writes reports,
figures and arrays into a hidden staging directory inside the target directory; ``commit``
checks that none of the targets exists (unless ``force``) and renames them all into place.
A run that fails before ``commit`` leaves the previous complete set untouched (its staged
files are removed), never a mix of old and new.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT_NAME",
    "LOCK_NAME",
    "Outputs",
    "RunDir",
    "RunDirError",
    "check_output_file",
    "default_run_dir",
    "release_all",
    "write_file_atomically",
]

LOCK_NAME = ".lock"
_STAGING_PREFIX = ".staging-"
CHECKPOINT_NAME = "checkpoint.pt"

# The directories this process owns, by resolved path: RunDir objects holding the lock fd.
_HELD: dict[Path, RunDir] = {}


def strict_json(data, indent: int | None = None) -> str:
    """``data`` as JSON that strict parsers accept: NaN and infinities (a figure that could
    not be computed, e.g. a standard error from one image) become null."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=indent, sort_keys=True, allow_nan=False)


class RunDirError(ValueError):
    """A directory that cannot be written as asked; the message is one line."""


def default_run_dir(name: str, root: Path | str = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>-<6 hex digits>``: two runs started in the same second
    get different names (and ``acquire(new=True)`` refuses the rare collision anyway)."""
    return Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _is_bookkeeping(name: str) -> bool:
    return name == LOCK_NAME or name.startswith(_STAGING_PREFIX)


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return f"process {text}" if text.isdigit() else "another process"


class RunDir:
    """The files of one run: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``,
    ``figures/*.png`` and evaluation reports (``*.json``); ``acquire`` makes this process
    their only writer."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    # -- layout ------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    # -- ownership ---------------------------------------------------------------------------

    @property
    def owned(self) -> bool:
        """Whether this process holds the directory's lock."""
        held = _HELD.get(self._key())
        return held is not None and held._fd is not None

    def _key(self) -> Path:
        return self.path.resolve()

    def contents(self) -> list[str]:
        """Names in the directory other than the lock file and staging directories."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if not _is_bookkeeping(p.name))

    def _occupied(self, flag: str) -> str:
        """Why a new run cannot go here: another run, or other files (named)."""
        names = self.contents()
        if "config.json" in names or CHECKPOINT_NAME in names:
            return f"{flag} {self.path}: already holds a run; choose another directory"
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{flag} {self.path}: is not empty ({shown}); choose an empty or new directory"

    def check(self, *, new: bool = False, flag: str = "--out") -> RunDir:
        """What ``acquire`` would refuse, found without creating or changing anything: an
        early one-line ``RunDirError`` before any work is done."""
        if self.owned:
            return self
        if self.path.exists():
            if not self.path.is_dir():
                raise RunDirError(f"{flag} {self.path}: exists and is not a directory")
            self._probe_lock(flag)  # a live owner is named first
            if new and self.contents():
                raise RunDirError(self._occupied(flag))
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise RunDirError(f"{flag} {self.path}: not writable")
            return self
        parent = self.path.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise RunDirError(f"{flag} {self.path}: cannot create a directory under {parent}")
        return self

    def _probe_lock(self, flag: str) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR)
        except OSError:
            return  # no lock file (yet): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunDirError(self._in_use(flag)) from None
        finally:
            os.close(fd)  # closing releases the probe's own lock

    def _in_use(self, flag: str) -> str:
        return (
            f"{flag} {self.path}: in use by {_holder(self.lock_path)}; wait for it to finish "
            "or choose another directory"
        )

    def acquire(self, *, new: bool = False, flag: str = "--out") -> RunDir:
        """Make this process the directory's only writer (creating it if needed); with
        ``new``, the directory must hold nothing yet.  Raises ``RunDirError`` naming ``flag``
        when it is not a directory, cannot be created, is another live process's, or (with
        ``new``) already holds files.  Acquiring a directory this process owns is a no-op."""
        if self.owned:
            if new and self.contents():
                raise RunDirError(self._occupied(flag))
            return self
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{flag} {self.path}: exists and is not a directory")
        if self.path.is_dir():
            self._probe_lock(flag)  # a live owner is named first
        if new and self.contents():  # checked before anything is created there
            raise RunDirError(self._occupied(flag))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"{flag} {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(self._in_use(flag)) from None
            raise RunDirError(f"{flag} {self.path}: cannot lock ({e.strerror})") from None
        if new and self.contents():  # filled between the first look and the lock
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise RunDirError(self._occupied(flag))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD[self._key()] = self
        _remove_dead_staging(self.path)
        return self

    def release(self) -> None:
        """Give the directory up (the lock file stays: removing it could let two writers in)."""
        held = _HELD.pop(self._key(), None)
        for owner in {id(o): o for o in (self, held) if o is not None}.values():
            if owner._fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(owner._fd, fcntl.LOCK_UN)
                    os.close(owner._fd)
                owner._fd = None

    def __enter__(self) -> RunDir:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- files of the run (written by its owner) -------------------------------------------

    def create(self) -> RunDir:
        """Make the directory and its ``figures/``."""
        self.figures.mkdir(parents=True, exist_ok=True)
        return self

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        """Write ``<run>/<name>`` atomically, pretty-printed."""
        return self.write_bytes(name, (strict_json(data, indent=2) + "\n").encode())

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``<run>/<name>`` atomically."""
        target = self.path / name
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def read_config(self) -> dict[str, Any]:
        """The run's ``config.json``."""
        return json.loads(self.config_path.read_text())

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """Rewrite ``metrics.jsonl`` (one line per epoch) from the full history, atomically,
        so a resumed run never holds lines from epochs it replays."""
        self.write_bytes(
            self.metrics_path.name,
            "".join(strict_json(m) + "\n" for m in history).encode(),
        )


def _remove_dead_staging(directory: Path) -> None:
    """Remove the staging directories of writers that died before committing (their names
    carry the writer's pid; a live writer's are left alone)."""
    for p in directory.glob(_STAGING_PREFIX + "*"):
        pid = p.name[len(_STAGING_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def release_all() -> None:
    """Release every directory this process owns (the scripts' exit path)."""
    for run_dir in list(_HELD.values()):
        run_dir.release()


class Outputs:
    """Result files bound for ``directory``, staged and then moved into place together.

    ``path(name)`` is where to write ``name`` (e.g. ``"report.json"`` or ``"figures"``, a
    directory to fill); ``commit()`` moves every staged file to the same relative path under
    ``directory``.  Without ``force`` an existing target is refused (``check`` refuses early,
    before the work; ``commit`` checks again); ``protect`` names files that are never
    replaced, even with ``force`` (a script's own inputs).  Used as a context manager, an
    exception discards the staged files.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        force: bool = False,
        flag: str = "--out",
        protect: tuple[Path | str, ...] = (),
    ) -> None:
        self.directory, self.force, self.flag = Path(directory), force, flag
        self.protect = {Path(p).resolve() for p in protect}
        self.staging = self.directory / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.committed: list[Path] = []

    def _refuse_existing(self, targets: list[Path]) -> None:
        for target in targets:
            if target.resolve() in self.protect:
                raise RunDirError(f"{self.flag} {self.directory}: would replace {target}, an input")
        if self.force:
            return
        existing = [t for t in targets if t.exists() or t.is_symlink()]
        if existing:
            shown = ", ".join(str(t.relative_to(self.directory)) for t in existing[:3])
            more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
            raise RunDirError(
                f"{self.flag} {self.directory}: {shown}{more} already "
                f"{'exists' if len(existing) == 1 else 'exist'}; pass --force to replace "
                f"{'it' if len(existing) == 1 else 'them'}, or choose another directory"
            )

    def check(self, *names: str) -> Outputs:
        """Refuse now, before any work, if the directory cannot be written or is another
        live process's, or if one of ``names`` would be replaced."""
        RunDir(self.directory).check(flag=self.flag)
        self._refuse_existing([self.directory / n for n in names])
        return self

    def path(self, name: str) -> Path:
        """The staged location of ``name`` (its parent directories made)."""
        staged = self.staging / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def directory_path(self, name: str) -> Path:
        """A staged directory ``name`` to write files into (made)."""
        staged = self.staging / name
        staged.mkdir(parents=True, exist_ok=True)
        return staged

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        """Stage ``name`` as pretty-printed JSON; returns where it will go."""
        path = self.path(name)
        path.write_text(strict_json(data, indent=2) + "\n")
        return self.directory / name

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Stage ``name`` with these bytes; returns where it will go."""
        self.path(name).write_bytes(data)
        return self.directory / name

    def staged(self) -> list[Path]:
        """Relative paths of the staged files."""
        if not self.staging.is_dir():
            return []
        return sorted(p.relative_to(self.staging) for p in self.staging.rglob("*") if p.is_file())

    def commit(self) -> list[Path]:
        """Own the directory (for the rest of the process's life), then move every staged
        file into place; returns the targets."""
        names = self.staged()
        targets = [self.directory / n for n in names]
        try:
            RunDir(self.directory).acquire(flag=self.flag)
            self._refuse_existing(targets)
            for name, target in zip(names, targets):
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staging / name, target)
        finally:
            self.discard()
        self.committed = targets
        return targets

    def discard(self) -> None:
        """Remove the staged files (nothing in the target directory changes)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.discard()


def _same_file(a: Path, b: Path | str) -> bool:
    try:
        return a.resolve() == Path(b).resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_file(
    output: Path | str, *, inputs: tuple = (), force: bool = False, flag: str = "--output"
) -> Path:
    """Refuse a bad single-file output before any work (``RunDirError``, one line): a missing
    directory, a directory, one of the job's ``inputs`` (even with ``force``), an existing
    file without ``force``.  Returns the path."""
    output = Path(output)
    if not output.parent.is_dir():
        raise RunDirError(f"{flag} {output}: no directory {output.parent}")
    for source in inputs:
        if source is not None and _same_file(output, source):
            raise RunDirError(f"{flag} {output}: is an input of this command; choose another file")
    if output.is_dir():
        raise RunDirError(f"{flag} {output}: is a directory")
    if output.exists() and not force:
        raise RunDirError(f"{flag} {output}: already exists; pass --force to replace it")
    return output


def write_file_atomically(
    path: Path | str, data: bytes, *, force: bool = False, flag: str = "--output"
) -> Path:
    """Write ``data`` to ``path`` (checked by ``check_output_file``) through a temporary file
    in the same directory: never half-written; without ``force`` a file that appeared
    meanwhile is not replaced.  The file gets the permissions a newly created file would
    (the umask's)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RunDirError(f"{flag} {path}: {e.strerror}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:  # link, not rename: fails instead of replacing a file made meanwhile
                os.link(tmp, path)
            except FileExistsError:
                raise RunDirError(
                    f"{flag} {path}: already exists; pass --force to replace it"
                ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
