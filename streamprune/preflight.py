"""Preflight: from shapes alone, before any heavy work.

Parameter counts and the achieved ratio of the plan; GPU and CPU memory forecast for the
largest layer and chunk; disk needed (output + two activation boundaries + survey
scratch) against free space. ``--dry-run`` stops here; a budget that does not fit stops
the run with the number and the flag to change.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import ConfigError, StreamPruneError
from .run.profile import GiB, rss_bytes
from .shapes import ModelShapes
from .spec import LayerSpec

# Working-set model of one forward chunk, in elements per token (fp32 where noted):
# attention q/k/v/o outputs + MLP gate, up, act product + residual copies.
_ACT_FACTOR_D = 8  # ~8 d-wide tensors alive per token
_ACT_FACTOR_F = 3  # gate, up, act(gate)*up


@dataclass(frozen=True)
class Forecast:
    params_dense: int
    params_pruned: int
    achieved_ratio: float
    chunk_rows: int
    layer_bytes: int  # one dense layer's weights in the compute dtype
    chunk_bytes: int  # one activation chunk
    device_bytes: int  # peak on the compute device (GPU, or CPU when --device cpu)
    cpu_bytes: int  # peak process RSS
    disk_bytes: int
    disk_free_bytes: int
    method_tflop: float = 0.0  # the method's own extra compute (cascade: reconstruction), whole run
    method_s: float = 0.0  # ... at the measured fp32 matmul throughput of the device
    forward_tflop: float = 0.0  # the layer passes over the calibration tokens, whole run
    wall_s: float = 0.0  # forward + method compute at the measured matmul rate + what is written at the measured disk rate


    def as_dict(self) -> dict:
        d = asdict(self)
        d.update({k.replace("_bytes", "_GiB"): round(v / GiB, 3) for k, v in d.items() if k.endswith("_bytes")})
        return d


def _layer_bytes(spec: LayerSpec, itemsize: int) -> int:
    return spec.num_params() * itemsize


def device_peak(shapes: ModelShapes, chunk_rows: int, seqlen: int, itemsize: int, workspace: int) -> int:
    """Bytes on the compute device at the peak of a layer: dense + pruned weights, the
    embedding (boundary 0), one chunk in and out, forward intermediates, method statistics."""
    dense = _layer_bytes(shapes.dense_spec(), itemsize)
    tokens = chunk_rows * seqlen
    chunk = tokens * shapes.hidden_size * itemsize
    inter = tokens * (_ACT_FACTOR_D * shapes.hidden_size + _ACT_FACTOR_F * shapes.intermediate_size) * 4
    scores = chunk_rows * shapes.num_heads * seqlen * seqlen * 4  # attention probabilities (math kernel)
    embed = shapes.vocab_size * shapes.hidden_size * itemsize
    return 2 * dense + embed + 2 * chunk + inter + scores + workspace


def forecast(shapes: ModelShapes, specs: list[LayerSpec], *, nsamples: int, seqlen: int, chunk_rows: int,
             dtype: torch.dtype, device: torch.device, workspace: int, work_dir: Path, survey: bool,
             method_flop: float = 0.0, host_workspace: int = 0, dense_stream: bool = False,
             decision_stream: bool = False, dense_passes: int = 1, pruned_passes: int = 1,
             storage_itemsize: int = 4, fork_rows: int = 0, forks: int = 0, members: int = 0) -> Forecast:
    """``dense_passes`` / ``pruned_passes``: how many times each layer, dense and pruned, runs over
    the calibration tokens (the observation passes and the streams the method keeps). ``forks``
    spawned in the survey over ``fork_rows`` search windows (:mod:`streamprune.forks`): each, and
    their reference, holds two boundaries of them on disk at the end of a survey step (the one a
    resume starts from is dropped once the layer is committed), and writes one per layer it runs.
    ``members``: the plans of a scoring pass (after the survey, its forks gone): the same over the
    search windows, beside a dense stream of the calibration tokens."""
    itemsize = dtype.itemsize
    chunk_rows = min(chunk_rows, nsamples)  # a chunk never holds more windows than there are
    dev = device_peak(shapes, chunk_rows, seqlen, itemsize, workspace)
    host_layer = _layer_bytes(shapes.dense_spec(), storage_itemsize)  # tensors as read from the shards
    # Process baseline now (interpreter, torch, transformers), plus 10 % + 128 MiB for what
    # is loaded later (tokenizer, calibration text, allocator slack), the outer tensors as
    # read (embedding, head: kept for the output), the method's host workspace, and layers:
    # on a GPU two host copies as stored (the one being copied over + the prefetched next);
    # on CPU the prefetched copy and the device working set, the read copy having become the
    # compute-dtype dense layer there, the second layer being the pruned one (at most the
    # largest kept layer). Checked against a LLaMA-2-13B-shaped run (benchmarks/RESULTS.md).
    base = rss_bytes()
    slack = base // 10 + (128 << 20)
    outer = shapes.vocab_size * shapes.hidden_size * storage_itemsize * (1 if shapes.tie_word_embeddings else 2)
    if device.type == "cpu":
        largest_kept = max((_layer_bytes(spec, itemsize) for spec in specs), default=0)
        layers = host_layer + dev - _layer_bytes(shapes.dense_spec(), itemsize) + largest_kept
    else:
        layers = 2 * host_layer + 2 * chunk_rows * seqlen * shapes.hidden_size * itemsize
    cpu = base + slack + outer + layers + host_workspace
    boundary = nsamples * seqlen * shapes.hidden_size * itemsize
    output = shapes.total_params(specs) * storage_itemsize  # written in the source checkpoint's dtype
    extra_streams = int(dense_stream) + int(decision_stream)  # two boundaries each, like the pruned stream
    fork_boundary = fork_rows * seqlen * shapes.hidden_size * itemsize
    search = max(2 * (forks + 1) if forks else 0, 2 * (members + 1) if members else 0) * fork_boundary  # forks, then the scoring pass
    disk = output + 2 * boundary + (boundary if survey else 0) + 2 * boundary * extra_streams + search
    tokens = nsamples * seqlen
    dense_layer = shapes.dense_spec().num_params()
    forward_flop = 2 * tokens * sum(dense_layer * (dense_passes + int(survey)) + spec.num_params() * pruned_passes for spec in specs)
    flops = matmul_flops(device, min(tokens, 2048), shapes.hidden_size, min(shapes.intermediate_size, 4096))
    probe = work_dir
    while not probe.exists():
        probe = probe.parent
    written = output + 2 * boundary * shapes.num_layers * (1 + extra_streams)  # the output and each stream's boundaries
    written += int(fork_boundary * (forks * (shapes.num_layers + 1) / 2 + shapes.num_layers))  # the forks' and their reference's
    if members:  # the scoring pass: its calibration stream, its members' and their reference's
        written += boundary * shapes.num_layers + fork_boundary * (members + 1) * (shapes.num_layers + 1)
    return Forecast(
        params_dense=shapes.total_params(),
        params_pruned=shapes.total_params(specs),
        achieved_ratio=shapes.achieved_ratio(specs),
        chunk_rows=chunk_rows,
        layer_bytes=_layer_bytes(shapes.dense_spec(), itemsize),
        chunk_bytes=chunk_rows * seqlen * shapes.hidden_size * itemsize,
        device_bytes=dev,
        cpu_bytes=cpu,
        disk_bytes=disk,
        disk_free_bytes=shutil.disk_usage(probe).free,
        method_tflop=round(method_flop / 1e12, 3),
        method_s=round(method_flop / flops, 3) if method_flop else 0.0,
        forward_tflop=round(forward_flop / 1e12, 3),
        wall_s=round((forward_flop + method_flop) / flops + written / write_rate(probe), 1),
    )


def matmul_flops(device: torch.device, m: int = 1024, k: int = 1024, n: int = 1024, seconds: float = 0.2) -> float:
    """Measured fp32 matmul throughput of ``device`` (FLOP/s) on an (m, k) @ (k, n) product: a
    ~0.2 s probe, for time forecasts (shaped like a layer's largest product: a small square
    one underestimates a CPU by ~2x)."""
    import time

    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    (a @ b).sum().item()  # warm-up (and CUDA init)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        c = a @ b
        reps += 1
    float(c[0, 0])  # synchronise
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


def write_rate(folder: Path, size: int = 64 << 20) -> float:
    """Measured bytes/s of a write + fsync of ``size`` bytes in ``folder`` (the probe file is removed)."""
    import os
    import time

    path = folder / f".streamprune-write-probe-{os.getpid()}"
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    try:
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return size / (time.perf_counter() - t0)
    except OSError:  # read-only or full: no I/O term rather than a failed dry run
        return float("inf")
    finally:
        path.unlink(missing_ok=True)


def fit_chunk_rows(shapes: ModelShapes, chunk_rows: int, seqlen: int, itemsize: int, workspace: int, budget: int | None) -> int:
    """Largest chunk (<= the requested one) whose device peak fits ``budget``."""
    if budget is None:
        return chunk_rows
    rows = chunk_rows
    while rows > 1 and device_peak(shapes, rows, seqlen, itemsize, workspace) > budget:
        rows //= 2
    need = device_peak(shapes, rows, seqlen, itemsize, workspace)
    if need > budget:
        raise StreamPruneError(
            f"one layer needs {need / GiB:.2f} GiB on the device even with 1 sequence per chunk, over "
            f"--max-gpu-memory {budget / GiB:.2f} GiB; raise --max-gpu-memory or lower --seqlen"
        )
    return rows


def check(fc: Forecast, device: torch.device, gpu_budget: int | None) -> None:
    """Refuse to start when a budget is exceeded."""
    if fc.disk_bytes > fc.disk_free_bytes:
        raise StreamPruneError(
            f"the run needs {fc.disk_bytes / GiB:.2f} GiB of disk (output + activation boundaries) but the work dir "
            f"has {fc.disk_free_bytes / GiB:.2f} GiB free; point --work-dir at a larger disk or lower --nsamples"
        )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cap = min(total, gpu_budget or total)
        if fc.device_bytes > cap:
            raise StreamPruneError(
                f"forecast GPU peak {fc.device_bytes / GiB:.2f} GiB exceeds {cap / GiB:.2f} GiB; "
                "lower --chunk-tokens or raise --max-gpu-memory"
            )


def cap_gpu(device: torch.device, budget: int | None) -> None:
    """Emulate a smaller card: per-process memory fraction of the device."""
    if budget is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if budget > total:
        raise ConfigError(f"--max-gpu-memory {budget / GiB:.2f} GiB exceeds the device's {total / GiB:.2f} GiB")
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
