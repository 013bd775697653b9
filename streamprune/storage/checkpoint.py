"""Checkpoint reader: a safetensors folder (sharded with an index, or a single file).

Reads only the tensors asked for, through memory-mapped ``safe_open`` handles that are
closed after each read (so mapped pages never accumulate in RSS across layers). Pickle
checkpoints (``.bin``, ``.pt``, ``.pth``) are refused: loading them executes code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable regular file (None if it is): missing, a symlink loop,
    a dangling symlink, a folder, unreadable."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a symlink loop (it resolves to itself); replace it with the real file"
        if os.path.islink(path):
            return f"{path} is a dangling symlink (to {os.readlink(path)!r}); restore its target or re-download"
        if e.errno == errno.ENOENT:
            return f"{path} is missing"
        return f"{path} cannot be read ({e.strerror})"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable (permission denied): fix its permissions (chmod a+r) or run as its owner"
    return None


def read_text(path: Path, what: str) -> str:
    """A small text file's contents, an unreadable one as one :class:`CheckpointError` line."""
    try:
        return path.read_text(encoding="utf-8")
    except PermissionError as e:
        raise CheckpointError(f"{path} is not readable (permission denied): fix its permissions (chmod a+r) or run as its owner") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text ({e}); {what}") from e
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); {what}") from e


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class CheckpointReader:
    """Tensor name -> shard map over a Hugging Face safetensors checkpoint folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            if self.folder.exists():
                raise CheckpointError(
                    f"model source {str(self.folder)!r} is a file, not a folder: give the folder that holds "
                    f"config.json and the *.safetensors (e.g. {str(self.folder.parent)!r})"
                )
            raise CheckpointError(f"model folder {str(self.folder)!r} does not exist (give a local folder with config.json and *.safetensors)")
        self.config_dict = self._read_config()
        self.weight_map = self._read_weight_map()
        self.bytes_read = 0

    # ---- opening ----------------------------------------------------------------------
    def _read_config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file() and not path.is_symlink():
            raise CheckpointError(f"{path} is missing: a Hugging Face model folder needs config.json")
        if problem := file_problem(path):
            raise CheckpointError(problem)
        try:
            cfg = json.loads(read_text(path, "re-download or fix the file"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise CheckpointError(f"{path} has no 'model_type'; is this a Hugging Face config.json?")
        return cfg

    def _read_weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_NAME
        single = self.folder / SINGLE_NAME
        if index.is_file() or index.is_symlink():
            if problem := file_problem(index):
                raise CheckpointError(problem)
            try:
                weight_map = json.loads(read_text(index, "re-download the checkpoint"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to shard file names")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            for shard in sorted(set(weight_map.values())):
                rel = Path(shard)
                if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                    raise CheckpointError(
                        f"{index} names shard {shard!r}, outside the model folder; an index may only name files "
                        f"inside {self.folder}: move the shard into it and name it by its file name"
                    )
                path = self.folder / shard
                if not path.is_file() and not path.is_symlink():
                    raise CheckpointError(f"shard {shard!r} named in {index} is missing from {self.folder}")
                if problem := file_problem(path):
                    raise CheckpointError(f"shard {shard!r} named in {index}: {problem}")
            self._check_index(weight_map)
            return weight_map
        if single.is_file() or single.is_symlink():
            if problem := file_problem(single):
                raise CheckpointError(problem)
            try:
                with safe_open(single, framework="pt") as f:
                    return {k: SINGLE_NAME for k in f.keys()}
            except Exception as e:  # safetensors raises its own error types for garbled headers
                raise CheckpointError(f"{single} cannot be opened as safetensors ({e}); re-download it") from e
        pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.folder} holds only pickle checkpoints ({', '.join(pickles[:3])}); streamprune "
                "never unpickles model files (it can execute code). Convert to safetensors first, e.g. "
                "`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment."
            )
        raise CheckpointError(f"{self.folder} has neither {INDEX_NAME} nor {SINGLE_NAME}")

    def _check_index(self, weight_map: dict[str, str]) -> None:
        by_shard: dict[str, set[str]] = defaultdict(set)
        for name, shard in weight_map.items():
            by_shard[shard].add(name)
        for shard, names in sorted(by_shard.items()):
            try:
                with safe_open(self.folder / shard, framework="pt") as f:
                    present = set(f.keys())
            except Exception as e:  # safetensors raises its own error types for garbled headers
                raise CheckpointError(f"shard {shard!r} cannot be opened as safetensors ({e})") from e
            missing = sorted(names - present)
            if missing:
                raise CheckpointError(
                    f"index names {len(missing)} tensors absent from shard {shard!r} (first: {missing[0]!r}); "
                    "the checkpoint is incomplete or the index is stale"
                )

    # ---- reading ----------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.weight_map

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(n for n in self.weight_map if n.startswith(prefix))

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's storage dtype, from its shard's header (no tensor data is read)."""
        with safe_open(self.folder / self.weight_map[name], framework="pt") as f:
            code = f.get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.folder} has dtype {code}; streamprune reads F32, F16 and BF16 weights")
        return SAFETENSORS_DTYPES[code]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read ``names`` (each once), grouped by shard; handles are closed afterwards."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise CheckpointError(f"tensor {name!r} is not in the checkpoint index of {self.folder}")
            by_shard[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(by_shard):
            with safe_open(self.folder / shard, framework="pt") as f:
                for name in by_shard[shard]:
                    t = f.get_tensor(name)
                    self.bytes_read += t.numel() * t.element_size()
                    out[name] = t
        return out

    # ---- identity (for the run fingerprint) --------------------------------------------
    def fingerprint(self) -> dict:
        """Config and index digests plus shard names and sizes (cheap: no shard hashing)."""
        files = sorted(set(self.weight_map.values()))
        index = self.folder / INDEX_NAME
        return {
            "config_sha256": file_sha256(self.folder / "config.json"),
            "index_sha256": file_sha256(index) if index.is_file() else None,
            "shards": {f: (self.folder / f).stat().st_size for f in files},
        }
