"""Atomic file writes: temp file in the same folder, fsync, ``os.replace``, fsync folder.

A reader (or a resumed run) sees either the old file or the complete new one, never a
partial write, whatever kills the process in between.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sweep_tmp(folder: Path) -> list[str]:
    """Remove the temp files that killed writers left in ``folder`` (any pid); returns their
    names. Only for a folder no live writer uses (the caller holds the run's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.name.startswith(".") and ".tmp-" in p.name and p.is_file())
    for p in stale:
        p.unlink()
    return [p.name for p in stale]


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for the caller to write (by any means); on a clean
    exit it is fsynced and renamed to ``path``, on an exception removed."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        yield tmp
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Save ``tensors`` (moved to CPU, made contiguous) atomically; returns the file size."""
    path = Path(path)
    tmp = _tmp_path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(cpu, tmp, metadata=metadata)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size
