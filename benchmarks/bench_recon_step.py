"""One reconstruction step of cascade (forward + backward + Adam on one decoder layer), three ways.

    python benchmarks/bench_recon_step.py                      # the demo model's layer shapes, CPU, 1 thread
    python benchmarks/bench_recon_step.py --device cuda --d 8192 --f 28672 --heads 64 --kv-heads 8 --head-dim 128

A Llama decoder layer (transformers' own class, random weights, built in-process) is fitted
to a random target with the method's loss (:func:`streamprune.methods.cascade.reconstruct.recon_loss`)
on ``--tokens`` tokens a step, timed as

- ``float32, per-tensor Adam``: torch's default Adam (the step before ``CASCADE_CONFIG_VERSION`` 3),
- ``float32, fused Adam``: one fused Adam kernel a step,
- ``bfloat16 autocast, fused Adam``: the steps' matmuls in bfloat16 (``recon_precision=bfloat16``,
  what ``auto`` picks on a CUDA GPU with bf16 or a CPU with AMX), weights and Adam in float32,

each the median of ``--repeat`` steps after ``--warmup``; and Adam's step alone, both ways.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from streamprune.methods.cascade.reconstruct import recon_loss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--f", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=512, help="tokens a step (rows of 128)")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = LlamaConfig(hidden_size=a.d, intermediate_size=a.f, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.head_dim, max_position_embeddings=a.seqlen, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(0)
    rows = max(1, a.tokens // a.seqlen)
    x = torch.randn(rows, a.seqlen, a.d, generator=gen).to(device)
    target = torch.randn(rows, a.seqlen, a.d, generator=gen).to(device)
    pos = torch.arange(a.seqlen, device=device)[None]
    pe = LlamaRotaryEmbedding(cfg).to(device)(x, pos)
    torch.manual_seed(0)
    template = LlamaDecoderLayer(cfg, 0).to(device)
    n_params = sum(p.numel() for p in template.parameters())

    def timed(fn) -> float:
        for _ in range(a.warmup):
            fn()
        sync(device)
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows_out = []
    for name, amp, fused in (("float32, per-tensor Adam", False, False), ("float32, fused Adam", False, True),
                             ("bfloat16 autocast, fused Adam", True, True)):
        layer = LlamaDecoderLayer(cfg, 0).to(device)
        layer.load_state_dict(template.state_dict())
        params = list(layer.parameters())
        opt = torch.optim.Adam(params, lr=2e-5, fused=fused)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                y = layer(x, position_embeddings=pe, attention_mask=None)
                y = y[0] if isinstance(y, tuple) else y
            recon_loss(y.float(), target, "rms").backward()
            opt.step()

        rows_out.append({"step": name, "ms": round(timed(step) * 1e3, 2)})
        rows_out[-1]["adam_ms"] = round(timed(opt.step) * 1e3, 3)  # the optimizer alone, on the last gradients
    base = rows_out[0]["ms"]
    print(f"one reconstruction step on {device} ({a.threads} thread(s) on CPU), torch {torch.__version__}: layer of "
          f"{n_params:,} params (d {a.d}, f {a.f}, heads {a.heads}/{a.kv_heads}), {rows * a.seqlen} tokens")
    print("| step | median ms | vs float32 per-tensor | Adam alone, ms |\n|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['step']} | {r['ms']:.1f} | {base / r['ms']:.2f} × | {r['adam_ms']:.2f} |")
    print(json.dumps({"bench": "recon_step", "device": str(device), "threads": a.threads, "torch": torch.__version__,
                      "params": n_params, "tokens": rows * a.seqlen, "rows": rows_out}))


if __name__ == "__main__":
    main()
