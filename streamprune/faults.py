"""Crash injection for the kill-and-resume tests: ``STREAMPRUNE_CRASH_AT=point``.

When the environment variable names a point the engine passes, the process kills
itself with SIGKILL there (no cleanup, no flush: exactly what an OOM kill does).
Points: ``observe:L`` (layer L's statistics pass), ``written:L`` (layer L's tensors are
on disk but not journaled), ``committed:L``, ``finalize`` (output staged, not published).
"""

from __future__ import annotations

import os
import signal

ENV = "STREAMPRUNE_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
