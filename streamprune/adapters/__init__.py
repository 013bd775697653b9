"""Architecture adapters. Registry: ``model_type`` -> adapter class.

Adding an architecture: one adapter file + one line in ``ADAPTERS``.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointReader
from ..errors import UnsupportedArchitectureError
from .llama import LAYER_CLASSES, SUPPORTED, LlamaFamilyAdapter

ADAPTERS = {**{t: LlamaFamilyAdapter for t in LAYER_CLASSES}, "streamprune": LlamaFamilyAdapter}


def open_model(folder: str | Path) -> LlamaFamilyAdapter:
    """Open a checkpoint folder and return the adapter for its architecture."""
    reader = CheckpointReader(folder)
    model_type = reader.config_dict["model_type"]
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} in {folder}/config.json is not supported; supported: {', '.join(SUPPORTED)}"
        )
    return ADAPTERS[model_type](reader)


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer. Registers the streamprune config first, so a pruned output
    never triggers transformers' remote-code prompt; never runs code from the folder."""
    from transformers import AutoTokenizer

    from ..modeling import register

    register()
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
