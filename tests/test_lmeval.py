"""lm-evaluation-harness scores a pruned output folder (optional extra ``eval``).

Run:  .venv/bin/pytest tests/test_lmeval.py -q   (``make install`` installs lm-eval)

A tiny random Llama is pruned by the engine (magnitude, 30 %); lm-eval's ``hf`` model
(``trust_remote_code=True``, the modeling file inside the folder) runs the two local tasks
of ``streamprune/data/lmeval`` offline in a fresh process. Its log-likelihoods equal those
computed directly with the model, and its greedy generations (batched, left-padded) equal
the model's own ``generate`` on each context alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from streamprune import PruneConfig, load_pruned, prune

TASKS = Path(__file__).resolve().parents[1] / "streamprune" / "data" / "lmeval"


def _wikicloze():
    spec = importlib.util.spec_from_file_location("lmeval_wikicloze", TASKS / "wikicloze.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shipped_task_data_is_rebuilt_byte_identically():
    wikicloze = _wikicloze()
    items = wikicloze.build_items(wikicloze.SOURCE.read_text())
    assert len(items) == wikicloze.N_ITEMS
    text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    assert wikicloze.DATA.read_text() == text
    for it in items:  # four distinct endings, the gold one where the label says
        assert len(set(it["endings"])) == 4 and 0 <= it["label"] < 4


def _samples(out_dir: Path, task: str) -> list[dict]:
    (path,) = out_dir.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation tokens | context), split as lm-eval splits a pair."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx) :]
    logp = torch.log_softmax(model(torch.tensor([whole]), use_cache=False).logits[0].double(), -1)
    rows = logp[len(ctx) - 1 : len(whole) - 1]  # (len(cont), V): predictions of the continuation
    target = torch.tensor(cont)
    ll = rows.gather(1, target[:, None]).sum().item()
    return ll, bool((rows.argmax(-1) == target).all())


def test_lm_eval_hf_model_scores_a_pruned_folder(tiny_llama, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "out"
    prune(PruneConfig(source=tiny_llama, out=out, method="magnitude", ratio=0.3, calib="c4", nsamples=8, seqlen=32, dtype="float32", progress=False))
    results = tmp_path / "results"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"),
    }
    cmd = [
        str(Path(sys.executable).with_name("lm-eval")), "run", "--model", "hf",
        "--model_args", f"pretrained={out},trust_remote_code=True,dtype=float32",
        "--include_path", str(TASKS), "--tasks", "streamprune_wikicloze,streamprune_wikigen",
        "--batch_size", "4", "--log_samples", "--output_path", str(results),
    ]
    # cwd: not the repo root (its top-level kernels/ would shadow HF's `kernels` package)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (summary,) = results.rglob("results_*.json")
    scores = json.loads(summary.read_text())["results"]
    assert {"acc,none", "acc_norm,none"} <= set(scores["streamprune_wikicloze"])
    assert "exact_match,strip" in scores["streamprune_wikigen"]

    model = load_pruned(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("a b") == tok.encode("a b", add_special_tokens=False)  # no BOS to mirror

    cloze = _samples(results, "streamprune_wikicloze")
    assert len(cloze) == 40
    worst = 0.0
    for s in cloze:
        for i, args in enumerate(s["arguments"].values()):
            (got_ll, got_greedy), = [s["resps"][i][0]]
            want_ll, want_greedy = _loglikelihood(model, tok, args["arg_0"], args["arg_1"])
            worst = max(worst, abs(float(got_ll) - want_ll) / abs(want_ll))
            assert (got_greedy == "True") == want_greedy
    assert worst <= 1e-5, worst

    gen = _samples(results, "streamprune_wikigen")
    assert len(gen) == 40 and sum(bool(s["resps"][0][0]) for s in gen) >= 30  # not empty strings
    until = ["\n", " .", tok.eos_token]
    for s in gen:
        args = s["arguments"]["gen_args_0"]
        ids = torch.tensor([tok.encode(args["arg_0"])])
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=args["arg_1"]["max_gen_toks"], do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        text = tok.decode(seq[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        for stop in until:
            text = text.split(stop)[0]
        assert s["resps"][0][0] == text, s["doc_id"]
