"""The main job on the embedded default: SmolLM2-135M-Instruct, bundled text.

Converts (once) the demo model, prunes it at ``ratio`` with the best available method,
evaluates dense and pruned WikiText-2 perplexity (128-token windows; a fixed subset of
the first ``DEMO_WINDOWS`` windows unless ``full``), prints a small table, and ends with
one short greedy sample from the dense and from the pruned model on the same prompt — and,
where llama.cpp is installed (the ``llamacpp`` extra) and the structure is servable
(``fmt="nemotron-nas"``), the size of the pruned model's q8_0 GGUF and llama.cpp's own greedy
sample of it.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import PruneConfig
from .inputs.demo_model import default_cache_dir, ensure_demo_model
from .engine import prune
from .errors import OutputError
from .evaluate import EvalConfig, perplexity

DEMO_WINDOWS = 64
DEMO_NSAMPLES = 128
SAMPLE_PROMPT = "The history of the city of London"
SAMPLE_TOKENS = 24


def best_method() -> str:
    """The best measured method (benchmarks/RESULTS.md, "cascade"): WikiText-2 PPL at 20 % below Olica's."""
    return "cascade" if importlib.util.find_spec("streamprune.methods.cascade") else "magnitude"


def greedy_sample(folder: Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = SAMPLE_TOKENS) -> str:
    """The greedy continuation (new text only, on one line) of ``prompt`` by the model in
    ``folder`` (a dense checkpoint or a streamprune output), with the KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import load_pruned
    from .modeling import register

    folder = Path(folder)
    register()  # the tokenizer reads config.json too: model_type streamprune without remote code
    tok = AutoTokenizer.from_pretrained(folder)
    model = load_pruned(folder) if _is_pruned(folder) else AutoModelForCausalLM.from_pretrained(folder)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return " ".join(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).split())


def _is_pruned(folder: Path) -> bool:
    import json

    return json.loads((folder / "config.json").read_text()).get("model_type") in ("streamprune", "nemotron-nas")


GGUF_TYPE = "q8_0"


def llama_cpp_sample(folder: Path, prompt: str = SAMPLE_PROMPT, max_new_tokens: int = SAMPLE_TOKENS) -> dict | str:
    """The q8_0 GGUF of ``folder`` (beside it) and llama.cpp's greedy continuation of ``prompt``;
    or a one-line reason why not (llama.cpp not installed, a structure GGUF cannot store)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return 'llama.cpp is not installed (pip install -e ".[llamacpp]", a ~7 min compile)'
    from .errors import StreamPruneError
    from .formats.gguf import export_gguf

    file = folder.with_name(folder.name + f".{GGUF_TYPE}.gguf")
    try:
        info = export_gguf(folder, file, GGUF_TYPE, progress=False)
    except StreamPruneError as e:
        return f"no GGUF: {e}"
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(file), n_ctx=256, n_threads=2, verbose=False, seed=0)
    text = llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=0.0, top_k=1)["choices"][0]["text"]
    return {"gguf": str(file), "gguf_bytes": info["bytes"], "gguf_type": GGUF_TYPE, "sample": " ".join(text.split())}


def run_demo(method: str | None = None, ratio: float = 0.2, full: bool = False, out: Path | None = None, nsamples: int | None = None,
             fmt: str = "streamprune") -> dict:
    t0 = time.perf_counter()
    method = method or best_method()
    model = ensure_demo_model()
    own_out = out is None  # the demo's own cache folder may be replaced; a user's --out never is
    suffix = "" if fmt == "streamprune" else f"-{fmt}"
    out = out or default_cache_dir() / "demo-out" / f"smollm2-{method}-{int(round(ratio * 100))}{suffix}"
    windows = None if full else DEMO_WINDOWS
    dense = perplexity(EvalConfig(model=model, dataset="wikitext2", seqlen=128, max_windows=windows))
    cfg = PruneConfig(source=model, out=out, method=method, ratio=ratio, calib="c4", nsamples=nsamples or DEMO_NSAMPLES, seqlen=128,
                      format=fmt)
    try:
        report = prune(cfg)
    except OutputError:
        if not own_out:
            raise
        shutil.rmtree(out)  # a demo output of an older version or other settings
        report = prune(replace(cfg, fresh=True))
    pruned = perplexity(EvalConfig(model=out, dataset="wikitext2", seqlen=128, max_windows=windows))
    run = report.get("run", report)
    rows = [
        ("model", "SmolLM2-135M-Instruct", f"{method} {ratio:.0%}"),
        ("params", f"{report['params_dense']:,}", f"{report['params_pruned']:,}"),
        ("achieved ratio", "0", f"{report['achieved_ratio']:.4f}"),
        (f"WikiText-2 PPL ({dense['windows']}x128)", f"{dense['ppl']:.3f}", f"{pruned['ppl']:.3f}"),
        ("prune wall time", "", f"{run.get('wall_s', 0):.1f} s"),
        ("prune peak RSS", "", f"{run.get('peak_rss_bytes', 0) / 2**20:.0f} MiB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(file=sys.stderr)
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>24}  {b:>24}", file=sys.stderr)
    samples = {"dense": greedy_sample(model), "pruned": greedy_sample(out)}
    print(f"\ngreedy sample, {SAMPLE_TOKENS} tokens, prompt {SAMPLE_PROMPT!r}:", file=sys.stderr)
    for name, text in samples.items():
        print(f"  {name:<6}  ...{text}", file=sys.stderr)
    gguf = llama_cpp_sample(Path(out))
    if isinstance(gguf, dict):
        print(f"  llama.cpp ({gguf['gguf_type']} GGUF, {gguf['gguf_bytes'] / 2**20:.1f} MiB)  ...{gguf['sample']}", file=sys.stderr)
    else:
        print(f"  llama.cpp: {gguf}" + ("" if fmt == "nemotron-nas" else "; `streamprune demo --format nemotron-nas` prunes "
                                         "in the servable structure llama.cpp runs"), file=sys.stderr)
    return {
        "method": method,
        "ratio": ratio,
        "achieved_ratio": report["achieved_ratio"],
        "params_dense": report["params_dense"],
        "params_pruned": report["params_pruned"],
        "ppl_dense": dense["ppl"],
        "ppl_pruned": pruned["ppl"],
        "windows": dense["windows"],
        "prune_wall_s": run.get("wall_s"),
        "prune_peak_rss_bytes": run.get("peak_rss_bytes"),
        "sample_prompt": SAMPLE_PROMPT,
        "sample_dense": samples["dense"],
        "sample_pruned": samples["pruned"],
        "llama_cpp": gguf,
        "format": fmt,
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "out": str(out),
    }
