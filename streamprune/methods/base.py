"""The method interface: what the streaming engine asks of a pruning method.

A method is a frozen config dataclass + pure numeric functions + one thin class
implementing :class:`Method`. It never touches files, hooks or devices: the engine feeds
it activations through :class:`Observer` objects and hands it the layer's weights.

Engine flow per layer ``i`` (see ``streamprune/engine.py``)::

    obs = method.observer(i, "A", weights)        # None = no statistics needed
    run the dense layer over X_i, feeding obs.update(tap, x_in, y_out)
    decision = method.decide(i, weights, obs)
    if method.needs_pass_b:                       # e.g. stats after attention is pruned
        obs = method.observer(i, "B", decision.tensors)
        if obs is not None:                       # None: nothing to collect on this layer
            run the layer named by method.pass_b_layer over X_i, feeding obs:
              "pruned" -> the decision's layer; "dense" -> the dense source layer again
        decision = method.refine(i, decision, obs)
    if method.needs_reconstruction:               # e.g. fit the pruned layer to the dense one
        decision = method.reconstruct(i, decision, LayerData(...))
    X_{i+1} = pruned layer over X_i

Taps (``Observer.taps``) name modules; the engine resolves them on the dense layer
(transformers class) and on the pruned layer alike. Names: ``q_proj``, ``k_proj``,
``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``mlp``, ``layer``.
For each tap and chunk the observer gets ``(x_in, y_out)`` flattened to
(tokens, features), in the activation dtype; it accumulates in fp32.
On a post-norm block (OLMo 2) ``o_proj`` and ``mlp`` give their input and the output of the
norm that follows them (what reaches the residual), not the projection's own output.

Weights (``weights`` argument) are the layer's tensors named relative to
``model.layers.{i}.`` in the *pruned-model* naming of :mod:`streamprune.spec` (for a
dense source layer that is the usual ``self_attn.q_proj.weight`` etc.), on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..distributed import Ranks
from ..shapes import ModelShapes
from ..spec import LayerSpec


class Observer(Protocol):
    taps: frozenset[str]
    # Names of the attributes that are sums over tokens (tensors, ints, floats, dicts of
    # them, or objects declaring ``summed`` such as ``Moments``): under torchrun they are
    # all-reduced across ranks after each pass (``streamprune.distributed``).
    summed: tuple[str, ...]

    def update(self, tap: str, x_in: torch.Tensor, y_out: torch.Tensor) -> None: ...


@dataclass
class Decision:
    """A pruned layer: its spec and its tensors (names relative to ``model.layers.{i}.``)."""

    spec: LayerSpec
    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)  # small JSON-able facts for the journal/report

    def validate(self, layer_idx: int) -> None:
        expected = self.spec.tensor_shapes()
        got = {k: tuple(v.shape) for k, v in self.tensors.items()}
        if got != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
            raise AssertionError(
                f"layer {layer_idx}: decision tensors disagree with spec: missing {missing}, "
                f"extra {extra}, wrong shapes {[(k, got[k], expected[k]) for k in wrong]}"
            )


@dataclass
class LayerData:
    """What the engine lends a method's ``reconstruct``: the layer's calibration inputs and layers.

    ``chunks()`` iterates the cached hidden states entering the layer (the pruned stream), in
    the cache's fixed order, ``(rows, seqlen, d)`` each on the device — or, for a method with
    ``needs_dense_stream``, ``(input, target)`` pairs, ``target`` the dense model's own hidden
    states leaving the layer for the same rows; ``dense`` is the source
    layer (callable ``(hidden, pe)``); ``build(spec, tensors, dtype)`` materialises a pruned
    layer (our modeling class) whose ``tensors()`` are keyed by the decision's tensor names.
    ``rows`` counts the whole job's calibration rows; under torchrun ``chunks()`` holds this
    rank's shard, global rows ``row_offset…``, and a gradient is all-reduced over ``ranks``."""

    dense: torch.nn.Module
    build: Callable[[LayerSpec, dict, torch.dtype], torch.nn.Module]
    chunks: Callable[[], Iterator[torch.Tensor]]
    pe: tuple[torch.Tensor, ...]  # (cos, sin), or every layer type's pair (Gemma 3): the layers pick theirs
    rows: int
    row_offset: int = 0
    ranks: Ranks = field(default_factory=Ranks)


class Method:
    """Base class. Subclasses set ``name`` and implement ``plan`` and ``decide``."""

    name: str = ""
    needs_survey: bool = False
    needs_pass_b: bool = False
    # Which layer pass B runs: "pruned" (the decision's layer) or "dense" (the source layer
    # again, exactly as in pass A; Olica's Linear Calibration fits the *dense* layer's MLP
    # input and needs the dense FFN's intermediate activations next to it).
    pass_b_layer: str = "pruned"
    # After refine: ``reconstruct(i, decision, LayerData)`` may change the tensors' values
    # (never the spec) using the layer's calibration inputs, before they are propagated.
    needs_reconstruction: bool = False
    # The engine also streams the dense model's own hidden states (a second activation
    # stream, on disk like the first); ``reconstruct`` then gets (input, dense output) pairs.
    needs_dense_stream: bool = False
    # Passes A and B read a third stream: the pruned model *before* reconstruction (each layer
    # as ``refine`` returned it), so every decision is the one the method takes without
    # reconstruction upstream; ``reconstruct`` and the output still follow the reconstructed stream.
    needs_decision_stream: bool = False
    # The survey also forks the dense model over ``fork_rows`` held-apart windows: each candidate
    # of ``fork_candidates`` is scored by the KL of the model's output (``streamprune.forks``);
    # the scores reach ``plan`` as ``survey[l]["fork_kl"]`` (per token, the candidates' order).
    needs_forks: bool = False
    fork_rows: int = 0
    # After the survey and ``plan``: ``population()`` whole plans, each scored by the KL of its
    # pruned model's output (every layer cut as that plan says, ``member_layers``) from the dense
    # model's on the ``fork_rows`` search windows, in one more streamed pass; ``choose`` gets the
    # scores (``streamprune.forks.Population``).
    needs_scoring: bool = False
    population_bound: int = 0  # the most plans ``population()`` may return (preflight's disk and time)
    # Bumped when a method's numerics change, so an old run directory is not resumed.
    config_version: int | None = None
    # The options that make the method produce the servable structure (dense attention kept or
    # removed, FFN widths multiples of 256: what ``--format nemotron-nas`` stores); None: it cannot.
    servable_options: dict | None = None

    def __init__(self, config, ratio: float):
        self.config = config
        self.ratio = ratio

    # ---- whole-model decisions from shapes (and survey results) ---------------------
    def plan(self, shapes: ModelShapes, survey: list[dict[str, torch.Tensor]] | None = None) -> None:
        """Turn ``ratio`` into per-layer knobs. Raise ``RatioError`` if unreachable."""
        raise NotImplementedError

    def planned_specs(self, shapes: ModelShapes) -> list[LayerSpec]:
        """The layer specs the plan will produce, from shapes alone (after ``plan``)."""
        raise NotImplementedError

    # ---- survey pass over the dense model (only if ``needs_survey``) ----------------
    def survey_observer(self, layer_idx: int, weights: dict[str, torch.Tensor]) -> Observer | None:
        return None

    def survey_result(self, layer_idx: int, observer: Observer | None) -> dict[str, torch.Tensor]:
        """A few numbers for layer ``layer_idx`` (stored in the run journal)."""
        return {}

    def fork_candidates(self, layer_idx: int, weights: dict[str, torch.Tensor], observer: Observer | None,
                        result: dict[str, torch.Tensor]):
        """(``needs_forks``) Decisions for layer ``layer_idx`` to fork the dense model with, after its
        survey ``observer`` and ``result``; the same on every rank (they see the same sums)."""
        return iter(())

    def fork_count(self, shapes: ModelShapes) -> int:
        """(``needs_forks``) How many candidates ``fork_candidates`` yields over all layers (preflight's disk)."""
        return 0

    # ---- scoring pass: whole plans scored end to end (only if ``needs_scoring``) ------
    def population(self) -> int:
        """How many plans the scoring pass scores (after ``plan`` with the survey)."""
        return 0

    def scoring_observer(self, layer_idx: int, weights: dict[str, torch.Tensor]) -> Observer | None:
        """What ``member_layers`` needs of the dense layer over the dense calibration stream."""
        return None

    def member_layers(self, layer_idx: int, weights: dict[str, torch.Tensor], observer: Observer | None) -> list[Decision]:
        """Layer ``layer_idx`` as each plan of the population cuts it, in population order."""
        return []

    def choose(self, shapes: ModelShapes, kls: list[float]) -> None:
        """Take the plan the scores pick (``kls``: each plan's KL per token, population order)."""

    # ---- per-layer ---------------------------------------------------------------------
    def observer(self, layer_idx: int, pass_name: str, weights: dict[str, torch.Tensor]) -> Observer | None:
        return None

    def decide(self, layer_idx: int, weights: dict[str, torch.Tensor], observer: Observer | None) -> Decision:
        raise NotImplementedError

    def refine(self, layer_idx: int, decision: Decision, observer: Observer | None) -> Decision:
        return decision

    def reconstruct(self, layer_idx: int, decision: Decision, data: LayerData) -> Decision:
        return decision

    def extra_flop(self, shapes: ModelShapes, specs: list[LayerSpec], nsamples: int, seqlen: int) -> float:
        """Forecast of the method's compute beyond the engine's forward passes (preflight time)."""
        return 0.0

    def workspace_bytes(self, shapes: ModelShapes) -> int:
        """Forecast of the method's device memory for statistics and factorisations
        (preflight). Default: four fp32 d x max(d, f) matrices (an SVD's U, S, V, copy)."""
        return 4 * 4 * shapes.hidden_size * max(shapes.hidden_size, shapes.intermediate_size)

    def host_workspace_bytes(self, shapes: ModelShapes, nsamples: int, seqlen: int) -> int:
        """Forecast of host memory the method keeps across a layer's passes (preflight). Default 0."""
        return 0

    def config_dict(self) -> dict:
        """What the run fingerprint records of the method (a changed value refuses resume)."""
        from dataclasses import asdict

        version = {} if self.config_version is None else {"config_version": self.config_version}
        return {"method": self.name, "ratio": self.ratio, **version, **asdict(self.config)}
