"""SlimLLM (``streamprune/methods/slimllm/``): ratios, heads from moments, regressions, engine.

Run: ``. .venv/bin/activate && python -m pytest tests/test_slimllm.py -q`` (about a minute on
2 cores; the unit tests alone take a few seconds: ``-k "not end_to_end and not resume"``).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from reference import logits_of, prune_in_memory
from streamprune import PruneConfig, load_pruned, prune
from streamprune.adapters import open_model
from streamprune.errors import ConfigError, RatioError
from streamprune.methods import build_method
from streamprune.methods.slimllm import SlimLLM, SlimLLMConfig, ffn_fit, ffn_scores
from streamprune.methods.slimllm.budget import clamp_redistribute, heads_to_prune, layer_ratios
from streamprune.methods.slimllm.heads import HeadMoments, fold_regression, head_pools, head_scores, linear_fit, select_heads
from streamprune.methods.slimllm.observers import HeadObserver
from streamprune.shapes import ModelShapes
from streamprune.inputs.textdata import calibration_windows, resolve_text_source
from test_resume import digests

SMOLLM2 = ModelShapes(num_layers=30, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                      head_dim=64, vocab_size=49152, tie_word_embeddings=True)
LLAMA_7B = ModelShapes(num_layers=32, hidden_size=4096, intermediate_size=11008, num_heads=32, num_kv_heads=32,
                       head_dim=128, vocab_size=32000, tie_word_embeddings=False)
LLAMA3_8B = ModelShapes(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
                        head_dim=128, vocab_size=128256, tie_word_embeddings=False)
CALIB = dict(calib="c4", nsamples=8, seqlen=32, seed=0, chunk_tokens=96, progress=False)  # 3 rows/chunk: 3 chunks


def synthetic_survey(L: int) -> list[dict[str, torch.Tensor]]:
    """Cosines like a real model's: low for the first and last layers, high in the middle."""
    return [{"cos": torch.tensor(0.6 + 0.35 * math.sin(math.pi * (i + 0.5) / L) + 0.01 * math.cos(7 * i),
                                 dtype=torch.float64)} for i in range(L)]


# ---- config, per-layer ratios, the ratio contract (shapes only) -----------------------------------


def test_config_regimes_and_validation():
    assert SlimLLMConfig().regime(0.2) == (10.0, 26 / 32)  # official script, ~20 %
    assert SlimLLMConfig().regime(0.5) == (7.0, 30 / 32)  # official script, ~50 %
    assert SlimLLMConfig(alpha=3, n_p=0.5).regime(0.2) == (3.0, 0.5)
    for kw in ({"alpha": -1.0}, {"n_p": 0.0}, {"n_p": 1.5}, {"r_max": 1.0}, {"keep_least_frac": 0.5}, {"alpha": True}):
        (name, value), = kw.items()
        with pytest.raises(ValueError, match=rf"SlimLLMConfig\.{name} .*got {value!r}"):
            SlimLLMConfig(**kw)
    with pytest.raises(ConfigError, match="r_max"):
        build_method("slimllm", 0.2, {"r_max": 2})


def test_clamp_redistribute_water_fills():
    # 0.5·2 = 1.0 > 0.9 is capped; the other 1.1 is split 3:1:1
    assert clamp_redistribute([0.5, 0.3, 0.1, 0.1], total=2.0, cap=0.9) == pytest.approx([0.9, 0.66, 0.22, 0.22])
    # a cascade: capping the first pushes the second over the cap too
    assert clamp_redistribute([0.6, 0.3, 0.05, 0.05], total=2.4, cap=0.9) == pytest.approx([0.9, 0.9, 0.3, 0.3])
    assert clamp_redistribute([1.0, 3.0], 1.0, 0.9) == pytest.approx([0.25, 0.75])  # no clamp: proportional


@pytest.mark.parametrize("r", [0.25, 0.55, 0.8])
def test_layer_ratios_average_to_r_and_respect_clamp(r):
    L, n_p, alpha = 32, 26, 10.0
    cos = [float(s["cos"]) for s in synthetic_survey(L)]
    ratios = layer_ratios(cos, r, n_p, alpha, 0.9)
    chosen = sorted(range(L), key=lambda i: -cos[i])[:n_p]
    assert [i for i, x in enumerate(ratios) if x > 0] == sorted(chosen)  # the most redundant layers
    assert sum(ratios) / n_p == pytest.approx(r)  # mean over the N_p layers = r
    assert max(ratios) <= 0.9 + 1e-12
    free = [i for i in chosen if ratios[i] < 0.9]
    w = torch.softmax(alpha * torch.tensor([cos[i] for i in chosen], dtype=torch.float64), 0)
    if len(free) == n_p:  # no clamp: exactly r·N_p·softmax(α c)
        assert ratios[chosen[0]] == pytest.approx(r * n_p * float(w[0]))
    a, b = free[0], free[-1]  # unclamped layers keep the softmax proportions
    assert ratios[a] / ratios[b] == pytest.approx(math.exp(alpha * (cos[a] - cos[b])))
    if r == 0.8:
        assert sum(x == 0.9 for x in ratios) > 0  # the clamp was active


@pytest.mark.parametrize("shapes", [SMOLLM2, LLAMA_7B, LLAMA3_8B], ids=["smollm2", "llama7b", "llama3-8b"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_plan_hits_ratio_with_synthetic_survey(shapes, ratio):
    method = SlimLLM(SlimLLMConfig(), ratio)
    method.plan(shapes, synthetic_survey(shapes.num_layers))
    p = method.knobs
    specs = method.planned_specs(shapes)
    assert abs(shapes.achieved_ratio(specs) - ratio) <= 0.01 and p.achieved == shapes.achieved_ratio(specs)
    assert p.n_p == round(shapes.num_layers * (26 / 32 if ratio < 0.35 else 30 / 32))
    pruned = [x for x in p.ratios if x > 0]
    assert len(pruned) == p.n_p and sum(pruned) / p.n_p == pytest.approx(p.r) and max(pruned) <= 0.9
    H, G, f = shapes.num_heads, shapes.num_kv_heads, shapes.intermediate_size
    for spec, r_l, r_f in zip(specs, p.ratios, p.ffn_ratios):
        assert r_f == min(p.ffn_scale * r_l, 0.9)
        assert f - spec.intermediate_size == round(r_f * f)
        n = heads_to_prune(r_l, H, G)
        if H == G:  # MHA: pruned heads take their KV rows with them
            assert spec.heads_per_group in (0, 1) and spec.num_heads == H - n
        else:  # GQA: the same number in every group; a group with no head left loses k/v
            assert spec.num_kv_heads in (0, G) and spec.num_heads == (G * (H // G - n) if n < H // G else 0)
        assert spec.o_bias == (n > 0) and spec.down_bias == (spec.intermediate_size < f)
    if shapes is LLAMA_7B:  # fine-grained heads: the paper's rule alone lands within ±1 pp
        assert p.ffn_scale == 1.0


def test_unreachable_ratio_and_zero_ratio():
    with pytest.raises(RatioError, match=r"--ratio 0\.9 .*at most 0\.\d+.*n_p"):
        SlimLLM(SlimLLMConfig(), 0.9).plan(SMOLLM2, synthetic_survey(30))
    m = SlimLLM(SlimLLMConfig(), 0.0)
    m.plan(SMOLLM2, synthetic_survey(30))
    assert m.planned_specs(SMOLLM2) == [SMOLLM2.dense_spec()] * 30


# ---- heads: moments, greedy, regression ------------------------------------------------------------


def head_outputs(seed: int, n=64, H=8, h=4, d=6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (n, H·h), Wo (d, H·h), T (n, d, H)) float64. Heads 0 and 5 nearly cancel: dropping one
    alone hurts, dropping both does not; the leave-one-out scores miss that, the greedy finds it."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, H, h, generator=g, dtype=torch.float64) * torch.rand(H, 1, generator=g, dtype=torch.float64) * 2
    A[:, 5] = -A[:, 0] + 0.1 * torch.randn(n, h, generator=g, dtype=torch.float64)
    Wo = torch.randn(d, H, h, generator=g, dtype=torch.float64)
    Wo[:, 5] = Wo[:, 0]
    T = torch.einsum("nhk,dhk->ndh", A, Wo)
    return A.reshape(n, H * h), Wo.reshape(d, H * h), T


def corr_explicit(x: torch.Tensor, y: torch.Tensor) -> float:
    """Official: Σ_c |mean((x − x̄)(y − ȳ)) / (std(x)·std(y))| with population stds."""
    cov = ((x - x.mean(0)) * (y - y.mean(0))).mean(0)
    sd = x.std(0, correction=0) * y.std(0, correction=0)
    return float(torch.where(sd > 0, cov / sd, torch.zeros_like(cov)).abs().sum())


def brute_force_heads(T: torch.Tensor, pools, m: int) -> tuple[list[int], list[int]]:
    """The official ``LlamaAttention.compress`` search on explicit head outputs, per pool."""
    H = T.shape[-1]
    Y = T.sum(-1)
    s = [corr_explicit(Y - T[:, :, i], Y) for i in range(H)]
    slots, pruned = [], []
    for pool in pools:
        order = sorted(pool, key=lambda i: (-s[i], i))
        pruned += order[:m]
        slots.append(order[m:])
    initial = sorted(i for sl in slots for i in sl)
    pool_of = {i: k for k, pool in enumerate(pools) for i in pool}

    def corr_of(sls):
        kept = [i for sl in sls for i in sl]
        return corr_explicit(T[:, :, kept].sum(-1), Y)

    best = corr_of(slots)
    for p in sorted(pruned, key=lambda i: (-s[i], i)):
        k, choice = pool_of[p], None
        for j in range(len(slots[k])):
            trial = [list(sl) for sl in slots]
            trial[k][j] = p
            c = corr_of(trial)
            if c > best:
                best, choice = c, j
        if choice is not None:
            slots[k][choice] = p
    return sorted(i for sl in slots for i in sl), initial


@pytest.mark.parametrize(("G", "m"), [(8, 3), (8, 5), (2, 1), (2, 2), (4, 1)], ids=["mha3", "mha5", "gqa2x1", "gqa2x2", "gqa4x1"])
def test_greedy_from_moments_matches_brute_force(G, m):
    H, swapped = 8, 0
    for seed in range(12):
        A, Wo, T = head_outputs(seed, H=H)
        obs = HeadObserver(Wo.float(), H, 4)
        obs.rows = 5  # several row blocks per chunk
        for i in range(0, A.shape[0], 24):  # chunks, like the engine
            obs.update("o_proj", A[i:i + 24].float(), torch.empty(0))
        hm = obs.moments()
        assert hm.n == A.shape[0]
        torch.testing.assert_close(hm.M, torch.einsum("ndi,ndj->dij", T, T), rtol=1e-5, atol=1e-4)
        pools = head_pools(H, G)
        kept, scores = select_heads(hm, pools, m)
        want, initial = brute_force_heads(T, pools, m)
        assert kept == want, seed
        Y = T.sum(-1)
        torch.testing.assert_close(scores, torch.tensor([corr_explicit(Y - T[:, :, i], Y) for i in range(H)]),
                                   rtol=1e-5, atol=1e-5)
        swapped += kept != initial
        assert all(sum(i in pool for i in kept) == len(pool) - m for pool in pools)  # equal per group
    assert swapped > 0  # the greedy did change the score-based choice somewhere


def test_head_regression_and_folding_reproduce_the_fit():
    _, Wo, T = head_outputs(3)
    A = head_outputs(3)[0]
    n, d = T.shape[:2]
    hm = HeadMoments(n, torch.einsum("ndi,ndj->dij", T, T), T.sum(0).T)
    kept = [1, 2, 4, 6]
    w = torch.zeros(8, dtype=torch.float64)
    w[kept] = 1.0
    sx, sxx, sxy = hm.fit_terms(w)
    a, b = linear_fit(n, sx, hm.sy, sxx, sxy)
    x, y = T[:, :, kept].sum(-1), T.sum(-1)
    for c in range(d):  # least squares per output dim = np.polyfit(x, y, 1)
        sol = torch.linalg.lstsq(torch.stack([x[:, c], torch.ones(n, dtype=torch.float64)], 1), y[:, c:c + 1]).solution
        assert float(a[c]) == pytest.approx(float(sol[0]), rel=1e-9) and float(b[c]) == pytest.approx(float(sol[1]), abs=1e-9)
    cols = torch.tensor([i * 4 + k for i in kept for k in range(4)])
    bias0 = torch.randn(d, dtype=torch.float64)
    W2, b2 = fold_regression(Wo[:, cols], a, b, bias0)
    folded = A[:, cols] @ W2.T + b2  # the new o_proj on the kept heads' inputs
    torch.testing.assert_close(folded, a * x + b + bias0, rtol=1e-12, atol=1e-12)
    assert hm.corr(torch.ones(8, dtype=torch.float64)) == pytest.approx(d)  # Y vs itself
    assert float(head_scores(hm).max()) <= d


def test_regression_with_no_head_left_is_the_mean():
    _, _, T = head_outputs(0)
    hm = HeadMoments(T.shape[0], torch.einsum("ndi,ndj->dij", T, T), T.sum(0).T)
    sx, sxx, sxy = hm.fit_terms(torch.zeros(8, dtype=torch.float64))
    a, b = linear_fit(hm.n, sx, hm.sy, sxx, sxy)
    assert bool((a == 0).all())
    torch.testing.assert_close(b, T.sum(-1).mean(0))


# ---- FFN: score and regression from pass-B moments ----------------------------------------------------


def ffn_data(seed=0, n=300, d=12, f=40):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    gate, up = (torch.randn(f, d, generator=g, dtype=torch.float64) / d ** 0.5 for _ in range(2))
    down = torch.randn(d, f, generator=g, dtype=torch.float64) * torch.rand(f, generator=g, dtype=torch.float64)
    Hm = torch.nn.functional.silu(X @ gate.T) * (X @ up.T)  # (n, f)
    return X, gate, up, down, Hm


def test_ffn_fit_from_gram_and_folding_reproduce_the_fit():
    X, _, _, down, Hm = ffn_data()
    n, d, f = Hm.shape[0], down.shape[0], down.shape[1]
    keep = torch.tensor(sorted(set(range(f)) - {3, 7, 8, 20, 31, 39}))
    a, b = ffn_fit(n, Hm.T @ Hm, Hm.sum(0), down, keep)
    x, y = Hm[:, keep] @ down[:, keep].T, Hm @ down.T  # pruned and full FFN outputs, same inputs
    design = torch.stack([x, torch.ones_like(x)], -1)  # (n, d, 2)
    for c in range(d):
        sol = torch.linalg.lstsq(design[:, c], y[:, c:c + 1]).solution
        assert float(a[c]) == pytest.approx(float(sol[0]), rel=1e-4) and float(b[c]) == pytest.approx(float(sol[1]), abs=1e-4)
    W2, b2 = fold_regression(down[:, keep].float(), a, b)
    folded = Hm[:, keep].float() @ W2.T + b2  # the new down_proj on the kept channels
    torch.testing.assert_close(folded, (a * x + b).float(), rtol=1e-5, atol=1e-5)
    mse = lambda u: float((u - y).square().mean())  # noqa: E731
    assert mse(a * x + b) <= mse(x)  # least squares never does worse than the raw pruned output


def test_ffn_scores_match_explicit_formula():
    X, gate, up, down, Hm = ffn_data(1)
    Y = Hm @ down.T
    Yc = Y - Y.mean(0)
    lam, Q = torch.linalg.eigh(Yc.T @ Yc)
    lt = torch.sigmoid(lam.abs() / lam.abs().mean())
    nx = X.norm(dim=0)
    want = (Hm.norm(dim=0) * ((Q.T @ down).abs() * lt[:, None]).norm(dim=0)
            + (gate * nx).norm(dim=1) + (up * nx).norm(dim=1))
    cov = Y.T @ Y - torch.outer(Y.sum(0), Y.sum(0)) / Y.shape[0]
    got = ffn_scores(gate.float(), up.float(), down.float(), X.square().sum(0).float(), Hm.square().sum(0).float(), cov.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


# ---- end to end on tiny GQA models ----------------------------------------------------------------------


def _tokens(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    return calibration_windows(tok, resolve_text_source("c4"), CALIB["nsamples"], CALIB["seqlen"], CALIB["seed"])


def _specs(out):
    return json.loads((out / "config.json").read_text())["layer_specs"]


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_end_to_end(tiny_model, tmp_path, ratio):
    """Achieved ratio, head/FFN structure, streamed == in-memory choices, output loads (both ways)."""
    out = tmp_path / "out"
    report = prune(PruneConfig(source=tiny_model, out=out, method="slimllm", ratio=ratio, **CALIB))
    assert abs(report["achieved_ratio"] - ratio) <= 0.01
    specs = _specs(out)
    assert any(s["o_bias"] and s["down_bias"] for s in specs)
    tokens = _tokens(tiny_model)
    method = build_method("slimllm", ratio)
    method.plan(open_model(tiny_model).shapes())
    decisions = prune_in_memory(tiny_model, method, tokens)
    streamed = {}
    for f in out.glob("*.safetensors"):
        streamed.update(load_file(f))
    for i, d in enumerate(decisions):  # same structure and choices; values up to fp32 summation order
        assert d.spec.to_dict() == specs[i]
        for name, ref in d.tensors.items():
            got = streamed[f"model.layers.{i}.{name}"]
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    local = load_pruned(out).eval()
    assert type(remote).__name__ == "StreamPruneForCausalLM"
    logits = logits_of(local, tokens[:2])
    torch.testing.assert_close(logits_of(remote, tokens[:2]), logits, rtol=0, atol=0)
    assert bool(torch.isfinite(logits).all())


def test_end_to_end_layer_without_attention(tiny_qwen2, tmp_path):
    """One pruned layer (n_p = 1/4) at r_l ≈ 0.77: GQA groups of 2 lose round(1.54) = 2 heads, the
    whole attention; the block keeps only o_proj's fitted bias (the mean attention output)."""
    out = tmp_path / "out"
    report = prune(PruneConfig(source=tiny_qwen2, out=out, method="slimllm", ratio=0.18,
                               method_options={"n_p": 0.25}, **CALIB))
    assert abs(report["achieved_ratio"] - 0.18) <= 0.01
    specs = _specs(out)
    gone = [i for i, s in enumerate(specs) if s["num_kv_heads"] == 0]
    assert len(gone) == 1 and specs[gone[0]]["o_bias"]
    tensors = load_file(out / f"model-layer-{gone[0]:05d}.safetensors")
    assert not any("q_proj" in k or "o_proj.weight" in k for k in tensors)
    tokens = _tokens(tiny_qwen2)[:2]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    torch.testing.assert_close(logits_of(remote, tokens), logits_of(load_pruned(out).eval(), tokens), rtol=0, atol=0)


def test_resume_is_byte_identical_and_skips_the_survey(tiny_llama, tmp_path, monkeypatch):
    """Interrupted after layer 1 is committed, then rerun: same bytes as an uninterrupted run,
    and the rerun reads the journaled survey instead of running it again."""
    cfg = dict(source=tiny_llama, method="slimllm", ratio=0.3, **CALIB)
    prune(PruneConfig(out=tmp_path / "out1", **cfg))

    real_decide = SlimLLM.decide

    def decide_then_crash(self, layer_idx, weights, observer):
        if layer_idx == 2:  # layers 0 and 1 are decided, written and committed
            raise KeyboardInterrupt("simulated kill")
        return real_decide(self, layer_idx, weights, observer)

    monkeypatch.setattr(SlimLLM, "decide", decide_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prune(PruneConfig(out=tmp_path / "out2", **cfg))
    monkeypatch.setattr(SlimLLM, "decide", real_decide)

    def no_survey(self, layer_idx, weights):
        raise AssertionError("the survey ran again on resume")

    monkeypatch.setattr(SlimLLM, "survey_observer", no_survey)
    resumed = prune(PruneConfig(out=tmp_path / "out2", **cfg))
    assert resumed["resumed_from_layer"] == 2

    # every output file sha256-equal; the report compared without its volatile "run" block
    assert digests(tmp_path / "out1") == digests(tmp_path / "out2")
