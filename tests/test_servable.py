"""The servable structure (``cascade --option structure=servable``, ``magnitude --option
ffn_multiple=256``; what ``--format nemotron-nas`` stores): attention kept whole or removed
(never in layer 0), FFN widths multiples of ``ffn_multiple``, the ratio within one move.

Run: ``.venv/bin/pytest tests/test_servable.py -q``
"""

from __future__ import annotations

import json
import signal

import pytest
import torch

from streamprune import PruneConfig, prune
from streamprune.errors import ConfigError
from streamprune.methods.cascade.servable import ServableLayer, allocate, uniform_plan

from test_resume import ARGS, digests, run_cli

D, F, M = 8, 64, 16  # hidden, FFN width, multiple
PER_CHANNEL, ATTN = 3 * D, 4 * D * D
STEP = M * PER_CHANNEL


def curves(scales: list[float]) -> list[torch.Tensor]:
    """Convex curves e(k) = s · k² over k = 0..F."""
    k = torch.arange(F + 1, dtype=torch.float64)
    return [s * k * k for s in scales]


def removed(plan: list[ServableLayer]) -> int:
    return sum((F - p.ffn) * PER_CHANNEL + (0 if p.attention else ATTN) for p in plan)


def test_allocate_reaches_the_target_within_one_move():
    c = curves([1.0, 2.0, 0.5, 4.0])
    attn = [9.9, 1e9, 0.1, 1e9]
    for target in (0, 1, STEP, 5 * STEP + 7, ATTN * 2, 3 * STEP * 4):
        plan = allocate(c, attn, F, M, PER_CHANNEL, ATTN, target)
        assert target <= removed(plan) < target + max(STEP, ATTN), (target, plan)
        assert all(p.ffn % M == 0 and M <= p.ffn <= F for p in plan)
        assert plan[0].attention  # vLLM needs attention in layer 0


def test_allocate_takes_the_cheapest_moves_first():
    c = curves([1.0, 100.0, 1.0, 100.0])
    plan = allocate(c, [0.0, 1e9, 1e9, 1e-9], F, M, PER_CHANNEL, ATTN, ATTN)  # one attention's worth
    assert [p.attention for p in plan] == [True, True, True, False]  # layer 0's free attention is never taken
    plan = allocate(c, [1e9] * 4, F, M, PER_CHANNEL, ATTN, 4 * STEP)
    assert [p.ffn for p in plan] == [F - 2 * M, F, F - 2 * M, F]  # the cheap layers' FFNs, evenly (convex curves)


def test_allocate_refuses_an_unreachable_target():
    with pytest.raises(ValueError, match="cannot remove"):
        allocate(curves([1.0] * 3), [1.0] * 3, F, M, PER_CHANNEL, ATTN, 10 ** 9)


def test_uniform_plan_spreads_the_steps():
    plan = uniform_plan(4, F, M, PER_CHANNEL, 6 * STEP)
    assert [p.ffn for p in plan] == [F - M, F - M, F - 2 * M, F - 2 * M] and all(p.attention for p in plan)


def servable_specs(out) -> list[dict]:
    return json.loads((out / "config.json").read_text())["layer_specs"]


def check_servable(specs: list[dict], source_cfg: dict, multiple: int) -> None:
    heads, kv = source_cfg["num_attention_heads"], source_cfg["num_key_value_heads"]
    assert specs[0]["num_kv_heads"] == kv
    for s in specs:
        assert s["num_kv_heads"] in (0, kv) and s["num_kv_heads"] * s["heads_per_group"] in (0, heads)
        assert s["v_head_dim"] == s["head_dim"] and s["bypass_rank"] == 0 and not s["down_bias"]
        assert all(s[f"{p}_rank"] is None for p in "qkvo")
        assert s["intermediate_size"] % multiple == 0 and s["intermediate_size"] >= multiple
        assert s["o_bias"] == (s["num_kv_heads"] > 0 and source_cfg.get("attention_bias", False) or
                               s["num_kv_heads"] > 0 and source_cfg["model_type"] == "qwen2")


CASCADE = {"structure": "servable", "ffn_multiple": 32, "recon_precision": "float32"}


@pytest.mark.parametrize("alloc", ["obs", "uniform"])
def test_cascade_servable_structure_and_ratio(tiny_model, tmp_path, alloc):
    src_cfg = json.loads((tiny_model / "config.json").read_text())
    src_cfg = {**src_cfg, "intermediate_size": src_cfg["intermediate_size"]}
    report = prune(PruneConfig(source=tiny_model, out=tmp_path / "out", method="cascade", ratio=0.2, nsamples=8, seqlen=32,
                               progress=False, method_options={**CASCADE, "allocation": alloc}))
    assert abs(report["achieved_ratio"] - 0.2) <= 0.01 * 4  # tiny model: one 32-channel step is 2.4 % of it
    check_servable(servable_specs(tmp_path / "out"), src_cfg, 32)


def test_magnitude_servable_widths_and_ratio(tiny_llama, tmp_path):
    report = prune(PruneConfig(source=tiny_llama, out=tmp_path / "out", method="magnitude", ratio=0.3, nsamples=8, seqlen=32,
                               progress=False, method_options={"ffn_multiple": 32}))
    widths = [s["intermediate_size"] for s in servable_specs(tmp_path / "out")]
    assert all(w % 32 == 0 for w in widths) and max(widths) - min(widths) <= 32 and widths == sorted(widths, reverse=True)
    assert abs(report["achieved_ratio"] - 0.3) < 0.03


@pytest.mark.parametrize("method", ["olica", "lorap", "slimllm"])
def test_format_nemotron_nas_refuses_methods_that_cannot_produce_it(tiny_llama, tmp_path, method):
    with pytest.raises(ConfigError, match=f"--method {method} cannot produce: use --method cascade"):
        prune(PruneConfig(source=tiny_llama, out=tmp_path / "out", method=method, ratio=0.2, format="nemotron-nas", dry_run=True))


def test_format_nemotron_nas_refuses_a_contradicting_option(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="needs --option structure=servable, got structure=streamprune"):
        prune(PruneConfig(source=tiny_llama, out=tmp_path / "out", method="cascade", ratio=0.2, format="nemotron-nas",
                          method_options={"structure": "streamprune"}, dry_run=True))


def test_servable_kill_inside_reconstruction_resumes_byte_identical(tiny_llama, tmp_path):
    job = ["--method", "cascade", "--ratio", "0.25", *[f"--option={k}={v}" for k, v in CASCADE.items()], *ARGS]
    ref = run_cli("prune", tiny_llama, "--out", tmp_path / "ref", *job)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    assert run_cli("prune", tiny_llama, "--out", out, *job, crash_at="reconstructed:1").returncode == -signal.SIGKILL
    r = run_cli("prune", tiny_llama, "--out", out, *job)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "streamprune_report.json").read_text())["run"]["resumed_from_layer"] == 1
    assert digests(out) == digests(tmp_path / "ref")


def test_prune_format_nemotron_nas_end_to_end(tmp_path):
    """``--format nemotron-nas``: the same decisions as the servable structure in the streamprune
    format, published as a nemotron-nas folder (same logits); kill -9 at finalize, then the
    resumed run publishes the same bytes."""
    from streamprune import load_pruned
    from tiny import make_tiny_model

    src = make_tiny_model(tmp_path / "src", "llama", layers=4, inter=768)
    job = ["--method", "cascade", "--ratio", "0.25", "--option", "recon_precision=float32", *ARGS]
    nas, ref = tmp_path / "nas", tmp_path / "ref"
    assert run_cli("prune", src, "--out", nas, "--format", "nemotron-nas", *job, crash_at="finalize").returncode == -signal.SIGKILL
    r = run_cli("prune", src, "--out", nas, "--format", "nemotron-nas", *job)
    assert r.returncode == 0, r.stderr
    fresh = run_cli("prune", src, "--out", tmp_path / "nas2", "--format", "nemotron-nas", *job)
    assert fresh.returncode == 0 and digests(nas) == digests(tmp_path / "nas2")
    assert run_cli("prune", src, "--out", ref, *job, "--option", "structure=servable").returncode == 0
    config = json.loads((nas / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and len(config["block_configs"]) == 4
    report = json.loads((nas / "streamprune_report.json").read_text())
    assert report["format"]["name"] == "nemotron-nas" and abs(report["achieved_ratio"] - 0.25) < 0.1
    assert not (tmp_path / "nas.work" / "staging").exists()  # the streamprune-format copy is gone
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = load_pruned(nas, torch_dtype=torch.float32).eval()(ids).logits
        b = load_pruned(ref, torch_dtype=torch.float32).eval()(ids).logits
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
