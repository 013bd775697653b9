"""Activation cache: the calibration hidden states at each layer boundary, on disk.

Boundary ``l`` holds the hidden states entering layer ``l``: (nsamples, seqlen, d) split
into chunks of ``chunk_rows`` sequences, one safetensors file each, plus a
``complete.json`` marker written last. A complete boundary is the resume point of a
run: no replay of earlier layers is needed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from . import atomic
from .prefetch import Prefetcher, stage_on_host, to_device

MARKER = "complete.json"


class ActivationCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.bytes_read = 0
        self.bytes_written = 0

    def boundary_dir(self, layer: int) -> Path:
        return self.root / f"boundary_{layer:04d}"

    def is_complete(self, layer: int) -> bool:
        return (self.boundary_dir(layer) / MARKER).is_file()

    def num_chunks(self, layer: int) -> int:
        return json.loads((self.boundary_dir(layer) / MARKER).read_text())["chunks"]

    def writer(self, layer: int) -> "BoundaryWriter":
        folder = self.boundary_dir(layer)
        if folder.exists():
            shutil.rmtree(folder)  # a partial boundary from an interrupted run
        folder.mkdir(parents=True)
        return BoundaryWriter(self, folder)

    def read(self, layer: int, device=None) -> Iterator[torch.Tensor]:
        """Chunks of boundary ``layer`` in order, each (rows, seqlen, d), on ``device``.

        The next chunk is read (pinned on CUDA) on a background thread while the caller
        computes on this one."""
        folder = self.boundary_dir(layer)
        target = torch.device("cpu") if device is None else torch.device(device)

        def load(c: int) -> torch.Tensor:
            with safe_open(folder / f"chunk_{c:05d}.safetensors", framework="pt") as f:
                return stage_on_host(f.get_tensor("hidden"), target)  # bytes resident, off the mmap

        with Prefetcher(load, range(self.num_chunks(layer))) as ahead:
            for t in ahead:
                self.bytes_read += t.numel() * t.element_size()
                yield to_device(t, target)

    def chunk(self, layer: int, c: int, device=None) -> torch.Tensor:
        """Chunk ``c`` of boundary ``layer`` alone, on ``device``."""
        with safe_open(self.boundary_dir(layer) / f"chunk_{c:05d}.safetensors", framework="pt") as f:
            t = f.get_tensor("hidden")
        self.bytes_read += t.numel() * t.element_size()
        return t.to(torch.device("cpu") if device is None else torch.device(device))

    def drop(self, layer: int) -> None:
        shutil.rmtree(self.boundary_dir(layer), ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class BoundaryWriter:
    def __init__(self, cache: ActivationCache, folder: Path):
        self.cache = cache
        self.folder = folder
        self.count = 0
        self.rows = 0

    def append(self, hidden: torch.Tensor) -> None:
        path = self.folder / f"chunk_{self.count:05d}.safetensors"
        self.cache.bytes_written += atomic.write_safetensors(path, {"hidden": hidden})
        self.count += 1
        self.rows += hidden.shape[0]

    def close(self) -> None:
        atomic.write_json(self.folder / MARKER, {"chunks": self.count, "rows": self.rows})
