"""Adapter for Nemotron-NAS / DeciLM folders (``model_type: nemotron-nas``), e.g. the ones
``streamprune export --format nemotron-nas`` writes: read for ``streamprune eval`` (and
re-export).

Each ``block_configs`` entry becomes a :class:`LayerSpec` (:func:`spec_from_block`): a
kept attention has ``num_attention_heads`` query heads in ``heads / n_heads_in_group``
groups of ``head_dim``, q/k/v/o biased when ``attention_bias``; the FFN width is vLLM's
``_ffn_mult_to_intermediate_size``; a no-op sub-block is 0 heads / width 0. Layers are the
``DeciLMDecoderLayer`` of ``streamprune/modeling/modeling_decilm.py`` (no norm, no tensor
for a no-op sub-block; a layer with neither has no tensors at all).
"""

from __future__ import annotations

import torch
from torch import nn

from ..storage.checkpoint import CheckpointReader
from ..errors import CheckpointError, UnsupportedArchitectureError
from ..modeling import DeciLMConfig
from ..modeling.modeling_decilm import DeciLMDecoderLayer
from ..spec import LayerSpec
from .llama import LlamaFamilyAdapter, check_config_values


def spec_from_block(config: DeciLMConfig, i: int) -> LayerSpec:
    """Layer ``i`` of a nemotron-nas config as a LayerSpec."""
    s = config.layer_shapes(i)
    bias = bool(config.attention_bias) and s["num_heads"] > 0
    return LayerSpec(
        hidden_size=config.hidden_size,
        num_kv_heads=s["num_kv_heads"],
        heads_per_group=s["num_heads"] // s["num_kv_heads"] if s["num_kv_heads"] else 0,
        head_dim=s["head_dim"],
        v_head_dim=s["head_dim"],
        intermediate_size=s["intermediate_size"],
        qkv_bias=bias,
        o_bias=bias,
    )


class NemotronNasAdapter(LlamaFamilyAdapter):
    """Reads and builds the layers of a nemotron-nas folder."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.model_type = "nemotron-nas"
        path = reader.folder / "config.json"
        raw = reader.config_dict
        check_config_values({"intermediate_size": 1, **raw}, path, dense=True)  # intermediate_size is per block here
        if not isinstance(raw.get("block_configs"), list):
            raise CheckpointError(f"{path} has no block_configs list; a nemotron-nas config needs one entry per layer")
        try:
            self.config = DeciLMConfig.from_pretrained(reader.folder)
            self.specs = [spec_from_block(self.config, i) for i in range(self.config.num_hidden_layers)]
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: {' '.join(str(e).split())}; fix block_configs") from e
        if getattr(self.config, "mlp_bias", False):
            raise UnsupportedArchitectureError(f"{path}: mlp_bias=True (biased gate/up/down) is not supported")
        self.config._attn_implementation = "sdpa"  # attention_mask=None + sdpa => causal, no mask tensor
        self.pruned = True
        self._check_checkpoint_matches_config()

    def layers_with_tensors(self) -> set[int]:
        return {i for i, s in enumerate(self.specs) if s.num_heads or s.intermediate_size}

    def read_layer(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.layers_with_tensors():
            return {}  # both sub-blocks no-op: an identity layer
        return super().read_layer(i)

    def skeleton(self, i: int) -> nn.Module:
        with torch.device("meta"):
            return DeciLMDecoderLayer(self.config, i)
