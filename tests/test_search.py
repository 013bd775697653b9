"""cascade ``allocation="search"``: forks scored by the KL at the head (streamprune.forks), the
KL-scaled curves (methods/cascade/search.py) and the engine contracts (ratio, resume, ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from streamprune import PruneConfig, prune
from streamprune.adapters import open_model
from streamprune.inputs.textdata import calibration_windows, resolve_text_source
from streamprune.adapters import load_tokenizer
from streamprune.kernels.divergence import kl_sum
from streamprune.kernels.obs import obs_cost_curve, obs_remove_columns, obs_remove_given
from streamprune.methods import build_method
from streamprune.methods.cascade import Cascade
from streamprune.methods.cascade.allocation import allocate
from streamprune.methods.cascade.search import blend_betas, blended, fork_levels, kl_scaled
from streamprune.methods.cascade.servable import allocate as allocate_servable
from streamprune.stream import position_embeddings
from test_resume import ARGS, digests, run_cli

E2E = dict(calib="c4", nsamples=16, seqlen=32, seed=0, chunk_tokens=160, progress=False)
FAST = {"allocation": "search", "recon": False, "search_rows": 6}


def test_kl_sum_is_the_float64_definition():
    g = torch.Generator().manual_seed(0)
    p, q = 3 * torch.randn(2, 7, 50, generator=g, dtype=torch.float64), 3 * torch.randn(2, 7, 50, generator=g, dtype=torch.float64)
    pp, qq = p.softmax(-1), q.softmax(-1)
    want = float((pp * (pp.log() - qq.log())).sum())
    assert kl_sum(p, q) == pytest.approx(want, rel=1e-12)
    assert kl_sum(p, q, block_rows=3) == pytest.approx(want, rel=1e-12)
    assert kl_sum(p.float(), q.float()) == pytest.approx(want, rel=1e-5)
    assert kl_sum(p, p) == 0.0
    with pytest.raises(ValueError, match="shape"):
        kl_sum(p, q[:, :3])


def test_fork_levels():
    assert fork_levels(100, 3) == [33, 67, 100]
    assert fork_levels(96, 3, 32) == [32, 64, 96]
    assert fork_levels(96, 5, 32) == [32, 64, 96]  # distinct multiples only
    assert fork_levels(20, 3, 32) == []
    assert fork_levels(1280, 1, 256) == [1280]


def test_kl_scaled_passes_through_the_measured_points_and_keeps_the_shape():
    curve = torch.arange(11, dtype=torch.float64) ** 2  # e(k) = k²
    out = kl_scaled(curve, [2, 6], [8.0, 18.0])  # α(2) = 2, α(6) = 0.5
    assert out[2] == pytest.approx(8.0) and out[6] == pytest.approx(18.0)
    assert out[1] == pytest.approx(2.0) and out[10] == pytest.approx(50.0)  # α constant outside the candidates
    assert out[4] == pytest.approx(16 * 1.25)  # α linear between them
    assert torch.equal(kl_scaled(curve, [0], [1.0]), curve)  # no usable ratio: the curve as is


def test_obs_remove_given_a_greedy_prefix_is_obs_remove_columns():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(400, 24, generator=g, dtype=torch.float64)
    gram, w = h.T @ h, torch.randn(8, 24, generator=g, dtype=torch.float64)
    curve, order = obs_cost_curve(w, gram, 16, with_order=True)
    assert torch.equal(curve, obs_cost_curve(w, gram, 16)) and order.unique().numel() == 16
    for k in (1, 5, 16):
        kept, wk, cost = obs_remove_columns(w, gram, k)
        kept2, wk2 = obs_remove_given(w, gram, order[:k])
        assert torch.equal(kept, kept2) and torch.allclose(wk, wk2, rtol=1e-12, atol=1e-12)
        assert cost == pytest.approx(float(curve[k]), rel=1e-9)


def test_config_refuses_search_without_obs():
    with pytest.raises(Exception, match="allocation"):
        build_method("cascade", 0.3, {"allocation": "search", "selection": "score"})
    for bad in ({"search_rows": 0}, {"search_levels": 0}):
        with pytest.raises(Exception, match=next(iter(bad))):
            build_method("cascade", 0.3, {"allocation": "search", **bad})


def _recorded_candidates(monkeypatch) -> list:
    seen = []
    original = Cascade.fork_candidates

    def record(self, i, weights, observer, result):
        for d in original(self, i, weights, observer, result):
            seen.append((i, d.spec, {k: v.clone() for k, v in d.tensors.items()}))
            yield d

    monkeypatch.setattr(Cascade, "fork_candidates", record)
    return seen


class InMemory:
    """The model of ``folder`` in float64, in memory, over ``tokens`` (the whole batch at once):
    its dense layers, each layer's input, and the dense next-token distribution."""

    @torch.no_grad()
    def __init__(self, folder, tokens):
        self.adapter = adapter = open_model(folder)
        dt = self.dtype = torch.float64
        outer = adapter.read_outer()
        self.embed = outer["model.embed_tokens.weight"].to(dt)
        self.head = outer["lm_head.weight"].to(dt) if "lm_head.weight" in outer else self.embed
        self.norm = adapter.final_norm("cpu", dt)
        self.norm.weight.copy_(outer["model.norm.weight"])
        self.pe = position_embeddings(adapter.rotary("cpu"), tokens.shape[1], "cpu", dt)
        self.layers = [adapter.build_layer(i, adapter.read_layer(i), "cpu", dt) for i in range(adapter.num_layers)]
        self.inputs, h = [], self.embed[tokens]
        for layer in self.layers:
            self.inputs.append(h)
            h = layer(h, self.pe)
        self.p = self.softmax(h)

    def softmax(self, h):
        return (self.norm(h) @ self.head.T).softmax(-1)

    def pruned(self, i, spec, tensors):
        return self.adapter.build_pruned_layer(i, spec, tensors, "cpu", self.dtype)

    def kl(self, h) -> float:
        """KL per token of the dense distribution from the one ``h`` (last hidden states) gives."""
        p, q = self.p, self.softmax(h)
        return float((p * (p.log() - q.log())).sum() / p[..., 0].numel())


@torch.no_grad()
def _reference_kls(folder, candidates, tokens) -> dict[int, list[float]]:
    """Per candidate, the KL of the model with that one layer replaced (:class:`InMemory`)."""
    model = InMemory(folder, tokens)
    out: dict[int, list[float]] = {}
    for i, spec, tensors in candidates:
        x = model.pruned(i, spec, tensors)(model.inputs[i], model.pe)
        for layer in model.layers[i + 1:]:
            x = layer(x, model.pe)
        out.setdefault(i, []).append(model.kl(x))
    return out


@pytest.mark.parametrize("structure", ["streamprune", "servable"])
def test_e2e_fork_kls_are_the_in_memory_float64_ones_and_the_plan_follows_them(tiny_llama, tmp_path, monkeypatch, structure):
    """Every fork's KL (streamed, fp32, chunked, from disk) equals the float64 in-memory KL of the
    model with that one layer cut; the per-layer counts are the greedy allocation on the
    KL-scaled curves (servable: attention removals priced at their fork's KL), at the ratio."""
    extra = {"structure": "servable", "ffn_multiple": 32} if structure == "servable" else {}
    opts = {**FAST, **extra}
    candidates = _recorded_candidates(monkeypatch)
    cfg = PruneConfig(source=tiny_llama, out=tmp_path / "out", method="cascade", ratio=0.3, method_options=opts, keep_work=True, **E2E)
    report = prune(cfg)
    assert report["achieved_ratio"] == pytest.approx(0.3, abs=0.01 if structure == "streamprune" else 0.03)
    tok = load_tokenizer(tiny_llama)
    rows = calibration_windows(tok, resolve_text_source("c4"), E2E["nsamples"] + FAST["search_rows"], E2E["seqlen"], 0)
    assert torch.equal(rows[:E2E["nsamples"]], calibration_windows(tok, resolve_text_source("c4"), E2E["nsamples"], E2E["seqlen"], 0))
    ref = _reference_kls(tiny_llama, candidates, rows[E2E["nsamples"]:])
    stored = load_file(cfg.run_dir / "survey.safetensors")
    L = open_model(tiny_llama).num_layers
    for i in range(L):
        got = stored[f"{i}.fork_kl"].tolist()
        assert len(got) == len(ref[i]) == len(stored[f"{i}.fork_ffn"]) >= 3
        assert got == pytest.approx(ref[i], rel=2e-4), i
        assert all(a < b for a, b in zip(got, got[1:len(fork_levels(10**9, 3))]))  # more channels cut, larger KL
    method = build_method("cascade", 0.3, opts)
    shapes = open_model(tiny_llama).shapes()
    method.plan(shapes)
    survey = [{k.split(".", 1)[1]: v for k, v in stored.items() if k.startswith(f"{i}.")} for i in range(L)]
    curves = [method._curve(s) for s in survey]
    specs = [json.loads((cfg.out / "config.json").read_text())["layer_specs"][i] for i in range(L)]
    f = shapes.intermediate_size
    if structure == "streamprune":
        total = sum(f - s["intermediate_size"] for s in specs)
        assert allocate(curves, total, method._alloc_cap(f)) == [f - s["intermediate_size"] for s in specs]
        assert len({s["intermediate_size"] for s in specs}) > 1
    else:
        method.plan(shapes, survey)
        assert [(s.attention, s.ffn) for s in method.layers] == [(s["num_kv_heads"] > 0, s["intermediate_size"]) for s in specs]
        attn = [method._attn_cost(s) for s in survey]
        assert attn[0] == float("inf") and all(a == s["fork_kl"][-1] for a, s in zip(attn[1:], survey[1:]))


def test_e2e_kill_inside_the_search_then_resume_is_byte_identical(tiny_llama, tmp_path):
    opts = [x for k, v in {**FAST, "search_rows": 4}.items() for x in ("--option", f"{k}={str(v).lower()}")]
    cmd = ["prune", tiny_llama, "--method", "cascade", "--ratio", "0.3", *opts, *ARGS]
    ref = run_cli(*cmd, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = run_cli(*cmd, "--out", tmp_path / "out", crash_at="fork:2")
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "out.work" / "acts" / "forks").is_dir()  # killed with forks on disk
    journal = tmp_path / "out.work" / "journal.jsonl"
    surveyed = lambda: [r["layer"] for r in map(json.loads, journal.read_text().splitlines()) if r["event"] == "survey_layer"]  # noqa: E731
    assert surveyed() == [0, 1]  # layer 2 was in flight
    resumed = run_cli(*cmd, "--out", tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr
    assert surveyed() == list(range(4))  # the resume went on at layer 2: nothing surveyed twice
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")
    assert not (tmp_path / "out.work" / "acts" / "forks").exists() and not (tmp_path / "out.work" / "survey").exists()


def test_preflight_counts_the_forks():
    """The dry run's disk and time grow by the forks: their boundaries and their layer passes."""
    method = build_method("cascade", 0.2, {"allocation": "search"})
    plain = build_method("cascade", 0.2, {"allocation": "obs"})
    from test_olica import LLAMA2_70B as shapes

    for m in (method, plain):
        m.plan(shapes)
    assert method.fork_count(shapes) == 3 * shapes.num_layers and plain.fork_count(shapes) == 0
    tokens, L = method.fork_rows * 128, shapes.num_layers
    assert method.extra_flop(shapes, method.planned_specs(shapes), 256, 128) - plain.extra_flop(shapes, plain.planned_specs(shapes), 256, 128) \
        == pytest.approx(method.fork_flop(shapes, 128)) 
    assert method.fork_flop(shapes, 128) > 3 * L * 2 * tokens * shapes.vocab_size * shapes.hidden_size


def test_two_ranks_take_the_one_process_decisions(tiny_llama, tmp_path):
    """Under torchrun the search rows split across the ranks and the KL sums are all-reduced:
    the same per-token KLs (to fp32 summation order) and the same layer specs as one process."""
    from test_distributed import CHUNK_TOKENS, NSAMPLES, RATIO, SEQLEN, last_json, prune_args, torchrun

    opts = {**FAST, "search_rows": 4, "search_blends": 3}
    one, two = tmp_path / "one", tmp_path / "two"
    prune(PruneConfig(source=tiny_llama, out=one, method="cascade", ratio=RATIO, calib="c4", nsamples=NSAMPLES, seqlen=SEQLEN,
                      chunk_tokens=CHUNK_TOKENS, progress=False, method_options=opts, keep_work=True))
    cli = [x for k, v in opts.items() for x in ("--option", f"{k}={str(v).lower()}")]
    report = last_json(torchrun(*prune_args(tiny_llama, two, "cascade"), *cli, "--keep-work"))
    assert report["world_size"] == 2
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (one, two))
    assert c1 == c2 and len({s["intermediate_size"] for s in c1["layer_specs"]}) > 1
    s1, s2 = (load_file(tmp_path / f"{d}.work" / "survey.safetensors") for d in ("one", "two"))
    for key in (k for k in s1 if k.endswith("fork_kl")):
        assert s2[key].tolist() == pytest.approx(s1[key].tolist(), rel=1e-4), key
    k1, k2 = (_scores(tmp_path / f"{d}.work") for d in ("one", "two"))  # the scoring pass: all-reduced the same way
    assert len(k1) >= 2 and k2 == pytest.approx(k1, rel=1e-4)



# ---- the scoring pass: whole allocations on blends of the two curves, scored end to end --------

def _scores(work) -> list[float]:
    return [r for r in map(json.loads, (work / "journal.jsonl").read_text().splitlines()) if r["event"] == "scores"][-1]["kl"]


def test_blends_run_from_the_kl_scaled_curve_to_the_obs_one():
    assert blend_betas(1) == [1.0] and blend_betas(3) == [1.0, 0.5, 0.0]
    curve = torch.tensor([0.0, 1.0, 4.0, 9.0], dtype=torch.float64)
    scaled = torch.tensor([0.0, 4.0, 4.0, 1.0], dtype=torch.float64)  # α = 4, 1, 1/9
    assert torch.equal(blended(curve, scaled, 1.0), scaled) and torch.equal(blended(curve, scaled, 0.0), curve)
    assert blended(curve, scaled, 0.5).tolist() == pytest.approx([0.0, 2.0, 4.0, 3.0])


def test_config_refuses_bad_blends():
    with pytest.raises(Exception, match="search_blends"):
        build_method("cascade", 0.3, {"allocation": "search", "search_blends": 0})
    assert not build_method("cascade", 0.3, {"allocation": "obs", "search_blends": 3}).needs_scoring  # no forks, no blends
    assert "search_blends" not in build_method("cascade", 0.3, {"allocation": "search"}).config_dict()  # fingerprints kept


def _recorded_members(monkeypatch) -> list:
    seen = []
    original = Cascade.member_layers

    def record(self, i, weights, observer):
        out = original(self, i, weights, observer)
        seen.append((i, [(d.spec, {k: v.clone() for k, v in d.tensors.items()}) for d in out]))
        return out

    monkeypatch.setattr(Cascade, "member_layers", record)
    return seen


@torch.no_grad()
def _reference_member_kls(folder, members, tokens) -> list[float]:
    """Each member's KL: its whole pruned model, every layer its recorded one (:class:`InMemory`)."""
    model = InMemory(folder, tokens)
    out = []
    for m in range(len(members[0][1])):
        x = model.embed[tokens]
        for i, layers in members:
            x = model.pruned(i, *layers[m])(x, model.pe)
        out.append(model.kl(x))
    return out


@pytest.mark.parametrize("structure", ["streamprune", "servable"])
def test_e2e_scoring_pass_kls_are_the_in_memory_float64_ones_and_the_best_is_taken(tiny_llama, tmp_path, monkeypatch, structure):
    """Each allocation's KL (its whole pruned model streamed over the search rows, fp32, from disk)
    equals the float64 in-memory KL of that model; the output takes the allocation of least KL,
    at the ratio; the allocations are the blends' (the first is the KL-scaled one's)."""
    extra = {"structure": "servable", "ffn_multiple": 16} if structure == "servable" else {}
    opts = {**FAST, "search_blends": 5, **extra}
    members = _recorded_members(monkeypatch)
    cfg = PruneConfig(source=tiny_llama, out=tmp_path / "out", method="cascade", ratio=0.3, method_options=opts, keep_work=True, **E2E)
    report = prune(cfg)
    assert report["achieved_ratio"] == pytest.approx(0.3, abs=0.01 if structure == "streamprune" else 0.03)
    L = open_model(tiny_llama).num_layers
    assert [i for i, _ in members] == list(range(L))
    kls = _scores(cfg.run_dir)
    assert len(kls) == len(members[0][1]) >= 2
    tok = load_tokenizer(tiny_llama)
    rows = calibration_windows(tok, resolve_text_source("c4"), E2E["nsamples"] + FAST["search_rows"], E2E["seqlen"], 0)
    assert kls == pytest.approx(_reference_member_kls(tiny_llama, members, rows[E2E["nsamples"]:]), rel=2e-4)
    best = min(range(len(kls)), key=lambda j: (kls[j], j))
    specs = json.loads((cfg.out / "config.json").read_text())["layer_specs"]
    assert [s["intermediate_size"] for s in specs] == [layers[best][0].intermediate_size for _, layers in members]
    if structure == "servable":
        assert [s["num_kv_heads"] for s in specs] == [layers[best][0].num_kv_heads for _, layers in members]
    stored = load_file(cfg.run_dir / "survey.safetensors")
    survey = [{k.split(".", 1)[1]: v for k, v in stored.items() if k.startswith(f"{i}.")} for i in range(L)]
    method = build_method("cascade", 0.3, opts)
    shapes = open_model(tiny_llama).shapes()
    method.plan(shapes, survey)
    assert method.plans[0] == method._blend_plan(shapes, survey, 1.0) and method._blend_plan(shapes, survey, 0.0) in method.plans


def test_e2e_kill_inside_the_scoring_pass_then_resume_is_byte_identical(tiny_llama, tmp_path):
    opts = [x for k, v in {**FAST, "search_rows": 4, "search_blends": 3}.items() for x in ("--option", f"{k}={str(v).lower()}")]
    cmd = ["prune", tiny_llama, "--method", "cascade", "--ratio", "0.3", *opts, *ARGS]
    ref = run_cli(*cmd, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    killed = run_cli(*cmd, "--out", tmp_path / "out", crash_at="scoring:2")
    assert killed.returncode == -9, killed.stderr
    journal = tmp_path / "out.work" / "journal.jsonl"
    scored = lambda: [r["layer"] for r in map(json.loads, journal.read_text().splitlines()) if r["event"] == "score_layer"]  # noqa: E731
    assert scored() == [0, 1] and (tmp_path / "out.work" / "acts" / "population").is_dir()  # layer 2 was in flight
    resumed = run_cli(*cmd, "--out", tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr
    assert scored() == list(range(4))  # the resume went on at layer 2
    assert digests(tmp_path / "out") == digests(tmp_path / "ref")
    assert _scores(tmp_path / "out.work") == _scores(tmp_path / "ref.work")
    assert not (tmp_path / "out.work" / "acts" / "population").exists()


def test_preflight_counts_the_scoring_pass():
    from test_olica import LLAMA2_70B as shapes
    from streamprune.preflight import forecast

    scored, plain = (build_method("cascade", 0.2, {"allocation": "search", "search_blends": n}) for n in (5, 1))
    for m in (scored, plain):
        m.plan(shapes)
    assert scored.population_bound == 5 and plain.population_bound == 0
    extra = scored.extra_flop(shapes, scored.planned_specs(shapes), 256, 128) - plain.extra_flop(shapes, plain.planned_specs(shapes), 256, 128)
    assert extra > 5 * shapes.num_layers * shapes.intermediate_size ** 3 / 3  # the members' down_proj solves at least
    kw = dict(nsamples=256, seqlen=128, chunk_rows=8, dtype=torch.bfloat16, device=torch.device("cpu"), workspace=0, work_dir=Path("."),
              survey=True, fork_rows=8)
    few, many = (forecast(shapes, plain.planned_specs(shapes), forks=4, members=n, **kw) for n in (0, 40))
    assert many.disk_bytes - few.disk_bytes == 2 * (41 - 5) * 8 * 128 * shapes.hidden_size * 2
