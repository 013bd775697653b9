"""The streaming pruning loop: one decoder layer at a time, resumable.

Read top to bottom: open (fingerprint, resume point), calibration tokens -> boundary 0,
survey (if the method has one), then per layer load / observe / decide / propagate /
write / commit, then finalize and publish. See ``../shared/spec/ARCHITECTURE.md``.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .storage import atomic, writer
from .run import runlock
from .activation_streams import ActivationStreams
from .storage.activations import ActivationCache
from .adapters import load_tokenizer, open_model, tokenizer_digest
from .storage.checkpoint import file_sha256
from . import preflight
from .config import PruneConfig, parse_size, resolve_device, resolve_dtype
from .distributed import Ranks, SharedStop, joined
from .errors import ConfigError, NumericalError, StreamPruneError
from .run.faults import crash_point
from .run.interrupts import graceful_stop
from .run.journal import RunDir, digest, disk_errors
from .methods import build_method
from .methods.base import Decision, LayerData, Method
from .storage.prefetch import Prefetcher, to_device
from .spec import LayerSpec
from .run.profile import GiB, LayerProfile, append_line, peak_rss_bytes
from .stream import position_embeddings, read_ahead, token_embedding
from .survey import scoring_pass, survey_pass
from .inputs.textdata import calibration_windows, resolve_text_source


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
        from .formats.nemotron_nas import check_block

        check_block(shapes.dense_spec())
        method = servable_method(cfg, method)
    method.plan(shapes, survey=None)
    return adapter, shapes, method, method.planned_specs(shapes)


def convert_staged(run: RunDir, fmt: str) -> Path:
    """The staged output (streamprune format) converted to ``fmt`` in a folder of its own
    (``streamprune.formats.nemotron_nas.export``, one layer at a time; a conversion cut
    short by a crash is redone whole), with the run's report; returns that folder."""
    from .formats import nemotron_nas

    target = run.root / fmt
    shutil.rmtree(target, ignore_errors=True)
    info = nemotron_nas.export(run.staging, target)
    report = json.loads((run.staging / writer.REPORT_FILE).read_text())
    report["format"] = {"name": fmt, "params_stored": info["params"], "files": info["files"]}
    atomic.write_json(target / writer.REPORT_FILE, report)
    return target


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


def nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


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


@dataclass(frozen=True)
class LayerContext:
    """What every step of every layer reads: fixed for the run."""

    adapter: object
    method: Method
    streams: ActivationStreams
    run: RunDir
    ranks: Ranks
    pe: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    storage_dtype: torch.dtype  # the source checkpoint's, for the output tensors
    rows: int  # the whole job's calibration rows (all ranks)

    def pruned_layer(self, i: int, decision: Decision):
        return self.adapter.build_pruned_layer(i, decision.spec, decision.tensors, self.device, self.dtype)


@torch.no_grad()
def prune_layer(ctx: LayerContext, i: int, ahead: Prefetcher, prof: LayerProfile) -> tuple[LayerSpec, int, int]:
    """Layer ``i``, step by step (``ARCHITECTURE.md``, "The loop"). Returns its spec, the bytes of
    its source tensors and the bytes written; what it holds (layers, tensors) is freed on return."""
    weights, dense = read_weights(ctx, i, ahead, prof)
    decision = observe_and_decide(ctx, i, weights, dense, prof)  # pass A
    if ctx.method.needs_pass_b:
        decision = refine(ctx, i, decision, dense, prof)  # pass B
    extend_side_streams(ctx, i, decision, dense, prof)
    if ctx.method.needs_reconstruction:
        decision = reconstruct(ctx, i, decision, dense, prof)
    check_decision(ctx, i, decision, prof)
    propagate_pruned(ctx, i, decision, prof)  # pass C
    out_bytes = write_and_commit(ctx, i, decision, prof)
    return decision.spec, nbytes(weights), out_bytes


def read_weights(ctx: LayerContext, i: int, ahead: Prefetcher, prof: LayerProfile):
    """Layer ``i``'s source tensors on the device and the dense layer built from them."""
    with prof.phase("read"):  # waiting for the prefetch thread + host-to-device copy
        weights = to_device(next(ahead), ctx.device, ctx.dtype)
        return weights, ctx.adapter.build_layer(i, weights, ctx.device, ctx.dtype)


def observe_and_decide(ctx: LayerContext, i: int, weights: dict, dense, prof: LayerProfile) -> Decision:
    """Pass A: the dense layer over the observed stream feeding the method's observer (summed over
    the ranks), then the method's decision."""
    with prof.phase("forward"):
        obs = ctx.method.observer(i, "A", weights)
        ctx.streams.observe(dense, i, ctx.pe, obs, ctx.device, pass_a=True)
        crash_point(f"observe:{i}")
    with prof.phase("sync"):  # sums over all ranks' shards (no-op in one process)
        ctx.ranks.reduce_observer(obs)
    with prof.phase("decide"):
        return ctx.method.decide(i, weights, obs)


def refine(ctx: LayerContext, i: int, decision: Decision, dense, prof: LayerProfile) -> Decision:
    """Pass B: the layer the method names (``pass_b_layer``) over the observed stream again, for
    post-decision statistics, then the method's refinement of its decision."""
    with prof.phase("forward"):
        obs = ctx.method.observer(i, "B", decision.tensors)
        if obs is not None:
            staged = dense if ctx.method.pass_b_layer == "dense" else ctx.pruned_layer(i, decision)
            ctx.streams.observe(staged, i, ctx.pe, obs, ctx.device)
    with prof.phase("sync"):
        ctx.ranks.reduce_observer(obs)
    with prof.phase("decide"):
        return ctx.method.refine(i, decision, obs)


def extend_side_streams(ctx: LayerContext, i: int, decision: Decision, dense, prof: LayerProfile) -> None:
    """Boundary ``i + 1`` of the dense and decision streams, where the method asked for them."""
    streams, pe, device = ctx.streams, ctx.pe, ctx.device
    if streams.dense is not None:
        with prof.phase("forward"), disk_errors(f"layer {i}'s dense-stream activations", ctx.run):
            streams.propagate(dense, i, pe, device, "dense")
    if streams.decision is not None:  # the decision as taken, before reconstruction changes its values
        with prof.phase("forward"), disk_errors(f"layer {i}'s decision-stream activations", ctx.run):
            streams.propagate(ctx.pruned_layer(i, decision), i, pe, device, "decision")


def reconstruct(ctx: LayerContext, i: int, decision: Decision, dense, prof: LayerProfile) -> Decision:
    """The method fits the pruned layer's kept weights on the pruned stream (values only, never the spec)."""
    device = ctx.device
    with prof.phase("reconstruct"):
        data = LayerData(dense=dense, chunks=ctx.streams.reconstruction_chunks(i, device), pe=ctx.pe, rows=ctx.rows,
                         ranks=ctx.ranks, row_offset=ctx.ranks.shard(ctx.rows).start,
                         build=lambda spec, t, dt: ctx.adapter.build_pruned_layer(i, spec, t, device, dt))
        decision = ctx.method.reconstruct(i, decision, data)
        crash_point(f"reconstructed:{i}")
    return decision


def check_decision(ctx: LayerContext, i: int, decision: Decision, prof: LayerProfile) -> None:
    """Shapes match the spec, values are finite, and every rank took the same decision."""
    decision.validate(i)
    for name, t in decision.tensors.items():
        if not torch.isfinite(t).all():
            raise NumericalError(f"layer {i}: NaN/Inf in the pruned {name.rsplit('.', 1)[0]} ({name}); the statistics "
                                 "overflowed or are degenerate: use --dtype float32 and/or more --nsamples")
    with prof.phase("sync"):  # every rank decided alone from the same sums: check they agree
        ctx.ranks.agree_decision(i, decision)


def propagate_pruned(ctx: LayerContext, i: int, decision: Decision, prof: LayerProfile) -> None:
    """Pass C: boundary ``i + 1`` of the pruned stream, the next layer's input."""
    with prof.phase("forward"), disk_errors(f"layer {i}'s output activations", ctx.run):
        ctx.streams.propagate(ctx.pruned_layer(i, decision), i, ctx.pe, ctx.device)


def write_and_commit(ctx: LayerContext, i: int, decision: Decision, prof: LayerProfile) -> int:
    """Rank 0 writes layer ``i``'s tensors, then its journal record (the commit); then every rank
    drops boundary ``i`` of its streams. Returns the bytes written (0 on the other ranks)."""
    run, ranks = ctx.run, ctx.ranks
    with prof.phase("write"), disk_errors(f"layer {i}", run):
        out_bytes = 0
        ranks.barrier()  # every rank's boundary i+1 is durable before layer i is committed
        if ranks.is_main:
            fname, out_bytes = writer.save_layer(run.staging, i, decision.tensors, ctx.storage_dtype)
            crash_point(f"written:{i}")
            run.append({"event": "layer", "layer": i, "file": fname, "sha256": file_sha256(run.staging / fname), "spec": decision.spec.to_dict(), "info": decision.info})
        crash_point(f"committed:{i}")
        ranks.barrier()  # the commit is durable before any rank drops its boundary i
        ctx.streams.drop(i)
    return out_bytes


@torch.no_grad()
def _prune(cfg: PruneConfig, stop, ranks: Ranks = Ranks()) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    gpu_budget = parse_size(cfg.max_gpu_memory)
    adapter, shapes, method, specs = plan(cfg)
    storage_dtype = adapter.reader.dtype(adapter.reader.names_with_prefix(adapter.layer_prefix(0))[0])  # the output's dtype
    chunk_rows = preflight.fit_chunk_rows(shapes, cfg.chunk_rows, cfg.seqlen, dtype.itemsize, method.workspace_bytes(shapes), gpu_budget)
    fc = preflight.forecast(shapes, specs, nsamples=cfg.nsamples, seqlen=cfg.seqlen, chunk_rows=chunk_rows, dtype=dtype,
                            device=device, workspace=method.workspace_bytes(shapes), work_dir=cfg.run_dir, survey=method.needs_survey,
                            dense_stream=method.needs_dense_stream, decision_stream=method.needs_decision_stream,
                            storage_itemsize=storage_dtype.itemsize, fork_rows=method.fork_rows, forks=method.fork_count(shapes), members=method.population_bound,
                            method_flop=method.extra_flop(shapes, specs, cfg.nsamples, cfg.seqlen),
                            dense_passes=1 + int(method.needs_pass_b and method.pass_b_layer == "dense") + int(method.needs_dense_stream),
                            pruned_passes=1 + int(method.needs_pass_b and method.pass_b_layer != "dense") + int(method.needs_decision_stream),
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
    acts = ranks.acts_dir(run.acts)  # this rank's activation streams
    outer = adapter.read_outer()
    embed = token_embedding(adapter, outer, device, dtype)
    pe = position_embeddings(adapter.rotary(device), cfg.seqlen, device, dtype)
    calib_tokens = lambda: calibration_windows(tokenizer, source, cfg.nsamples, cfg.seqlen, cfg.seed)[ranks.shard(cfg.nsamples)]  # noqa: E731

    # ---- survey pass (journaled layer by layer: a resume goes on from the layer in flight)
    if method.needs_survey:
        survey = run.load_survey(records, shapes.num_layers)
        if survey is None:
            survey = survey_pass(cfg, method, adapter, shapes, run, records, acts, outer, embed, pe, device, dtype,
                                 chunk_rows, tokenizer, source, calib_tokens, ranks, stop)
        method.plan(shapes, survey=survey)
        if method.needs_scoring and method.population() > 1:  # whole plans scored end to end: the method takes the best
            kls = run.load_scores(records)
            if kls is None:
                kls = scoring_pass(cfg, method, adapter, shapes, run, records, acts, outer, embed, pe, device, dtype,
                                   chunk_rows, tokenizer, source, calib_tokens, ranks, stop)
            method.choose(shapes, kls)

    # ---- resume point: the first uncommitted layer, whose input boundary is on disk --
    start = max(committed) + 1 if committed else 0
    streams = ActivationStreams.for_method(acts, method)  # the pruned stream + those the method asked for
    if streams.needs_embedding(start):
        tokens = calib_tokens()
        with disk_errors("the calibration activations", run):
            streams.embed(tokens, embed, chunk_rows, dtype)
    streams.check_resumable(start, shapes.num_layers, ranks)
    out_specs = [None] * shapes.num_layers
    for i, rec in committed.items():
        out_specs[i] = LayerSpec.from_dict(rec["spec"])

    # ---- the layer loop: read, pass A + decide, pass B + refine, side streams, reconstruct, pass C, commit
    ctx = LayerContext(adapter, method, streams, run, ranks, pe, device, dtype, storage_dtype, rows=cfg.nsamples)
    startup_s = time.perf_counter() - t_start  # for a resume: time to get back to work
    done_s: list[float] = []
    bar = tqdm(range(start, shapes.num_layers), desc="prune", initial=start, total=shapes.num_layers, disable=not cfg.progress)
    with read_ahead(adapter, start, device, dtype) as ahead:
        for i in bar:
            prof = LayerProfile(i, device)
            read0, write0 = streams.pruned.bytes_read, streams.pruned.bytes_written
            out_specs[i], weight_bytes, out_bytes = prune_layer(ctx, i, ahead, prof)
            done_s.append(time.perf_counter() - prof.start)
            eta = sorted(done_s)[len(done_s) // 2] * (shapes.num_layers - i - 1)
            rec = prof.record(bytes_read=weight_bytes + streams.pruned.bytes_read - read0,
                              bytes_written=streams.pruned.bytes_written - write0 + out_bytes, eta_s=round(eta, 1))
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
        with disk_errors("the output folder", run):
            staged = run.staging if cfg.format == "streamprune" else convert_staged(run, cfg.format)
            writer.publish(staged, cfg.out)
            if staged != run.staging:  # the streamprune-format copy it was converted from
                shutil.rmtree(run.staging, ignore_errors=True)
    if not cfg.keep_work:
        streams.clear()
    ranks.finished(run.acts, keep=cfg.keep_work)
    return {**report, **timing, "out": str(cfg.out)}
