"""Broken-input sweep: garbled config values, index/symlink tricks, unreadable files,
calibration text in other encodings, folders without a tokenizer. Each must end in one
actionable ``streamprune: error:`` line, a non-zero exit and nothing written.

Run: ``.venv/bin/pytest tests/test_errors_sweep.py -q``
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamprune.cli import main

from test_errors import ARGS, _first_shard, prune_broken_copy


def set_config(**values):
    def breaker(m: Path):
        cfg = json.loads((m / "config.json").read_text())
        for key, value in values.items():
            if value is None:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (m / "config.json").write_text(json.dumps(cfg))

    return breaker


def index_points_outside(m: Path, absolute: bool = False):
    index = json.loads((m / "model.safetensors.index.json").read_text())
    shard = _first_shard(m).name
    shutil.copy(m / shard, m.parent / "outside.safetensors")
    target = str(m.parent / "outside.safetensors") if absolute else "../outside.safetensors"
    index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))


def shard_symlink_loop(m: Path):
    shard = _first_shard(m)
    shard.unlink()
    os.symlink("other.safetensors", shard)
    os.symlink(shard.name, m / "other.safetensors")


def dangling_shard_symlink(m: Path):
    shard = _first_shard(m)
    shard.unlink()
    os.symlink("../blobs/gone", shard)


def no_tokenizer(m: Path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (m / name).unlink(missing_ok=True)


def garbled_tokenizer(m: Path):
    (m / "tokenizer.json").write_text("{not a tokenizer")


def no_change(m: Path):
    pass


CASES = [
    ("hidden_size 0", set_config(hidden_size=0), [], "hidden_size must be a positive integer, got 0"),
    ("hidden_size negative", set_config(hidden_size=-64), [], "hidden_size must be a positive integer, got -64"),
    ("num_hidden_layers 0", set_config(num_hidden_layers=0), [], "num_hidden_layers must be a positive integer, got 0"),
    ("intermediate_size negative", set_config(intermediate_size=-1), [], "intermediate_size must be a positive integer"),
    ("num_attention_heads 0", set_config(num_attention_heads=0), [], "num_attention_heads must be a positive integer"),
    ("num_key_value_heads 0", set_config(num_key_value_heads=0), [], "num_key_value_heads must be a positive integer"),
    ("hidden_size a string", set_config(hidden_size="64"), [], "hidden_size must be a positive integer, got '64'"),
    ("hidden_size a float", set_config(hidden_size=64.5), [], "hidden_size must be a positive integer, got 64.5"),
    ("vocab_size missing", set_config(vocab_size=None), [], "has no 'vocab_size'"),
    ("heads do not divide hidden", set_config(num_attention_heads=3, num_key_value_heads=3, head_dim=None), [], "num_attention_heads 3 does not divide hidden_size 64"),
    ("kv heads do not divide heads", set_config(num_key_value_heads=3), [], "not a multiple of num_key_value_heads 3"),
    ("head_dim vs tensors", set_config(head_dim=8), [], "has shape (32, 64), expected (16, 64) from"),
    ("heads vs tensors", set_config(num_attention_heads=2, num_key_value_heads=2, head_dim=16), [], "the checkpoint and its config disagree"),
    ("vocab_size vs embedding", set_config(vocab_size=100), [], "implies (100, 64): fix vocab_size"),
    ("more layers than tensors", set_config(num_hidden_layers=6), [], "num_hidden_layers=6 but the checkpoint has tensors for layers 0-3"),
    ("rope_theta missing", set_config(rope_theta=None, rope_parameters=None, rope_scaling=None), [], "has no rope_theta"),
    ("rope_theta garbled", set_config(rope_theta="abc", rope_parameters=None), [], "rope_theta must be a positive number, got 'abc'"),
    ("rms_norm_eps negative", set_config(rms_norm_eps=-1.0), [], "rms_norm_eps must be a positive number"),
    ("max_position_embeddings 0", set_config(max_position_embeddings=0), [], "max_position_embeddings must be a positive integer"),
    ("index points outside", index_points_outside, [], "names shard '../outside.safetensors', outside the model folder"),
    ("index absolute path", lambda m: index_points_outside(m, absolute=True), [], "outside the model folder"),
    ("shard symlink loop", shard_symlink_loop, [], "is a symlink loop"),
    ("dangling shard symlink", dangling_shard_symlink, [], "is a dangling symlink (to '../blobs/gone')"),
    ("no tokenizer files", no_tokenizer, [], "has no tokenizer files (tokenizer.json"),
    ("garbled tokenizer", garbled_tokenizer, [], "cannot be loaded"),
    ("--tokenizer missing", no_change, ["--tokenizer", "/nonexistent/tok"], "tokenizer folder '/nonexistent/tok' does not exist"),
]


@pytest.mark.parametrize("name,breaker,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_broken_source_is_one_actionable_line(tiny_llama, tmp_path, capsys, name, breaker, extra, expected):
    out = prune_broken_copy(tiny_llama, tmp_path, capsys, breaker, extra, expected)
    assert not out.exists() and not (tmp_path / "out.work").exists()  # nothing written, not even a lock


def test_source_that_is_a_file_says_so(tiny_llama, tmp_path, capsys):
    path = tiny_llama / "config.json"
    assert main(["prune", str(path), "--out", str(tmp_path / "out"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert f"model source {str(path)!r} is a file, not a folder" in err and f"e.g. {str(tiny_llama)!r}" in err


ENCODINGS = [
    ("utf-16 with BOM", lambda t: t.encode("utf-16"), "is UTF-16-LE, not UTF-8: convert it, e.g. `iconv -f UTF-16-LE"),
    ("utf-16 without BOM", lambda t: t.encode("utf-16-le"), "is UTF-16/32 without a byte-order mark, not UTF-8"),
    ("utf-32", lambda t: t.encode("utf-32"), "is UTF-32-LE, not UTF-8"),
    ("latin-1", lambda t: t.encode("latin-1"), "is not UTF-8 (byte 0xe9 at offset"),
]


@pytest.mark.parametrize("name,encode,expected", ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_calibration_file_in_another_encoding(tiny_llama, tmp_path, capsys, name, encode, expected):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(encode("Café au lait, déjà vu. " * 200))
    assert main(["prune", str(tiny_llama), "--out", str(tmp_path / "out"), "--calib", str(calib), *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_tokenizer_option_takes_the_tokenizer_from_another_folder(tiny_llama, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    no_tokenizer(model)
    out = tmp_path / "out"
    cmd = ["prune", str(model), "--out", str(out), "--method", "magnitude", "--ratio", "0.2", *ARGS]
    assert main([*cmd, "--tokenizer", str(tiny_llama)]) == 0
    capsys.readouterr()
    assert (out / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()  # copied to the output
    # the same run with the source's own tokenizer: same tokens, so the same layers
    ref = tmp_path / "ref"
    assert main(["prune", str(tiny_llama), "--out", str(ref), "--method", "magnitude", "--ratio", "0.2", *ARGS]) == 0
    for f in sorted(ref.glob("model-layer-*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes()
    # the tokenizer is part of the job's fingerprint: another one is another job
    other = tmp_path / "tok2"
    shutil.copytree(tiny_llama, other)
    (other / "tokenizer_config.json").write_text((other / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    shutil.rmtree(out)
    assert main([*cmd, "--tokenizer", str(other)]) == 2
    assert "differs in: tokenizer.tokenizer_config.json" in capsys.readouterr().err


# ---- an unreadable file (permissions) -----------------------------------------------------
UNREADABLE = [
    ("config.json", lambda m: m / "config.json", [], "config.json is not readable (permission denied)"),
    ("a shard", _first_shard, [], "is not readable (permission denied)"),
    ("the tokenizer", lambda m: m / "tokenizer.json", [], "tokenizer"),
    ("the calibration file", lambda m: m.parent / "calib.txt", ["--calib", "{calib}"], "calib.txt is not readable (permission denied)"),
]


@pytest.mark.parametrize("name,target,extra,expected", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_file_is_one_line(tiny_llama, tmp_path, name, target, extra, expected):
    """chmod 000 on one file. Root reads any file whatever its mode (CAP_DAC_OVERRIDE), so as
    root the prune runs under ``setpriv`` with that capability (and DAC_READ_SEARCH) dropped
    from its bounding set: then the mode bits apply to it as to any user."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing: root ignores file permissions")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all", "--"]
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (tmp_path / "calib.txt").write_text("some calibration text. " * 400)
    os.chmod(target(model), 0o000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMPRUNE_")}
    args = [a.replace("{calib}", str(tmp_path / "calib.txt")) for a in extra]
    cmd = [*prefix, sys.executable, "-m", "streamprune", "prune", str(model), "--out", str(tmp_path / "out"), "--method", "magnitude", *ARGS, *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if prefix and "setpriv" in r.stderr and r.returncode != 2:
        pytest.skip(f"running as root and setpriv cannot drop capabilities here: {r.stderr.strip()[:200]}")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(err) == 1 and err[0].startswith("streamprune: error:") and expected in err[0], err
    assert not (tmp_path / "out").exists()
