"""Architecture adapters. Registry: ``model_type`` -> adapter class.

Adding an architecture: one adapter file + one line in ``ADAPTERS``.
"""

from __future__ import annotations

from pathlib import Path

from ..storage.checkpoint import CheckpointReader, file_sha256
from ..errors import CheckpointError, UnsupportedArchitectureError
from .llama import LAYER_CLASSES, SUPPORTED, LlamaFamilyAdapter
from .gemma3 import Gemma3Adapter, Gemma3ImageTextAdapter
from .nemotron_nas import NemotronNasAdapter
from .phi3 import Phi3Adapter

ADAPTERS = {**{t: LlamaFamilyAdapter for t in LAYER_CLASSES}, "streamprune": LlamaFamilyAdapter, "nemotron-nas": NemotronNasAdapter,
            "phi3": Phi3Adapter, "gemma3_text": Gemma3Adapter, "gemma3": Gemma3ImageTextAdapter}


def open_model(folder: str | Path) -> LlamaFamilyAdapter:
    """Open a checkpoint folder and return the adapter for its architecture."""
    reader = CheckpointReader(folder)
    model_type = reader.config_dict["model_type"]
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} in {folder}/config.json is not supported; supported: {', '.join(SUPPORTED + ['nemotron-nas'])}"
        )
    return ADAPTERS[model_type](reader)


# A folder has a tokenizer if it holds one of these (fast, sentencepiece, BPE vocab).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_FIX = "copy the tokenizer files of the original model into it, or (prune) give --tokenizer DIR, a folder that has them"


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer. Registers the streamprune config first, so a pruned output
    never triggers transformers' remote-code prompt; never runs code from the folder."""
    from transformers import AutoTokenizer

    from ..modeling import register

    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CheckpointError(f"tokenizer folder {str(folder)!r} {what}: give the folder that holds tokenizer.json (or tokenizer.model)")
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise CheckpointError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}): {_FIX}")
    register()
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError/OSError/... with multi-line messages
        reason = " ".join(str(e).split())[:300]
        raise CheckpointError(f"the tokenizer in {folder} cannot be loaded ({type(e).__name__}: {reason}); {_FIX}") from e


def tokenizer_digest(folder: str | Path) -> dict[str, str]:
    """sha256 of each tokenizer file in ``folder`` (for the run fingerprint of ``--tokenizer``)."""
    from ..storage.writer import TOKENIZER_FILES

    folder = Path(folder)
    return {name: file_sha256(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}
