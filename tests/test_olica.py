"""Olica: unit tests on tiny random GQA Llama layers driven by hand, then end to end.

Run: ``. .venv/bin/activate && python -m pytest tests/test_olica.py -q`` (~40 s on 2 CPU
cores; the end-to-end part alone, ``-k e2e``, ~30 s).

Unit part: the method is driven the way the engine drives it: forward hooks on the
``transformers`` ``LlamaDecoderLayer`` modules call ``observer.update(tap, x_in, y_out)``
with (tokens, features) tensors; survey → plan → per layer pass A, decide, pass B (the
dense layer again), refine, and the next layer's inputs come from the *pruned* layer,
computed by a small reference forward of a :class:`LayerSpec` + tensors (below).

End-to-end part (bottom): ``streamprune.prune`` on the tiny checkpoints of
``tests/conftest.py`` against ``tests/reference.py``'s in-memory pruner; loading the
output (``load_pruned`` and remote code); the ratio contract; resume without a second survey.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding, apply_rotary_pos_emb

from reference import logits_of, prune_in_memory
from streamprune import PruneConfig, load_pruned, prune
from streamprune.storage import writer
from streamprune.adapters import open_model
from streamprune.errors import RatioError
from streamprune.run.journal import RunDir
from streamprune.kernels.svd import weighted_svd
from streamprune.kernels.reference import linear_fit_pearson_ref
from streamprune.methods import build_method
from streamprune.methods.channels import select_channels
from streamprune.methods.olica import (
    Olica,
    OlicaConfig,
    lc_lambda,
    linear_calibration,
    pruned_channels,
)
from streamprune.methods.olica.attention import exact_ond_transform, fast_ond_rotation
from streamprune.methods.olica.budget import awsvd_rank, budget_split, pick_lc_layers, sr_allocation
from streamprune.shapes import ModelShapes
from streamprune.spec import LayerSpec
from streamprune.inputs.textdata import calibration_windows, resolve_text_source
from test_engine import _engine_logits, _output_tensors
from test_resume import digests
from tiny import real_shapes

SMOLLM2, LLAMA2_70B = real_shapes()["smollm2"], real_shapes()["llama-2-70b"]


# ---- tiny model harness -----------------------------------------------------------------------


def tiny_config(L=4, d=64, H=8, G=2, f=128, bias=False) -> LlamaConfig:
    cfg = LlamaConfig(hidden_size=d, intermediate_size=f, num_attention_heads=H, num_key_value_heads=G,
                      num_hidden_layers=L, vocab_size=256, attention_bias=bias, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return cfg


def shapes_of(cfg: LlamaConfig) -> ModelShapes:
    return ModelShapes(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                       cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings,
                       qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias)


def make_layer(cfg: LlamaConfig, idx: int, seed: int) -> LlamaDecoderLayer:
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(cfg, idx).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return layer


def calib_inputs(cfg: LlamaConfig, n=4, T=32, seed=0) -> torch.Tensor:
    """Hidden states with a strong shared mean direction, like real residual streams."""
    g = torch.Generator().manual_seed(seed)
    mean = 2.0 * torch.randn(cfg.hidden_size, generator=g)
    return mean + torch.randn(n, T, cfg.hidden_size, generator=g)


def rope(cfg, x):
    pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return LlamaRotaryEmbedding(cfg)(x, pos)


def run_layer(layer, cfg, x):
    with torch.no_grad():
        out = layer(x, position_embeddings=rope(cfg, x))
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def hooked(layer: LlamaDecoderLayer, observer):
    mods = {"q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
            "o_proj": layer.self_attn.o_proj, "gate_proj": layer.mlp.gate_proj, "up_proj": layer.mlp.up_proj,
            "down_proj": layer.mlp.down_proj, "mlp": layer.mlp, "layer": layer}
    handles = []
    for tap in observer.taps:
        def hook(_mod, args, out, tap=tap):
            x, y = args[0], out[0] if isinstance(out, tuple) else out
            observer.update(tap, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        handles.append(mods[tap].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def observe(layer, cfg, x, observer):
    if observer is not None:
        with hooked(layer, observer):
            for i in range(x.shape[0]):  # one chunk per sample, like the engine
                run_layer(layer, cfg, x[i:i + 1])
    return observer


def dense_weights(layer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def _lin(t, prefix, z, rank):
    if rank is None:
        y = z @ t[f"{prefix}.weight"].T
        b = t.get(f"{prefix}.bias")
    else:
        y = (z @ t[f"{prefix}.down.weight"].T) @ t[f"{prefix}.up.weight"].T
        b = t.get(f"{prefix}.up.bias")
    return y if b is None else y + b


def ffn_forward(spec, t, z):
    y = _lin(t, "mlp.down_proj", F.silu(_lin(t, "mlp.gate_proj", z, None)) * _lin(t, "mlp.up_proj", z, None), None)
    if spec.bypass_rank:
        y = y + (z @ t["mlp.bypass.down.weight"].T) @ t["mlp.bypass.up.weight"].T
    return y


def pruned_forward(spec, t, x, cfg):
    """Reference forward of a pruned layer (spec + tensors), no mask, like the dense harness."""
    B, T, _ = x.shape
    G, hpg, h, hv = spec.num_kv_heads, spec.heads_per_group, spec.head_dim, spec.v_head_dim
    z = _rms(x, t["input_layernorm.weight"], cfg.rms_norm_eps)
    q = _lin(t, "self_attn.q_proj", z, spec.q_rank).view(B, T, G * hpg, h).transpose(1, 2)
    k = _lin(t, "self_attn.k_proj", z, spec.k_rank).view(B, T, G, h).transpose(1, 2)
    v = _lin(t, "self_attn.v_proj", z, spec.v_rank).view(B, T, G, hv).transpose(1, 2)
    cos, sin = rope(cfg, x)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = k.repeat_interleave(hpg, dim=1), v.repeat_interleave(hpg, dim=1)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h), dim=-1) @ v  # (B, H, T, hv)
    x = x + _lin(t, "self_attn.o_proj", a.transpose(1, 2).reshape(B, T, -1), spec.o_rank)
    return x + ffn_forward(spec, t, _rms(x, t["post_attention_layernorm.weight"], cfg.rms_norm_eps))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def survey(method, layers, cfg, x):
    out = []
    for i, layer in enumerate(layers):
        obs = observe(layer, cfg, x, method.survey_observer(i, dense_weights(layer)))
        out.append(method.survey_result(i, obs))
        x = run_layer(layer, cfg, x)
    return out


def prune_layer(method, i, layer, cfg, x):
    """Pass A, decide, pass B, refine for layer i. Returns (decision before refine, after refine)."""
    w = dense_weights(layer)
    decision = method.decide(i, w, observe(layer, cfg, x, method.observer(i, "A", w)))
    obs_b = method.observer(i, "B", decision.tensors)
    assert method.pass_b_layer == "dense"
    observe(layer, cfg, x, obs_b)  # pass B re-runs the dense layer
    return decision, method.refine(i, decision, obs_b)


# ---- budget -----------------------------------------------------------------------------------


def test_sr_allocation_official_rule():
    assert sr_allocation(0.2, 3) == pytest.approx((0.4, 0.1))
    assert sr_allocation(0.5, 3) == pytest.approx((0.75, 0.25))


def test_awsvd_rank_uses_each_matrix_shape():
    assert awsvd_rank(576, 576, 0.4) == math.floor(0.6 * 576 / 2)
    assert awsvd_rank(192, 576, 0.4) == 86  # SmolLM2 k_proj under GQA: floor(0.6·192·576/768)


def test_budget_split_formula_on_square_mha():
    shapes = ModelShapes(2, 8, 16, 2, 2, 4, 10, True)  # q,k,v,o all 8×8; ranks 4·8·... exact at these s
    s_qk, s_vo, s_mlp = budget_split(shapes, 0.25, 3, 0)
    # q/k: r = floor(0.5·64/16) = 2 → 32 params each (was 64); v/o: h_v = 4 − floor(0.125·4) = 4
    removed_attn = 2 * (2 * 32)
    want = (0.25 * shapes.total_params() - removed_attn) / (2 * 3 * 8 * 16)
    assert (s_qk, s_vo) == pytest.approx((0.5, 0.125)) and s_mlp == pytest.approx(want)


@pytest.mark.parametrize("shapes", [SMOLLM2, LLAMA2_70B], ids=["smollm2", "llama2-70b"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_planned_specs_hit_ratio(shapes, ratio):
    method = Olica(OlicaConfig(), ratio)
    method.plan(shapes)
    specs = method.planned_specs(shapes)
    assert abs(shapes.achieved_ratio(specs) - ratio) < 0.01
    assert sum(s.bypass_rank > 0 for s in specs) == 6
    assert all(s.v_head_dim == shapes.head_dim - math.floor(method.knobs.s_vo * shapes.head_dim) for s in specs)


def test_unreachable_ratio_names_ratio_and_range():
    method = Olica(OlicaConfig(), 0.9)
    with pytest.raises(RatioError, match=r"--ratio 0\.9 .*Reachable ratios .*\[0\.\d+, 0\.\d+\]"):
        method.plan(SMOLLM2)


@pytest.mark.parametrize("kw", [{"k": 0}, {"mlp_num": -1}, {"lc_rank_ratio": 1.5}, {"percdamp": -1.0},
                                {"keep_least_frac": 0.5}, {"svd_solver": "magic"}])
def test_config_rejects_bad_values(kw):
    (name, value), = kw.items()
    with pytest.raises(ValueError, match=rf"OlicaConfig\.{name} .*got {value!r}"):
        OlicaConfig(**kw)


def test_lc_layers_never_the_last():
    assert pick_lc_layers([0.5, 0.1, 0.3, 0.0], 2) == (1, 2)


def test_ffn_selection_keeps_least_important():
    scores = torch.tensor([5.0, 0.0, 3.0, 1.0, 4.0, 2.0])
    kept = select_channels(scores, 2, keep_least_frac=1 / 6)  # keep the lowest 1, prune the next 2
    assert kept.tolist() == [0, 1, 2, 4] and pruned_channels(kept, 6).tolist() == [3, 5]


# ---- numerics ---------------------------------------------------------------------------------


def test_awsvd_full_rank_reproduces_matrix():
    torch.manual_seed(0)
    w = torch.randn(12, 20)
    e = torch.rand(20) * 10
    up, down = weighted_svd(w, e.sqrt(), 12, balance="left")
    assert rel(up @ down, w) < 1e-5


@pytest.mark.parametrize("G", [2, 8], ids=["gqa", "mha"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_ond_rotation_leaves_layer_output_unchanged(G, bias, exact):
    cfg = tiny_config(G=G, bias=bias)
    layer = make_layer(cfg, 0, seed=1)
    x = calib_inputs(cfg, n=2, T=16)
    ref = run_layer(layer, cfg, x)
    eo = torch.zeros(cfg.hidden_size)
    h = layer.self_attn.o_proj.register_forward_hook(lambda m, a, y: eo.add_(y.reshape(-1, y.shape[-1]).square().sum(0)))
    run_layer(layer, cfg, x)
    h.remove()
    hpg, hd = cfg.num_attention_heads // G, cfg.head_dim
    sd = dense_weights(layer)
    fn = exact_ond_transform if exact else fast_ond_rotation
    wv, wo, T = fn(sd["self_attn.v_proj.weight"], sd["self_attn.o_proj.weight"], eo, hpg, hd)
    if not exact:
        assert torch.allclose(T @ T.transpose(1, 2), torch.eye(hd).expand(G, hd, hd), atol=1e-5)
    sd["self_attn.v_proj.weight"], sd["self_attn.o_proj.weight"] = wv, wo
    if bias:
        sd["self_attn.v_proj.bias"] = (sd["self_attn.v_proj.bias"].reshape(G, 1, hd) @ T).reshape(-1)
    rotated = make_layer(cfg, 0, seed=1)
    rotated.load_state_dict(sd)
    assert rel(run_layer(rotated, cfg, x), ref) < (1e-4 if exact else 1e-5)


def test_lc_ridge_from_moments_matches_closed_form_float64():
    torch.manual_seed(0)
    n, d = 600, 16
    X = (torch.randn(n, d) * torch.linspace(0.5, 3, d) + 1.0).double()
    E = X @ torch.randn(d, d).double() * 0.3 + torch.randn(n, d).double()
    xtx, xte = X.T @ X, X.T @ E
    percdamp = 0.7
    lam = lc_lambda(xtx, percdamp, n)
    assert lam == pytest.approx(percdamp * float(xtx.diagonal().mean()) / ((n / 128) * (1 / 128)))
    fit = linear_calibration(n, X.sum(0), xtx, xte, E.sum(0), E.square().sum(0), percdamp, rank=d)
    closed = torch.linalg.solve(xtx + lam * torch.eye(d, dtype=torch.float64), xte)
    assert rel(fit.W.double(), closed) < 1e-5
    assert torch.allclose(fit.rho.double(), linear_fit_pearson_ref(X, E, closed), atol=1e-5)
    assert rel((fit.A @ fit.B).double(), closed) < 1e-4  # full rank: the bypass is the ridge map


# ---- the method, end to end on a tiny model -----------------------------------------------------


def _tiny_run(bias=False, ratio=0.3, L=4, **options):
    """A 4-layer GQA model, surveyed and planned. 512 calibration tokens: percdamp 0.05 gives
    λ ≈ 1.6·mean(diag XᵀX), the regime of the default 1.0 at 256×128 tokens (0.5·mean)."""
    cfg = tiny_config(L=L, bias=bias)
    layers = [make_layer(cfg, i, seed=10 + i) for i in range(L)]
    x = calib_inputs(cfg, n=8, T=64)
    method = Olica(OlicaConfig(mlp_num=2, lc_rank_ratio=0.25, percdamp=0.05, **options), ratio)
    shapes = shapes_of(cfg)
    method.plan(shapes)  # dry run: from shapes alone
    dry = method.planned_specs(shapes)
    method.plan(shapes, survey(method, layers, cfg, x))
    return cfg, layers, x, method, shapes, dry


@pytest.mark.parametrize("bias,exact", [(False, False), (True, False), (False, True)],
                         ids=["llama", "qkv-bias", "exact-ond"])
def test_decisions_match_planned_specs(bias, exact):
    cfg, layers, x, method, shapes, dry = _tiny_run(bias=bias, exact_ond=exact)
    specs = method.planned_specs(shapes)
    assert shapes.achieved_ratio(specs) == pytest.approx(shapes.achieved_ratio(dry))
    assert len(method.knobs.lc_layers) == 2 and cfg.num_hidden_layers - 1 not in method.knobs.lc_layers
    for i, layer in enumerate(layers):
        before, after = prune_layer(method, i, layer, cfg, x)
        for dec in (before, after):
            dec.validate(i)
            assert dec.spec == specs[i]
        dense_out = run_layer(layer, cfg, x)
        pruned_out = pruned_forward(after.spec, after.tensors, x, cfg)
        # lossy at 30 %, but the block's contribution (output − input) is still close
        assert rel(pruned_out - x, dense_out - x) < 0.2
        x = pruned_out  # sequential: the next layer sees the pruned stream


def test_lc_reduces_ffn_residual_on_calibration_data():
    cfg, layers, x, method, shapes, _ = _tiny_run()
    lc_layers = method.knobs.lc_layers
    for i, layer in enumerate(layers):
        before, after = prune_layer(method, i, layer, cfg, x)
        if i in lc_layers:
            xs = []  # X: the dense layer's MLP input on the pruned stream (what LC fits)
            h = layer.mlp.register_forward_hook(lambda m, a, y: xs.append(a[0].reshape(-1, a[0].shape[-1])))
            run_layer(layer, cfg, x)
            h.remove()
            X = torch.cat(xs)
            dense = layer.mlp(X).detach()
            err_before = (ffn_forward(before.spec, before.tensors, X) - dense).square().sum()
            err_after = (ffn_forward(after.spec, after.tensors, X) - dense).square().sum()
            assert float(err_after) < 0.6 * float(err_before), (i, float(err_after / err_before))
            assert after.tensors["mlp.bypass.up.weight"].abs().sum() > 0
        x = pruned_forward(after.spec, after.tensors, x, cfg)


def test_survey_without_lc_layers_skips_the_linearity_moments():
    """mlp_num=0: no LC layer to choose, so the survey keeps only the o_proj energy (the two
    d x d moments per token would go unused) and plans the same specs as a full survey."""
    cfg = tiny_config(L=3)
    layers = [make_layer(cfg, i, seed=10 + i) for i in range(3)]
    x = calib_inputs(cfg, n=4, T=32)
    shapes = shapes_of(cfg)
    method = Olica(OlicaConfig(mlp_num=0), 0.3)
    observer = method.survey_observer(0, dense_weights(layers[0]))
    assert not observer.moments
    result = survey(method, layers, cfg, x)
    assert all(set(r) == {"o_out_energy"} for r in result)
    method.plan(shapes, result)
    full = Olica(OlicaConfig(mlp_num=0), 0.3)
    full.plan(shapes, [{**r, "linearity": torch.tensor(0.5)} for r in result])
    assert method.planned_specs(shapes) == full.planned_specs(shapes) and method.knobs.lc_layers == ()


def test_survey_result_is_small_cpu_tensors():
    cfg, layers, x, method, shapes, _ = _tiny_run(L=2)
    res = method._survey[0]
    assert res["linearity"].shape == () and res["o_out_energy"].shape == (cfg.hidden_size,)
    assert res["o_out_energy"].device.type == "cpu"


def test_pruned_forward_harness_matches_transformers():
    cfg = tiny_config(bias=True)
    layer = make_layer(cfg, 0, seed=3)
    x = calib_inputs(cfg, n=2, T=8)
    spec = shapes_of(cfg).dense_spec()
    assert rel(pruned_forward(spec, dense_weights(layer), x, cfg), run_layer(layer, cfg, x)) < 1e-5


# ---- end to end: the streaming engine on tiny checkpoints (tests/conftest.py) -----------------------
# 4 layers, d 64, f 128, 4 query / 2 KV heads; Qwen2 adds q/k/v bias and tied embeddings. Real c4
# calibration text. LC on 2 of the 4 layers with an 8-wide bypass (floor(0.125·64)).

E2E_OPTS = {"mlp_num": 2, "lc_rank_ratio": 0.125, "percdamp": 0.05}
E2E = dict(calib="c4", nsamples=16, seqlen=32, seed=0, chunk_tokens=160, progress=False)  # 5 rows a chunk: 4 chunks
# Streamed (chunked fp32 statistics, chunked propagation) vs in-memory (one batch, sdpa): measured
# ‖Δ‖/‖ref‖ ≤ 6e-5 per tensor after 4 sequential layers; plain slices and copies are bit-equal.
E2E_REL_TOL = 5e-4
_EXACT = ("layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "up.bias")


def _e2e_tokens(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return calibration_windows(tok, resolve_text_source(E2E["calib"]), E2E["nsamples"], E2E["seqlen"], E2E["seed"])


def _specs_of(out) -> list[LayerSpec]:
    return [LayerSpec.from_dict(d) for d in json.loads((out / "config.json").read_text())["layer_specs"]]


@pytest.fixture(scope="module")
def olica_runs(tiny_llama, tiny_qwen2, tmp_path_factory):
    """``get(arch)``: one streamed Olica run at ratio 0.3 per architecture (work dir kept), made once."""
    runs = {}

    def get(arch: str) -> SimpleNamespace:
        if arch not in runs:
            source = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
            out = tmp_path_factory.mktemp(f"olica_{arch}") / "out"
            cfg = PruneConfig(source=source, out=out, method="olica", ratio=0.3, method_options=E2E_OPTS, **E2E)
            report = prune(replace(cfg, keep_work=True))
            runs[arch] = SimpleNamespace(cfg=cfg, source=source, out=out, work=cfg.run_dir, report=report)
        return runs[arch]

    return get


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_e2e_streamed_equals_in_memory(olica_runs, arch):
    run = olica_runs(arch)
    shapes = open_model(run.source).shapes()
    method = build_method("olica", 0.3, E2E_OPTS)
    decisions = prune_in_memory(run.source, method, _e2e_tokens(run.source))
    specs = _specs_of(run.out)
    assert specs == [d.spec for d in decisions] == method.planned_specs(shapes)
    lc = tuple(i for i, s in enumerate(specs) if s.bypass_rank)
    assert lc == method.knobs.lc_layers and len(lc) == 2 and all(d.info["lc"] == (i in lc) for i, d in enumerate(decisions))

    run_dir = RunDir(run.work)  # the journaled survey: same numbers, same LC layer choice
    survey = run_dir.load_survey(run_dir.records(), shapes.num_layers)
    for mine, ref in zip(survey, method._survey):
        assert float(mine["linearity"]) == pytest.approx(float(ref["linearity"]), rel=1e-4)
        assert rel(mine["o_out_energy"], ref["o_out_energy"]) < E2E_REL_TOL

    streamed = _output_tensors(run.out)
    for i, d in enumerate(decisions):
        assert {k for k in streamed if k.startswith(f"model.layers.{i}.")} == {f"model.layers.{i}.{k}" for k in d.tensors}
        for name, ref in d.tensors.items():
            got = streamed[f"model.layers.{i}.{name}"]
            if name.endswith(_EXACT):  # copies and channel slices: the same channels were kept
                assert torch.equal(got, ref), (i, name)
            else:
                assert rel(got, ref) < E2E_REL_TOL, (i, name, rel(got, ref))
            if name.startswith("mlp.bypass"):
                assert ref.abs().sum() > 0, (i, "LC bypass left at zero")


# Loads through remote code in a fresh interpreter with streamprune never imported (in process,
# a register()ed local class would shadow the remote one); see tests/test_modeling.py.
_REMOTE_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
args = sys.argv[1:]
for out, ids, dest in zip(args[0::3], args[1::3], args[2::3]):
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    assert type(model).__name__ == "StreamPruneForCausalLM", type(model)
    with torch.no_grad():
        torch.save(model.eval()(torch.load(ids)).logits.float(), dest)
assert not [m for m in sys.modules if m.split(".")[0] == "streamprune"]
"""


def test_e2e_output_loads_and_matches_engine_propagation(olica_runs, tmp_path):
    args, want = [], {}
    for arch in ("llama", "qwen2"):
        run = olica_runs(arch)
        tokens = _e2e_tokens(run.source)
        logits = logits_of(load_pruned(run.out).eval(), tokens)
        # the loaded model's logits == the engine's own propagation (last boundary + norm + head)
        torch.testing.assert_close(logits, _engine_logits(run.work, run.out, tokens), rtol=1e-4, atol=1e-4)
        want[arch] = logits[:2]
        torch.save(tokens[:2], tmp_path / f"{arch}_ids.pt")
        args += [run.out, tmp_path / f"{arch}_ids.pt", tmp_path / f"{arch}_logits.pt"]

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, *map(str, args)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # cwd: not the repo root (its kernels/)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for word in ("MISSING", "UNEXPECTED", "MISMATCH", "not initialized"):  # transformers' load report
        assert word not in proc.stderr, proc.stderr[-4000:]
    for arch, logits in want.items():  # same module code, same weights: equal up to kernel noise
        torch.testing.assert_close(torch.load(tmp_path / f"{arch}_logits.pt"), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_e2e_achieved_ratio_within_one_point(tiny_llama, tmp_path, ratio):
    """Default Olica options (LC on 3 layers, rank floor(0.03·64) = 1); the report states the exact figure."""
    out = tmp_path / "out"
    report = prune(PruneConfig(source=tiny_llama, out=out, method="olica", ratio=ratio, **{**E2E, "nsamples": 8}))
    shapes = open_model(tiny_llama).shapes()
    specs = _specs_of(out)
    assert report["achieved_ratio"] == shapes.achieved_ratio(specs)
    assert abs(report["achieved_ratio"] - ratio) <= 0.01
    assert sum(s.bypass_rank > 0 for s in specs) == 3 and specs[-1].bypass_rank == 0


class _Interrupted(Exception):
    pass


def test_e2e_resume_skips_survey_and_is_byte_identical(olica_runs, tmp_path, monkeypatch):
    baseline = olica_runs("llama")  # uninterrupted, same fingerprint (keep_work is not part of it)
    cfg = replace(baseline.cfg, out=tmp_path / "out")
    surveyed: list[int] = []
    real_survey_observer, real_save_layer = Olica.survey_observer, writer.save_layer

    def spy(self, layer_idx, weights):
        surveyed.append(layer_idx)
        return real_survey_observer(self, layer_idx, weights)

    def fail_on_layer_2(staging, i, tensors, dtype):
        if i == 2:
            raise _Interrupted("injected: stop while writing layer 2 (layers 0 and 1 are committed)")
        return real_save_layer(staging, i, tensors, dtype)

    monkeypatch.setattr(Olica, "survey_observer", spy)
    monkeypatch.setattr(writer, "save_layer", fail_on_layer_2)
    with pytest.raises(_Interrupted):
        prune(cfg)
    assert surveyed == [0, 1, 2, 3] and not cfg.out.exists()
    assert sorted(RunDir(cfg.run_dir).committed_layers(RunDir(cfg.run_dir).records())) == [0, 1]

    monkeypatch.setattr(writer, "save_layer", real_save_layer)
    surveyed.clear()
    report = prune(cfg)
    assert surveyed == [] and report["resumed_from_layer"] == 2  # the journaled survey was reused
    assert digests(cfg.out) == digests(baseline.out)


def test_lc_residual_ratio_from_moments_equals_explicit():
    from streamprune.methods.olica import residual_ratio

    g = torch.Generator().manual_seed(0)
    X, E, M = torch.randn(200, 6, generator=g), torch.randn(200, 6, generator=g), torch.randn(6, 6, generator=g) * 0.1
    explicit = ((E - X @ M).square().sum() / E.square().sum()).item()
    assert abs(residual_ratio(X.T @ X, X.T @ E, E.square().sum(0), M) - explicit) < 1e-5
