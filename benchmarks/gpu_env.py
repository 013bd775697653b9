"""What machine a benchmark ran on, and its measured ceilings (a script; used by gpu_check.py).

    python benchmarks/gpu_env.py --work /tmp/gpu_check     # prints one JSON line

Versions (python, torch, CUDA, transformers, safetensors), the device (name, memory,
multiprocessors, ``nvidia-smi`` driver and clocks), CPU count and RAM, the work folder's
filesystem and free space, the registered pruning methods, and, on CUDA, three ceilings
measured here (METHOD.md of the device docs: measure them, do not trust datasheets):
a device-to-device copy (bytes read + written / s), a bf16 matrix product (TFLOP/s, random
data), and host-to-device copies from pinned and pageable memory (what the engine's
``read`` phase pays per layer after the disk). Each timed with CUDA events, median of 10
after 3 warm-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def mount_of(path: Path) -> dict:
    """Filesystem type and mount point holding ``path`` (from /proc/mounts)."""
    path = path.resolve()
    best = {"mount": None, "fstype": None, "device": None}
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best["mount"] or ""):
                best = {"mount": mnt, "fstype": fstype, "device": dev}
    except OSError:
        pass
    return best


def nvidia_smi() -> dict | None:
    if shutil.which("nvidia-smi") is None:
        return None
    fields = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    return dict(zip(fields.split(","), (v.strip() for v in out.splitlines()[0].split(",")))) if out else None


def cuda_ceilings(torch, device) -> dict:
    """Copy bandwidth, bf16 GEMM rate and host-to-device bandwidth, CUDA events, median of 10."""

    def median_ms(fn, warm=3, reps=10) -> float:
        for _ in range(warm):
            fn()
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1 << 28, device=device, generator=gen)  # 1 GiB fp32, random (never zeros)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    copy = 2 * x.numel() * 4 / (ms / 1e3)
    del x, y
    n = 8192
    a = torch.randn(n, n, device=device, generator=gen, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=gen, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    gemm = 2 * n**3 / (ms / 1e3)
    del a, b
    host = torch.randn(1 << 28, device=device, generator=gen).cpu()  # 1 GiB, random (CPU randn is one thread: seconds)
    dev = torch.empty(host.shape, device=device)
    pinned = host.pin_memory()
    h2d_pinned = host.numel() * 4 / (median_ms(lambda: dev.copy_(pinned, non_blocking=True), 1, 5) / 1e3)
    h2d_pageable = host.numel() * 4 / (median_ms(lambda: dev.copy_(host), 1, 5) / 1e3)
    del host, dev, pinned
    torch.cuda.empty_cache()
    return {"copy_d2d_bps": round(copy), "bf16_gemm_flops": round(gemm), "h2d_pinned_bps": round(h2d_pinned),
            "h2d_pageable_bps": round(h2d_pageable)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("."), help="folder whose filesystem the benchmarks use")
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda when available)")
    p.add_argument("--no-ceilings", action="store_true", help="skip the CUDA ceiling measurements")
    a = p.parse_args()
    env: dict = {"python": sys.version.split()[0], "python_exe": sys.executable, "platform": platform.platform(),
                 "cpu_count": os.cpu_count()}
    try:
        import psutil

        env["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    a.work.mkdir(parents=True, exist_ok=True)
    env["work"] = {"path": str(a.work.resolve()), "free_bytes": shutil.disk_usage(a.work).free, **mount_of(a.work)}
    import safetensors
    import torch
    import transformers

    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, transformers=transformers.__version__,
               safetensors=safetensors.__version__, cuda_available=torch.cuda.is_available())
    try:
        import streamprune
        from streamprune.methods import available

        env["streamprune"] = {"version": streamprune.__version__, "path": str(Path(streamprune.__file__).parent),
                              "methods": sorted(available())}
    except Exception as e:  # reported, not fatal: the install step says why
        env["streamprune"] = {"error": f"{type(e).__name__}: {e}"}
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env["device_type"] = device.split(":")[0]
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        env["gpu"] = {"name": props.name, "total_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
                      "capability": f"{props.major}.{props.minor}", "nvidia_smi": nvidia_smi()}
        if not a.no_ceilings:
            try:
                env["ceilings"] = cuda_ceilings(torch, dev)
            except Exception as e:  # reported; the rest of the check does not depend on it
                env["ceilings_error"] = f"{type(e).__name__}: {e}"
        env["device_name"] = props.name
    else:
        env["device_name"] = f"cpu ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"
    print(json.dumps(env, sort_keys=True))


if __name__ == "__main__":
    main()
