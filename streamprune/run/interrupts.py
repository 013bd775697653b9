"""SIGINT / SIGTERM: stop at the next safe point (after a layer commit), never mid-write.

A second signal while stopping raises ``KeyboardInterrupt`` at once (the journal still
guarantees a clean resume: only committed layers count).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from ..errors import StreamPruneError


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
def _handling(signals: tuple[signal.Signals, ...], handler):
    """Install ``handler`` for ``signals`` while the block runs (main thread only: Python
    delivers signals there; elsewhere this does nothing), then restore the old handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def graceful_stop():
    """For resumable work (pruning): SIGINT/SIGTERM set a flag checked at safe points."""
    flag = StopFlag()

    def handler(signum, frame):
        if flag.signum is not None:
            raise KeyboardInterrupt
        flag.signum = signum

    with _handling((signal.SIGINT, signal.SIGTERM), handler):
        yield flag


@contextmanager
def sigterm_raises(what: str):
    """For work that cannot resume (evaluation): SIGTERM raises :class:`Interrupted` at once,
    as Ctrl-C raises ``KeyboardInterrupt``, so ``finally`` blocks and temporary folders clean up
    (the default SIGTERM action ends the process without running them)."""

    def handler(signum, frame):
        raise Interrupted(f"{what} stopped by SIGTERM; it does not resume: run it again")

    with _handling((signal.SIGTERM,), handler):
        yield
