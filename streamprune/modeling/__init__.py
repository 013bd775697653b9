"""The pruned-model class and how outputs find it.

``configuration_streamprune.py`` + ``cache_compat_streamprune.py`` + ``modeling_streamprune.py`` are self-contained (torch and
transformers only): the output writer copies :data:`MODELING_FILES` into the output folder
and puts :data:`AUTO_MAP` in its ``config.json``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works anywhere.
In-process, :func:`register` makes the same folder load without remote code.
"""

from __future__ import annotations

from pathlib import Path

from .configuration_decilm import DeciLMConfig
from .configuration_streamprune import StreamPruneConfig, layer_spec_dict
from .modeling_decilm import DeciLMForCausalLM, DeciLMModel
from .modeling_streamprune import (
    BiasOnly,
    LowRankLinear,
    StreamPruneAttention,
    StreamPruneDecoderLayer,
    StreamPruneForCausalLM,
    StreamPruneMLP,
    StreamPruneModel,
    StreamPruneRMSNorm,
)

# The remote-code files an output folder carries (the modeling file imports the other two).
MODELING_FILES = tuple(Path(__file__).with_name(n) for n in ("configuration_streamprune.py", "cache_compat_streamprune.py", "modeling_streamprune.py"))
AUTO_MAP = {
    "AutoConfig": "configuration_streamprune.StreamPruneConfig",
    "AutoModelForCausalLM": "modeling_streamprune.StreamPruneForCausalLM",
}

# The nemotron-nas (DeciLM) folder's remote-code files (streamprune/formats/nemotron_nas.py).
DECILM_FILES = tuple(Path(__file__).with_name(n) for n in ("configuration_decilm.py", "cache_compat_streamprune.py", "modeling_decilm.py"))
DECILM_AUTO_MAP = {
    "AutoConfig": "configuration_decilm.DeciLMConfig",
    "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
}


def register() -> None:
    """Register model_types "streamprune" and "nemotron-nas" with AutoConfig / AutoModel /
    AutoModelForCausalLM.

    Idempotent. Afterwards ``AutoModelForCausalLM.from_pretrained(dir)`` loads an output
    folder (either format) in-process without ``trust_remote_code``.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(StreamPruneConfig.model_type, StreamPruneConfig, exist_ok=True)
    AutoModel.register(StreamPruneConfig, StreamPruneModel, exist_ok=True)
    AutoModelForCausalLM.register(StreamPruneConfig, StreamPruneForCausalLM, exist_ok=True)
    AutoConfig.register(DeciLMConfig.model_type, DeciLMConfig, exist_ok=True)
    AutoModel.register(DeciLMConfig, DeciLMModel, exist_ok=True)
    AutoModelForCausalLM.register(DeciLMConfig, DeciLMForCausalLM, exist_ok=True)


__all__ = [
    "AUTO_MAP",
    "DECILM_AUTO_MAP",
    "DECILM_FILES",
    "DeciLMConfig",
    "DeciLMForCausalLM",
    "DeciLMModel",
    "MODELING_FILES",
    "BiasOnly",
    "LowRankLinear",
    "StreamPruneAttention",
    "StreamPruneConfig",
    "StreamPruneDecoderLayer",
    "StreamPruneForCausalLM",
    "StreamPruneMLP",
    "StreamPruneModel",
    "StreamPruneRMSNorm",
    "layer_spec_dict",
    "register",
]
