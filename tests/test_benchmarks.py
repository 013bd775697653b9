"""The benchmark scripts run end to end on tiny shapes and end with one parseable JSON line.

Run: ``.venv/bin/pytest -q tests/test_benchmarks.py`` (~20 s; bench_memory starts one Python
process per depth and is marked slow, ~30 s: ``-m 'not slow'`` skips it).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--config", "custom", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "512"]


def bench(name: str):
    """A script of benchmarks/ imported as a module (its folder on sys.path only while importing)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def run_script(name: str, *args: str, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, "a benchmark prints a readable table before its JSON line"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def make_synthetic():
    return bench("make_synthetic")


def test_make_synthetic_writes_a_sharded_checkpoint_the_engine_opens(tmp_path):
    out = run_script("make_synthetic.py", *TINY, "--layers", "2", "--out", str(tmp_path / "m"))
    assert {"folder", "layers", "hidden_size", "vocab_size", "tokenizer_size", "total_bytes", "layer_bytes", "seconds"} <= set(out)
    assert out["layers"] == 2 and out["vocab_size"] >= out["tokenizer_size"]
    folder = Path(out["folder"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3  # one per layer + embed / norm / head
    assert index["metadata"]["total_size"] == out["total_bytes"]

    from streamprune.adapters import open_model

    shapes = open_model(folder).shapes()
    assert (shapes.num_layers, shapes.hidden_size, shapes.intermediate_size, shapes.num_heads, shapes.num_kv_heads) == (2, 64, 128, 4, 2)
    with safe_open(folder / index["weight_map"]["model.layers.1.mlp.down_proj.weight"], framework="pt") as f:
        down = f.get_tensor("model.layers.1.mlp.down_proj.weight").float()
    assert down.shape == (64, 128)
    assert abs(down.std().item() - 128**-0.5) < 0.01  # N(0, 1/in)


def test_make_synthetic_layers_do_not_depend_on_depth(tmp_path, make_synthetic):
    """Each tensor has its own seeded generator: layer 0 is the same in a 1- and a 2-layer model."""
    import torch

    cfg = make_synthetic.model_config("custom", hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=300)
    name = "model.layers.0.self_attn.q_proj.weight"
    a = make_synthetic.random_tensor(name, (32, 32), torch.bfloat16, seed=0)
    b = make_synthetic.random_tensor(name, (32, 32), torch.bfloat16, seed=0)
    c = make_synthetic.random_tensor(name, (32, 32), torch.bfloat16, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert make_synthetic.layer_shapes(cfg)["self_attn.k_proj.weight"] == (16, 32)  # G * h = 1 * 16
    with pytest.raises(SystemExit, match="multiple"):
        make_synthetic.model_config("custom", num_attention_heads=6, num_key_value_heads=4)


def test_bench_layers_end_to_end():
    out = run_script("bench_layers.py", *TINY, "--layers", "2", "--method", "magnitude", "--ratio", "0.1",
                     "--nsamples", "8", "--seqlen", "32", "--bw-mib", "16", "--device", "cpu", "--no-progress")
    for key in ("median_s", "fixed_s", "extrapolated_s", "io_floor_s", "io_floor_ratio", "disk_read_bps", "disk_write_bps",
                "bytes_read_per_layer", "bytes_written_per_layer", "peak_rss_bytes", "layers", "method"):
        assert key in out, key
    assert out["layers"] == 2 and out["method"] == "magnitude"
    assert out["extrapolated_s"] > 0 and out["io_floor_s"] > 0 and out["disk_read_bps"] > 0
    assert abs(out["io_floor_ratio"] - out["io_floor_s"] / out["extrapolated_s"]) < 1e-3


def test_quality_plot_draws_each_methods_default_rows_newest_first():
    plot_quality = bench("plot_quality")

    def rec(row, ratio, ppl, ev="wikitext2:128"):
        return {"row": row, "eval": ev, "achieved_ratio": ratio, "ppl": ppl}

    records = [rec("dense", 0, 56.1), rec("olica-20", 0.2, 119.3), rec("olica-20-nolc", 0.2, 120.6),
               rec("cascade-20-selection=obs", 0.1997, 104.6),  # the default's value, spelt out
               rec("cascade-20-recon_target=dense_stream", 0.1997, 111.6),  # not the default
               rec("cascade-20-nsamples=512", 0.1997, 99.0),  # another calibration size: not the default
               rec("olica-20-nsamples=256", 0.2, 118.0),  # the default size, spelt out: the newer olica-20 point
               rec("olica-50", 0.5, 999.0), rec("olica-50", 0.4997, 935.8),  # the newest record wins
               rec("olica-20", 0.2, 1.0, ev="ptb:128")]
    series = plot_quality.points(records, "wikitext2:128", None)
    assert series == {"olica": [(0.0, 56.1), (0.2, 118.0), (0.4997, 935.8)], "cascade": [(0.0, 56.1), (0.1997, 104.6)]}
    from streamprune.methods import build_method

    c = build_method("cascade", 0.2, {}).config  # the legend names the default's setting, read from its config
    assert plot_quality.default_label("cascade").startswith(f"cascade (ours): {c.recon_epochs} × {c.recon_batch_tokens}-token epochs, {c.recon_schedule} rate")
    assert plot_quality.default_label("olica") == "Olica"
    quality = sys.modules["quality"]  # plot_quality's sibling: the row grammar
    assert quality.split_calibration("cascade", quality.parse_row("cascade-20-nsamples=512-recon=false")[2]) == ({"recon": False}, 512)
    assert quality.split_calibration("slimllm", {}) == ({}, 32)
    with pytest.raises(ValueError, match="nsamples"):
        quality.split_calibration("olica", {"nsamples": "many"})


@pytest.mark.slow
def test_bench_memory_end_to_end(tmp_path):
    out = run_script("bench_memory.py", *TINY, "--depths", "1,2", "--nsamples", "8", "--seqlen", "32",
                     "--results", str(tmp_path / "results"))
    for key in ("depths", "peak_rss_bytes", "peak_rss_ratio", "checkpoint_bytes", "plots"):
        assert key in out, key
    assert out["depths"] == [1, 2] and all(p > 0 for p in out["peak_rss_bytes"])
    for png in out["plots"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quality_table_renders_records_and_marks_missing_cells():
    quality = bench("quality")
    pruned = {"params": 80, "achieved_ratio": 0.2, "prune_wall_s": 12.4}
    done = {
        ("dense", "wikitext2:128", None): {"ppl": 56.1, "windows": 10},
        ("olica-20", "wikitext2:128", None): {"ppl": 119.27, "windows": 10, **pruned},
        ("magnitude-20", "wikitext2:128", None): {"ppl": 1044365.6, "windows": 10, **pruned},
    }
    lines = quality.render_table(done, ["dense", "olica-20", "magnitude-20", "lorap-50"], ["wikitext2:128", "ptb:128"]).splitlines()
    assert lines[0].startswith("| model | params | achieved ratio | WikiText-2 PPL @128 (10 windows) | PTB PPL @128 |")
    assert lines[2] == "| dense | 100 | 0 | 56.10 | not run | – |"  # dense count recovered from a pruned record
    assert lines[3] == "| Olica 20 % | 80 | 0.2000 | 119.27 | not run | 12 s |"
    assert lines[4] == "| magnitude 20 % | 80 | 0.2000 | 1,044,366 | not run | 12 s |"
    assert lines[5] == "| LoRAP 50 % | not run | – | not run | not run | – |"


def test_quality_run_stopped_by_a_signal_ends_with_the_engines_message_not_a_traceback(monkeypatch, tmp_path, capsys):
    quality = bench("quality")
    from streamprune.run.interrupts import Interrupted

    def stopped(cfg):
        raise Interrupted("stopped by SIGTERM after committing layer 3; run the same command again to resume")

    monkeypatch.setattr(quality, "ensure_demo_model", lambda: tmp_path / "model")
    monkeypatch.setattr(quality, "default_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(quality, "prune", stopped)
    assert quality.main(["--rows", "olica-20", "--prune-only"]) == 130
    err = capsys.readouterr().err
    assert err == "quality.py: stopped by SIGTERM after committing layer 3; run the same command again to resume\n"


@pytest.mark.slow
def test_prune_cost_prunes_in_fresh_processes_and_reproduces_outputs_byte_for_byte(tmp_path):
    model = run_script("make_synthetic.py", *TINY, "--layers", "2", "--out", str(tmp_path / "m"))["folder"]
    common = ["--source", model, "--rows", "magnitude-10,lorap-10", "--nsamples", "8", "--seqlen", "32",
              "--results", str(tmp_path / "cost.jsonl")]
    first = run_script("prune_cost.py", *common, "--keep", str(tmp_path / "a"), "--reference-dir", str(tmp_path / "none"))
    again = run_script("prune_cost.py", *common, "--keep", str(tmp_path / "b"), "--reference-dir", str(tmp_path / "a"))
    assert [r["vs_reference"] for r in first] == ["no reference", "no reference"]
    assert [r["vs_reference"] for r in again] == ["identical", "identical"]
    for r in first + again:
        assert abs(r["achieved_ratio"] - 0.1) <= 0.01 and r["peak_rss_bytes"] > 0 and r["process_wall_s"] >= r["prune_wall_s"] > 0
    assert len((tmp_path / "cost.jsonl").read_text().splitlines()) == 4


# ---- gpu_check.sh (issue 15): its CPU --small form, so the prepared GPU check cannot rot ---------
def test_gpu_check_small_runs_every_step_and_writes_at_most_8_files(tmp_path):
    """The whole check in its small form, as a run on a device would take it (install skipped:
    this checkout is installed). A method that is not registered is skipped, never replaced."""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--small", "--budget-s", "1200", "--methods", "olica nosuch", "--out", str(out),
                           "--work", str(work), "--tests", "tests/test_engine.py -k 'streamed_equals_in_memory and llama'"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.json", "gpu_check.log", "gpu_section.md", "kernels.json", "layers.json", "summary.json", "tests.json"]
    s = json.loads((out / "summary.json").read_text())
    status = {k: v["status"] for k, v in s["steps"].items()}
    assert status == {"install": "skipped", "env": "ok", "synthetic": "ok", "layers:olica": "ok", "layers:nosuch": "skipped",
                      "tests": "ok", "kernels": "ok"}
    assert "not registered" in s["steps"]["layers:nosuch"]["note"]
    (run,) = s["layers"]
    assert run["method"] == "olica" and run["status"] == "ok" and abs(run["achieved_ratio"] - 0.2) < 0.01
    assert [p["layer"] for p in run["per_layer"]] == [0, 1, 2, 3]
    assert all(p["read_s"] >= 0 and p["forward_s"] > 0 and p["decide_s"] > 0 and p["write_s"] > 0 for p in run["per_layer"])
    assert run["max_gpu_memory"] == "24GiB" and run["dtype"] == "torch.bfloat16" and (run["nsamples"], run["seqlen"]) == (16, 64)
    assert run["evicted_source_bytes"] > s["synthetic"]["total_bytes"]  # every shard (payload + headers)
    assert s["tests"]["counts"] == {"passed": 1} and s["tests"]["device_fixture_tests"] == 1
    assert s["kernels"]["moments"] and s["kernels"]["svd"]
    deferred, eager = s["kernels"]["obs"]  # the greedy OBS steps, deferred downdates against the eager loop
    assert deferred["same_choice"] is True and deferred["flush"] > 1 == eager["flush"] and deferred["speedup"] > 0
    assert s["env"]["streamprune"]["methods"] and "olica" in s["env"]["streamprune"]["methods"]
    # the markdown is what gpu_summary renders from summary.json, and it was printed last
    md = (out / "gpu_section.md").read_text()
    assert md == bench("gpu_summary").render(s) and md.strip() in proc.stdout
    assert "| olica 0.2 | 0 |" in md and "small (CI) shapes" in md and "| obs greedy, deferred |" in md
    assert not (work / "model").exists() and not (work / "bench").exists()  # work folder cleaned up


def test_gpu_summary_checks_the_goals_and_marks_a_killed_run():
    gs = bench("gpu_summary")
    layer = {"layer": 0, "read_s": 1.0, "forward_s": 2.0, "decide_s": 3.0, "write_s": 0.5, "wall_s": 6.5,
             "gpu_peak_allocated_bytes": 12e9, "gpu_peak_reserved_bytes": 17e9, "rss_bytes": 8 * 2**30, "bytes_read": 3e9, "bytes_written": 2e9}
    ok = {"method": "olica", "ratio": 0.2, "status": "ok", "achieved_ratio": 0.2001, "median_s": {"wall": 6.5}, "survey_per_layer_s": 0.5,
          "fixed_s": 20.0, "extrapolated_s": 580.0, "gpu_peak_allocated_bytes": 12e9, "gpu_peak_reserved_bytes": 17e9,
          "peak_rss_bytes": 9 * 2**30, "disk_write_bps": 2e9, "disk_read_bps": 4e9, "io_floor_s": 145.0, "evict_suspect": False,
          "per_layer": [layer]}
    killed = {"method": "cascade", "status": "timeout", "per_layer": [layer, {**layer, "layer": 1, "wall_s": 8.5}]}
    md = gs.render({"meta": {"started_utc": "2026-12-01 10:00:00 UTC", "small": False}, "layers": [ok, killed],
                    "steps": {"layers:olica": {"status": "ok", "seconds": 60.0}}})
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| olica 0.2 | 0.2001")}
    (row,) = rows.values()
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4] == "580 s = 9.7 min" and cells[5] == "yes"  # <= 10 min
    assert cells[6] == "12.00 / 17.00" and cells[7] == "**NO**"  # reserved 17 GB > 16 GB
    assert cells[11] == "4.0×"  # 580 s measured / 145 s floor
    assert "| cascade | **timeout** | 7.50 (partial) |" in md
    assert "| cascade (timeout) | 1 |" in md


def test_gpu_check_kills_a_child_past_its_limit(tmp_path):
    gpu_check = bench("gpu_check")
    check = gpu_check.Check(gpu_check.parse_args(["--small", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]))
    t0 = time.monotonic()
    rc, lines, secs = check.run("sleeper", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(300)"], cap=10)
    assert rc is None and lines == ["started"] and 10 <= secs < 60 and time.monotonic() - t0 < 60
    check.log.close()
    assert "sleeper: over its 10 s limit; killing pid" in (tmp_path / "o" / "gpu_check.log").read_text()


def test_gpu_check_full_mode_builds_commands_the_scripts_accept(tmp_path, monkeypatch):
    """The 70B-shaped branch cannot run in CI: replay it with a fake child runner on a
    pretend CUDA machine and parse every command with the script's own argument parser."""
    bench_kernels, bench_layers, gpu_check, make_synthetic = map(bench, ("bench_kernels", "bench_layers", "gpu_check", "make_synthetic"))
    work = tmp_path / "w"
    check = gpu_check.Check(gpu_check.parse_args(["--methods", "olica,lorap", "--out", str(tmp_path / "o"), "--work", str(work),
                                                  "--install", "never"]))
    env = {"cuda_available": True, "device_name": "NVIDIA H200", "streamprune": {"methods": ["lorap", "magnitude", "olica"]}}
    synthetic = {"folder": str(work / "model"), "layers": 4, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096, "dtype": "bfloat16", "layer_bytes": 1, "total_bytes": 1}
    calls = []

    def fake_run(name, cmd, cap, env_vars=None):
        calls.append((name, cmd))
        if name == "env":
            return 0, [json.dumps(env)], 1.0
        if name == "synthetic":
            (work / "model").mkdir(parents=True)
            return 0, [json.dumps(synthetic)], 1.0
        return 1, ["not run"], 1.0

    monkeypatch.setattr(check, "run", fake_run)
    for step in gpu_check.STEPS:
        getattr(check, f"step_{step}")()
    check.log.close()
    by_name = dict(calls)
    assert [n for n, _ in calls] == ["env", "synthetic", "layers:olica", "layers:lorap", "tests", "kernels"]
    syn = make_synthetic.build_parser().parse_args(by_name["synthetic"][2:])
    assert (syn.config, syn.layers, syn.vocab, syn.gen_device) == ("llama-2-70b", 4, 4096, "cuda")
    monkeypatch.setattr(sys, "argv", by_name["layers:olica"][1:])
    lay = bench_layers.parse_args()
    assert (lay.method, lay.ratio, lay.device, lay.compute_dtype, lay.max_gpu_memory) == ("olica", 0.2, "cuda", "bfloat16", "24GiB")
    assert (lay.nsamples, lay.seqlen, lay.chunk_tokens, lay.bw_mib, lay.no_fallback, lay.model) == (256, 128, 16384, 2048, True, work / "model")
    monkeypatch.setattr(sys, "argv", by_name["kernels"][1:])
    ker = bench_kernels.parse_args()
    assert (ker.device, ker.small, ker.d, ker.f, ker.repeat, ker.svd_repeat) == ("cuda", False, 8192, 28672, 5, 1)
    tests = by_name["tests"]
    assert tests[tests.index("--device") + 1] == "cuda" and "not slow" in tests
    assert all(f in tests for f in gpu_check.TEST_FILES) and all((BENCH.parent / f).exists() for f in gpu_check.TEST_FILES)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_the_70b_check_without_cuda(tmp_path):
    gpu_check = bench("gpu_check")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--steps", "synthetic,layers", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
    assert e.value.code == 2
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["steps"] == {"device": {"status": "failed", "seconds": 0.0, "note": "no CUDA device; use --small"}}
    assert not (tmp_path / "w" / "model").exists()


def test_bench_recon_step_times_the_three_ways_on_one_layer():
    out = run_script("bench_recon_step.py", "--d", "64", "--f", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                     "--tokens", "64", "--seqlen", "32", "--repeat", "2", "--warmup", "1")
    assert out["bench"] == "recon_step" and out["tokens"] == 64 and out["params"] == 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64  # q, o; k, v (2 KV heads of 16); gate, up, down; norms
    assert [r["step"] for r in out["rows"]] == ["float32, per-tensor Adam", "float32, fused Adam", "bfloat16 autocast, fused Adam"]
    assert all(r["ms"] > 0 and r["adam_ms"] > 0 for r in out["rows"])


# ---- RESULTS.md: the summary's figures come from records of today's defaults ------------------
def test_results_summary_is_backed_by_records_of_the_default_rows(capsys):
    """Every figure of RESULTS.md's summary has a record (same value as printed) of the
    method's default row (``METHOD-PCT``, no options) in benchmarks/results/*.jsonl."""
    check_results = bench("check_results")
    assert check_results.main([]) == 0, capsys.readouterr().out
    claims, problems = check_results.parse_summary((BENCH / "RESULTS.md").read_text())
    assert not problems
    assert {c.row for c in claims} >= {"dense", "olica-20", "lorap-50", "slimllm-50", "cascade-20", "cascade-50"}
    assert {c.kind for c in claims} == {"wikitext2:128", "wikitext2:2048", "ptb:128", "cost"}


def test_check_results_flags_figures_without_a_default_record(tmp_path, capsys):
    check_results = bench("check_results")
    q = [{"row": "dense", "eval": "wikitext2:128", "max_windows": None, "ppl": 56.1026},
         {"row": "olica-20", "eval": "wikitext2:128", "max_windows": None, "ppl": 119.2723, "prune_wall_s": 268.02,
          "prune_peak_rss_bytes": 1088749568},
         {"row": "olica-20", "eval": "ptb:128", "max_windows": 64, "ppl": 150.0},  # a subset: never backs a cell
         {"row": "cascade-20-recon_schedule=constant", "eval": "wikitext2:128", "max_windows": None, "ppl": 97.73},
         {"row": "magnitude-20", "eval": "wikitext2:128", "max_windows": None, "ppl": 1044365.63}]
    cost = [{"row": "olica-20", "prune_wall_s": 264.42, "peak_rss_bytes": 1461575680}]
    (tmp_path / "results").mkdir()
    for name, recs in (("quality", q), ("prune_cost", cost)):
        (tmp_path / "results" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    def check(summary: str) -> list[str]:
        md = tmp_path / "RESULTS.md"
        md.write_text("# R\n\n## Summary\n\n" + summary + "\n## Next\n\n| method | removed | PTB @128 |\n|---|---|---|\n| nope | 1 % | x |\n")
        rc = check_results.main(["--results-md", str(md), "--results-dir", str(tmp_path / "results")])
        out = capsys.readouterr().out.splitlines()
        assert (rc == 0) == ("are backed by records" in out[-1])
        return out if rc else []

    good = ("| WikiText-2 @128 | 10 % | 20 % |\n|---|---|---|\n| Olica | – | 119.27 |\n| magnitude | – | 1,044,366 |\n\n"
            "| method | removed | WikiText-2 @128 | PTB @128 | prune wall | peak RSS |\n|---|---|---|---|---|---|\n"
            "| dense | 0 % | 56.10 | – | – | – |\n| **Olica** | 20 % | **119.27** | – | 264.4 s | 1.36 GiB |\n")
    assert check(good) == []
    assert check(good.replace("264.4 s | 1.36 GiB", "268.0 s | 1.01 GiB")) == []  # the quality run's prune is a record too
    bad = check(good.replace("| 119.27 |\n| magnitude", "| 119.28 |\n| magnitude")  # not the record's value
                + "| cascade (ours) | 20 % | 97.73 | – | – | – |\n"  # only a superseded setting has it
                + "| Olica | 20 % | – | 150.00 | – | – |\n"  # only a 64-window record has it
                + "| Olica | 20 % | – | – | 264.4 s | 1.02 GiB |\n"  # wall and RSS from different records
                + "| LoRAP | 20 % | n/a | – | – | – |\n")  # not a figure
    assert len(bad) == 5, bad
    for what in ("'n/a' under 'WikiText-2 @128' is not a figure", "olica-20 wikitext2:128 = 119.28", "cascade-20 wikitext2:128 = 97.73",
                 "olica-20 ptb:128 = 150.00", "olica-20 prune wall / peak RSS = 264.4 s / 1.02 GiB"):
        assert sum(what in line for line in bad) == 1, (what, bad)


def test_make_synthetic_resume_rewrites_only_the_missing_shard(tmp_path, make_synthetic):
    cfg = make_synthetic.model_config("custom", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    folder = tmp_path / "m"
    make_synthetic.write_checkpoint(folder, cfg, 3, log=lambda *_: None)
    shards = sorted(folder.glob("model-*.safetensors"))
    before = {p.name: p.read_bytes() for p in shards}
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[2].unlink()  # a write killed before this shard was renamed into place
    (folder / "model.safetensors.index.json").unlink()
    make_synthetic.write_checkpoint(folder, cfg, 3, resume=True, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in sorted(folder.glob("model-*.safetensors"))} == before
    assert [p.stat().st_mtime_ns == stamps[p.name] for p in shards] == [True, True, False, True]
    assert not list(folder.glob("*.tmp"))


def test_bench_out_of_core_tiny_kills_resumes_and_records(tmp_path):
    """The out-of-core benchmark on tiny shapes: the large run's every step (checkpoint, preflight,
    sampled run, kill -9 halfway through a layer, resume, streamed eval, record, plot)."""
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_out_of_core.py"), "--shape", "tiny", "--root", str(tmp_path / "root"),
                           "--results", str(results), "--methods", "magnitude", "--kill-after", "3", "--interval", "0.2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec == json.loads((results / "out_of_core.jsonl").read_text().splitlines()[-1])
    for key in ("method", "checkpoint_bytes", "ram_bytes", "peak_rss_bytes", "wall_s", "preflight_host_bytes", "preflight_wall_s",
                "bytes_read", "bytes_written", "peak_uss_bytes", "peak_page_cache_bytes", "lost_s"):
        assert rec[key] is not None, key
    assert rec["method"] == "magnitude" and abs(rec["achieved_ratio"] - 0.2) < 0.01
    assert rec["killed_at_s"] > 0 and rec["resumed_from_layer"] == 3  # continued from the layer in flight, not from zero
    assert len(rec["peak_rss_bytes_per_process"]) == 2 and all(p > 0 for p in rec["peak_rss_bytes_per_process"])
    assert rec["bytes_written"] >= rec["output_bytes"] > 0
    assert rec["eval_windows"] == 4 and 1 < rec["eval_ppl"] < 1e5
    timeline = json.loads((results / "out_of_core_tiny_magnitude.json").read_text())
    assert [r["layer"] for r in timeline["layers"]] == list(range(6))  # layers 0-2 by the killed process, 3-5 by the resume
    assert (results / "out_of_core_memory_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_out_of_core_tiny_continues_after_it_was_stopped_inside_the_survey(tmp_path):
    """The whole benchmark (its sampler and the prune) killed inside cascade's survey, as when a
    machine is taken back in the middle of a multi-hour run: ``--continue`` resumes the prune at
    the survey layer in flight, and the record covers both processes."""
    import signal

    results, root = tmp_path / "results", tmp_path / "root"
    cmd = [sys.executable, str(BENCH / "bench_out_of_core.py"), "--shape", "tiny", "--root", str(root), "--results", str(results),
           "--methods", "cascade", "--interval", "0.2", "--save-every", "0.2"]
    env = {**os.environ, "STREAMPRUNE_STALL_AT": "surveyed:2:120"}  # the prune holds still after its survey layer 2
    bench = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = root / "out-tiny-cascade-20.bench.json"
    deadline = time.time() + 300
    while time.time() < deadline and bench.poll() is None:
        if state.is_file() and [r["layer"] for r in json.loads(state.read_text())["runs"][-1]["survey"]] == [0, 1, 2]:
            break
        time.sleep(0.2)
    assert bench.poll() is None, bench.stderr.read()[-3000:]
    os.killpg(bench.pid, signal.SIGKILL)  # the sampler and the prune together
    bench.wait()
    proc = subprocess.run([*cmd, "--continue"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rec["processes"] == 2 and rec["resume_points"] == [{"survey": 3, "layers": 0}]  # survey layers 0-2 were kept
    assert len(rec["peak_rss_bytes_per_process"]) == 2 and all(p > 0 for p in rec["peak_rss_bytes_per_process"])
    assert abs(rec["achieved_ratio"] - 0.2) < 0.01 and 1 < rec["eval_ppl"] < 1e5 and rec["lost_s"] >= 0
    timeline = json.loads((results / "out_of_core_tiny_cascade.json").read_text())
    assert [r["layer"] for r in timeline["survey"]] == list(range(6))  # each survey layer once: 0-2 before the kill, 3-5 after
    assert [r["layer"] for r in timeline["layers"]] == list(range(6))
    assert not state.exists()
