"""The survey: the dense model over the dense calibration stream, before any layer is pruned.

A method that ``needs_survey`` gets each layer's statistics (``survey_observer`` /
``survey_result``) to plan with; one that ``needs_forks`` also gets each candidate cut scored
by the model's output (:mod:`streamprune.forks`) on windows drawn after the calibration ones
(:func:`search_windows`). The engine journals the results whole (``survey.safetensors``).
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
               forks: ForkSet | None = None, head=None) -> list[dict]:
    """Dense model over dense hidden states; per-layer results from the method.

    ``stop`` (the run's SIGINT/SIGTERM flag) is checked before every layer: the survey is
    journaled only whole, so a stop inside it ends the process at once (``Interrupted``) and
    the resumed run starts the survey again, instead of running it to its end first (on a 70B
    model: 80 dense layers over the calibration set).

    ``forks`` (a method that ``needs_forks``): each layer's candidates fork the search rows'
    dense stream after the layer's statistics are in, every fork advances with the dense layer
    read once, and at the end ``head`` (final norm, lm_head) scores each by its KL from the
    dense model, per token over all ranks: ``results[l]["fork_kl"]`` (:mod:`streamprune.forks`)."""
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
            if forks is not None:
                candidates = (adapter.build_pruned_layer(i, d.spec, d.tensors, device, dtype)
                              for d in method.fork_candidates(i, weights, obs, results[-1]))
                forks.step(i, layer, candidates, pe, device)
                crash_point(f"fork:{i}")
    if forks is not None:
        for layer, kl in forks.kl_per_token(adapter.num_layers, *head, device, ranks).items():
            results[layer]["fork_kl"] = kl
    return results
