"""One prune per run directory and per output folder: an exclusive OS-level lock.

``held(run_dir, out)`` takes two ``fcntl.flock`` locks for the whole life of a prune:
``RUN_DIR/lock`` and ``.OUT.lock`` beside the output folder (so two runs with different
``--work-dir`` cannot publish into the same ``--out`` either). The kernel releases a
flock when its holder dies, however it dies (SIGKILL, OOM kill, power loss of a client),
so a killed run never leaves a stale lock: the next run takes it over. A second process
fails at once with :class:`RunLocked`, which names the holder (pid, host, start time,
read from the lock file) and touches nothing.

Lock files are unlinked by their holder on release, while still locked; a process that
opened the old file before it was unlinked notices (its locked inode is no longer the
one at the path) and retries, so unlinking never lets two holders in. ``--fresh`` keeps
``RUN_DIR/lock`` (see ``RunDir.open``), for the same reason. Readers (``inspect``, and the
CLI's early check :func:`refuse_if_held`) only probe with a non-blocking shared lock
(:func:`holder`); taking the lock retries for half a second, so a probe never makes a
prune fail.

Only stdlib: the CLI takes the locks before it imports torch and holds them for the run,
so a second prune is refused in well under a second whenever it starts, even while the
first is still importing; the engine takes them itself too (a no-op under the CLI, see
:func:`held`), so the Python API is excluded the same way.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import StreamPruneError

LOCK_NAME = "lock"
_RETRY_S = 0.5  # how long a busy lock is retried (covers an `inspect` probe)


class RunLocked(StreamPruneError):
    """Another live process holds the run directory or the output folder."""

    exit_code = 3


def run_lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def out_lock_path(out: Path) -> Path:
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.lock")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fs = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


def run_dir_for(out: Path, work_dir: Path | None) -> Path:
    """The run directory of a prune: ``--work-dir``, else ``OUT.work`` next to the output."""
    return Path(work_dir) if work_dir is not None else Path(out).with_name(Path(out).name + ".work")


def read_holder(path: Path) -> dict:
    """The holder facts written into a lock file, for messages only. A file that cannot be read
    or is half-written (its holder is between ``open`` and ``pwrite``) gives ``{}``, which the
    message names "another process (starting up)": the lock itself, not this text, decides."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process (starting up)"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


class _Lock:
    """One held flock; ``release`` unlinks the file (and an empty folder this lock created)."""

    def __init__(self, path: Path, what: str, retry_s: float = _RETRY_S):
        self.path = Path(path)
        created: list[Path] = []
        folder = self.path.parent
        while not folder.exists():
            created.append(folder)
            folder = folder.parent
        deadline = time.monotonic() + retry_s
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise _busy(what, self.path, read_holder(self.path)) from None
            if not _same_file(fd, self.path):  # unlinked by its last holder meanwhile: retry
                os.close(fd)
                continue
            break
        self.fd = fd
        self.created = created  # innermost first
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)  # still locked: a waiter that opened it retries
            for folder in self.created:
                try:
                    folder.rmdir()  # only if empty: an error before any work leaves no litter
                except OSError:  # not empty (or gone): it and the folders above it stay as they are
                    break
        finally:
            os.close(self.fd)  # releases the flock


def _busy(what: str, path: Path, holder: dict) -> RunLocked:
    return RunLocked(
        f"{what} is in use by {_describe(holder)} (lock {path}); wait for that run to finish "
        "(or stop it), or give another --out / --work-dir; `streamprune inspect` shows its progress"
    )


def _targets(run_dir: str | Path, out: str | Path) -> list[tuple[Path, str]]:
    return [(out_lock_path(Path(out)), f"output folder {str(out)!r}"), (run_lock_path(Path(run_dir)), f"work dir {str(run_dir)!r}")]


_HELD: set[Path] = set()  # lock files held with ``share=True``: a nested ``held`` on them is a no-op


@contextmanager
def held(run_dir: str | Path, out: str | Path, share: bool = False):
    """Hold the output folder's lock, then the run directory's, for the block.

    ``share=True`` (the CLI, which takes both locks before it imports torch) lets a nested
    ``held`` on the same files in this process (the engine's own, the Python API's guard)
    pass without taking them again; without it a nested ``held`` is refused like any other."""
    locks: list[_Lock] = []
    try:
        for path, what in _targets(run_dir, out):
            if path.absolute() in _HELD:
                continue
            locks.append(_Lock(path, what))
            if share:
                _HELD.add(path.absolute())
        yield
    finally:
        for lock in reversed(locks):
            _HELD.discard(lock.path.absolute())
            lock.release()


def holder(path: str | Path) -> dict | None:
    """The live holder of the lock file ``path`` (pid, host, started), or None if nobody
    holds it; a non-blocking shared-lock probe that creates nothing."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return read_holder(path)
            raise
        return None  # nobody holds it (a file left by a killed run)
    finally:
        os.close(fd)
