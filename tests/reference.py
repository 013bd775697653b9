"""Plain in-memory reference pruner: the whole model in RAM, the whole batch at once.

Drives a method through the same interface as the streaming engine but with no shards,
no disk cache and no chunking, so "streamed == in-memory" tests the streaming plumbing.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from streamprune.adapters import open_model
from streamprune.observers import observing
from streamprune.stream import position_embeddings


@torch.no_grad()
def prune_in_memory(folder, method, tokens: torch.Tensor, survey=None, chunk_rows: int | None = None):
    """Returns the list of decisions (one per layer), pruning sequentially.

    ``chunk_rows``: how a method's ``reconstruct`` sees the inputs (the engine's chunking);
    every other pass takes the whole batch at once."""
    from streamprune.methods.base import LayerData

    adapter = open_model(folder)
    shapes = adapter.shapes()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    hidden = model.model.embed_tokens(tokens)  # as the architecture embeds (Gemma 3: scaled)
    pe = position_embeddings(adapter.rotary("cpu"), tokens.shape[1], "cpu", torch.float32)  # every layer type's RoPE
    if method.needs_survey:
        results, h = [], hidden
        for i, hf_layer in enumerate(model.model.layers):
            layer, weights = _block(adapter, hf_layer, i)
            obs = method.survey_observer(i, weights)
            with observing(layer, obs):
                h = layer(h, pe)
            results.append(method.survey_result(i, obs))
        method.plan(shapes, survey=results)
    decisions, dense_hidden, seen = [], hidden, hidden  # seen: what passes A/B observe
    for i, hf_layer in enumerate(model.model.layers):
        layer, weights = _block(adapter, hf_layer, i)
        dense_out = layer(dense_hidden, pe) if method.needs_dense_stream else None
        weights = {k: v.clone() for k, v in weights.items()}
        obs = method.observer(i, "A", weights)
        with observing(layer, obs):
            layer(seen, pe)
        decision = method.decide(i, weights, obs)
        if method.needs_pass_b:
            obs_b = method.observer(i, "B", decision.tensors)
            if obs_b is not None:
                if method.pass_b_layer == "dense":
                    staged = layer
                else:
                    staged = adapter.build_pruned_layer(i, decision.spec, decision.tensors, "cpu", torch.float32)
                with observing(staged, obs_b):
                    staged(seen, pe)
            decision = method.refine(i, decision, obs_b)
        if method.needs_decision_stream:  # the next decision sees this layer as decided, unreconstructed
            seen = adapter.build_pruned_layer(i, decision.spec, decision.tensors, "cpu", torch.float32)(seen, pe)
        if method.needs_reconstruction:
            rows = chunk_rows or hidden.shape[0]
            if dense_out is None:
                chunks = lambda h=hidden: iter(h.split(rows))  # noqa: E731
            else:
                chunks = lambda h=hidden, t=dense_out: zip(h.split(rows), t.split(rows))  # noqa: E731
            data = LayerData(dense=layer, chunks=chunks, pe=pe, rows=hidden.shape[0],
                             build=lambda spec, t, dt, i=i: adapter.build_pruned_layer(i, spec, t, "cpu", dt))
            decision = method.reconstruct(i, decision, data)
        pruned = adapter.build_pruned_layer(i, decision.spec, decision.tensors, "cpu", torch.float32)
        hidden = pruned(hidden, pe)
        dense_hidden = dense_out
        if not method.needs_decision_stream:
            seen = hidden
        decisions.append(decision)
    return decisions


def _block(adapter, hf_layer, i: int):
    """(layer, its weights under the block's names): the transformers layer itself, or, where the
    checkpoint's names are not the block's (Phi-3's fused q/k/v and gate/up), the adapter's
    layer built from its split tensors."""
    weights = dict(hf_layer.state_dict())
    if set(weights) == set(adapter.skeleton(i).state_dict()):
        return adapter.wrap(hf_layer, i, adapter.specs[i]), weights
    split = adapter.read_layer(i)
    return adapter.build_layer(i, split, "cpu", torch.float32), split


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()
