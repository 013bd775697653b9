"""Data parallelism under torchrun: 2 CPU ranks (gloo) against the 1-process run, kill a rank
and resume, world-size change refused, streamed eval split the same way.

Run: ``.venv/bin/pytest tests/test_distributed.py -q`` (4.5 min on the 2-core machine at load
average 7; every torchrun job starts two Python processes, the 1-process runs are in-process).

Bounds. The ranks' moments are the 1-process moments with the fp32 additions in another
order, so they agree to fp32 summation rounding (unit test: max |Δ| ≤ 1e-5 · max |ref| for
chunked sums of ~10³ terms). The pruned tensors are functions of those moments through
SVDs, eigendecompositions and ridge solves, which amplify a relative perturbation ε of the
moments by their conditioning; on the tiny model Olica's worst tensor moves by 6e-5 of its
largest entry (changing ``--chunk-tokens`` in one process, which reorders the same sums,
moves it by 9e-5), SlimLLM's by 1e-6. Layer specs and every discrete choice (kept channels,
heads, value dims) are identical; magnitude (weights only) is bitwise identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_resume import digests  # sha256 of every output file, the report without its "run" block

from streamprune import EvalConfig, PruneConfig, perplexity, prune
from streamprune.run.journal import FingerprintMismatch

NSAMPLES, SEQLEN, CHUNK_TOKENS = 8, 32, 96  # chunks of 3 rows: 3+3+2 in one process, 3+1 per rank
ARGS = ["--calib", "c4", "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--chunk-tokens", str(CHUNK_TOKENS), "--no-progress"]
RATIO = 0.3
BOUND = {"magnitude": 0.0, "olica": 5e-4, "slimllm": 5e-5}  # max |Δ| / max |1-process tensor|


def torchrun(*args, nproc: int = 2, crash_at: str | None = None, crash_rank: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPRUNE_CRASH")}
    env["OMP_NUM_THREADS"] = "1"
    if crash_at:
        env["STREAMPRUNE_CRASH_AT"] = crash_at
    if crash_rank is not None:
        env["STREAMPRUNE_CRASH_RANK"] = str(crash_rank)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "streamprune", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def prune_args(src: Path, out: Path, method: str) -> list:
    return ["prune", src, "--out", out, "--method", method, "--ratio", RATIO, *ARGS]


def last_json(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def worst_relative_difference(a: Path, b: Path) -> float:
    worst = 0.0
    for f in sorted(a.glob("model-*.safetensors")):
        ta, tb = load_file(f), load_file(b / f.name)
        assert ta.keys() == tb.keys(), f.name
        for k in ta:
            assert ta[k].shape == tb[k].shape and ta[k].dtype == tb[k].dtype, k
            scale = ta[k].double().abs().max().item()
            worst = max(worst, (ta[k].double() - tb[k].double()).abs().max().item() / max(scale, 1e-30))
    return worst


def journal_info(work: Path) -> list[dict]:
    return [r for r in map(json.loads, (work / "journal.jsonl").read_text().splitlines()) if r.get("event") == "layer"]


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """Per method: the 1-process output (in this process) and the 2-rank output (torchrun)."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for method in BOUND:
        one, two = root / f"{method}-1", root / f"{method}-2"
        prune(PruneConfig(source=tiny_llama, out=one, method=method, ratio=RATIO, calib="c4", nsamples=NSAMPLES,
                          seqlen=SEQLEN, chunk_tokens=CHUNK_TOKENS, progress=False))
        report = last_json(torchrun(*prune_args(tiny_llama, two, method)))
        assert report["world_size"] == 2 and report["resumed_from_layer"] == 0
        out[method] = (one, two)
    return out


@pytest.mark.parametrize("method", list(BOUND))
def test_two_ranks_equal_one_process(runs, method):
    one, two = runs[method]
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (one, two))
    assert c1 == c2  # same layer specs (and every other config field)
    assert not (two.parent / f"{two.name}.work" / "acts").exists()  # per-rank caches removed
    # discrete choices (kept channels / heads / value dims / ranks) are the same on every layer
    discrete = lambda info: {k: v for k, v in info.items() if isinstance(v, (bool, int, list, str))}
    i1, i2 = (journal_info(d.parent / f"{d.name}.work") for d in (one, two))
    assert [(r["layer"], r["spec"], discrete(r["info"])) for r in i1] == [(r["layer"], r["spec"], discrete(r["info"])) for r in i2]
    worst = worst_relative_difference(one, two)
    assert worst <= BOUND[method], worst
    if method == "magnitude":
        assert digests(one) == {**digests(two), "streamprune_report.json": digests(one)["streamprune_report.json"]}


def test_perplexity_equal_to_four_digits(runs):
    one, two = runs["olica"]
    kw = dict(dataset="wikitext2", seqlen=SEQLEN, max_windows=24, progress=False)
    ppl_one = perplexity(EvalConfig(model=one, **kw))
    two_ranks = last_json(torchrun("eval", two, "--dataset", "wikitext2", "--seqlen", SEQLEN, "--max-windows", 24, "--no-progress"))
    assert two_ranks["world_size"] == 2 and two_ranks["windows"] == ppl_one["windows"] == 24
    assert two_ranks["tokens"] == ppl_one["tokens"]
    assert abs(two_ranks["ppl"] - ppl_one["ppl"]) <= 5e-5 * ppl_one["ppl"], (two_ranks["ppl"], ppl_one["ppl"])
    # the split eval itself only reorders float64 sums of per-window NLLs
    same_model = perplexity(EvalConfig(model=two, **kw))
    assert abs(same_model["nll"] - two_ranks["nll"]) <= 1e-12 * same_model["nll"]


def test_kill_one_rank_then_resume_is_identical(runs, tiny_llama, tmp_path):
    """Rank 1 is SIGKILLed in layer 2's statistics pass (survey and layers 0-1 committed)."""
    out = tmp_path / "out"
    killed = torchrun(*prune_args(tiny_llama, out, "olica"), crash_at="observe:2", crash_rank=1)
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr
    assert not out.exists()
    report = last_json(torchrun(*prune_args(tiny_llama, out, "olica")))
    assert report["resumed_from_layer"] == 2
    assert digests(out) == digests(runs["olica"][1])


def test_kill_rank0_refuses_other_world_size_then_resumes_identical(runs, tiny_llama, tmp_path):
    """Rank 0 is SIGKILLed right after committing layer 1; resuming in one process is refused
    naming world_size; the same 2-rank command resumes and matches the uninterrupted run."""
    out = tmp_path / "out"
    killed = torchrun(*prune_args(tiny_llama, out, "magnitude"), crash_at="committed:1", crash_rank=0)
    assert killed.returncode != 0 and not out.exists()
    with pytest.raises(FingerprintMismatch, match=r"differs in: world_size\).*--fresh"):
        prune(PruneConfig(source=tiny_llama, out=out, method="magnitude", ratio=RATIO, calib="c4", nsamples=NSAMPLES,
                          seqlen=SEQLEN, chunk_tokens=CHUNK_TOKENS, progress=False))
    report = last_json(torchrun(*prune_args(tiny_llama, out, "magnitude")))
    assert report["resumed_from_layer"] == 2
    assert digests(out) == digests(runs["magnitude"][1])


# ---- the collectives themselves, on real observers (torch.multiprocessing, gloo) --------------


def _units(rank: int, world: int, init: str, source: str, out: str) -> None:
    import torch.distributed as dist

    from streamprune import distributed as D
    from streamprune.errors import ConfigError, StreamPruneError
    from streamprune.methods.base import Decision
    from streamprune.methods.olica.observers import PassAObserver
    from streamprune.methods.slimllm.observers import FFNObserver, SurveyObserver
    from streamprune.spec import LayerSpec

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ranks = D.current()
    assert (ranks.rank, ranks.world_size, ranks.is_main) == (rank, world, rank == 0)
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(96, 16, generator=g), torch.randn(96, 32, generator=g)) for _ in range(10)]
    mine = range(10)[ranks.shard(10)]

    def fed(obs, chunk_ids):
        for c in chunk_ids:
            x, h = chunks[c]
            for tap, (xi, yo) in {"v_proj": (x, x), "gate_proj": (x, x), "down_proj": (h, x), "o_proj": (x, x),
                                  "mlp": (x, x), "layer": (x, x * 0.5 + 1)}.items():
                if tap in obs.taps:
                    obs.update(tap, xi, yo)
        return obs

    for make in (lambda: PassAObserver(4, 4), FFNObserver, SurveyObserver):
        ref, obs = fed(make(), range(10)), fed(make(), mine)
        ranks.reduce_observer(obs)
        for (path, _, _, a), (_, _, _, b) in zip(D.summed_leaves(ref, "ref"), D.summed_leaves(obs, "obs")):
            if a is None:
                assert b is None, path
            elif isinstance(a, torch.Tensor):
                assert (a - b).abs().max() <= 1e-5 * a.abs().max(), path
            elif isinstance(a, int):
                assert a == b, path
            else:
                assert abs(a - b) <= 1e-12 * abs(a), path

    # decisions: equal ones pass untouched; a rank-dependent one is replaced by rank 0's
    spec = LayerSpec(hidden_size=2, num_kv_heads=1, heads_per_group=1, head_dim=2, v_head_dim=2, intermediate_size=1)
    same = Decision(spec, {"w": torch.arange(6.0)})
    assert ranks.agree_decision(0, same) is False
    differs = Decision(spec, {"w": torch.arange(6.0) + rank * 1e-7, "b": torch.ones(2)})
    assert ranks.agree_decision(1, differs) is True and torch.equal(differs.tensors["w"], torch.arange(6.0))

    # differently shaped statistics are refused on every rank (not a hang)
    odd = PassAObserver(4, 4)
    odd.e["v_proj"] = torch.ones(4 + rank)
    try:
        ranks.reduce_observer(odd)
        raise AssertionError("no disagreement detected")
    except D.RankDisagreement:
        pass

    # rank 0's error stops every rank, printed once (the others' copy is quiet)
    def fail():
        raise ConfigError("bad --flag 7")

    try:
        ranks.on_main(fail)
        raise AssertionError("no error")
    except StreamPruneError as e:
        assert str(e) == "bad --flag 7" and getattr(e, "quiet", False) == (rank != 0)
    assert ranks.on_main(lambda: 5) == (5 if rank == 0 else None)
    assert ranks.sum_floats(1.5, rank) == [3.0, 1.0]
    try:
        ranks.shard(1)
        raise AssertionError("1 row split over 2 ranks")
    except ConfigError as e:
        assert "--nsamples" in str(e)

    # the Python API inside an initialised process group: the same job as under torchrun
    report = prune(PruneConfig(source=source, out=out, method="olica", ratio=RATIO, calib="c4", nsamples=NSAMPLES,
                               seqlen=SEQLEN, chunk_tokens=CHUNK_TOKENS, progress=False))
    assert report["world_size"] == 2 and report["out"] == out
    dist.destroy_process_group()


def test_collectives_and_python_api_in_an_initialised_group(runs, tiny_llama, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "out"
    mp.spawn(_units, args=(2, f"file://{tmp_path / 'pg'}", str(tiny_llama), str(out)), nprocs=2, join=True)
    assert digests(out) == digests(runs["olica"][1])  # bytes equal to the torchrun job's


CASCADE_OPTS = ["--option", "recon_epochs=2", "--option", "recon_lr=2e-4", "--option", "recon_batch_tokens=64", "--option", "recon_val_rows=2"]


def test_cascade_allocation_splits_and_reconstruction_runs_data_parallel(tiny_llama, tmp_path):
    """cascade's survey statistics (the allocation Gram) are all-reduced like every observer's,
    so the 2-rank run takes the same measured allocation; its gradient reconstruction runs data
    parallel (gradients all-reduced), improves every layer it can, and a rank killed inside it
    resumes to the uninterrupted run's bytes."""
    one, two, killed_out = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    opts = {k: float(v) if "lr" in k else int(v) for k, v in (o.split("=") for o in CASCADE_OPTS[1::2])}
    prune(PruneConfig(source=tiny_llama, out=one, method="cascade", ratio=RATIO, calib="c4", nsamples=NSAMPLES, seqlen=SEQLEN,
                      chunk_tokens=CHUNK_TOKENS, progress=False, method_options=opts, keep_work=True))
    report = last_json(torchrun(*prune_args(tiny_llama, two, "cascade"), *CASCADE_OPTS, "--keep-work"))
    assert report["world_size"] == 2
    c1, c2 = (json.loads((d / "config.json").read_text()) for d in (one, two))
    assert c1 == c2 and len({s["intermediate_size"] for s in c1["layer_specs"]}) > 1  # the same measured allocation
    info1, info2 = ([r["info"] for r in journal_info(tmp_path / f"{d}.work")] for d in ("one", "two"))
    # the held-out rows (the last 2 of 8) live on rank 1: layer 0 (same input, same decision) starts
    # from the 1-process held-out loss; later layers see a stream reconstructed with other batches
    assert info2[0]["recon_val_before"] == pytest.approx(info1[0]["recon_val_before"], rel=1e-4)
    assert all(b["recon_val_after"] <= b["recon_val_before"] for b in info2)
    assert sum(b["recon_val_after"] < 0.99 * b["recon_val_before"] for b in info2) >= 2
    killed = torchrun(*prune_args(tiny_llama, killed_out, "cascade"), *CASCADE_OPTS, crash_at="reconstructed:1", crash_rank=1)
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr and not killed_out.exists()
    resumed = last_json(torchrun(*prune_args(tiny_llama, killed_out, "cascade"), *CASCADE_OPTS))
    assert resumed["resumed_from_layer"] == 1 and digests(killed_out) == digests(two)


def test_data_parallel_reconstruction_equals_one_process_on_full_batches(tiny_llama, tmp_path):
    """With one batch per rank and step, the all-reduced gradient is the 1-process full-batch
    gradient: same held-out curve, same weights up to fp32 summation order."""
    import torch.multiprocessing as mp

    mp.spawn(_recon_units, args=(2, f"file://{tmp_path / 'pg'}", str(tiny_llama)), nprocs=2, join=True)


def _recon_units(rank: int, world: int, init: str, source: str) -> None:
    import torch.distributed as dist

    from streamprune import distributed as D
    from streamprune.methods.cascade.reconstruct import ReconSettings, reconstruct_layer
    from test_cascade import _layer_pair

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    ranks = D.current()
    # 24 rows: 18 train, 6 held out; one step an epoch. float32: the claim is the algebra (up to fp32
    # summation order); bfloat16 steps also round differently for a 12-row and an 18-row batch.
    settings = ReconSettings(epochs=10, lr=3e-3, batch_tokens=10**6, val_rows=6, precision="float32")
    dense, pruned, x, pe = _layer_pair(Path(source), noise=0.3)
    start = {k: v.clone() for k, v in pruned.inner.state_dict().items()}
    ref = reconstruct_layer(pruned, dense, lambda: iter([x]), pe, 24, settings, seed=0)  # one process, one chunk
    pruned.inner.load_state_dict(start)
    mine = ranks.shard(24)  # rank 0: rows 0-11 (train), rank 1: rows 12-23 (6 train, the 6 held out)
    got = reconstruct_layer(pruned, dense, lambda: iter([x[mine]]), pe, 24, settings, seed=0, row_offset=mine.start, ranks=ranks)
    assert got.steps == ref.steps == 10 and got.best_epoch == ref.best_epoch
    assert got.history == pytest.approx(ref.history, rel=1e-4) and got.history[-1] < 0.7 * got.history[0], (got.history, ref.history)
    for k, v in ref.state.items():
        assert (got.state[k] - v).abs().max() <= 1e-3 * v.abs().max(), k
    assert ranks.same_everywhere(D._digest({k: D.tensor_checksum(v) for k, v in got.state.items()}))  # identical bits on every rank
    dist.destroy_process_group()