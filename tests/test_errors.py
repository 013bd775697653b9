"""Bad-input catalogue: one actionable line on stderr, non-zero exit, no partial output.

Run: ``.venv/bin/pytest tests/test_errors.py -q``
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streamprune.cli import main

ARGS = ["--nsamples", "4", "--seqlen", "32", "--no-progress"]


def _first_shard(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"]["model.layers.0.mlp.up_proj.weight"]


def break_missing_config(m: Path):
    (m / "config.json").unlink()


def break_garbled_config(m: Path):
    (m / "config.json").write_text("{not json")


def break_missing_index(m: Path):
    (m / "model.safetensors.index.json").unlink()


def break_missing_shard(m: Path):
    _first_shard(m).unlink()


def break_index_names_absent_tensor(m: Path):
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = _first_shard(m).name
    (m / "model.safetensors.index.json").write_text(json.dumps(index))


def _rewrite(m: Path, fn):
    shard = _first_shard(m)
    tensors = load_file(shard)
    fn(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def break_tensor_shape(m: Path):
    _rewrite(m, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3)))


def break_tensor_dtype(m: Path):
    _rewrite(m, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros_like(t["model.layers.0.mlp.up_proj.weight"], dtype=torch.int32)))


def break_nan_weight(m: Path):
    def poison(t):
        w = t["model.layers.0.mlp.up_proj.weight"].clone()
        w[0, 0] = float("nan")
        t["model.layers.0.mlp.up_proj.weight"] = w

    _rewrite(m, poison)


def break_pickle(m: Path):
    for f in m.glob("model*.safetensors*"):
        f.unlink()
    (m / "pytorch_model.bin").write_bytes(b"\x80\x04not really")


def break_architecture(m: Path):
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (m / "config.json").write_text(json.dumps(cfg))


def no_change(m: Path):
    pass


CASES = [
    ("missing config", break_missing_config, [], "config.json is missing"),
    ("garbled config", break_garbled_config, [], "not valid JSON"),
    ("missing index", break_missing_index, [], "neither model.safetensors.index.json"),
    ("missing shard", break_missing_shard, [], "is missing from"),
    ("index names absent tensor", break_index_names_absent_tensor, [], "absent from shard"),
    ("tensor shape", break_tensor_shape, [], "has shape (3, 3), expected"),
    ("tensor dtype", break_tensor_dtype, [], "expected a floating-point dtype"),
    ("pickle checkpoint", break_pickle, [], "never unpickles"),
    ("unsupported architecture", break_architecture, [], "supported: gemma3, gemma3_text, llama, mistral, olmo2, phi3, qwen2, qwen3"),
    ("ratio >= 1", no_change, ["--ratio", "1.0"], "--ratio must be in [0, 1)"),
    ("ratio < 0", no_change, ["--ratio", "-0.1"], "--ratio must be in [0, 1)"),
    ("ratio unreachable", no_change, ["--ratio", "0.95", "--method", "magnitude"], "unreachable"),
    ("ratio unreachable olica", no_change, ["--ratio", "0.9", "--method", "olica"], "--ratio"),
    ("nsamples 0", no_change, ["--nsamples", "0"], "--nsamples must be > 0"),
    ("seqlen 0", no_change, ["--seqlen", "0"], "--seqlen must be > 0"),
    ("seqlen > max", no_change, ["--seqlen", "100000"], "exceeds the model's max_position_embeddings"),
    ("calib missing", no_change, ["--calib", "/nonexistent/calib.txt"], "does not exist"),
    ("calib too few docs", no_change, ["--nsamples", "5000"], "--nsamples"),
    ("cuda unavailable", no_change, ["--device", "cuda"], "CUDA is not available"),
    ("nan in statistics", break_nan_weight, ["--method", "olica"], "NaN/Inf"),
]


def prune_broken_copy(src, tmp_path, capsys, breaker, extra, expected) -> Path:
    """Prune a copy of ``src`` broken by ``breaker``: it must fail with one ``streamprune:
    error:`` line that contains ``expected``. Returns the ``--out`` path it was given."""
    model = tmp_path / "model"
    shutil.copytree(src, model)
    breaker(model)
    out = tmp_path / "out"
    code = main(["prune", str(model), "--out", str(out), "--method", "magnitude", "--ratio", "0.2", *ARGS, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("streamprune: error:"), err
    assert expected in err[0], err[0]
    return out


@pytest.mark.parametrize("name,breaker,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_actionable_line(tiny_llama, tmp_path, capsys, monkeypatch, name, breaker, extra, expected):
    if name == "cuda unavailable":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = prune_broken_copy(tiny_llama, tmp_path, capsys, breaker, extra, expected)
    assert not out.exists()  # nothing half-written visible


def test_empty_calibration_file(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = main(["prune", str(tiny_llama), "--out", str(tmp_path / "out"), "--calib", str(empty), *ARGS])
    assert code == 2 and "is empty" in capsys.readouterr().err


def test_output_folder_of_another_job_is_refused(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code = main(["prune", str(tiny_llama), "--out", str(out), "--method", "magnitude", *ARGS])
    assert code == 2 and "exists and is not a previous run of this job" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
