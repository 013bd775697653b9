"""The activation streams a pruning run carries from layer to layer, and who owns them.

A stream is one :class:`~streamprune.storage.activations.ActivationCache`: the calibration hidden
states at each layer boundary, on disk. Every run carries the pruned model's own stream
(boundary ``i`` = the pruned layers ``0..i-1`` over the calibration tokens); a method asks
for up to two more (``Method.needs_dense_stream``, ``Method.needs_decision_stream``):

- ``pruned``   (always)   the output's own hidden states: reconstruction's input, the next
                          layer's input, and what passes A and B observe unless ``decision``
- ``dense``    (optional) the dense model's own hidden states: reconstruction's target
- ``decision`` (optional) the pruned model *before* reconstruction (each layer as ``refine``
                          returned it): what passes A and B observe instead of ``pruned``

One more, held in memory for one layer only: when reconstruction's target is the dense layer
on the pruned stream (no ``dense`` stream) and pass A observes that same stream, pass A's
outputs *are* the targets, so they are kept (on the host) rather than computed twice.

Layout: ``pruned`` at the root, the others in ``dense/`` and ``decision/`` under it (so
``clear()`` removes them all, with the survey's scratch stream in ``survey/``). The pruned
stream's boundary marker is written last, so a complete pruned boundary says "all streams
have it".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .storage.activations import ActivationCache
from .errors import StreamPruneError
from .stream import embed_to_boundary
from .stream import observe as observe_layer
from .stream import propagate as propagate_layer


class ActivationStreams:
    def __init__(self, root: str | Path, *, dense: bool = False, decision: bool = False, reconstruction: bool = False):
        self.pruned = ActivationCache(root)
        self.dense = ActivationCache(self.pruned.root / "dense") if dense else None
        self.decision = ActivationCache(self.pruned.root / "decision") if decision else None
        # Pass A's outputs double as reconstruction targets exactly when it observes the pruned
        # stream and no dense stream exists to read them from.
        self.keep_targets = reconstruction and not dense and not decision
        self._targets: list[torch.Tensor] = []  # (rows, seqlen, d) on the host, one per chunk of the layer in flight

    @classmethod
    def for_method(cls, root: str | Path, method) -> "ActivationStreams":
        return cls(root, dense=method.needs_dense_stream, decision=method.needs_decision_stream,
                   reconstruction=method.needs_reconstruction)

    @property
    def root(self) -> Path:
        return self.pruned.root

    @property
    def all(self) -> list[ActivationCache]:
        """Every stream on disk, the pruned one last (its marker says "all streams have it")."""
        return [c for c in (self.dense, self.decision, self.pruned) if c is not None]

    @property
    def observed(self) -> ActivationCache:
        """The stream passes A and B run over."""
        return self.decision or self.pruned

    # ---- open -------------------------------------------------------------------------
    def needs_embedding(self, start: int) -> bool:
        """Boundary 0 still to write: a fresh run (or one killed before it was complete)."""
        return start == 0 and not self.pruned.is_complete(0)

    def embed(self, tokens: torch.Tensor, embed: torch.Tensor, chunk_rows: int, dtype) -> None:
        """Boundary 0 of every stream: the embeddings of ``tokens`` (N, T)."""
        for c in self.all:
            embed_to_boundary(c, tokens, embed, chunk_rows, dtype)

    def check_resumable(self, start: int, num_layers: int, ranks) -> None:
        """Every stream holds boundary ``start`` on every rank (nothing to hold after the last layer)."""
        for c in self.all:
            if not ranks.all_true(start == num_layers or c.is_complete(start)):
                raise StreamPruneError(f"activation boundary {start} is missing from {c.root}; rerun with --fresh")

    # ---- one layer ----------------------------------------------------------------------
    def observe(self, layer, i: int, pe, observer, device, *, pass_a: bool = False) -> None:
        """``layer`` over the observed stream's boundary ``i`` feeding ``observer``; in pass A its
        outputs are kept as reconstruction targets when they are those (``keep_targets``)."""
        keep = None
        if pass_a and self.keep_targets:
            keep = self._targets = []
        observe_layer(layer, self.observed, i, pe, observer, device, keep=keep)

    def reconstruction_chunks(self, i: int, device) -> Callable[[], Iterator]:
        """What ``LayerData.chunks`` iterates for layer ``i``, chunk by chunk on ``device``."""
        pruned, dense, targets = self.pruned, self.dense, self._targets
        if targets:  # (pruned-stream input, the dense layer's output on it from pass A) pairs
            return lambda: zip(pruned.read(i, device), (t.to(device) for t in targets))
        if dense is None:  # the method runs the dense layer on the input itself
            return lambda: pruned.read(i, device)
        return lambda: zip(pruned.read(i, device), dense.read(i + 1, device))  # (input, dense-stream output) pairs

    def propagate(self, layer, i: int, pe, device, stream: str = "pruned") -> None:
        """Boundary ``i + 1`` of ``stream`` (``pruned``, ``dense`` or ``decision``) = ``layer`` over
        its boundary ``i``."""
        propagate_layer(layer, getattr(self, stream), i, pe, device)

    def drop(self, i: int) -> None:
        """Boundary ``i`` of every stream, and the layer's kept targets: layer ``i`` is committed."""
        for c in (self.pruned, self.dense, self.decision):
            if c is not None:
                c.drop(i)
        self._targets = []

    def clear(self) -> None:
        """Every stream (and the survey scratch): the run is published."""
        self.pruned.clear()
