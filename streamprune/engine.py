"""The streaming pruning loop: one decoder layer at a time, resumable.

Read top to bottom: open (fingerprint, resume point), calibration tokens -> boundary 0,
survey (if the method has one), then per layer load / observe / decide / propagate /
write / commit, then finalize and publish. See ``../shared/spec/ARCHITECTURE.md``.
"""

from __future__ import annotations

import errno
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from . import __version__, atomic, runlock, writer
from .activations import ActivationCache
from .adapters import load_tokenizer, open_model, tokenizer_digest
from .checkpoint import file_sha256
from . import preflight
from .config import PruneConfig, parse_size, resolve_device, resolve_dtype
from .distributed import Ranks, SharedStop, joined
from .errors import ConfigError, NumericalError, StreamPruneError
from .faults import crash_point
from .interrupts import graceful_stop
from .journal import RunDir, digest
from .methods import build_method
from .methods.base import LayerData
from .prefetch import Prefetcher, stage_on_host, to_device
from .spec import LayerSpec
from .profile import GiB, LayerProfile, append_line, peak_rss_bytes
from .stream import embed_to_boundary, observe, position_embeddings, propagate
from .textdata import calibration_windows, resolve_text_source


def fingerprint(cfg: PruneConfig, adapter, method, calib_digest: str, device, dtype, chunk_rows: int, world_size: int = 1) -> dict:
    fp = {
        "source": adapter.reader.fingerprint(),
        "method": method.config_dict(),
        "calibration": {"source": cfg.calib, "sha256": calib_digest, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed},
        "dtype": str(dtype),
        "device_type": device.type,
        "chunk_rows": chunk_rows,
        "version": __version__,
    }
    if world_size > 1:  # the calibration split (so the sums' rounding and each rank's cache) depend on it
        fp["world_size"] = world_size
    if cfg.format != "streamprune":  # only then: fingerprints of earlier runs stay as they were
        fp["format"] = cfg.format
    if cfg.tokenizer is not None:  # only then: fingerprints of runs without it stay as they were
        fp["tokenizer"] = tokenizer_digest(cfg.tokenizer)
    return fp


def plan(cfg: PruneConfig):
    """Everything decided from shapes alone: adapter, method plan, planned specs."""
    adapter = open_model(cfg.source)
    shapes = adapter.shapes()
    if cfg.seqlen > shapes.max_position_embeddings:
        raise ConfigError(f"--seqlen {cfg.seqlen} exceeds the model's max_position_embeddings {shapes.max_position_embeddings}")
    method = build_method(cfg.method, cfg.ratio, cfg.method_options)
    if cfg.format == "nemotron-nas":
        method = servable_method(cfg, method)
    method.plan(shapes, survey=None)
    return adapter, shapes, method, method.planned_specs(shapes)


def servable_method(cfg: PruneConfig, method):
    """The method with the options that make it produce the servable structure
    (``Method.servable_options``); a method that cannot is refused in one line."""
    extra = type(method).servable_options
    if extra is None:
        raise ConfigError(f"--format {cfg.format} stores dense attention (kept or removed) and FFN widths in multiples of 256, "
                          f"which --method {cfg.method} cannot produce: use --method cascade (the best) or magnitude, or "
                          "--format streamprune")
    clash = sorted(k for k, v in extra.items() if k in cfg.method_options and cfg.method_options[k] != v)
    if clash:
        raise ConfigError(f"--format {cfg.format} needs --option {clash[0]}={extra[clash[0]]}, got "
                          f"{clash[0]}={cfg.method_options[clash[0]]}: drop that --option or use --format streamprune")
    return build_method(cfg.method, cfg.ratio, {**cfg.method_options, **extra})


@torch.no_grad()
def run_survey(method, adapter, cache: ActivationCache, pe, device, dtype, progress: bool, ranks: Ranks, stop) -> list[dict]:
    """Dense model over dense hidden states; per-layer results from the method.

    ``stop`` (the run's SIGINT/SIGTERM flag) is checked before every layer: the survey is
    journaled only whole, so a stop inside it ends the process at once (``Interrupted``) and
    the resumed run starts the survey again, instead of running it to its end first (on a 70B
    model: 80 dense layers over the calibration set)."""
    results = []
    with read_ahead(adapter, 0, device, dtype) as ahead:
        for i in tqdm(range(adapter.num_layers), desc="survey", disable=not progress):
            stop.check(f"during the survey, before its layer {i} (a resume starts the survey again)")
            weights = to_device(next(ahead), device, dtype)
            layer = adapter.build_layer(i, weights, device, dtype)
            obs = method.survey_observer(i, weights)
            propagate(layer, cache, i, pe, device, observer=obs)
            ranks.reduce_observer(obs)
            cache.drop(i)
            results.append(method.survey_result(i, obs))
    return results


def read_ahead(adapter, start: int, device, dtype) -> Prefetcher:
    """Layer tensors from ``start`` on, read (and pinned on CUDA) one layer ahead on a thread."""
    return Prefetcher(lambda j: stage_on_host(adapter.read_layer(j), device, dtype), range(start, adapter.num_layers))


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextmanager
def disk_errors(where: str, run: RunDir):
    """Turn a full disk into an actionable message; the journal makes the retry clean."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StreamPruneError(
                f"disk full while writing {where} under {run.root}; free space (or move --work-dir) "
                "and run the same command again to resume"
            ) from e
        raise


def check_finite(layer: int, decision) -> None:
    for name, t in decision.tensors.items():
        if not torch.isfinite(t).all():
            raise NumericalError(
                f"layer {layer}: NaN/Inf in the pruned {name.rsplit('.', 1)[0]} ({name}); the statistics "
                "overflowed or are degenerate: use --dtype float32 and/or more --nsamples"
            )


def prune(cfg: PruneConfig) -> dict:
    """Prune ``cfg.source`` into ``cfg.out``; returns the report (also written to the output).

    SIGINT/SIGTERM stop after the layer in flight is committed (``Interrupted``). The run
    directory and ``cfg.out`` are locked for the whole call (``runlock.RunLocked``; under
    torchrun rank 0 holds the lock and its refusal stops every rank). Under torchrun (or in an
    initialised process group) the calibration is split across the ranks: see
    :mod:`streamprune.distributed`."""
    with joined(cfg.device) as (ranks, device), graceful_stop() as stop, ExitStack() as locks:
        if ranks.distributed:
            cfg = replace(cfg, device=device, progress=cfg.progress and ranks.is_main)
        if not cfg.dry_run:
            ranks.on_main(lambda: locks.enter_context(runlock.held(cfg.run_dir, cfg.out)))
        return _prune(cfg, SharedStop(stop, ranks), ranks)


def _open_run(run: RunDir, fp: dict, fresh: bool, job: dict) -> list[dict]:
    records = run.open(fp, fresh=fresh, job=job)
    run.verify(records)
    return records


@torch.no_grad()
def _prune(cfg: PruneConfig, stop, ranks: Ranks = Ranks()) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    gpu_budget = parse_size(cfg.max_gpu_memory)
    adapter, shapes, method, specs = plan(cfg)
    chunk_rows = preflight.fit_chunk_rows(shapes, cfg.chunk_rows, cfg.seqlen, dtype.itemsize, method.workspace_bytes(shapes), gpu_budget)
    fc = preflight.forecast(shapes, specs, nsamples=cfg.nsamples, seqlen=cfg.seqlen, chunk_rows=chunk_rows, dtype=dtype,
                            device=device, workspace=method.workspace_bytes(shapes), work_dir=cfg.run_dir, survey=method.needs_survey,
                            dense_stream=method.needs_dense_stream, decision_stream=method.needs_decision_stream,
                            method_flop=method.extra_flop(shapes, specs, cfg.nsamples, cfg.seqlen),
                            host_workspace=method.host_workspace_bytes(shapes, cfg.nsamples, cfg.seqlen))
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.source)
    source = resolve_text_source(cfg.calib)
    run = RunDir(cfg.run_dir)
    fp = fingerprint(cfg, adapter, method, source.sha256, device, dtype, chunk_rows, ranks.world_size)
    done = writer.finished_report(cfg.out, digest(fp))
    if done is not None and not cfg.fresh:
        if not cfg.keep_work:  # a run killed after publishing, before its cleanup
            ActivationCache(run.acts).clear()
        return {**done, "out": str(cfg.out), "already_complete": True}
    writer.check_output_target(cfg.out, digest(fp))
    if cfg.dry_run:
        return {"dry_run": True, **fc.as_dict()}
    preflight.check(fc, device, gpu_budget)
    preflight.cap_gpu(device, gpu_budget)

    job = {"source": str(cfg.source), "out": str(cfg.out), "num_layers": shapes.num_layers, "method": cfg.method}
    records = ranks.on_main(lambda: _open_run(run, fp, cfg.fresh, job))  # rank 0 alone writes the run dir
    records = records if ranks.is_main else run.records()
    committed = run.committed_layers(records)
    cache = ActivationCache(ranks.acts_dir(run.acts))
    outer = adapter.read_outer()
    embed = outer["model.embed_tokens.weight"].to(device, dtype)
    pe = position_embeddings(adapter.rotary(device), cfg.seqlen, device, dtype)
    storage_dtype = next(iter(adapter.read_layer(0).values())).dtype

    # ---- survey pass (journaled: a resume never repeats it) --------------------------
    if method.needs_survey:
        survey = run.load_survey(records, shapes.num_layers)
        if survey is None:
            tokens = calibration_windows(tokenizer, source, cfg.nsamples, cfg.seqlen, cfg.seed)[ranks.shard(cfg.nsamples)]
            survey_cache = ActivationCache(cache.root / "survey")
            with disk_errors("the survey activations", run):
                try:
                    embed_to_boundary(survey_cache, tokens, embed, chunk_rows, dtype)
                    survey = run_survey(method, adapter, survey_cache, pe, device, dtype, cfg.progress, ranks, stop)
                finally:  # stopped or failed too: its activations are never reused
                    survey_cache.clear()
            with disk_errors("the survey results", run):
                if ranks.is_main:
                    run.save_survey(survey)
        method.plan(shapes, survey=survey)

    # ---- resume point: the first uncommitted layer, whose input boundary is on disk --
    start = max(committed) + 1 if committed else 0
    # The dense model's own stream, next to the pruned one, for methods that fit to it.
    dense_cache = ActivationCache(cache.root / "dense") if method.needs_dense_stream else None
    # The pruned model before reconstruction, for methods that decide on it (passes A and B).
    decision_cache = ActivationCache(cache.root / "decision") if method.needs_decision_stream else None
    streams = [c for c in (dense_cache, decision_cache, cache) if c is not None]  # the pruned stream last: its marker says "all"
    seen = decision_cache or cache  # what passes A and B observe
    if start == 0 and not cache.is_complete(0):
        tokens = calibration_windows(tokenizer, source, cfg.nsamples, cfg.seqlen, cfg.seed)[ranks.shard(cfg.nsamples)]
        with disk_errors("the calibration activations", run):
            for c in streams:
                embed_to_boundary(c, tokens, embed, chunk_rows, dtype)
    for c in streams:
        if not ranks.all_true(start == shapes.num_layers or c.is_complete(start)):
            raise StreamPruneError(f"activation boundary {start} is missing from {c.root}; rerun with --fresh")
    out_specs = [None] * shapes.num_layers
    for i, rec in committed.items():
        out_specs[i] = LayerSpec.from_dict(rec["spec"])

    # ---- the layer loop ---------------------------------------------------------------
    startup_s = time.perf_counter() - t_start  # for a resume: time to get back to work
    done_s: list[float] = []
    bar = tqdm(range(start, shapes.num_layers), desc="prune", initial=start, total=shapes.num_layers, disable=not cfg.progress)
    with read_ahead(adapter, start, device, dtype) as ahead:
        for i in bar:
            prof = LayerProfile(i, device)
            read0, write0 = cache.bytes_read, cache.bytes_written
            with prof.phase("read"):  # waiting for the prefetch thread + host-to-device copy
                weights = to_device(next(ahead), device, dtype)
                dense = adapter.build_layer(i, weights, device, dtype)
                weight_bytes = nbytes(weights)
            # Reconstruction's default target is the dense layer on the pruned stream — what pass A
            # computes when it observes that stream: keep its outputs rather than run the layer twice.
            targets = [] if method.needs_reconstruction and dense_cache is None and seen is cache else None
            with prof.phase("forward"):
                obs = method.observer(i, "A", weights)
                observe(dense, seen, i, pe, obs, device, keep=targets)
                crash_point(f"observe:{i}")
            with prof.phase("sync"):  # sums over all ranks' shards (no-op in one process)
                ranks.reduce_observer(obs)
            with prof.phase("decide"):
                decision = method.decide(i, weights, obs)
            if method.needs_pass_b:
                with prof.phase("forward"):
                    obs_b = method.observer(i, "B", decision.tensors)
                    if obs_b is not None:
                        staged = dense if method.pass_b_layer == "dense" else adapter.build_pruned_layer(i, decision.spec, decision.tensors, device, dtype)
                        observe(staged, seen, i, pe, obs_b, device)
                with prof.phase("sync"):
                    ranks.reduce_observer(obs_b)
                with prof.phase("decide"):
                    decision = method.refine(i, decision, obs_b)
            if dense_cache is not None:
                with prof.phase("forward"), disk_errors(f"layer {i}'s dense-stream activations", run):
                    propagate(dense, dense_cache, i, pe, device)
            if decision_cache is not None:  # the decision as taken, before reconstruction changes its values
                with prof.phase("forward"), disk_errors(f"layer {i}'s decision-stream activations", run):
                    propagate(adapter.build_pruned_layer(i, decision.spec, decision.tensors, device, dtype), decision_cache, i, pe, device)
            if method.needs_reconstruction:
                with prof.phase("reconstruct"):
                    if targets:  # (pruned-stream input, the dense layer's output on it from pass A) pairs
                        chunks = lambda: zip(cache.read(i, device), (t.to(device) for t in targets))  # noqa: E731
                    elif dense_cache is None:  # the method runs the dense layer on the input itself
                        chunks = lambda: cache.read(i, device)  # noqa: E731
                    else:  # (pruned-stream input, dense-stream output) pairs, chunk by chunk
                        chunks = lambda: zip(cache.read(i, device), dense_cache.read(i + 1, device))  # noqa: E731
                    data = LayerData(dense=dense, chunks=chunks, pe=pe, rows=cfg.nsamples, ranks=ranks,
                                     row_offset=ranks.shard(cfg.nsamples).start,
                                     build=lambda spec, t, dt: adapter.build_pruned_layer(i, spec, t, device, dt))
                    decision = method.reconstruct(i, decision, data)
                    crash_point(f"reconstructed:{i}")
            decision.validate(i)
            check_finite(i, decision)
            with prof.phase("sync"):  # every rank decided alone from the same sums: check they agree
                ranks.agree_decision(i, decision)
            with prof.phase("forward"), disk_errors(f"layer {i}'s output activations", run):
                pruned = adapter.build_pruned_layer(i, decision.spec, decision.tensors, device, dtype)
                propagate(pruned, cache, i, pe, device)
            with prof.phase("write"), disk_errors(f"layer {i}", run):
                out_bytes = 0
                ranks.barrier()  # every rank's boundary i+1 is durable before layer i is committed
                if ranks.is_main:
                    fname, out_bytes = writer.save_layer(run.staging, i, decision.tensors, storage_dtype)
                    crash_point(f"written:{i}")
                    run.append({"event": "layer", "layer": i, "file": fname, "sha256": file_sha256(run.staging / fname), "spec": decision.spec.to_dict(), "info": decision.info})
                crash_point(f"committed:{i}")
                ranks.barrier()  # the commit is durable before any rank drops its boundary i
                cache.drop(i)
                for c in (dense_cache, decision_cache):
                    if c is not None:
                        c.drop(i)
            out_specs[i] = decision.spec
            del weights, dense, pruned, decision, targets
            done_s.append(time.perf_counter() - prof.start)
            eta = sorted(done_s)[len(done_s) // 2] * (shapes.num_layers - i - 1)
            rec = prof.record(bytes_read=weight_bytes + cache.bytes_read - read0, bytes_written=cache.bytes_written - write0 + out_bytes, eta_s=round(eta, 1))
            if ranks.is_main:
                append_line(run.profile_path, rec)
            bar.set_postfix(rss=f"{rec['rss_bytes'] / GiB:.2f}GiB", gpu=f"{rec.get('gpu_peak_allocated_bytes', 0) / GiB:.2f}GiB")
            stop.check(f"after committing layer {i}")
    bar.close()

    # ---- finalize (rank 0) ----------------------------------------------------------------
    if ranks.is_main:
        with disk_errors("the output folder", run):
            writer.save_outer(run.staging, outer, storage_dtype)
            layer_files = [writer.layer_file(i) for i in range(shapes.num_layers)]
            writer.finalize(run.staging, cfg.source, adapter.config, out_specs, layer_files, sorted(outer), storage_dtype, tokenizer_folder=cfg.tokenizer)
    report = {
        "method": method.config_dict(),
        "requested_ratio": cfg.ratio,
        "achieved_ratio": shapes.achieved_ratio(out_specs),
        "params_dense": shapes.total_params(),
        "params_pruned": shapes.total_params(out_specs),
        "layers": shapes.num_layers,
        "calibration": {"source": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed},
        "device": str(device),
        "dtype": str(dtype),
        "fingerprint_sha256": run.fingerprint_sha256(),
        "version": __version__,
    }
    # Volatile facts (time, memory) go to the run directory, not into the output bytes,
    # so a resumed run's output is byte-identical to an uninterrupted one.
    timing = {"wall_s": round(time.perf_counter() - t_start, 2), "peak_rss_bytes": peak_rss_bytes(), "resumed_from_layer": start, "startup_s": round(startup_s, 2), "forecast": fc.as_dict()}
    if device.type == "cuda":
        timing["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if ranks.distributed:
        timing["world_size"] = ranks.world_size
    # The report's "run" block (time, peaks) is the only part of the output that may
    # differ between an uninterrupted and a resumed run; every other byte is identical.
    if ranks.is_main:
        with disk_errors("the output folder", run):
            atomic.write_json(run.staging / writer.REPORT_FILE, {**report, "run": timing})
        crash_point("finalize")
        writer.publish(run.staging, cfg.out)
    if not cfg.keep_work:
        cache.clear()
    ranks.finished(run.acts, keep=cfg.keep_work)
    return {**report, **timing, "out": str(cfg.out)}
