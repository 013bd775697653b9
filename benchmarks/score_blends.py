"""What the scoring pass of ``cascade --option allocation=search,search_blends=n`` sees, offline
(a script): the allocations on blends of the OBS and KL-scaled curves, each scored whole.

    python benchmarks/score_blends.py --ratio 0.5 --betas 0,0.5,1 --attention olica
    python benchmarks/score_blends.py --ratio 0.2 --betas 0,0.25,0.5,0.75,1 --attention dense

Reads the survey of the quality run ``cascade-PCT-allocation=search`` (``benchmarks/quality.py``
keeps it in its work dir under ``~/.cache/streamprune/quality``), rebuilds each blend's
allocation (:func:`streamprune.methods.cascade.search.blended`), and streams the demo model over
the 256 calibration windows (each layer's Gram, and the base's pass-A statistics) beside the 8
search windows: each blend's model has every layer's FFN cut as its allocation says (the
survey's OBS order, down_proj refitted) and its attention dense (``--attention dense``) or cut
as Olica decides on the dense stream (``--attention olica``, what the scoring pass does); no
reconstruction. Prints one JSON line per blend: its KL per token from the dense model's
next-token distribution, and its per-layer FFN counts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from streamprune.adapters import load_tokenizer, open_model
from streamprune.inputs.demo_model import default_cache_dir, ensure_demo_model
from streamprune.inputs.textdata import calibration_windows, resolve_text_source
from streamprune.methods import build_method
from streamprune.methods.cascade.allocation import allocate
from streamprune.methods.cascade.observers import AllocationObserver
from streamprune.methods.cascade.selection import obs_ffn_given
from streamprune.storage.activations import ActivationCache
from streamprune.stream import embed_to_boundary, final_head, position_embeddings, propagate, token_embedding


@torch.no_grad()
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratio", type=float, required=True)
    p.add_argument("--betas", default="0,0.5,1")
    p.add_argument("--attention", choices=["dense", "olica"], default="olica")
    a = p.parse_args(argv)
    betas = [float(b) for b in a.betas.split(",")]
    model = ensure_demo_model()
    work = default_cache_dir() / "quality" / f"cascade-{round(a.ratio * 100)}-allocation=search.work"
    if not (work / "survey.safetensors").is_file():
        raise SystemExit(f"no survey in {work}: run python benchmarks/quality.py --rows cascade-{round(a.ratio * 100)}-allocation=search first")
    stored = load_file(work / "survey.safetensors")
    adapter = open_model(model)
    shapes, L, f = adapter.shapes(), adapter.num_layers, adapter.shapes().intermediate_size
    survey = [{k.split(".", 1)[1]: v for k, v in stored.items() if k.startswith(f"{i}.")} for i in range(L)]
    method = build_method("cascade", a.ratio, {"allocation": "search"})
    method.plan(shapes, survey)
    total, cap = method.base.knobs.n_ffn_pruned * L, method._alloc_cap(f)
    allocs = {b: allocate([method._curve(s, b) for s in survey], total, cap) for b in betas}
    tok, dt = load_tokenizer(model), torch.float32
    rows = calibration_windows(tok, resolve_text_source("c4"), 256 + method.fork_rows, 128, 0)
    outer = adapter.read_outer()
    embed = token_embedding(adapter, outer, "cpu", dt)
    norm, head = final_head(adapter, outer, embed, "cpu", dt)
    pe = position_embeddings(adapter.rotary("cpu"), 128, "cpu", dt)
    tmp = Path(tempfile.mkdtemp())
    try:
        calib = ActivationCache(tmp / "calib")
        embed_to_boundary(calib, rows[:256], embed, 64, dt)
        ref = embed(rows[256:])
        members = {b: ref.clone() for b in betas}
        for i in range(L):
            w = {k: v.to(dt) for k, v in adapter.read_layer(i).items()}
            layer = adapter.build_layer(i, w, "cpu", dt)
            obs = AllocationObserver(method.base.observer(i, "A", w) if a.attention == "olica" else None, f)
            propagate(layer, calib, i, pe, "cpu", observer=obs)
            calib.drop(i)
            if a.attention == "olica":
                base = method.base.decide(i, w, obs.base)
                spec, attn = base.spec, {k: v for k, v in base.tensors.items() if not k.startswith("mlp.")}
            else:
                spec, attn = shapes.dense_spec(), {k: v for k, v in w.items() if not k.startswith("mlp.")}
            for b in betas:
                k = allocs[b][i]
                ffn = obs_ffn_given(w, obs.gram, survey[i]["ffn_order"][:k], float(method.config.obs_damp))
                members[b] = adapter.build_pruned_layer(i, replace(spec, intermediate_size=f - k), {**attn, **ffn}, "cpu", dt)(members[b], pe)
            ref = layer(ref, pe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logp = F.log_softmax(F.linear(norm(ref), head).float(), -1)
    for b in betas:
        logq = F.log_softmax(F.linear(norm(members[b]), head).float(), -1)
        kl = float((logp.exp() * (logp - logq)).sum() / logp[..., 0].numel())
        print(json.dumps({"ratio": a.ratio, "attention": a.attention, "beta": b, "kl": round(kl, 5), "ffn_cut": allocs[b]}), flush=True)


if __name__ == "__main__":
    main()
