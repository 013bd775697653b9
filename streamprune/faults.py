"""Crash injection for the kill-and-resume tests: ``STREAMPRUNE_CRASH_AT=point``.

When the environment variable names a point the engine passes, the process kills
itself with SIGKILL there (no cleanup, no flush: exactly what an OOM kill does).
Points: ``observe:L`` (layer L's statistics pass), ``written:L`` (layer L's tensors are
on disk but not journaled), ``committed:L``, ``finalize`` (output staged, not published).
Under torchrun ``STREAMPRUNE_CRASH_RANK=r`` limits the crash to rank ``r``.
"""

from __future__ import annotations

import os
import signal

ENV = "STREAMPRUNE_CRASH_AT"
RANK_ENV = "STREAMPRUNE_CRASH_RANK"  # under torchrun: only this rank crashes (default: every rank)


def crash_point(name: str) -> None:
    rank = os.environ.get("RANK", "0")
    if os.environ.get(ENV) == name and os.environ.get(RANK_ENV, rank) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
