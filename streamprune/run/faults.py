"""Fault injection for the crash-safety tests, at named points the engine passes.

``STREAMPRUNE_CRASH_AT=point``: the process kills itself with SIGKILL there (no cleanup,
no flush: exactly what an OOM kill does). ``STREAMPRUNE_STALL_AT=point:SECONDS``: it
sleeps there (a run that is alive and holds its lock, for the concurrency tests).
Points: ``fork:L`` (the survey's layer L forked, not journaled), ``surveyed:L`` (journaled,
its input boundary still on disk), ``scoring:L`` / ``scored:L`` (the same in cascade's scoring
pass), ``observe:L`` (layer L's statistics pass), ``written:L`` (layer L's tensors are
on disk but not journaled), ``committed:L``, ``finalize`` (output staged, not published).
Under torchrun ``STREAMPRUNE_CRASH_RANK=r`` limits the crash to rank ``r``.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "STREAMPRUNE_CRASH_AT"
RANK_ENV = "STREAMPRUNE_CRASH_RANK"  # under torchrun: only this rank crashes (default: every rank)
STALL_ENV = "STREAMPRUNE_STALL_AT"


def crash_point(name: str) -> None:
    rank = os.environ.get("RANK", "0")
    if os.environ.get(ENV) == name and os.environ.get(RANK_ENV, rank) == rank:
        os.kill(os.getpid(), signal.SIGKILL)
    stall = os.environ.get(STALL_ENV)
    if stall and stall.rpartition(":")[0] == name:
        time.sleep(float(stall.rpartition(":")[2]))
