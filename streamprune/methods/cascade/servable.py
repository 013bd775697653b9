"""The servable structure (``structure="servable"``): shapes every inference engine stores.

Nemotron-NAS / DeciLM checkpoints (vLLM, SGLang, TensorRT-LLM, MLX-lm, llama.cpp's ``deci``;
:mod:`streamprune.formats.nemotron_nas`) describe a layer by two facts: its attention is kept
whole (dense q/k/v/o, every query head) or removed, and its FFN has some width. So here:

- **attention**: kept dense, or removed (``no_op``; never in layer 0, where vLLM needs it);
- **FFN**: width a multiple of ``ffn_multiple`` (256: llama.cpp's k-quants need the FFN
  width, down_proj's row length, to be one, and the format rounds widths up to it), at least
  one multiple (a layer that keeps attention needs an FFN in llama.cpp's graph).

No low-rank factors, no value-dim cuts. Which layers lose attention and each layer's FFN
width come from measured costs, both in the units of the allocation's FFN curve (the error
of the layer's output as the next RMSNorm sees it, Σ_t ‖Δ_t‖² / ms(y_t), on the survey's
dense stream; :mod:`.allocation`):

- FFN: the greedy OBS cost curve ``e_l(k)`` (channels removed with down_proj refitted),
  read every ``ffn_multiple`` channels;
- attention: ``a_l = Σ_t ‖o_t‖² / ms(y_t)``, the whole attention output's size.

:func:`allocate` hands out parameter cuts greedily by cost per parameter removed (each
layer's next FFN step, or its attention) until the requested count is reached; the FFN curve
is convex in practice, and an attention removal is one move of its own. Pure functions.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ...shapes import ModelShapes
from ...spec import LayerSpec


@dataclass(frozen=True)
class ServableLayer:
    attention: bool  # kept whole (True) or removed
    ffn: int  # FFN width, a multiple of ffn_multiple


def uniform_plan(num_layers: int, f: int, ffn_multiple: int, ffn_params_per_channel: int, target: int) -> list[ServableLayer]:
    """The plan before the survey (preflight), and ``allocation="uniform"``: every layer keeps
    attention and the FFNs lose multiples as evenly as the count allows (the last layers one
    more), as close to ``target`` parameters as one FFN step allows."""
    step = ffn_multiple * ffn_params_per_channel
    max_steps = f // ffn_multiple - 1
    n = min(max(0, round(target / step)), num_layers * max_steps)
    base, extra = divmod(n, num_layers)
    return [ServableLayer(True, f - (base + (layer >= num_layers - extra)) * ffn_multiple) for layer in range(num_layers)]


def allocate(ffn_curves: list[Tensor], attn_costs: list[float], f: int, ffn_multiple: int, ffn_params_per_channel: int,
             attn_params: int, target: int) -> list[ServableLayer]:
    """Per-layer structure removing at least ``target`` parameters (the first move that reaches
    it stops: at most one move over), cheapest error per removed parameter first.

    ffn_curves[l]: (≥ f - ffn_multiple + 1,) error of removing k channels of layer l's FFN;
    attn_costs[l]: error of removing layer l's attention (layer 0 never loses it);
    ffn_params_per_channel: parameters one FFN channel carries (3 d); attn_params: one layer's
    attention parameters. Ties go to the lower layer, FFN before attention. Raises ValueError
    when ``target`` cannot be reached."""
    L = len(ffn_curves)
    max_steps = f // ffn_multiple - 1  # keep one multiple
    reachable = L * max_steps * ffn_multiple * ffn_params_per_channel + (L - 1) * attn_params
    if not 0 <= target <= reachable:
        raise ValueError(f"cannot remove {target} parameters in the servable structure (at most {reachable}: every FFN at "
                         f"{ffn_multiple} channels and every attention but layer 0's removed)")
    steps = [0] * L
    attention = [True] * L
    step_params = ffn_multiple * ffn_params_per_channel

    def ffn_move(layer: int):
        k = steps[layer] * ffn_multiple
        cost = float(ffn_curves[layer][k + ffn_multiple] - ffn_curves[layer][k])
        return (max(cost, 0.0) / step_params, layer, 0)

    heap = [ffn_move(layer) for layer in range(L) if max_steps > 0]
    heap += [(max(float(attn_costs[layer]), 0.0) / attn_params, layer, 1) for layer in range(1, L) if attn_params > 0]
    heapq.heapify(heap)
    removed = 0
    while removed < target:
        _, layer, kind = heapq.heappop(heap)
        if kind == 1:
            attention[layer] = False
            removed += attn_params
            continue
        steps[layer] += 1
        removed += step_params
        if steps[layer] < max_steps:
            heapq.heappush(heap, ffn_move(layer))
    return [ServableLayer(attention[layer], f - steps[layer] * ffn_multiple) for layer in range(L)]


def layer_spec(shapes: ModelShapes, layer: ServableLayer) -> LayerSpec:
    """The spec of a servable layer: the dense attention (q/k/v biases travel with a zero o_proj
    bias in the format) or none, and the layer's FFN width."""
    dense = shapes.dense_spec()
    if layer.attention:
        return replace(dense, intermediate_size=layer.ffn, o_bias=dense.o_bias or dense.qkv_bias)
    return replace(dense, num_kv_heads=0, heads_per_group=0, qkv_bias=False, o_bias=False, intermediate_size=layer.ffn)


def layer_tensors(weights: dict[str, Tensor], spec: LayerSpec, ffn: dict[str, Tensor]) -> dict[str, Tensor]:
    """A servable layer's tensors: the dense layer's attention and norms as ``spec`` keeps them (a
    zero o_proj bias where the spec has one the source lacks), with the given FFN tensors."""
    down = weights["mlp.down_proj.weight"]
    tensors = {k: weights[k] for k in spec.tensor_shapes() if k in weights and not k.startswith("mlp.")}
    if spec.o_bias and "self_attn.o_proj.bias" not in tensors:
        tensors["self_attn.o_proj.bias"] = torch.zeros(down.shape[0], dtype=down.dtype, device=down.device)
    tensors.update({k: v.to(down.dtype) for k, v in ffn.items()})
    return tensors


def check_width(f: int, ffn_multiple: int) -> None:
    if f % ffn_multiple or f < 2 * ffn_multiple:
        raise ValueError(f"the servable structure needs the FFN width ({f}) to be a multiple of --option "
                         f"ffn_multiple={ffn_multiple}, at least two of them: pick an ffn_multiple that divides it")


def plan(shapes: ModelShapes, ratio: float, ffn_multiple: int, ffn_curves: list[Tensor] | None = None,
         attn_costs: list[float] | None = None) -> list[ServableLayer]:
    """Per-layer (attention kept?, FFN width) removing ``ratio`` of the parameters (±1 move):
    measured (:func:`allocate`) given each layer's costs, else uniform (:func:`uniform_plan`).
    Parameters are counted as the specs store them (a zero o_proj bias beside q/k/v biases
    included). Raises ValueError naming what cannot be done."""
    f, m = shapes.intermediate_size, ffn_multiple
    check_width(f, m)
    per_channel = 3 * shapes.hidden_size
    attn_params = layer_spec(shapes, ServableLayer(True, f)).num_params() - layer_spec(shapes, ServableLayer(False, f)).num_params()
    baseline = shapes.total_params([layer_spec(shapes, ServableLayer(True, f))] * shapes.num_layers)  # may exceed dense by the zero o biases
    target = round(baseline - (1 - ratio) * shapes.total_params())
    if ffn_curves is None:
        return uniform_plan(shapes.num_layers, f, m, per_channel, target)
    return allocate(ffn_curves, attn_costs, f, m, per_channel, attn_params, target)
