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
from .forks import ForkSet
from .inputs.textdata import calibration_windows
from .run.faults import crash_point
from .storage.activations import ActivationCache
from .storage.prefetch import to_device
from .stream import propagate, read_ahead


def search_windows(tokenizer, source, cfg, rows: int) -> torch.Tensor:
    """The search's ``rows`` windows: drawn after the ``cfg.nsamples`` calibration ones with the same
    seed (for documents: the next ones in the seeded order, none of the calibration's)."""
    return calibration_windows(tokenizer, source, cfg.nsamples + rows, cfg.seqlen, cfg.seed)[cfg.nsamples:]


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
    with read_ahead(adapter, start, device, dtype) as ahead:
        for i in tqdm(range(start, adapter.num_layers), desc="survey", initial=start, total=adapter.num_layers,
                      disable=not progress):
            stop.check(f"during the survey, before its layer {i} (a resume continues the survey there)")
            weights = to_device(next(ahead), device, dtype)
            layer = adapter.build_layer(i, weights, device, dtype)
            obs = method.survey_observer(i, weights)
            propagate(layer, cache, i, pe, device, observer=obs)
            ranks.reduce_observer(obs)
            results.append(method.survey_result(i, obs))
            if forks is not None:
                candidates = (adapter.build_pruned_layer(i, d.spec, d.tensors, device, dtype)
                              for d in method.fork_candidates(i, weights, obs, results[-1]))
                forks.step(i, layer, candidates, pe, device)
                crash_point(f"fork:{i}")
            ranks.barrier()  # every rank's boundary i + 1 is durable before layer i is committed
            if commit is not None:
                ranks.on_main(lambda: commit(i, results[i]))
            crash_point(f"surveyed:{i}")
            ranks.barrier()  # committed before any rank drops its boundary i
            cache.drop(i)
            if forks is not None:
                forks.drop(i)
    if forks is not None:
        for layer, kl in forks.kl_per_token(adapter.num_layers, *head, device, ranks).items():
            results[layer]["fork_kl"] = kl
    return results
