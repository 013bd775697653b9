"""The streaming primitives shared by pruning and evaluation.

Each works on one layer and the on-disk activation cache, chunk by chunk; weights stay
on the device for all chunks (layer-outer, chunk-inner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .storage.activations import ActivationCache
from .storage.prefetch import Prefetcher, stage_on_host
from .observers import observing


def position_embeddings(rotary, seqlen: int, device, dtype) -> tuple[torch.Tensor, ...]:
    """(cos, sin), each (1, seqlen, head_dim), shared by every chunk of every layer; where the
    RoPE differs by layer type (Gemma 3), every type's pair flattened (``adapter.rotary``)."""
    pos = torch.arange(seqlen, device=device)[None]
    dummy = torch.zeros(1, seqlen, 1, device=device, dtype=dtype)
    return tuple(t.to(dtype) for t in rotary(dummy, pos))  # OLMo 2's rotary returns float32 whatever the dtype


@dataclass(frozen=True)
class TokenEmbedding:
    """The input embedding as the architecture computes it: rows of ``weight`` (vocab, d), times
    ``scale`` in the weight's dtype where the architecture scales them (Gemma 3: sqrt(d)). The
    weight stays unscaled: it is also the tied head."""

    weight: torch.Tensor  # (vocab, d)
    scale: float | None = None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.weight)  # (rows, T, d)
        if self.scale is None:
            return x
        return x * torch.tensor(self.scale, dtype=self.weight.dtype, device=self.weight.device)


def token_embedding(adapter, outer: dict, device, dtype) -> TokenEmbedding:
    """The model's input embedding on the device (``outer``: :meth:`read_outer`'s tensors)."""
    return TokenEmbedding(outer["model.embed_tokens.weight"].to(device, dtype), adapter.embed_scale)


@torch.no_grad()
def final_head(adapter, outer: dict, embed: TokenEmbedding, device, dtype):
    """(final norm, lm_head weight) on the device (the embedding's weight when tied)."""
    norm = adapter.final_norm(device, dtype)
    norm.weight.copy_(outer["model.norm.weight"])
    head = outer["lm_head.weight"].to(device, dtype) if "lm_head.weight" in outer else embed.weight
    return norm, head


@torch.no_grad()
def embed_to_boundary(cache: ActivationCache, tokens: torch.Tensor, embed: TokenEmbedding, chunk_rows: int, dtype) -> None:
    """Boundary 0: embeddings of ``tokens`` (N, T), written in chunks of ``chunk_rows``."""
    w = cache.writer(0)
    for start in range(0, tokens.shape[0], chunk_rows):
        ids = tokens[start : start + chunk_rows].to(embed.weight.device)
        w.append(embed(ids).to(dtype))  # (rows, T, d)
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
