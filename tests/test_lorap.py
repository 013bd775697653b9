"""LoRAP (``streamprune/methods/lorap.py``) and the shared FFN channel pieces (``channels.py``).

Run: ``.venv/bin/pytest tests/test_lorap.py -q`` (about a minute on 2 cores; the end-to-end
cases are ``-k "end_to_end or resume"``, the unit tests alone take a second: ``-k "not end_to_end and not resume"``).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from reference import logits_of, prune_in_memory
from streamprune import PruneConfig, load_pruned, prune
from streamprune.adapters import open_model
from streamprune.errors import ConfigError, RatioError
from streamprune.kernels.svd import truncated_svd
from streamprune.methods import build_method
from streamprune.methods import lorap as lorap_mod
from streamprune.methods.channels import ffn_channel_scores, select_channels
from streamprune.methods.lorap import (
    LoRAPConfig,
    achieved_ratio_at,
    allocate_ranks,
    awsvd,
    layer_spec,
    solve_fraction,
)
from test_engine import CALIB, _output_tensors, _tokens
from test_resume import digests
from tiny import real_shapes

LLAMA_7B, SMOLLM2 = real_shapes()["llama-7b"], real_shapes()["smollm2"]


# ---- rank allocation and the ratio solver (shapes only) ------------------------------------


def test_paper_ranks_llama7b():
    """The paper's LLaMA-7B ranks are the per-layer fraction s = 0.2 / 0.5 (official ``cal_saved_rank``)."""
    assert allocate_ranks(LLAMA_7B, 0.2) == {"q": 1228, "k": 1228, "v": None, "o": None}
    assert allocate_ranks(LLAMA_7B, 0.5) == {"q": 512, "k": 512, "v": 1536, "o": 1536}
    # Only narrow windows of s give these figures (floors of budgets / 8192) ...
    assert allocate_ranks(LLAMA_7B, 0.2003)["q"] == 1227 and allocate_ranks(LLAMA_7B, 0.1999)["q"] == 1229
    assert allocate_ranks(LLAMA_7B, 0.4996)["v"] == 1537
    # ... and s = ratio applied per layer removes less of the *total* (embeddings are kept),
    assert achieved_ratio_at(LLAMA_7B, 0.2) == pytest.approx(0.1922, abs=1e-4)
    assert achieved_ratio_at(LLAMA_7B, 0.5) == pytest.approx(0.4805, abs=1e-4)
    # so under the ratio contract --ratio 0.2 solves to s ≈ 0.208 (Q/K rank 1195).
    s = solve_fraction(LLAMA_7B, 0.2)
    assert 0.207 < s < 0.209 and allocate_ranks(LLAMA_7B, s) == {"q": 1195, "k": 1195, "v": None, "o": None}


@pytest.mark.parametrize("s", [0.05, 0.2, 0.33, 0.4, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("shapes", [LLAMA_7B, SMOLLM2], ids=["llama7b", "smollm2"])
def test_rank_budgets(shapes, s):
    """Each factor pair fits its budget; the split is 3:1 (V/O : Q/K) unless V/O are capped dense."""
    spec = shapes.dense_spec()
    dims = {p: spec.proj_shape(p) for p in "qkvo"}
    size = {p: m * n for p, (m, n) in dims.items()}
    R = (1 - s) * sum(size.values())
    ranks = allocate_ranks(shapes, s)
    kept = {p: size[p] if r is None else r * sum(dims[p]) for p, r in ranks.items()}
    assert all(r is None or 1 <= r and r * sum(dims[p]) < size[p] for p, r in ranks.items())
    assert sum(kept.values()) <= R
    slack = sum(sum(d) for d in dims.values())  # at most one rank step lost per matrix
    assert sum(kept.values()) > R - slack
    if ranks["v"] is None:  # capped: V/O dense, Q/K share the remainder
        assert ranks["o"] is None and ranks["q"] is not None
    else:
        assert kept["v"] + kept["o"] == pytest.approx(3 * (kept["q"] + kept["k"]), abs=3 * slack)
        # inside a pair the budget follows matrix size (GQA: k/v smaller than q/o)
        assert kept["k"] / kept["q"] == pytest.approx(size["k"] / size["q"], abs=0.05)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("shapes", [LLAMA_7B, SMOLLM2], ids=["llama7b", "smollm2"])
def test_planned_ratio_within_1pp(shapes, ratio):
    method = build_method("lorap", ratio)
    method.plan(shapes)
    specs = method.planned_specs(shapes)
    assert len(specs) == shapes.num_layers and len(set(specs)) == 1
    assert abs(shapes.achieved_ratio(specs) - ratio) <= 0.01
    f = shapes.intermediate_size
    assert specs[0].intermediate_size == f - math.floor(method.s * f)  # same s in attention and FFN


def test_ratio_zero_is_dense_and_unreachable_ratio_names_range():
    assert layer_spec(SMOLLM2, solve_fraction(SMOLLM2, 0.0)) == SMOLLM2.dense_spec()
    with pytest.raises(RatioError, match=r"reachable range \[0, 0\.7"):
        build_method("lorap", 0.9).plan(SMOLLM2)


def test_config_validation_names_bad_value():
    with pytest.raises(ValueError, match=r"LoRAPConfig\.a .*got 0"):
        LoRAPConfig(a=0)
    with pytest.raises(ValueError, match=r"svd_solver.*'qr'"):
        LoRAPConfig(svd_solver="qr")
    with pytest.raises(ConfigError, match="keep_least_frac"):
        build_method("lorap", 0.2, {"keep_least_frac": 0.7})


# ---- numerics ---------------------------------------------------------------------------------


def test_awsvd_beats_plain_svd_on_skewed_energies():
    """Activation-weighted error ‖X(W − Ŵ)ᵀ‖ of AWSVD < plain SVD's; AWSVD is optimal in ‖(W−Ŵ)D‖."""
    g = torch.Generator().manual_seed(0)
    m, n, rank, tokens = 48, 96, 12, 4096
    scale = torch.exp(2.0 * torch.randn(n, generator=g))  # input columns spanning ~e^±6
    x = torch.randn(tokens, n, generator=g) * scale  # (tokens, n)
    w = torch.randn(m, n, generator=g) / math.sqrt(n)
    e = x.square().sum(0)  # (n,) input energy
    up, down = awsvd(w, e, rank, solver="full")
    U, S, Vh = truncated_svd(w, rank, solver="full")
    w_svd = (U * S) @ Vh
    err = lambda w_hat: torch.linalg.norm(x @ (w - w_hat).T).item()  # noqa: E731
    assert err(up @ down) < 0.5 * err(w_svd)
    # Eckart–Young in the weighted norm: the residual is the tail of WD's spectrum
    d = e.sqrt().double()
    tail = torch.linalg.svdvals(w.double() * d)[rank:].square().sum().sqrt()
    assert torch.linalg.norm((w.double() - (up @ down).double()) * d) == pytest.approx(tail.item(), rel=1e-4)
    # balance "sqrt": up = U S^½ and down D = S^½ Vᵀ carry the same singular values
    sv = torch.linalg.svdvals((w.double() * d))[:rank]
    torch.testing.assert_close(up.double().T @ up.double(), torch.diag(sv), rtol=1e-4, atol=1e-4 * sv[0].item())
    dd = down.double() * d
    torch.testing.assert_close(dd @ dd.T, torch.diag(sv), rtol=1e-4, atol=1e-4 * sv[0].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ffn_channel_scores_against_float64(dtype):
    g = torch.Generator().manual_seed(1)
    f, d = 40, 24
    gate, up = torch.randn(f, d, generator=g).to(dtype), torch.randn(f, d, generator=g).to(dtype)
    down = torch.randn(d, f, generator=g).to(dtype)
    ex, eh = torch.rand(d, generator=g) * 10, torch.rand(f, generator=g) * 10
    sx = ex.double().sqrt()
    ref = ((up.double().abs() * sx).norm(dim=1) + (gate.double().abs() * sx).norm(dim=1)
           + eh.double().sqrt() * down.double().norm(dim=0))
    got = ffn_channel_scores(gate, up, down, ex, eh)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)


def test_select_channels_keeps_least_then_prunes_next():
    f = 250  # keep_least_frac 0.01 -> floor(2.5) = 2 least kept
    perm = torch.randperm(f, generator=torch.Generator().manual_seed(2))
    scores = torch.empty(f)
    scores[perm] = torch.arange(f, dtype=torch.float32)  # channel perm[k] has the k-th lowest score
    kept = select_channels(scores, 50)
    assert kept.tolist() == sorted(kept.tolist()) and kept.numel() == f - 50
    assert set(kept.tolist()) == set(range(f)) - set(perm[2:52].tolist())
    ties = select_channels(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), 2, keep_least_frac=0.0)
    assert ties.tolist() == [0, 2, 3]  # stable sort: the tied lowest (1, 4) go first, in index order
    with pytest.raises(ValueError, match="n_prune"):
        select_channels(scores, f - 1)


# ---- end to end on tiny GQA models --------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_end_to_end(tiny_model, tmp_path, ratio):
    """Achieved ratio, streamed == in-memory, and the output loads (local class and remote code).

    Tolerance: the engine accumulates energies chunk by chunk (3 windows at a time) and runs
    layers per chunk, the reference all at once; fp32 summation order moves the factors by
    ~1e-4 of their largest entry (measured ≤ 1.5e-4), so factors are compared at 1e-3 of
    their max and the products up·down at 2e-4. Channel selection and every tensor that is
    sliced or copied (FFN, norms, dense V/O, biases) must agree exactly.
    """
    out = tmp_path / "out"
    report = prune(PruneConfig(source=tiny_model, out=out, method="lorap", ratio=ratio, **CALIB))
    assert abs(report["achieved_ratio"] - ratio) <= 0.01
    tokens = _tokens(tiny_model)
    method = build_method("lorap", ratio)
    method.plan(open_model(tiny_model).shapes())
    decisions = prune_in_memory(tiny_model, method, tokens)
    streamed = _output_tensors(out)
    for i, d in enumerate(decisions):
        layer = {n[len(f"model.layers.{i}."):]: t for n, t in streamed.items() if n.startswith(f"model.layers.{i}.")}
        assert set(layer) == set(d.tensors)
        for name, ref in d.tensors.items():
            if name.endswith((".up.weight", ".down.weight")):
                torch.testing.assert_close(layer[name], ref, rtol=0, atol=1e-3 * ref.abs().max().item())
            else:
                torch.testing.assert_close(layer[name], ref, rtol=0, atol=0)
        for p in "qkvo":
            if d.spec.rank(p) is not None:
                pre = f"self_attn.{p}_proj"
                ref = d.tensors[f"{pre}.up.weight"] @ d.tensors[f"{pre}.down.weight"]
                got = layer[f"{pre}.up.weight"] @ layer[f"{pre}.down.weight"]
                torch.testing.assert_close(got, ref, rtol=0, atol=2e-4 * ref.abs().max().item())
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    local = load_pruned(out).eval()
    assert type(remote).__name__ == "StreamPruneForCausalLM"
    torch.testing.assert_close(logits_of(remote, tokens[:2]), logits_of(local, tokens[:2]), rtol=0, atol=0)


def test_resume_is_byte_identical(tiny_qwen2, tmp_path, monkeypatch):
    """Interrupted after layer 1's decision, then rerun: same bytes as an uninterrupted run."""
    cfg = dict(source=tiny_qwen2, method="lorap", ratio=0.3, **CALIB)
    prune(PruneConfig(out=tmp_path / "out1", **cfg))

    real_decide = lorap_mod.LoRAP.decide

    def decide_then_crash(self, layer_idx, weights, observer):
        if layer_idx == 2:  # layers 0 and 1 are decided, written and committed
            raise KeyboardInterrupt("simulated kill")
        return real_decide(self, layer_idx, weights, observer)

    monkeypatch.setattr(lorap_mod.LoRAP, "decide", decide_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prune(PruneConfig(out=tmp_path / "out2", **cfg))
    monkeypatch.setattr(lorap_mod.LoRAP, "decide", real_decide)
    resumed = prune(PruneConfig(out=tmp_path / "out2", **cfg))
    assert resumed["resumed_from_layer"] == 2

    # every output file sha256-equal; the report compared without its volatile "run" block
    assert digests(tmp_path / "out1") == digests(tmp_path / "out2")
