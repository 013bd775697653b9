"""The survey: the dense model over the dense calibration stream, before any layer is pruned.

A method that ``needs_survey`` gets each layer's statistics (``survey_observer`` /
``survey_result``) to plan with; one that ``needs_forks`` also gets each candidate cut scored
by the model's output (:mod:`streamprune.forks`) on windows drawn after the calibration ones
(:func:`search_windows`). The engine journals each layer's results as it is surveyed (a killed
run resumes at the layer in flight), then the whole (``survey.safetensors``).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .distributed import Ranks
from .forks import ForkSet, Population, fork_chunk_rows
from .inputs.textdata import calibration_windows
from .run.faults import crash_point
from .run.journal import RunDir, disk_errors
from .storage.activations import ActivationCache
from .storage.prefetch import to_device
from .stream import embed_to_boundary, final_head, propagate, read_ahead


def search_windows(tokenizer, source, cfg, rows: int) -> torch.Tensor:
    """The search's ``rows`` windows: drawn after the ``cfg.nsamples`` calibration ones with the same
    seed (for documents: the next ones in the seeded order, none of the calibration's)."""
    return calibration_windows(tokenizer, source, cfg.nsamples + rows, cfg.seqlen, cfg.seed)[cfg.nsamples:]


def commit_layer(i: int, ranks: Ranks, commit, point: str, *streams) -> None:
    """Journal layer ``i`` of a pass (``commit(i)`` on rank 0) once every rank's boundary ``i + 1``
    is durable (crash point ``point:i`` after it), then drop boundary ``i`` of every stream
    (activation caches, fork sets)."""
    ranks.barrier()
    if commit is not None:
        ranks.on_main(lambda: commit(i))
    crash_point(f"{point}:{i}")
    ranks.barrier()  # committed before any rank drops its boundary i
    for stream in streams:
        if stream is not None:
            stream.drop(i)


def dense_layers(adapter, cache: ActivationCache, start: int, observer, pe, device, dtype, ranks: Ranks, stop,
                 progress: bool, desc: str, what: str):
    """The dense layers from ``start`` on, each read once (one layer ahead) and run over the dense
    calibration stream ``cache`` feeding ``observer(i, weights)`` (summed over the ranks): yields
    ``(i, weights, layer, observer)``. ``stop`` is checked before every layer, so a stop ends the
    process there and the resumed run continues at that layer."""
    with read_ahead(adapter, start, device, dtype) as ahead:
        for i in tqdm(range(start, adapter.num_layers), desc=desc, initial=start, total=adapter.num_layers, disable=not progress):
            stop.check(f"during {what}, before its layer {i} (a resume continues it there)")
            weights = to_device(next(ahead), device, dtype)
            layer = adapter.build_layer(i, weights, device, dtype)
            obs = observer(i, weights)
            propagate(layer, cache, i, pe, device, observer=obs)
            ranks.reduce_observer(obs)
            yield i, weights, layer, obs


@torch.no_grad()
def run_survey(method, adapter, cache: ActivationCache, pe, device, dtype, progress: bool, ranks: Ranks, stop,
               forks: ForkSet | None = None, head=None, done: list[dict] | None = None, commit=None) -> list[dict]:
    """Dense model over dense hidden states; per-layer results from the method.

    ``done``: the results of the layers a killed run committed (``RunDir.surveyed_layers``); the
    survey goes on from the next one, whose input boundary ``cache`` (and every fork) still holds.
    ``commit(i, result)`` journals layer ``i`` once every rank's boundary ``i + 1`` is durable;
    then boundary ``i`` is dropped. ``stop`` (the run's SIGINT/SIGTERM flag) is checked before
    every layer, so a stop ends the process there and the resumed run continues at that layer.

    ``forks`` (a method that ``needs_forks``): each layer's candidates fork the search rows'
    dense stream after the layer's statistics are in, every fork advances with the dense layer
    read once, and at the end ``head`` (final norm, lm_head) scores each by its KL from the
    dense model, per token over all ranks: ``results[l]["fork_kl"]`` (:mod:`streamprune.forks`)."""
    results = list(done or [])
    start = len(results)
    for i, weights, layer, obs in dense_layers(adapter, cache, start, method.survey_observer, pe, device, dtype,
                                               ranks, stop, progress, "survey", "the survey"):
        results.append(method.survey_result(i, obs))
        if forks is not None:
            candidates = (adapter.build_pruned_layer(i, d.spec, d.tensors, device, dtype)
                          for d in method.fork_candidates(i, weights, obs, results[-1]))
            forks.step(i, layer, candidates, pe, device)
            crash_point(f"fork:{i}")
        commit_layer(i, ranks, commit and (lambda j: commit(j, results[j])), "surveyed", cache, forks)
    if forks is not None:
        for layer, kl in forks.kl_per_token(adapter.num_layers, *head, device, ranks).items():
            results[layer]["fork_kl"] = kl
    return results


@torch.no_grad()
def run_scoring(method, adapter, cache: ActivationCache, pe, device, dtype, progress: bool, ranks: Ranks, stop,
                population: Population, head, start: int = 0, commit=None) -> list[float]:
    """The scoring pass: each plan of the method's population as a whole pruned model over the
    search rows, scored at the head by its KL from the dense model (per token, over all ranks).

    The dense calibration stream (``cache``) runs beside it, for what ``member_layers`` needs of
    each dense layer (``scoring_observer``: OBS's Gram). Resumable like the survey: ``start`` is
    the first layer a killed pass did not commit (``cache`` and every member hold its input
    boundary); ``commit(i)`` journals layer ``i`` once every rank's boundary ``i + 1`` is durable."""
    for i, weights, layer, obs in dense_layers(adapter, cache, start, method.scoring_observer, pe, device, dtype,
                                               ranks, stop, progress, "scoring", "the scoring pass"):
        members = [adapter.build_pruned_layer(i, d.spec, d.tensors, device, dtype) for d in method.member_layers(i, weights, obs)]
        population.step(i, layer, members, pe, device)
        crash_point(f"scoring:{i}")
        commit_layer(i, ranks, commit, "scored", cache, population)
    return population.kl_per_member(adapter.num_layers, *head, device, ranks)


def survey_pass(cfg, method, adapter, shapes, run: RunDir, records, acts, outer, embed, pe, device, dtype, chunk_rows,
                tokenizer, source, calib_tokens, ranks: Ranks, stop) -> list[dict]:
    """The survey (:func:`streamprune.survey.run_survey`), from the first layer a killed run did not
    commit when every rank still holds its input boundary (and the forks theirs), else from
    layer 0; journaled per layer, then whole. Its activations are cleared once it is done."""
    survey_cache = ActivationCache(acts / "survey")
    forks = ForkSet(acts / "forks") if method.needs_forks else None
    done = run.surveyed_layers(records)
    resumable = bool(done) and survey_cache.is_complete(len(done)) and (forks is None or forks.resume(len(done)))
    if not ranks.all_true(resumable):
        done = []
    with disk_errors("the survey activations", run):
        head = final_head(adapter, outer, embed, device, dtype) if forks is not None else None
        if not done:
            survey_cache.clear()
            embed_to_boundary(survey_cache, calib_tokens(), embed, chunk_rows, dtype)
            if forks is not None:
                rows = method.fork_rows
                forks.embed(search_windows(tokenizer, source, cfg, rows)[ranks.shard(rows, "search rows", "--option search_rows")],
                            embed, min(chunk_rows, fork_chunk_rows(rows, cfg.seqlen, shapes.vocab_size)), dtype)
        save = lambda i, result: run.save_survey_layer(i, result)  # noqa: E731
        survey = run_survey(method, adapter, survey_cache, pe, device, dtype, cfg.progress, ranks, stop, forks, head,
                            done=done, commit=save)
    with disk_errors("the survey results", run):
        ranks.on_main(lambda: run.save_survey(survey))
    survey_cache.clear()
    if forks is not None:
        forks.clear()
    return survey


def scoring_pass(cfg, method, adapter, shapes, run: RunDir, records, acts, outer, embed, pe, device, dtype, chunk_rows,
                 tokenizer, source, calib_tokens, ranks: Ranks, stop) -> list[float]:
    """:func:`run_scoring` from the first layer a killed pass did not commit when every rank
    still holds its input boundaries, else from layer 0; journaled per layer, then its scores.
    Its activations are cleared once it is done."""
    cache = ActivationCache(acts / "scoring")
    population = Population(acts / "population", method.population())
    start = run.scored_layers(records)
    if not ranks.all_true(start > 0 and cache.is_complete(start) and population.resume(start)):
        start = 0
    with disk_errors("the scoring pass's activations", run):
        if start == 0:
            cache.clear()
            embed_to_boundary(cache, calib_tokens(), embed, chunk_rows, dtype)
            rows = method.fork_rows
            population.embed(search_windows(tokenizer, source, cfg, rows)[ranks.shard(rows, "search rows", "--option search_rows")],
                             embed, min(chunk_rows, fork_chunk_rows(rows, cfg.seqlen, shapes.vocab_size)), dtype)
        head = final_head(adapter, outer, embed, device, dtype)
        kls = run_scoring(method, adapter, cache, pe, device, dtype, cfg.progress, ranks, stop, population, head,
                          start=start, commit=run.save_scored_layer)
    with disk_errors("the scoring pass's results", run):
        ranks.on_main(lambda: run.save_scores(kls))
    cache.clear()
    population.clear()
    return kls
