"""Run configuration (typed, frozen) and device / dtype / memory-size parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConfigError
from .formats import FORMATS
from .run.runlock import run_dir_for

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_size(text: str | None) -> int | None:
    """'24GiB', '16GB', '512MiB', '1e9' -> bytes."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?)?\s*", str(text))
    if not m:
        raise ConfigError(f"cannot parse memory size {text!r}; write e.g. 24GiB, 16GB or 512MiB")
    value = float(m.group(1))
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(value * scale)


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available (torch {torch.__version__}); use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Compute dtype: float32 on CPU, bfloat16 on CUDA unless given."""
    if name is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass(frozen=True)
class PruneConfig:
    source: Path
    out: Path
    method: str = "cascade"  # the best measured method (benchmarks/RESULTS.md)
    ratio: float = 0.2
    method_options: dict = field(default_factory=dict)
    calib: str = "c4"
    nsamples: int = 256
    seqlen: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None
    chunk_tokens: int = 16384
    work_dir: Path | None = None
    fresh: bool = False
    keep_work: bool = False
    dry_run: bool = False
    max_gpu_memory: str | None = None
    progress: bool = True
    tokenizer: Path | None = None  # a folder with the tokenizer files (default: the source's)
    # The output folder's format: "streamprune" (our modeling file: every structure) or
    # "nemotron-nas" (DeciLM: vLLM, SGLang, TensorRT-LLM, MLX-lm, llama.cpp's GGUF converter;
    # the method then produces the servable structure, see streamprune.formats.nemotron_nas).
    format: str = "streamprune"

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "out", Path(self.out))
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir", Path(self.work_dir))
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.nsamples <= 0:
            raise ConfigError(f"--nsamples must be > 0, got {self.nsamples}")
        if self.seqlen <= 0:
            raise ConfigError(f"--seqlen must be > 0, got {self.seqlen}")
        if self.chunk_tokens <= 0:
            raise ConfigError(f"--chunk-tokens must be > 0, got {self.chunk_tokens}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    @property
    def run_dir(self) -> Path:
        return run_dir_for(self.out, self.work_dir)

    @property
    def chunk_rows(self) -> int:
        return max(1, self.chunk_tokens // self.seqlen)
