"""SIGINT / SIGTERM: stop at the next safe point (after a layer commit), never mid-write.

A second signal while stopping raises ``KeyboardInterrupt`` at once (the journal still
guarantees a clean resume: only committed layers count).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from .errors import StreamPruneError


class Interrupted(StreamPruneError):
    """Raised at a safe point after SIGINT/SIGTERM."""

    exit_code = 130


class StopFlag:
    def __init__(self):
        self.signum: int | None = None

    def check(self, where: str) -> None:
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Interrupted(f"stopped by {name} {where}; run the same command again to resume")


@contextmanager
def graceful_stop():
    """Install handlers (main thread only) that set a flag checked at safe points."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.signum is not None:
            raise KeyboardInterrupt
        flag.signum = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def sigterm_raises(what: str):
    """For work that cannot resume (evaluation): SIGTERM raises :class:`Interrupted` at once,
    as Ctrl-C raises ``KeyboardInterrupt``, so ``finally`` blocks and temporary folders clean up
    (the default SIGTERM action ends the process without running them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"{what} stopped by SIGTERM; it does not resume: run it again")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
