"""cascade (ours): base selection + block-wise gradient reconstruction.

Run: ``.venv/bin/pytest tests/test_cascade.py -q``. Unit part on tiny random GQA layers
(reconstruction recovers a perturbed layer, never returns a worse one, is deterministic);
the ratio contract from shapes (SmolLM2, LLaMA-2-70B); end to end on the tiny checkpoints:
streamed == in-memory, kill inside reconstruction + resume is byte-identical, loads.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from reference import prune_in_memory
from streamprune import PruneConfig, load_pruned, prune
from streamprune.adapters import open_model
from streamprune.run.journal import RunDir
from streamprune.methods import build_method
from streamprune.methods.cascade import Cascade, CascadeConfig
from streamprune.methods.cascade.reconstruct import ReconSettings, recon_loss, reconstruct_layer
from streamprune.methods.olica import Olica, OlicaConfig
from streamprune.stream import position_embeddings
from test_olica import LLAMA2_70B, SMOLLM2, _e2e_tokens, _specs_of, rel
from test_engine import _output_tensors
from test_resume import ARGS, digests, run_cli

E2E = dict(calib="c4", nsamples=16, seqlen=32, seed=0, chunk_tokens=160, progress=False)  # 5 rows a chunk
# float32 steps: streamed == in-memory is checked to fp32 rounding (bfloat16 steps round a 5-row
# chunk and a 12-row batch differently, and Adam amplifies it); bfloat16: the unit tests below
# and tests/test_distributed.py's engine run under torchrun (auto: bfloat16 on an AMX CPU).
E2E_OPTS = {"recon_epochs": 2, "recon_lr": 2e-4, "recon_batch_tokens": 64, "recon_val_rows": 4, "recon_precision": "float32"}


@pytest.mark.parametrize("kw", [{"base": "magic"}, {"base_mlp_num": -1}, {"recon": 1}, {"recon_epochs": -1},
                                {"recon_lr": 0}, {"recon_batch_tokens": 0}, {"recon_val_rows": -2}, {"recon_loss": "l1"},
                                {"attn_scale": -0.1}, {"attn_scale": 2.5}, {"recon_target": "global"},
                                {"recon_schedule": "linear"}, {"recon_precision": "float16"}, {"recon_min_gain": 1}, {"recon_min_gain": -0.1},
                                {"decide_on": "raw"}, {"selection": "best"}, {"obs_damp": 0}, {"obs_block": 0}])
def test_config_rejects_bad_values(kw):
    (name, value), = kw.items()
    with pytest.raises(ValueError, match=rf"CascadeConfig\.{name} .*got {value!r}"):
        CascadeConfig(**kw)


def test_obs_selection_refuses_a_base_it_cannot_replace():
    for kw in ({"base_mlp_num": 6}, {"base": "lorap", "allocation": "uniform"}):
        with pytest.raises(ValueError, match=r"CascadeConfig\.selection must be 'score' unless base=olica with base_mlp_num=0"):
            CascadeConfig(selection="obs", **kw)


@pytest.mark.parametrize("shapes", [SMOLLM2, LLAMA2_70B], ids=["smollm2", "llama2-70b"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_specs_are_the_base_methods_and_hit_ratio(shapes, ratio):
    method = build_method("cascade", ratio, {})
    method.plan(shapes)  # before the survey: the base's uniform plan (measured allocation comes with the survey)
    base = Olica(OlicaConfig(mlp_num=0), ratio)
    base.plan(shapes)
    specs = method.planned_specs(shapes)
    assert specs == base.planned_specs(shapes)
    assert abs(shapes.achieved_ratio(specs) - ratio) <= 0.01


@pytest.mark.parametrize("shapes", [SMOLLM2, LLAMA2_70B], ids=["smollm2", "llama2-70b"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.2])
def test_attn_scale_moves_the_cut_between_attention_and_ffn_at_equal_total(shapes, ratio, scale):
    specs = {}
    for a in (1.0, scale):
        method = build_method("cascade", ratio, {"attn_scale": a})
        method.plan(shapes)
        specs[a] = method.planned_specs(shapes)
    attn = {a: sum(s.num_params() - 3 * s.hidden_size * s.intermediate_size for s in sp) for a, sp in specs.items()}
    ffn = {a: sum(s.intermediate_size for s in sp) for a, sp in specs.items()}
    assert abs(shapes.achieved_ratio(specs[scale]) - ratio) <= 0.01  # the ratio contract holds at any split
    if scale < 1:
        assert attn[scale] > attn[1.0] and ffn[scale] < ffn[1.0]  # attention keeps more, the FFNs pay
    else:
        assert attn[scale] < attn[1.0] and ffn[scale] > ffn[1.0]
    if scale == 0:  # attention untouched: dense Q/K/V/O, full value heads
        dense = shapes.dense_spec()
        assert all(s.q_rank is None and s.k_rank is None and s.v_head_dim == dense.v_head_dim for s in specs[0.0])
        assert attn[0.0] == shapes.num_layers * (dense.num_params() - 3 * dense.hidden_size * dense.intermediate_size)


def test_attn_scale_zero_keeps_the_attention_bit_for_bit(tiny_llama, tmp_path):
    """Dense Q/K (rank None) are copied; V/O only go through Fast-OND's orthogonal rotation,
    so the attention block's output is the dense one's."""
    out = tmp_path / "out"
    opts = {"recon": False, "attn_scale": 0.0}
    prune(PruneConfig(source=tiny_llama, out=out, method="cascade", ratio=0.3, method_options=opts, **E2E))
    pruned, src = _output_tensors(out), open_model(tiny_llama).reader
    for i, spec in enumerate(_specs_of(out)):
        assert spec.q_rank is None and spec.k_rank is None
        for proj in ("q", "k"):
            name = f"model.layers.{i}.self_attn.{proj}_proj.weight"
            assert torch.equal(pruned[name], src.read([name])[name])
        wv, wo = (pruned[f"model.layers.{i}.self_attn.{p}_proj.weight"].double() for p in ("v", "o"))
        names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in ("v", "o")]
        wv0, wo0 = (t.double() for t in src.read(names).values())
        g = spec.heads_per_group  # per KV group, o's input columns (its query heads) multiply that group's v rows
        h = spec.head_dim
        for grp in range(spec.num_kv_heads):
            v, v0 = wv[grp * h:(grp + 1) * h], wv0[grp * h:(grp + 1) * h]
            for q in range(g):
                c = slice((grp * g + q) * h, (grp * g + q + 1) * h)
                assert rel(wo[:, c] @ v, wo0[:, c] @ v0) < 1e-5


def test_workspace_forecast_fits_a_24gb_card_at_70b():
    method = build_method("cascade", 0.2, {"selection": "score", "allocation": "measured"})  # Adam's peak (OBS's: the next test)
    method.plan(LLAMA2_70B)
    # 16 B/param Adam state + 2 B/param autocast's bf16 weight copies for the largest planned 70B
    # layer (0.69 G params at 20 %) + 512 tokens' activations (0.5 GiB, the default batch):
    # 12.1 GiB, next to a 1.6 GiB bf16 dense layer on a 24 GiB card
    largest = max(s.num_params() for s in method.planned_specs(LLAMA2_70B))
    assert 0.65e9 < largest < 0.72e9
    assert method.workspace_bytes(LLAMA2_70B) == 18 * largest + 512 * (12 * 8192 + 6 * 28672) * 4 < 13 * 2**30


def test_obs_workspace_and_compute_forecast_at_70b():
    from streamprune.methods.cascade.selection import obs_flop

    method = build_method("cascade", 0.2, {"selection": "obs", "allocation": "measured"})
    method.plan(LLAMA2_70B)
    f, d = 28672, 8192  # fp32 arithmetic: the Gram, its damped copy, Cholesky factor, inverse + 3 copies of down
    obs = 4 * f * f + 3 * f * f * 4 + 3 * d * f * 4 + 65 * (2 * f + d) * 4  # + the deferred downdates' buffers
    assert method.workspace_bytes(LLAMA2_70B) == obs < 15 * 2**30  # above reconstruction's 12.1 GiB: OBS is the peak
    specs = method.planned_specs(LLAMA2_70B)
    plain = build_method("cascade", 0.2, {"selection": "score", "allocation": "measured"})
    plain.plan(LLAMA2_70B)
    extra = method.extra_flop(LLAMA2_70B, specs, 256, 128) - plain.extra_flop(LLAMA2_70B, specs, 256, 128)
    assert extra == pytest.approx(sum(obs_flop(LLAMA2_70B, f - s.intermediate_size) for s in specs))
    assert 1e13 < extra / len(specs) < 1e14  # dominated by the f x f inverse: f³ = 2.4e13 per layer
    # allocation=obs: the survey's greedy curve (the inverse + cap rank-one steps) on the same workspace
    curve = build_method("cascade", 0.2, {"selection": "score"})  # allocation=obs: the default
    curve.plan(LLAMA2_70B)
    assert curve.workspace_bytes(LLAMA2_70B) == obs
    cap = int(0.8 * f)
    assert curve.extra_flop(LLAMA2_70B, specs, 256, 128) - plain.extra_flop(LLAMA2_70B, specs, 256, 128) == pytest.approx(
        len(specs) * (f ** 3 + cap * (2 * f * f + 4 * d * f + 2 * 64 * f)))


# ---- reconstruction on explicit activations -------------------------------------------------


def _layer_pair(tiny_llama, noise: float, seed: int = 0):
    adapter = open_model(tiny_llama)
    weights = adapter.read_layer(1)
    dense = adapter.build_layer(1, weights, "cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    perturbed = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v.clone()
                 for k, v in weights.items()}
    pruned = adapter.build_layer(1, perturbed, "cpu", torch.float32)
    pruned.tensors = lambda: pruned.inner.state_dict()
    x = torch.randn(24, 16, adapter.config.hidden_size, generator=g)
    pe = position_embeddings(adapter.rotary("cpu"), 16, "cpu", torch.float32)
    return dense, pruned, x, pe


def test_reconstruction_recovers_a_perturbed_layer(tiny_llama):
    dense, pruned, x, pe = _layer_pair(tiny_llama, noise=0.3)
    with torch.no_grad():
        before = float(recon_loss(pruned(x[-6:], pe), dense(x[-6:], pe), "rms"))
    r = reconstruct_layer(pruned, dense, lambda: iter(x.split(8)), pe, 24, ReconSettings(epochs=30, lr=3e-3, batch_tokens=64, val_rows=6), seed=0)
    with torch.no_grad():
        after = float(recon_loss(pruned(x[-6:], pe), dense(x[-6:], pe), "rms"))
    assert r.val_before == pytest.approx(before, rel=1e-5) and r.val_after == pytest.approx(after, rel=1e-5)
    assert after < 0.5 * before and r.best_epoch > 0 and r.steps == 30 * 5  # 18 train rows, 8-row chunks, 4-row batches
    assert len(r.history) == 31 and r.history[0] == r.val_before and min(r.history) == r.val_after == r.history[r.best_epoch]


@pytest.mark.parametrize("min_gain", [0.05, 0.3])
def test_reconstruction_stops_when_an_epoch_gains_too_little(tiny_llama, min_gain):
    """``min_gain``: every epoch but the last lowered the held-out loss by at least
    ``min_gain`` × the start; the last by less; no epoch after it ran."""
    dense, pruned, x, pe = _layer_pair(tiny_llama, noise=0.3)
    r = reconstruct_layer(pruned, dense, lambda: iter(x.split(8)), pe, 24,
                          ReconSettings(epochs=30, lr=3e-3, batch_tokens=64, val_rows=6, min_gain=min_gain), seed=0)
    gains = [a - b for a, b in zip(r.history, r.history[1:])]
    assert 1 <= len(gains) < 30 and r.steps == 5 * len(gains)
    assert all(g >= min_gain * r.val_before for g in gains[:-1]) and gains[-1] < min_gain * r.val_before
    assert r.val_after == min(r.history) < r.val_before


def test_reconstruction_never_returns_worse_weights(tiny_llama):
    dense, pruned, x, pe = _layer_pair(tiny_llama, noise=0.01)
    start = {k: v.clone() for k, v in pruned.tensors().items()}
    r = reconstruct_layer(pruned, dense, lambda: iter(x.split(8)), pe, 24, ReconSettings(epochs=2, lr=1.0, batch_tokens=64, val_rows=6), seed=0)
    assert r.best_epoch == 0 and r.val_after == r.val_before  # lr 1.0 diverges: the method's weights stay
    assert all(torch.equal(v, start[k]) for k, v in pruned.tensors().items())


def test_reconstruction_is_deterministic(tiny_llama):
    states = []
    for _ in range(2):
        dense, pruned, x, pe = _layer_pair(tiny_llama, noise=0.3)
        reconstruct_layer(pruned, dense, lambda: iter(x.split(8)), pe, 24, ReconSettings(epochs=2, lr=1e-3, batch_tokens=64, val_rows=6), seed=3)
        states.append(pruned.tensors())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_reconstruction_learning_rate_schedule(tiny_llama, monkeypatch, schedule):
    """Every Adam step runs at the schedule's rate for the training rows seen before it:
    constant, or cosine from ``lr`` to 0 over all epochs (by rows, so chunk sizes do not matter)."""
    import streamprune.methods.cascade.reconstruct as rec

    seen_lrs = []

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            seen_lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(rec.torch.optim, "Adam", Recording)
    dense, pruned, x, pe = _layer_pair(tiny_llama, noise=0.3)
    lr, epochs = 1e-3, 3
    r = reconstruct_layer(pruned, dense, lambda: iter(x.split(8)), pe, 24,
                          ReconSettings(epochs=epochs, lr=lr, batch_tokens=64, val_rows=6, schedule=schedule), seed=0)
    # 18 training rows in 8-row chunks (8, 8, 2) and 4-row batches: 4, 4, 4, 4, 2 rows per epoch
    rows = [4, 4, 4, 4, 2] * epochs
    seen = [sum(rows[:i]) for i in range(len(rows))]
    want = [lr] * len(rows) if schedule == "constant" else [lr * 0.5 * (1 + math.cos(math.pi * s / (epochs * 18))) for s in seen]
    assert r.steps == len(rows) and seen_lrs == pytest.approx(want, rel=1e-12, abs=0)
    assert r.val_after < r.val_before


def test_reconstruction_uses_fused_adam_with_the_per_tensor_update(tiny_llama, monkeypatch):
    """The fused kernel (one per step, on CPU and CUDA) takes the same steps as torch's
    per-tensor Adam: the weights after two epochs agree to float32 rounding."""
    import streamprune.methods.cascade.reconstruct as rec

    made = []

    class Loop(torch.optim.Adam):  # the reference: the for-loop implementation, whatever the caller asks
        def __init__(self, params, **kw):
            made.append(kw.pop("fused"))
            super().__init__(params, foreach=False, **kw)

    settings = ReconSettings(epochs=2, lr=1e-3, batch_tokens=64, val_rows=6)
    states = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(rec.torch.optim, "Adam", Loop)
        dense, pruned, x, pe = _layer_pair(tiny_llama, noise=0.3)
        reconstruct_layer(pruned, dense, lambda: iter(x.split(8)), pe, 24, settings, seed=0)
        states.append(pruned.tensors())
    assert made == [True]  # the engine's layers are on the CPU here: fused
    start = _layer_pair(tiny_llama, noise=0.3)[1].tensors()
    for k, v in states[0].items():
        moved = (states[1][k] - start[k]).abs().max()
        assert torch.allclose(v, states[1][k], rtol=0, atol=1e-3 * float(moved) + 1e-7), k


def test_reconstruction_precision_resolves_auto_by_what_the_device_multiplies_natively(monkeypatch):
    import streamprune.methods.cascade.reconstruct as rec

    cpu = torch.device("cpu")
    assert rec.autocast_dtype("float32", cpu) is None and rec.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    for amx, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(rec.torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert rec.autocast_dtype("auto", cpu) is want
    monkeypatch.delattr(rec.torch.cpu, "_is_amx_tile_supported")  # a torch without the probe: float32
    assert rec.autocast_dtype("auto", cpu) is None
    assert rec.autocast_dtype("auto", torch.device("meta")) is None
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'half'"):
        rec.autocast_dtype("half", cpu)


def test_bfloat16_reconstruction_keeps_float32_weights_and_recovers_like_float32(tiny_llama):
    """Under autocast the steps run in bfloat16, the weights, the held-out losses and the
    returned state stay float32; the fit recovers the perturbed layer about as well, and the
    same seed gives the same bits."""
    results, states = {}, {}
    for precision in ("float32", "bfloat16", "bfloat16"):
        dense, pruned, x, pe = _layer_pair(tiny_llama, noise=0.3)
        r = reconstruct_layer(pruned, dense, lambda: iter(x.split(8)), pe, 24,
                              ReconSettings(epochs=10, lr=3e-3, batch_tokens=64, val_rows=6, schedule="constant", precision=precision), seed=0)
        assert r.precision == precision and all(v.dtype == torch.float32 for v in r.state.values())
        if precision in results:
            assert all(torch.equal(v, states[precision][k]) for k, v in r.state.items())
        results[precision], states[precision] = r, r.state
    f32, b16 = results["float32"], results["bfloat16"]
    assert f32.val_before == b16.val_before  # the held-out measurement is float32 in both
    assert f32.val_after < 0.5 * f32.val_before and b16.val_after < 0.5 * b16.val_before
    assert b16.val_after == pytest.approx(f32.val_after, rel=0.2)
    assert not all(torch.equal(v, states["float32"][k]) for k, v in states["bfloat16"].items())  # bf16 did run


def test_recon_loss_rms_is_scale_free():
    y, t = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    assert float(recon_loss(100 * y, 100 * t, "rms")) == pytest.approx(float(recon_loss(y, t, "rms")), rel=1e-5)
    assert float(recon_loss(y, t, "mse")) == pytest.approx(float((y - t).pow(2).mean()), rel=1e-6)


# ---- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[{"recon_target": "dense_stream"}, {"recon_target": "dense_layer"},
                                        {"recon_target": "dense_stream", "decide_on": "unreconstructed"}],
                ids=["dense_stream", "dense_layer", "decision_stream"])
def cascade_run(request, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade") / "out"
    opts = {**E2E_OPTS, **request.param}
    cfg = PruneConfig(source=tiny_llama, out=out, method="cascade", ratio=0.3, method_options=opts, **E2E)
    report = prune(replace(cfg, keep_work=True))
    return cfg, report


def test_e2e_streamed_equals_in_memory(cascade_run, tiny_llama):
    cfg, report = cascade_run
    method = build_method("cascade", 0.3, cfg.method_options)
    decisions = prune_in_memory(tiny_llama, method, _e2e_tokens(tiny_llama), chunk_rows=5)
    assert _specs_of(cfg.out) == [d.spec for d in decisions]
    streamed = _output_tensors(cfg.out)
    journal = {r["layer"]: r["info"] for r in RunDir(cfg.run_dir).records() if r.get("event") == "layer"}
    worst = 0.0
    for i, d in enumerate(decisions):
        assert d.info["recon_steps"] == journal[i]["recon_steps"] == E2E_OPTS["recon_epochs"] * 7  # 12 train rows: chunks 5+5+2, 2-row batches
        assert d.info["recon_val_after"] <= d.info["recon_val_before"]
        history = journal[i]["recon_history"]  # the held-out curve: start, then one value per epoch
        assert len(history) == E2E_OPTS["recon_epochs"] + 1 and history[0] == journal[i]["recon_val_before"]
        assert min(history) == journal[i]["recon_val_after"]
        for key in ("recon_val_before", "recon_val_after"):
            assert journal[i][key] == pytest.approx(d.info[key], rel=5e-3), (i, key)
        for name, ref in d.tensors.items():
            worst = max(worst, rel(streamed[f"model.layers.{i}.{name}"], ref))
    # streamed (chunked) vs in-memory (one batch) inputs differ by ~1e-5 relative; Adam's
    # normalised steps amplify that
    assert worst < 2e-2, worst
    assert sum(d.info["recon_val_after"] < 0.99 * d.info["recon_val_before"] for d in decisions) >= 2


def test_e2e_output_loads_and_reconstruction_changed_weights(cascade_run, tiny_llama, tmp_path):
    cfg, report = cascade_run
    base_out = tmp_path / "base"
    prune(PruneConfig(source=tiny_llama, out=base_out, method="cascade", ratio=0.3, method_options={**E2E_OPTS, "recon": False}, **E2E))
    assert _specs_of(base_out) == _specs_of(cfg.out) and report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)
    a, b = _output_tensors(cfg.out), _output_tensors(base_out)
    assert any(not torch.equal(a[k], b[k]) for k in a if "mlp.gate_proj" in k)  # gate/up move too
    tokens = _e2e_tokens(tiny_llama)
    model = load_pruned(cfg.out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=tokens[:2]).logits).all()


@pytest.mark.parametrize("point,extra", [("reconstructed:1", {}), ("observe:2", {}),
                                         ("reconstructed:1", {"decide_on": "unreconstructed"}), ("observe:2", {"decide_on": "unreconstructed"})])
def test_e2e_kill_inside_reconstruction_then_resume_is_byte_identical(tiny_llama, tmp_path, point, extra):
    options = {"recon_epochs": 1, "recon_lr": 1e-3, "recon_batch_tokens": 64, "recon_val_rows": 2, **extra}
    opts = [x for k, v in options.items() for x in ("--option", f"{k}={v}")]
    cmd = ["prune", tiny_llama, "--method", "cascade", "--ratio", "0.3", *opts, *ARGS]
    ref = run_cli(*cmd, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = run_cli(*cmd, "--out", tmp_path / "out", crash_at=point)
    assert killed.returncode == -9, killed.stderr
    resumed = run_cli(*cmd, "--out", tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")


# ---- measured allocation ---------------------------------------------------------------------


def test_prefix_errors_equal_brute_force_on_explicit_activations():
    from streamprune.methods.cascade.allocation import prefix_errors
    from streamprune.methods.cascade.observers import AllocationObserver

    g = torch.Generator().manual_seed(0)
    t, d, f = 300, 6, 10
    h, y, W = torch.randn(t, f, generator=g), 3 * torch.randn(t, d, generator=g), torch.randn(d, f, generator=g)
    obs = AllocationObserver(None, f)
    for s in (slice(0, 120), slice(120, 300)):  # two chunks, hooks in the engine's order
        obs.update("gate_proj", torch.randn(s.stop - s.start, d, generator=g), h[s])
        obs.update("down_proj", h[s], h[s] @ W.T)
        obs.update("layer", y[s], y[s])
    order = torch.randperm(f, generator=g)
    curve = prefix_errors(W, obs.gram, order)
    hd, yd, Wd = h.double(), y.double(), W.double()
    for k in range(f + 1):
        S = order[:k]
        delta = hd[:, S] @ Wd[:, S].T  # (t, d): what the removed channels contributed
        want = (delta.pow(2).sum(1) / (yd.pow(2).mean(1) + 1e-6)).sum()
        assert float(curve[k]) == pytest.approx(float(want), rel=1e-5, abs=1e-9), k


def test_allocate_hits_total_respects_cap_and_matches_brute_force():
    import itertools

    from streamprune.methods.cascade.allocation import allocate

    g = torch.Generator().manual_seed(1)
    curves = [torch.cat([torch.zeros(1), torch.cumsum(torch.sort(torch.rand(6, generator=g)).values * s, 0)]) for s in (1.0, 3.0, 0.5)]
    for total in range(0, 13):
        counts = allocate(curves, total, max_per_layer=4)
        assert sum(counts) == total and max(counts) <= 4
        best = min(sum(float(c[k]) for c, k in zip(curves, ks)) for ks in itertools.product(range(5), repeat=3) if sum(ks) == total)
        assert sum(float(c[k]) for c, k in zip(curves, counts)) == pytest.approx(best, rel=1e-9)  # convex: greedy is optimal
    with pytest.raises(ValueError, match="cannot remove 13 channels"):
        allocate(curves, 13, max_per_layer=4)


@pytest.mark.parametrize("shapes", [SMOLLM2, LLAMA2_70B], ids=["smollm2", "llama2-70b"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_measured_allocation_keeps_the_exact_parameter_count(shapes, ratio):
    method = build_method("cascade", ratio, {})
    method.plan(shapes)
    uniform = method.planned_specs(shapes)
    f, L = shapes.intermediate_size, shapes.num_layers
    g = torch.Generator().manual_seed(2)
    survey = [{"linearity": torch.tensor(0.5), "o_out_energy": torch.ones(shapes.hidden_size),
               "ffn_curve": torch.cat([torch.zeros(1), torch.cumsum(torch.rand(f, generator=g) * (l + 1), 0)])} for l in range(L)]
    method.plan(shapes, survey)
    specs = method.planned_specs(shapes)
    widths = [s.intermediate_size for s in specs]
    assert shapes.total_params(specs) == shapes.total_params(uniform)  # same total, same achieved ratio
    assert abs(shapes.achieved_ratio(specs) - ratio) <= 0.01
    assert len(set(widths)) > 1 and min(widths) >= f - int(0.8 * f)  # really per layer; the cap holds
    assert widths[0] < widths[-1]  # layer 0's channels cost the least error: it gives up the most


def test_e2e_measured_allocation_streamed_equals_in_memory(tiny_llama, tmp_path):
    opts = {"recon": False, "allocation": "measured"}  # (obs, the default: the next tests)
    out = tmp_path / "out"
    report = prune(PruneConfig(source=tiny_llama, out=out, method="cascade", ratio=0.3, method_options=opts, **E2E))
    method = build_method("cascade", 0.3, opts)
    decisions = prune_in_memory(tiny_llama, method, _e2e_tokens(tiny_llama))
    specs = _specs_of(out)
    assert specs == [d.spec for d in decisions] and len({s.intermediate_size for s in specs}) > 1
    assert report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)
    streamed = _output_tensors(out)
    for i, d in enumerate(decisions):
        for name, ref in d.tensors.items():
            assert rel(streamed[f"model.layers.{i}.{name}"], ref) < 5e-4, (i, name)


def test_dense_layer_runs_once_per_chunk_its_outputs_are_the_reconstruction_targets(tiny_llama, tmp_path, monkeypatch):
    """Pass A already runs the dense layer on the pruned stream: its outputs are kept as the
    reconstruction targets, so the dense layer runs once per chunk and layer (16 rows, 5 a
    chunk: 4), not twice; with the decision stream (pass A sees another input) twice."""
    from streamprune.adapters.llama import LlamaFamilyAdapter

    calls = []
    build = LlamaFamilyAdapter.build_layer

    def counting(self, i, tensors, device, dtype):
        layer = build(self, i, tensors, device, dtype)
        layer.register_forward_pre_hook(lambda *_: calls.append(i))
        return layer

    monkeypatch.setattr(LlamaFamilyAdapter, "build_layer", counting)
    for options, per_chunk in (({}, 1), ({"decide_on": "unreconstructed"}, 2)):
        calls.clear()
        prune(PruneConfig(source=tiny_llama, out=tmp_path / f"out{per_chunk}", method="cascade", ratio=0.3,
                          method_options={**E2E_OPTS, **options}, **E2E))
        layers = open_model(tiny_llama).shapes().num_layers
        assert sorted(calls) == sorted(list(range(layers)) * 4 * per_chunk + list(range(layers)) * 4)  # + the survey's pass


def test_preflight_forecasts_reconstruction_compute(tiny_llama, tmp_path):
    from streamprune.engine import plan

    score_opts = {**E2E_OPTS, "selection": "score", "allocation": "measured"}  # reconstruction's arithmetic alone (OBS's: test_obs_workspace_and_compute_forecast_at_70b)

    cfg = PruneConfig(source=tiny_llama, out=tmp_path / "out", method="cascade", ratio=0.3, method_options=score_opts, **E2E, dry_run=True)
    fc = prune(cfg)
    _, shapes, method, specs = plan(cfg)
    n_val = min(score_opts["recon_val_rows"], 16 // 4)
    train, val, dense = (16 - n_val) * 32, n_val * 32, shapes.dense_spec().num_params()
    fit = sum(2 * train * 6 * s.num_params() + 3 * val * 2 * s.num_params() for s in specs)  # the dense targets are pass A's outputs
    assert method.extra_flop(shapes, specs, 16, 32) == fit and fc["method_tflop"] == round(fit / 1e12, 3) and fc["method_s"] > 0
    # with the decision stream, the dense layer runs once more per token: on the un-reconstructed input
    decided_method = build_method("cascade", 0.3, {**score_opts, "decide_on": "unreconstructed"})
    assert decided_method.extra_flop(shapes, specs, 16, 32) == fit + len(specs) * 16 * 32 * 2 * dense
    assert method.host_workspace_bytes(shapes, 16, 32) == 16 * 32 * shapes.hidden_size * 4  # the kept dense targets
    stream_target = build_method("cascade", 0.3, {**score_opts, "recon_target": "dense_stream"})
    assert stream_target.host_workspace_bytes(shapes, 16, 32) == 0  # targets come from the dense stream on disk
    off = prune(replace(cfg, method_options={**score_opts, "recon": False}))
    assert off["method_tflop"] == 0 and off["method_s"] == 0
    # the dense stream is two more activation boundaries on disk (rows × seqlen × d each)
    stream = prune(replace(cfg, method_options={**score_opts, "recon_target": "dense_stream"}))
    assert stream["disk_bytes"] - fc["disk_bytes"] == 2 * 16 * 32 * shapes.hidden_size * 4
    # so is the decision stream (the pruned model before reconstruction); both: four
    boundary = 16 * 32 * shapes.hidden_size * 4
    decided = prune(replace(cfg, method_options={**score_opts, "decide_on": "unreconstructed"}))
    both = prune(replace(cfg, method_options={**score_opts, "decide_on": "unreconstructed", "recon_target": "dense_stream"}))
    assert decided["disk_bytes"] - fc["disk_bytes"] == 2 * boundary and both["disk_bytes"] - fc["disk_bytes"] == 4 * boundary


# ---- OBS selection -----------------------------------------------------------------------------


def test_e2e_obs_selection_streamed_equals_in_memory_at_the_same_parameter_count(tiny_llama, tmp_path):
    opts = {"recon": False, "selection": "obs"}
    out, score_out = tmp_path / "out", tmp_path / "score"
    cfg = PruneConfig(source=tiny_llama, out=out, method="cascade", ratio=0.3, method_options=opts, **E2E, keep_work=True)
    report = prune(cfg)
    score = prune(PruneConfig(source=tiny_llama, out=score_out, method="cascade", ratio=0.3, method_options={"recon": False, "selection": "score"}, **E2E))
    assert _specs_of(out) == _specs_of(score_out) and report["params_pruned"] == score["params_pruned"]
    decisions = prune_in_memory(tiny_llama, build_method("cascade", 0.3, opts), _e2e_tokens(tiny_llama))
    assert _specs_of(out) == [d.spec for d in decisions]
    streamed, by_score = _output_tensors(out), _output_tensors(score_out)
    journal = {r["layer"]: r["info"] for r in RunDir(cfg.run_dir).records() if r.get("event") == "layer"}
    f = open_model(tiny_llama).config.intermediate_size
    for i, d in enumerate(decisions):
        ratio = journal[i]["obs_cost_ratio"]
        assert journal[i]["selection"] == "obs" and 0 <= ratio < 1 and (ratio > 0) == (journal[i]["ffn_kept"] < f), (i, ratio)
        for name, ref in d.tensors.items():
            assert rel(streamed[f"model.layers.{i}.{name}"], ref) < 5e-4, (i, name)
    # OBS picks other channels than the score and refits down_proj: the FFN tensors differ, attention does not
    assert any(not torch.equal(streamed[k], by_score[k]) for k in streamed if "mlp.down_proj" in k)
    assert all(torch.equal(streamed[k], by_score[k]) for k in streamed if "self_attn" in k and ".0." in k)


def test_e2e_obs_allocation_curves_are_the_greedy_obs_costs(tiny_llama, tmp_path):
    """allocation=obs: every layer's survey curve is a greedy OBS cost curve (0 at k = 0,
    non-decreasing, one entry per removable channel), the counts are ``allocate`` on those
    curves and keep the parameter total, and the output is the in-memory reference's."""
    from safetensors.torch import load_file

    from streamprune.methods.cascade.allocation import allocate

    opts = {"recon": False, "selection": "obs", "allocation": "obs"}
    cfg = PruneConfig(source=tiny_llama, out=tmp_path / "out", method="cascade", ratio=0.3, method_options=opts, **E2E, keep_work=True)
    report = prune(cfg)
    plain = prune(PruneConfig(source=tiny_llama, out=tmp_path / "plain", method="cascade", ratio=0.3, method_options={"recon": False, "selection": "score"}, **E2E))
    assert report["params_pruned"] == plain["params_pruned"] and report["achieved_ratio"] == pytest.approx(0.3, abs=0.01)
    decisions = prune_in_memory(tiny_llama, build_method("cascade", 0.3, opts), _e2e_tokens(tiny_llama))
    specs = _specs_of(cfg.out)
    assert specs == [d.spec for d in decisions]
    streamed = _output_tensors(cfg.out)
    for i, d in enumerate(decisions):
        for name, ref in d.tensors.items():
            assert rel(streamed[f"model.layers.{i}.{name}"], ref) < 5e-4, (i, name)
    method = build_method("cascade", 0.3, opts)
    f = open_model(tiny_llama).config.intermediate_size
    stored = load_file(cfg.run_dir / "survey.safetensors")
    curves = [stored[f"{i}.ffn_curve"].double() for i in range(len(specs))]
    for c in curves:
        assert c.shape == (method._alloc_cap(f) + 1,) and c[0] == 0 and bool((c[1:] >= c[:-1]).all())
    total = sum(f - s.intermediate_size for s in specs)
    assert allocate(curves, total, method._alloc_cap(f)) == [f - s.intermediate_size for s in specs]
