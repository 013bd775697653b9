"""Perplexity, streamed layer by layer (a 70B model evaluates on one 24 GB GPU).

Protocol (the pruning papers'): tokenize the whole evaluation text once, cut it into
non-overlapping windows of ``seqlen`` tokens (tail dropped), mean next-token NLL over
all windows, ``exp``. Works for dense checkpoints and streamprune outputs alike. The
in-memory path (``perplexity_in_memory``) loads the whole model with ``transformers``:
for small models and as the reference the streamed figure is tested against.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .storage.activations import ActivationCache
from .adapters import load_tokenizer, open_model
from .config import resolve_device, resolve_dtype
from .distributed import Ranks, joined
from .errors import ConfigError
from .run.interrupts import sigterm_raises
from .stream import embed_to_boundary, final_head, position_embeddings, propagate, token_embedding, token_nll
from .inputs.textdata import eval_windows, resolve_text_source


@dataclass(frozen=True)
class EvalConfig:
    model: Path
    dataset: str = "wikitext2"
    seqlen: int = 128
    max_windows: int | None = None
    device: str = "cpu"
    dtype: str | None = None
    chunk_tokens: int = 16384
    work_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.seqlen <= 1:
            raise ConfigError(f"--seqlen must be > 1, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows <= 0:
            raise ConfigError(f"--max-windows must be > 0, got {self.max_windows}")


def _windows(model_dir: Path, cfg: EvalConfig) -> torch.Tensor:
    tokenizer = load_tokenizer(model_dir)
    return eval_windows(tokenizer, resolve_text_source(cfg.dataset), cfg.seqlen, cfg.max_windows)


def _result(cfg: EvalConfig, tokens: torch.Tensor, nll: float, count: int, t0: float, mode: str) -> dict:
    return {
        "dataset": cfg.dataset,
        "seqlen": cfg.seqlen,
        "windows": int(tokens.shape[0]),
        "tokens": int(count),
        "nll": nll / count,
        "ppl": math.exp(nll / count),
        "mode": mode,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


EVAL_DIR_PREFIX = "streamprune-eval-"


def sweep_stale_eval_dirs(root: Path) -> list[Path]:
    """Remove activation folders of evaluations that were killed (``kill -9``, OOM): each
    holds the pid of its process; a folder whose process is gone is removed. Returns them."""
    removed = []
    for folder in root.glob(EVAL_DIR_PREFIX + "*"):
        try:
            pid = int((folder / "pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if not psutil.pid_exists(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def perplexity(cfg: EvalConfig) -> dict:
    """Streamed perplexity of the model folder ``cfg.model``. Under torchrun (or in an
    initialised process group) each rank streams a contiguous shard of the windows and the
    NLL sums are all-reduced: every rank returns the same result."""
    with joined(cfg.device) as (ranks, device):
        if ranks.distributed:
            cfg = replace(cfg, device=device, progress=cfg.progress and ranks.is_main)
        return _perplexity(cfg, ranks)


@torch.no_grad()
def _perplexity(cfg: EvalConfig, ranks: Ranks) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    adapter = open_model(cfg.model)
    if cfg.seqlen > adapter.shapes().max_position_embeddings:
        raise ConfigError(f"--seqlen {cfg.seqlen} exceeds the model's max_position_embeddings {adapter.shapes().max_position_embeddings}")
    tokens = _windows(cfg.model, cfg)
    mine = tokens[ranks.shard(tokens.shape[0], "evaluation windows", "--max-windows (or lower --seqlen)")]
    outer = adapter.read_outer()
    embed = token_embedding(adapter, outer, device, dtype)
    norm, head = final_head(adapter, outer, embed, device, dtype)
    pe = position_embeddings(adapter.rotary(device), cfg.seqlen, device, dtype)
    chunk_rows = max(1, cfg.chunk_tokens // cfg.seqlen)
    root = Path(cfg.work_dir) if cfg.work_dir is not None else Path(tempfile.gettempdir())
    sweep_stale_eval_dirs(root)
    with sigterm_raises("evaluation"), tempfile.TemporaryDirectory(prefix=EVAL_DIR_PREFIX, dir=root) as tmp:
        (Path(tmp) / "pid").write_text(str(os.getpid()))
        cache = ActivationCache(Path(tmp))
        embed_to_boundary(cache, mine, embed, chunk_rows, dtype)
        for i in tqdm(range(adapter.num_layers), desc="eval", disable=not cfg.progress):
            layer = adapter.build_layer(i, adapter.read_layer(i), device, dtype)
            propagate(layer, cache, i, pe, device)
            cache.drop(i)
            del layer
        nll, count = token_nll(cache, adapter.num_layers, mine, norm, head, device)
    nll, count = ranks.sum_floats(nll, count)  # the same sum on every rank, deterministic for a given world size
    result = _result(cfg, tokens, nll, int(count), t0, "streamed")
    return {**result, "world_size": ranks.world_size} if ranks.distributed else result


@torch.no_grad()
def perplexity_in_memory(cfg: EvalConfig) -> dict:
    """Same protocol, whole model loaded by ``transformers`` (small models only)."""
    from transformers import AutoModelForCausalLM

    from .modeling import register

    t0 = time.perf_counter()
    register()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
    tokens = _windows(cfg.model, cfg)
    nll, count = 0.0, 0
    for row in tqdm(range(tokens.shape[0]), desc="eval", disable=not cfg.progress):
        ids = tokens[row : row + 1].to(device)
        logits = model(input_ids=ids).logits.float()[0]  # (T, vocab) fp32
        nll += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return _result(cfg, tokens, nll, count, t0, "in-memory")
