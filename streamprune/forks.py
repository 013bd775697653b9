"""Forks: how each layer's candidate cut moves the model's output, measured in one streamed pass.

The survey walks the dense model layer by layer; the fork set walks beside it over a few
*search rows* (calibration windows held apart from the rows that fit each layer). At layer
``i``, before the dense layer is applied, every candidate the method offers for layer ``i``
(a pruned version of it: an FFN cut, the attention removed, …) is applied to the dense
hidden state entering layer ``i``: each gives a *fork*, a hidden state that differs from the
dense model's in that one layer only. Then the dense layer ``i`` advances the reference and
every fork spawned before. Each dense layer is thus read once for all forks together; after
the last layer the head turns the reference and every fork into next-token distributions and
each fork's cost is its KL divergence from the dense model's, per token
(:func:`streamprune.kernels.divergence.kl_sum`).

Layers ``i`` and later are dense in a fork of layer ``i``, so the KL measures how that layer's
cut grows by the head, which a layer's own error cannot tell. Cost: a fork spawned at layer
``i`` runs ``L - i`` dense layers over the search rows, so ``K`` candidates per layer cost
``K L / 2`` dense-model passes over them (and one head each); on disk, the forks alive at a
boundary hold ``K i + 1`` copies of the search rows' hidden states (two boundaries at a time).

Everything is in an :class:`ActivationCache` per fork under ``root``, named after the layer
and candidate that spawned it. A step writes boundary ``i + 1`` of the reference and of every
fork and leaves boundary ``i`` in place until the survey has committed layer ``i``
(:meth:`ForkSet.drop`): a run killed inside step ``i`` resumes at it (:meth:`ForkSet.resume`),
deterministic, the same result byte for byte.

:class:`Population` scores whole plans the same way: one stream per plan, every layer of it
cut as the plan says, beside the reference; each layer read once for all of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from .kernels.divergence import kl_sum_from, log_probs
from .storage.activations import ActivationCache
from .stream import embed_to_boundary


def apply(layer, source: ActivationCache, target: ActivationCache, boundary: int, pe, device) -> None:
    """Boundary ``boundary + 1`` of ``target`` = ``layer`` over boundary ``boundary`` of ``source``."""
    w = target.writer(boundary + 1)
    for x in source.read(boundary, device):
        w.append(layer(x, pe))
    w.close()


class ForkSet:
    """The reference (dense) stream of the search rows and every fork spawned from it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.reference = ActivationCache(self.root / "reference")
        self.forks: list[tuple[int, ActivationCache]] = []  # (layer it was spawned at, its stream), spawn order

    def embed(self, tokens: torch.Tensor, embed: torch.Tensor, chunk_rows: int, dtype) -> None:
        self.clear()
        embed_to_boundary(self.reference, tokens, embed, chunk_rows, dtype)

    def resume(self, boundary: int) -> bool:
        """Take up the forks a killed survey left, at ``boundary`` (its first uncommitted layer):
        the ones spawned before it, in spawn order; those spawned at or after it are removed
        (respawned by its step). False, with nothing taken, if any stream lacks the boundary."""
        spawned = sorted(p for p in self.root.glob("fork_*") if p.is_dir()) if self.root.is_dir() else []
        keep = [(int(p.name.split("_")[1]), ActivationCache(p)) for p in spawned]
        keep = [(layer, c) for layer, c in keep if layer < boundary]
        if not all(c.is_complete(boundary) for c in [self.reference] + [c for _, c in keep]):
            return False
        for p in spawned:
            if int(p.name.split("_")[1]) >= boundary:
                shutil.rmtree(p)
        self.forks = keep
        return True

    @torch.no_grad()
    def step(self, i: int, dense, candidates: list, pe, device) -> None:
        """Spawn a fork of layer ``i`` per candidate layer, then advance the reference and the
        older forks through the dense layer ``i`` (boundary ``i`` stays: :meth:`drop`)."""
        older = list(self.forks)
        for j, layer in enumerate(candidates):
            fork = ActivationCache(self.root / f"fork_{i:04d}_{j:03d}")
            apply(layer, self.reference, fork, i, pe, device)
            self.forks.append((i, fork))
        for _, fork in older:
            apply(dense, fork, fork, i, pe, device)
        apply(dense, self.reference, self.reference, i, pe, device)

    def drop(self, boundary: int) -> None:
        """Remove ``boundary`` from every stream (once the layer before it is committed)."""
        for _, fork in self.forks:
            fork.drop(boundary)
        self.reference.drop(boundary)

    @torch.no_grad()
    def divergences(self, boundary: int, norm, head: torch.Tensor, device) -> tuple[dict[int, list[float]], int]:
        """Per spawning layer, each fork's summed KL from the reference over the search tokens
        (in spawn order), and the number of tokens: chunk by chunk, the reference's logits of a
        chunk computed once and every fork's same chunk read against them."""
        out: dict[int, list[float]] = {}
        totals = [0.0] * len(self.forks)
        tokens = 0
        for c in range(self.reference.num_chunks(boundary)):
            ref = log_probs(F.linear(norm(self.reference.chunk(boundary, c, device)), head))  # (rows·T, vocab)
            tokens += ref.shape[0]
            for n, (_, fork) in enumerate(self.forks):
                totals[n] += kl_sum_from(ref, F.linear(norm(fork.chunk(boundary, c, device)), head))
            del ref
        for (layer, _), total in zip(self.forks, totals):
            out.setdefault(layer, []).append(total)
        return out, tokens

    def kl_per_token(self, boundary: int, norm, head: torch.Tensor, device, ranks) -> dict[int, torch.Tensor]:
        """Per spawning layer, its forks' KL per token (float64, spawn order), summed over the ranks."""
        kls, tokens = self.divergences(boundary, norm, head, device)
        layers = sorted(kls)
        *flat, tokens = ranks.sum_floats(*(v for layer in layers for v in kls[layer]), float(tokens))
        out, at = {}, 0
        for layer in layers:
            n = len(kls[layer])
            out[layer] = torch.tensor(flat[at:at + n], dtype=torch.float64) / tokens
            at += n
        return out

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.forks = []


LOGIT_BUDGET = 1 << 30  # bytes of fp32 logits for a chunk of the reference and one fork together


def fork_chunk_rows(rows: int, seqlen: int, vocab: int, budget: int = LOGIT_BUDGET) -> int:
    """Search rows per chunk: as many as keep two chunks' fp32 logits within ``budget`` (at least one)."""
    return max(1, min(rows, budget // (2 * seqlen * vocab * 4)))


class Population(ForkSet):
    """Whole plans scored end to end: beside the search rows' dense stream (the reference), one
    stream per plan, each its own pruned model (every layer cut as that plan says). At layer
    ``i`` each member's stream goes through the member's own pruned layer ``i`` and the reference
    through the dense one: each layer is read once for the whole population. Resumable like the
    forks: boundary ``i`` stays until layer ``i`` is committed."""

    def __init__(self, root: str | Path, size: int):
        super().__init__(root)
        self.size = size

    def members(self) -> list[tuple[int, ActivationCache]]:
        return [(0, ActivationCache(self.root / f"member_{m:03d}")) for m in range(self.size)]

    def embed(self, tokens: torch.Tensor, embed: torch.Tensor, chunk_rows: int, dtype) -> None:
        super().embed(tokens, embed, chunk_rows, dtype)
        self.forks = self.members()
        for _, member in self.forks:  # every member starts from the embeddings
            shutil.copytree(self.reference.boundary_dir(0), member.boundary_dir(0))

    def resume(self, boundary: int) -> bool:
        """Take up the streams a killed pass left at ``boundary``; False if any lacks it."""
        members = self.members()
        if not all(c.is_complete(boundary) for c in [self.reference] + [c for _, c in members]):
            return False
        self.forks = members
        return True

    @torch.no_grad()
    def step(self, i: int, dense, member_layers: list, pe, device) -> None:
        """Member ``m``'s stream through ``member_layers[m]``, the reference through ``dense``
        (boundary ``i`` stays: :meth:`drop`)."""
        if len(member_layers) != self.size:
            raise ValueError(f"layer {i}: {len(member_layers)} member layers for a population of {self.size}")
        for (_, member), layer in zip(self.forks, member_layers):
            apply(layer, member, member, i, pe, device)
        apply(dense, self.reference, self.reference, i, pe, device)

    def kl_per_member(self, boundary: int, norm, head: torch.Tensor, device, ranks) -> list[float]:
        """Each member's KL per token from the reference (float, population order), over all ranks."""
        return self.kl_per_token(boundary, norm, head, device, ranks)[0].tolist()
