"""gpu_check.py's summary.json -> the GPU section of RESULTS.md, as markdown (a script).

    python benchmarks/gpu_summary.py /work/.device/.../summary.json >> section.md

gpu_check.py renders the same text into ``$OUT/gpu_section.md`` after every step, so
whoever runs it on a device pastes that file. Goals checked (from issue 15): peak GPU reserved
<= 16 GB under the 24 GiB cap, 80-layer extrapolated time <= 10 min. Standard library only.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

GB, GiB, MiB = 1e9, 1 << 30, 1 << 20
GOAL_GPU_BYTES = 16e9  # "peak GPU allocated and reserved must stay <= 16 GB"
GOAL_80_LAYER_S = 600.0  # "80-layer extrapolated time <= 10 minutes on an H100-class GPU"


def _f(v, spec: str = ".2f", scale: float = 1.0, none: str = "–") -> str:
    return none if v is None else format(v / scale, spec)


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _ok(flag: bool | None) -> str:
    return "–" if flag is None else ("yes" if flag else "**NO**")


def header(s: dict) -> list[str]:
    meta, env = s.get("meta", {}), s.get("env", {})
    gpu = env.get("gpu") or {}
    smi = gpu.get("nvidia_smi") or {}
    device = env.get("device_name", "device unknown (env step did not run)")
    out = [f"### {device} — {meta.get('started_utc', '?')}" + (" — **small (CI) shapes, not the GPU check**" if meta.get("small") else ""), ""]
    code = f"commit {meta['commit']}" + (" (+ uncommitted changes)" if meta.get("dirty") else "") if meta.get("commit") else "commit unknown"
    out.append(f"Command: `{meta.get('command', 'bash benchmarks/gpu_check.sh')}` ({code}, code sha256 {meta.get('code_sha256', '?')}; "
               f"{meta.get('elapsed_s', '?')} s in all, budget {meta.get('budget_s', '?')} s).")
    versions = ", ".join(x for x in [f"torch {env['torch']}" if env.get("torch") else "", f"CUDA {env['torch_cuda']}" if env.get("torch_cuda") else "",
                                     f"driver {smi['driver_version']}" if smi.get("driver_version") else "",
                                     f"transformers {env['transformers']}" if env.get("transformers") else "",
                                     f"Python {env['python']}" if env.get("python") else "",
                                     f"{env['cpu_count']} CPU cores" if env.get("cpu_count") else "",
                                     f"{env['ram_bytes'] / GiB:.0f} GiB RAM" if env.get("ram_bytes") else ""] if x)
    if versions:
        out.append(f"Machine: {versions}.")
    c = env.get("ceilings")
    if c:
        out.append(f"Ceilings measured there (CUDA events, median of 10): device copy {c['copy_d2d_bps'] / 1e12:.2f} TB/s (read + written), "
                   f"bf16 GEMM 8192³ {c['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s, host→device {c['h2d_pinned_bps'] / GB:.1f} GB/s pinned, "
                   f"{c['h2d_pageable_bps'] / GB:.1f} GB/s pageable.")
    syn = s.get("synthetic")
    w = env.get("work") or {}
    if syn:
        out.append(f"Checkpoint: synthetic, d {syn['hidden_size']}, f {syn['intermediate_size']}, {syn['num_attention_heads']}/"
                   f"{syn['num_key_value_heads']} heads, h {syn['head_dim']}, {syn['layers']} layers, vocab {syn['vocab_size']}, "
                   f"{syn['dtype']} ({syn['layer_bytes'] / GiB:.3g} GiB a layer); calibration {meta.get('nsamples')} × "
                   f"{meta.get('seqlen')} C4 tokens, compute {meta.get('compute_dtype')}, `--max-gpu-memory {meta.get('max_gpu_memory')}`, "
                   f"chunks of {meta.get('chunk_tokens')} tokens"
                   + (f"; work folder {w.get('path')} on {w.get('fstype')} ({w.get('mount')})" if w else "")
                   + (" — **a RAM filesystem: the disk figures are memory bandwidth**." if w.get("fstype") in ("tmpfs", "ramfs") else "."))
    out.append("")
    return out


def layer_tables(s: dict) -> list[str]:
    out: list[str] = []
    runs = s.get("layers") or []
    if not runs:
        return out
    out += ["| method | layer | read s | forward s | decide s | write s | wall s | GPU peak alloc GB | GPU peak reserved GB | RSS GiB | GB read | GB written |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        label = f"{r['method']} {r.get('ratio', '')}".strip() + ("" if r.get("status", "ok") == "ok" else f" ({r['status']})")
        for p in r.get("per_layer", []):
            out.append(f"| {label} | {p['layer']} | {_f(p.get('read_s'), '.3f')} | {_f(p.get('forward_s'), '.3f')} | "
                       f"{_f(p.get('decide_s'), '.3f')} | {_f(p.get('write_s'), '.3f')} | {_f(p.get('wall_s'), '.3f')} | "
                       f"{_f(p.get('gpu_peak_allocated_bytes'), '.2f', GB)} | {_f(p.get('gpu_peak_reserved_bytes'), '.2f', GB)} | "
                       f"{_f(p.get('rss_bytes'), '.2f', GiB)} | {_f(p.get('bytes_read'), '.3g', GB)} | {_f(p.get('bytes_written'), '.3g', GB)} |")
    out.append("")
    out += ["| method | achieved ratio | median layer s (+ survey) | fixed s | 80 layers extrapolated | ≤ 10 min | peak GPU alloc / reserved GB | ≤ 16 GB | peak RSS GiB | disk write / read GB/s | I/O floor, 80 layers | measured / floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.get("status", "ok") != "ok":
            walls = [p["wall_s"] for p in r.get("per_layer", []) if "wall_s" in p]
            med = f"{statistics.median(walls):.2f} (partial)" if walls else "–"
            out.append(f"| {r['method']} | **{r['status']}** | {med} | – | – | – | – | – | – | – | – | – |")
            continue
        alloc, resv = r.get("gpu_peak_allocated_bytes"), r.get("gpu_peak_reserved_bytes")
        gpu_ok = None if resv is None else max(alloc or 0, resv) <= GOAL_GPU_BYTES
        ext = r["extrapolated_s"]
        measured_over_floor = ext / r["io_floor_s"] if r.get("io_floor_s") else None
        disk = f"{r['disk_write_bps'] / GB:.2f} / {r['disk_read_bps'] / GB:.2f}" + (" (eviction ignored?)" if r.get("evict_suspect") else "")
        out.append(f"| {r['method']} {r['ratio']} | {r['achieved_ratio']:.4f} | {r['median_s']['wall']:.2f} (+ {r['survey_per_layer_s']:.2f}) | "
                   f"{r['fixed_s']:.1f} | {ext:.0f} s = {ext / 60:.1f} min | {_ok(ext <= GOAL_80_LAYER_S)} | "
                   f"{_f(alloc, '.2f', GB)} / {_f(resv, '.2f', GB)} | {_ok(gpu_ok)} | {r['peak_rss_bytes'] / GiB:.2f} | {disk} | "
                   f"{r['io_floor_s']:.0f} s | {_f(measured_over_floor, '.1f')}× |")
    out += ["", "80 layers extrapolated = (median layer wall + survey per layer) × 80 + fixed (calibration, boundary 0, finalize); "
            "I/O floor = per-layer bytes read / measured read bandwidth + bytes written / write bandwidth, × 80 "
            "(bench_layers.py's docstring); measured / floor = 1.0 would be disk-bound.", ""]
    return out


def tests_block(s: dict) -> list[str]:
    t = s.get("tests")
    if not t:
        return []
    counts = t.get("counts", {})
    dev = t.get("device_fixture_counts", {})
    line = (f"Tests (`{t.get('command', 'pytest')}`): "
            + (", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "error", "skipped") if counts.get(k)) or "no results")
            + f" of {t.get('total', 0)}; of these, {t.get('device_fixture_tests', 0)} take the `device` fixture and ran on "
            f"{t.get('device')} (" + (", ".join(f"{v} {k}" for k, v in dev.items() if v) or "none") + "); the others run on the CPU"
            + (" (killed at its time limit: counts so far)" if t.get("rc") is None else "") + ".")
    out = [line]
    bad = [x["nodeid"] for x in t.get("tests", []) if x["outcome"] in ("failed", "error")]
    if bad:
        out.append("Failed: " + ", ".join(f"`{b}`" for b in bad[:20]) + (" …" if len(bad) > 20 else ""))
    return out + [""]


def kernels_block(s: dict) -> list[str]:
    k = s.get("kernels")
    if not k:
        return []
    sh = k.get("shapes", {})
    out = [f"Kernels (`bench_kernels.py`, tokens {sh.get('tokens')}, d {sh.get('d')}, f {sh.get('f')}, best of {k.get('repeat', '?')}, "
           f"SVDs best of {k.get('svd_repeat', '?')}):", "", "| kernel | shape | ms | achieved | vs ceiling |", "|---|---|---|---|---|"]
    for r in k.get("moments", []):
        out.append(f"| {r['kernel']} | {_cell(r['shape'])} | {r['ms']:.1f} | {r['rate']} | {_f(r.get('vs_ceiling'), '.2f')} {r.get('ceiling', '')} |")
    out += ["", "| case | shape | solver | ms | excess vs full |", "|---|---|---|---|---|"]
    for r in k.get("svd", []):
        out.append(f"| {r['case']} | {r['shape']} | {r['kernel']} | {r['ms']:.1f} | {_f(r.get('excess'), '.1e')} |")
    if k.get("obs"):
        out += ["", "| OBS greedy steps | shape | ms | vs eager | same choices |", "|---|---|---|---|---|"]
        for r in k["obs"]:
            out.append(f"| {r['kernel']} | {r['shape']} | {r['ms']:.1f} | {_f(r.get('speedup'), '.2f')} | {r.get('same_choice', '')} |")
    return out + [""]


def steps_block(s: dict) -> list[str]:
    out = ["| step | status | s | note |", "|---|---|---|---|"]
    for name, v in s.get("steps", {}).items():
        out.append(f"| {name} | {v['status']} | {v['seconds']} | {_cell(v.get('note', ''))} |")
    return out + [""]


def render(s: dict) -> str:
    return "\n".join(header(s) + layer_tables(s) + tests_block(s) + kernels_block(s) + steps_block(s))


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/gpu_summary.py SUMMARY_JSON")
    print(render(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
