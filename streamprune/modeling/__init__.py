"""The pruned-model class and how outputs find it.

``configuration_streamprune.py`` + ``cache_compat_streamprune.py`` + ``modeling_streamprune.py`` are self-contained (torch and
transformers only): the output writer copies :data:`MODELING_FILES` into the output folder
and puts :data:`AUTO_MAP` in its ``config.json``, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works anywhere.
In-process, :func:`register` makes the same folder load without remote code.
"""

from __future__ import annotations

from pathlib import Path

from .configuration_streamprune import StreamPruneConfig, layer_spec_dict
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
