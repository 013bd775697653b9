"""The streaming primitives shared by pruning and evaluation.

Each works on one layer and the on-disk activation cache, chunk by chunk; weights stay
on the device for all chunks (layer-outer, chunk-inner).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .storage.activations import ActivationCache
from .storage.prefetch import Prefetcher, stage_on_host
from .observers import observing


def position_embeddings(rotary, seqlen: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1, seqlen, head_dim), shared by every chunk of every layer."""
    pos = torch.arange(seqlen, device=device)[None]
    dummy = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
    cos, sin = rotary(dummy, pos)  # OLMo 2's rotary returns float32 whatever the dtype
    return cos.to(dtype), sin.to(dtype)


@torch.no_grad()
def final_head(adapter, outer: dict, embed: torch.Tensor, device, dtype):
    """(final norm, lm_head weight) on the device (the embedding when tied)."""
    norm = adapter.final_norm(device, dtype)
    norm.weight.copy_(outer["model.norm.weight"])
    head = outer["lm_head.weight"].to(device, dtype) if "lm_head.weight" in outer else embed
    return norm, head


@torch.no_grad()
def embed_to_boundary(cache: ActivationCache, tokens: torch.Tensor, embed: torch.Tensor, chunk_rows: int, dtype) -> None:
    """Boundary 0: embeddings of ``tokens`` (N, T), written in chunks of ``chunk_rows``."""
    w = cache.writer(0)
    for start in range(0, tokens.shape[0], chunk_rows):
        ids = tokens[start : start + chunk_rows].to(embed.device)
        w.append(F.embedding(ids, embed).to(dtype))  # (rows, T, d)
    w.close()


@torch.no_grad()
def observe(layer, cache: ActivationCache, boundary: int, pe, observer, device, keep: list | None = None) -> None:
    """Run ``layer`` over boundary ``boundary`` feeding ``observer``; the outputs are discarded,
    or appended chunk by chunk to ``keep`` on the host when it is given (a caller that needs
    them again later, e.g. as reconstruction targets, so the layer does not run twice)."""
    if observer is None:
        return
    with observing(layer, observer):
        for x in cache.read(boundary, device):
            y = layer(x, pe)
            if keep is not None:
                keep.append(y.to("cpu"))


@torch.no_grad()
def propagate(layer, cache: ActivationCache, boundary: int, pe, device, observer=None) -> None:
    """Boundary ``boundary + 1`` = ``layer`` over boundary ``boundary``."""
    w = cache.writer(boundary + 1)
    with observing(layer, observer):
        for x in cache.read(boundary, device):
            w.append(layer(x, pe))
    w.close()


@torch.no_grad()
def token_nll(cache: ActivationCache, boundary: int, tokens: torch.Tensor, norm, head: torch.Tensor, device) -> tuple[float, int]:
    """Sum of next-token NLL over all windows and the number of predicted tokens."""
    total, count, start = 0.0, 0, 0
    for h in cache.read(boundary, device):
        ids = tokens[start : start + h.shape[0]].to(device)
        start += h.shape[0]
        for row in range(h.shape[0]):  # one window at a time bounds the (T, vocab) logits
            logits = F.linear(norm(h[row : row + 1]), head).float()[0]  # (T, vocab) fp32
            total += F.cross_entropy(logits[:-1], ids[row, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total, count


def read_ahead(adapter, start: int, device, dtype) -> Prefetcher:
    """Layer tensors from ``start`` on, read (and pinned on CUDA) one layer ahead on a thread."""
    return Prefetcher(lambda j: stage_on_host(adapter.read_layer(j), device, dtype), range(start, adapter.num_layers))
