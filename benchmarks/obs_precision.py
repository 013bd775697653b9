"""Does OBS need float64? Greedy OBS in float32 against float64 on the demo model's real Grams.

For a few layers of the dense demo model, the down_proj-input Gram weighted like cascade's
(``1 / ms(y_t)`` of the layer output, on bundled C4 text) feeds the survey's cost curve
(``obs_cost_curve`` up to 80 % of the channels) and one selection (``obs_remove_columns``) in
both dtypes; prints the curves' largest relative difference, the selections' summed cost and
the overlap of the kept channels, and each curve's time (one thread).

    python benchmarks/obs_precision.py [--layers 2,15,28] [--rows 128] [--remove 400]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamprune.inputs.demo_model import ensure_demo_model
from streamprune.kernels.obs import obs_cost_curve, obs_remove_columns

C4 = Path(__file__).resolve().parents[1] / "streamprune" / "data" / "c4" / "validation-2k.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="2,15,28")
    ap.add_argument("--rows", type=int, default=128, help="calibration sequences of 128 tokens")
    ap.add_argument("--remove", type=int, default=400, help="channels the selection removes")
    a = ap.parse_args()
    torch.set_num_threads(1)
    folder = ensure_demo_model()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = []
    for line in C4.open():
        t = tok(json.loads(line)["text"]).input_ids[:128]
        if len(t) == 128:
            ids.append(t)
        if len(ids) == a.rows:
            break
    layers = [int(s) for s in a.layers.split(",")]
    seen: dict[int, dict[str, torch.Tensor]] = {l: {} for l in layers}
    for l in layers:
        layer = model.model.layers[l]
        layer.mlp.down_proj.register_forward_hook(lambda m, i, o, l=l: seen[l].__setitem__("h", i[0].flatten(0, 1)))
        layer.register_forward_hook(lambda m, i, o, l=l: seen[l].__setitem__("y", (o[0] if isinstance(o, tuple) else o).flatten(0, 1)))
    with torch.no_grad():
        model(torch.tensor(ids))
    for l in layers:
        h, y = seen[l]["h"], seen[l]["y"]
        hw = h * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        gram, w = hw.T @ hw, model.model.layers[l].mlp.down_proj.weight.detach()
        n = int(0.8 * w.shape[1])
        t0 = time.perf_counter()
        c64 = obs_cost_curve(w, gram, n, dtype=torch.float64)
        t1 = time.perf_counter()
        c32 = obs_cost_curve(w, gram, n, dtype=torch.float32)
        t2 = time.perf_counter()
        rel = float(((c32 - c64).abs()[1:] / c64[1:].clamp_min(1e-30)).max())
        k64, _, s64 = obs_remove_columns(w, gram, a.remove, dtype=torch.float64)
        k32, _, s32 = obs_remove_columns(w, gram, a.remove, dtype=torch.float32)
        overlap = len(set(k64.tolist()) & set(k32.tolist())) / len(k64)
        print(json.dumps({"layer": l, "curve_s_float64": round(t1 - t0, 3), "curve_s_float32": round(t2 - t1, 3),
                          "curve_max_rel_diff": float(f"{rel:.3g}"), "cost_float64": float(f"{s64:.6g}"),
                          "cost_float32": float(f"{s32:.6g}"), "kept_overlap": overlap}))


if __name__ == "__main__":
    main()
