"""Per-layer profile: wall time split by phase, memory peaks, bytes moved.

One flushed JSON line per layer in ``profile.jsonl`` of the run directory, readable
while the run is going (and after a crash).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager

import psutil
import torch

GiB = 1 << 30


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this process's own
    address space. (``ru_maxrss`` is not used there: it survives fork + exec, so a child
    would report its parent's peak.) Elsewhere ``ru_maxrss`` (KiB on Linux/BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux: fall back to getrusage below
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class LayerProfile:
    """Collects one layer's phases; ``record()`` returns the JSON-able dict."""

    def __init__(self, layer: int, device: torch.device):
        self.layer = layer
        self.device = device
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()  # this process's CPU seconds, all threads
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def record(self, **extra) -> dict:
        rec = {
            "layer": self.layer,
            "wall_s": round(time.perf_counter() - self.start, 4),
            "cpu_s": round(time.process_time() - self.cpu_start, 4),
            **{f"{k}_s": round(v, 4) for k, v in self.seconds.items()},
            "rss_bytes": rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        if self.device.type == "cuda":
            rec["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            rec["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        rec.update(extra)
        return rec


def append_line(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
