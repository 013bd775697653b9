"""Output writer: a Hugging Face folder that ``transformers`` loads.

Files are first written into a staging folder inside the run directory (so the output
folder never holds partial files), then published with one directory rename:

- ``model-layer-XXXXX.safetensors`` per decoder layer, ``model-outer.safetensors``
  (embeddings, final norm, lm_head unless tied), ``model.safetensors.index.json``;
- ``config.json`` (``StreamPruneConfig``: the source config + per-layer specs + auto_map),
  ``configuration_streamprune.py`` + ``cache_compat_streamprune.py`` + ``modeling_streamprune.py`` (for ``trust_remote_code``), tokenizer files;
- ``streamprune_report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import atomic
from ..errors import OutputError
from ..modeling import AUTO_MAP, MODELING_FILES
from ..modeling import modeling_streamprune as sp
from ..spec import LayerSpec

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
OUTER_FILE = "model-outer.safetensors"
REPORT_FILE = "streamprune_report.json"


def layer_file(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


def save_layer(staging: Path, i: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[str, int]:
    """Write layer ``i`` (names relative to the layer) as ``model.layers.{i}.*``; returns (file, bytes)."""
    named = {f"model.layers.{i}.{k}": v.to(dtype) for k, v in sorted(tensors.items())}
    size = atomic.write_safetensors(staging / layer_file(i), named, metadata={"format": "pt"})
    return layer_file(i), size


def save_outer(staging: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    return atomic.write_safetensors(staging / OUTER_FILE, {k: v.to(dtype) for k, v in tensors.items()}, metadata={"format": "pt"})


def pruned_config(source_config, specs: list[LayerSpec], dtype: torch.dtype) -> "sp.StreamPruneConfig":
    """The output config: the source's fields + per-layer specs + auto_map."""
    overrides = {}
    if getattr(source_config, "model_type", None) == "streamprune":  # re-pruning an output
        overrides["source_model_type"] = source_config.source_model_type
    cfg = sp.StreamPruneConfig.from_source(source_config, specs, **overrides)
    cfg.architectures = ["StreamPruneForCausalLM"]
    cfg.auto_map = dict(AUTO_MAP)
    cfg.dtype = dtype
    return cfg


def finalize(staging: Path, source_folder: Path, config, specs: list[LayerSpec], layer_files: list[str], outer_keys: list[str], dtype: torch.dtype,
             tokenizer_folder: Path | None = None) -> None:
    """Write index, config, modeling file and tokenizer into ``staging``; the tokenizer files
    come from ``tokenizer_folder`` when given (``--tokenizer``), generation_config.json always
    from the source."""
    weight_map: dict[str, str] = {}
    total = 0
    for i, (spec, fname) in enumerate(zip(specs, layer_files)):
        for name in spec.tensor_shapes():
            weight_map[f"model.layers.{i}.{name}"] = fname
        total += spec.num_params() * dtype.itemsize
    for key in outer_keys:
        weight_map[key] = OUTER_FILE
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic.write_json(staging / "model.safetensors.index.json", index)
    cfg = pruned_config(config, specs, dtype)
    atomic.write_bytes(staging / "config.json", cfg.to_json_string(use_diff=False).encode())
    for remote_file in MODELING_FILES:
        atomic.write_bytes(staging / remote_file.name, remote_file.read_bytes())
    for name in TOKENIZER_FILES:
        src = (tokenizer_folder if tokenizer_folder is not None and name != "generation_config.json" else source_folder) / name
        if src.is_file():
            atomic.write_bytes(staging / name, src.read_bytes())


def finished_report(out: Path, fingerprint_sha256: str) -> dict | None:
    """The report of ``out`` if it is a finished run of the job with this fingerprint."""
    report = out / REPORT_FILE
    if not report.is_file():
        return None
    try:
        data = json.loads(report.read_text())
    except json.JSONDecodeError:
        return None  # a garbled report is not "the same job"
    return data if data.get("fingerprint_sha256") == fingerprint_sha256 else None


def check_output_target(out: Path, fingerprint_sha256: str) -> None:
    """Refuse an existing output folder unless it is a previous run of the same job."""
    if not out.exists() or finished_report(out, fingerprint_sha256) is not None:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise OutputError(
        f"output folder {str(out)!r} exists and is not a previous run of this job; "
        "choose another --out or remove it"
    )


def publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to ``out`` (one rename when on the same filesystem)."""
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, out)
    except OSError:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(staging, tmp)
        os.replace(tmp, out)
        shutil.rmtree(staging)
