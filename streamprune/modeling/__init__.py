"""The pruned-model class and how outputs find it.

``modeling_streamprune.py`` is self-contained: the output writer copies :data:`MODELING_FILE`
into the output folder and puts :data:`AUTO_MAP` in its ``config.json``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works anywhere.
In-process, :func:`register` makes the same folder load without remote code.
"""

from __future__ import annotations

from pathlib import Path

from .modeling_streamprune import (
    BiasOnly,
    LowRankLinear,
    StreamPruneAttention,
    StreamPruneConfig,
    StreamPruneDecoderLayer,
    StreamPruneForCausalLM,
    StreamPruneMLP,
    StreamPruneModel,
    StreamPruneRMSNorm,
    build_attention_mask,
    layer_spec_dict,
)

MODELING_FILE = Path(__file__).with_name("modeling_streamprune.py")
AUTO_MAP = {
    "AutoConfig": "modeling_streamprune.StreamPruneConfig",
    "AutoModelForCausalLM": "modeling_streamprune.StreamPruneForCausalLM",
}


def register() -> None:
    """Register model_type "streamprune" with AutoConfig / AutoModel / AutoModelForCausalLM.

    Idempotent. Afterwards ``AutoModelForCausalLM.from_pretrained(dir)`` loads an output
    folder in-process without ``trust_remote_code``.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(StreamPruneConfig.model_type, StreamPruneConfig, exist_ok=True)
    AutoModel.register(StreamPruneConfig, StreamPruneModel, exist_ok=True)
    AutoModelForCausalLM.register(StreamPruneConfig, StreamPruneForCausalLM, exist_ok=True)


__all__ = [
    "AUTO_MAP",
    "MODELING_FILE",
    "BiasOnly",
    "LowRankLinear",
    "StreamPruneAttention",
    "StreamPruneConfig",
    "StreamPruneDecoderLayer",
    "StreamPruneForCausalLM",
    "StreamPruneMLP",
    "StreamPruneModel",
    "StreamPruneRMSNorm",
    "build_attention_mask",
    "layer_spec_dict",
    "register",
]
