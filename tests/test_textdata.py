"""Calibration and evaluation windows (streamprune/inputs/textdata.py).

Run:  . .venv/bin/activate && python -m pytest tests/test_textdata.py -q

The window logic is tested with a word tokenizer whose token ids are the integers written
in the text, so every window can be checked exactly. The bundled-data tests use the demo
model's tokenizer (`ensure_demo_model()`; the first run converts the GGUF, ~25 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch

from streamprune.errors import CalibrationError, ConfigError
from streamprune.inputs.textdata import (
    BUNDLED,
    TextSource,
    calibration_windows,
    eval_windows,
    evaluation_text,
    random_windows,
    read_documents,
    resolve_text_source,
    split_windows,
)

BOS = 999_999


class IntTokenizer:
    """Each whitespace-separated word is one token whose id is the word read as an int.

    Prepends BOS with add_special_tokens=True, like a Llama tokenizer; counts the texts it saw.
    """

    def __init__(self):
        self.texts_seen = 0

    def __call__(self, text, add_special_tokens=True, verbose=True, return_attention_mask=True):
        def encode(t: str) -> list[int]:
            self.texts_seen += 1
            return ([BOS] if add_special_tokens else []) + [int(w) for w in t.split()]

        if isinstance(text, str):
            return {"input_ids": encode(text)}
        return {"input_ids": [encode(t) for t in text]}


def numbers(start: int, count: int) -> str:
    return " ".join(str(i) for i in range(start, start + count))


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in texts))
    return path


def assert_consecutive(windows: torch.Tensor) -> None:
    """Every row is a run of consecutive integers (a contiguous slice of one document)."""
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones_like(windows[:, 1:]))


# --- pure window functions -------------------------------------------------------------

def test_split_windows_drops_tail_and_keeps_first_k():
    ids = torch.arange(10)
    assert split_windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert split_windows(ids, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert split_windows(ids, 3, max_windows=50).shape == (3, 3)
    assert split_windows(ids, 10).tolist() == [list(range(10))]


def test_random_windows_are_slices_at_seeded_offsets():
    ids = torch.arange(100, 200)
    a = random_windows(ids, 50, 7, torch.Generator().manual_seed(3))
    b = random_windows(ids, 50, 7, torch.Generator().manual_seed(3))
    c = random_windows(ids, 50, 7, torch.Generator().manual_seed(4))
    assert a.shape == (50, 7) and a.dtype == torch.long
    assert_consecutive(a)
    assert a.min() >= 100 and a.max() <= 199
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The last possible start (93 -> tokens 193..199) is reachable: windows == text.
    whole = random_windows(ids, 4, 100, torch.Generator().manual_seed(0))
    assert torch.equal(whole, ids.expand(4, 100))


# --- with the int tokenizer -------------------------------------------------------------

def test_txt_eval_windows_include_special_tokens(tmp_path):
    source = resolve_text_source(_txt(tmp_path, numbers(0, 100)))
    windows = eval_windows(IntTokenizer(), source, seqlen=10)
    assert windows.shape == (10, 10)  # BOS + 100 tokens = 101 -> 10 windows, 1 dropped
    assert windows[0].tolist() == [BOS] + list(range(9))
    assert windows[9].tolist() == list(range(89, 99))
    assert eval_windows(IntTokenizer(), source, seqlen=10, max_windows=3).tolist() == windows[:3].tolist()


def test_txt_calibration_windows_are_seeded_slices_without_special_tokens(tmp_path):
    source = resolve_text_source(_txt(tmp_path, numbers(0, 500)))
    a = calibration_windows(IntTokenizer(), source, nsamples=16, seqlen=32, seed=0)
    b = calibration_windows(IntTokenizer(), source, nsamples=16, seqlen=32, seed=0)
    c = calibration_windows(IntTokenizer(), source, nsamples=16, seqlen=32, seed=1)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert (a != BOS).all()
    assert_consecutive(a)
    assert a.min() >= 0 and a.max() <= 499
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_jsonl_calibration_takes_one_window_per_long_document(tmp_path):
    lengths = [5, 20, 30, 8, 50, 25, 9]  # documents 1, 2, 4, 5 have >= 10 tokens
    texts = [numbers(1000 * k, n) for k, n in enumerate(lengths)]
    source = resolve_text_source(str(write_jsonl(tmp_path / "d.jsonl", texts)))
    windows = calibration_windows(IntTokenizer(), source, nsamples=4, seqlen=10, seed=0)
    assert windows.shape == (4, 10)
    assert_consecutive(windows)
    documents = (windows[:, 0] // 1000).tolist()
    assert sorted(documents) == [1, 2, 4, 5]  # without replacement: each long doc once
    for row, k in zip(windows.tolist(), documents):
        assert row[-1] < 1000 * k + lengths[k]  # the window lies inside its document
    # Fewer documents than windows: same seed -> same documents in the same order.
    two = calibration_windows(IntTokenizer(), source, nsamples=2, seqlen=10, seed=0)
    assert torch.equal(two, calibration_windows(IntTokenizer(), source, nsamples=2, seqlen=10, seed=0))
    others = [calibration_windows(IntTokenizer(), source, nsamples=2, seqlen=10, seed=s) for s in range(1, 6)]
    assert any(not torch.equal(two, o) for o in others)


def test_jsonl_too_few_long_documents_is_an_error_unless_reuse(tmp_path):
    texts = [numbers(1000 * k, n) for k, n in enumerate([5, 20, 30, 8, 50, 25, 9])]
    source = resolve_text_source(str(write_jsonl(tmp_path / "d.jsonl", texts)))
    with pytest.raises(CalibrationError, match=r"only 4 of the 7 documents .* seqlen=10 .* nsamples=6") as e:
        calibration_windows(IntTokenizer(), source, nsamples=6, seqlen=10, seed=0)
    # lengths sorted: 50 30 25 20 9 8 5 -> the 6th longest document has 8 tokens
    assert "lower --nsamples to 4" in str(e.value) and "lower --seqlen to 8" in str(e.value)
    windows = calibration_windows(IntTokenizer(), source, nsamples=6, seqlen=10, seed=0, reuse_documents=True)
    assert windows.shape == (6, 10)
    assert_consecutive(windows)
    assert set((windows[:, 0] // 1000).tolist()) == {1, 2, 4, 5}
    with pytest.raises(CalibrationError, match="only 0 of the 7"):
        calibration_windows(IntTokenizer(), source, nsamples=1, seqlen=51, seed=0, reuse_documents=True)


def test_jsonl_calibration_tokenizes_only_what_it_needs(tmp_path):
    texts = [numbers(1000 * k, 40) for k in range(1000)]
    source = resolve_text_source(str(write_jsonl(tmp_path / "d.jsonl", texts)))
    tokenizer = IntTokenizer()
    windows = calibration_windows(tokenizer, source, nsamples=3, seqlen=16, seed=0)
    assert windows.shape == (3, 16)
    assert tokenizer.texts_seen == 256  # one batch, not 1000 documents


def test_jsonl_eval_joins_documents_with_blank_lines(tmp_path):
    source = resolve_text_source(str(write_jsonl(tmp_path / "d.jsonl", [numbers(0, 3), numbers(3, 4)])))
    assert evaluation_text(source) == "0 1 2\n\n3 4 5 6"
    assert eval_windows(IntTokenizer(), source, seqlen=4).tolist() == [[BOS, 0, 1, 2], [3, 4, 5, 6]]


@pytest.mark.parametrize("kwargs, flag", [
    (dict(nsamples=0, seqlen=8), "--nsamples"),
    (dict(nsamples=4, seqlen=-1), "--seqlen"),
    (dict(nsamples=True, seqlen=8), "--nsamples"),
    (dict(nsamples=4, seqlen=2.5), "--seqlen"),
])
def test_bad_sizes_are_config_errors(tmp_path, kwargs, flag):
    source = resolve_text_source(_txt(tmp_path, numbers(0, 100)))
    with pytest.raises(ConfigError, match=flag):
        calibration_windows(IntTokenizer(), source, seed=0, **kwargs)


def test_bad_eval_sizes(tmp_path):
    source = resolve_text_source(_txt(tmp_path, numbers(0, 100)))
    with pytest.raises(ConfigError, match="--max-windows"):
        eval_windows(IntTokenizer(), source, seqlen=8, max_windows=0)
    with pytest.raises(ConfigError, match="--seqlen"):
        eval_windows(IntTokenizer(), source, seqlen=0)
    with pytest.raises(CalibrationError, match="has 101 tokens, fewer than seqlen=102"):
        eval_windows(IntTokenizer(), source, seqlen=102)
    with pytest.raises(CalibrationError, match="has 100 tokens, fewer than seqlen=101"):
        calibration_windows(IntTokenizer(), source, nsamples=1, seqlen=101, seed=0)


# --- resolving sources ------------------------------------------------------------------

@pytest.mark.parametrize("name, text, message", [
    ("nope.txt", None, r"nope\.txt does not exist: check the path"),
    ("empty.txt", "  \n\n", r"empty\.txt is empty"),
    ("bad.jsonl", '{"text": "fine"}\n\n{"body": "no text"}\n', r"bad\.jsonl line 3 has no string 'text' field"),
    ("garbled.jsonl", '{"text": "fine"}\nnot json\n', r"garbled\.jsonl line 2 is not JSON"),
    ("data.csv", "a,b\n", r"unknown text source file .*data\.csv.*wikitext2, ptb, c4"),
])
def test_resolve_errors_name_the_path_and_the_fix(tmp_path, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(CalibrationError, match=message):
        resolve_text_source(str(tmp_path / name))


def test_unknown_source_name_and_kind_are_refused(tmp_path):
    with pytest.raises(CalibrationError, match=r"unknown text source name or path 'wikitext3'"):
        resolve_text_source("wikitext3")
    with pytest.raises(ConfigError, match="kind must be one of"):
        TextSource(name="x", path=tmp_path / "x.txt", kind="csv", sha256=None)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets_says_what_is_accepted():
    with pytest.raises(CalibrationError, match=r"needs the Hugging Face `datasets` package.*wikitext2, ptb, c4"):
        resolve_text_source("hf:wikitext:wikitext-2-raw-v1:test")


def test_bundled_sources_are_hashed_and_follow_their_protocols():
    # sha256 prefixes from streamprune/data/README.md
    expected = {"wikitext2": ("txt", "696cca6b"), "ptb": ("ptb", "91a2fa93"), "c4": ("jsonl", "118ef726")}
    for name, (kind, digest) in expected.items():
        source = resolve_text_source(name)
        assert source.path == BUNDLED[name] and source.kind == kind
        assert source.sha256.startswith(digest)
        assert source.sha256 == hashlib.sha256(BUNDLED[name].read_bytes()).hexdigest()
    ptb = evaluation_text(resolve_text_source("ptb"))
    assert "\n" not in ptb and ptb.startswith("no it was n't black monday but while")
    assert len(ptb.split()) == 82_430 - 3_761  # the 82,430 reference tokens count one <eos> per line
    wiki = evaluation_text(resolve_text_source("wikitext2"))
    assert wiki == BUNDLED["wikitext2"].read_text(encoding="utf-8")
    assert len(read_documents(resolve_text_source("c4"))) == 2000


# --- with the demo model's tokenizer ----------------------------------------------------

@pytest.fixture(scope="module")
def demo_tokenizer():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from streamprune.inputs.demo_model import ensure_demo_model

    return AutoTokenizer.from_pretrained(ensure_demo_model(progress=False))


def test_bundled_eval_token_counts(demo_tokenizer):
    wiki = resolve_text_source("wikitext2")
    assert len(demo_tokenizer(evaluation_text(wiki), verbose=False)["input_ids"]) == 304_986
    assert eval_windows(demo_tokenizer, wiki, seqlen=2048).shape == (148, 2048)  # the reference 148 windows
    windows = eval_windows(demo_tokenizer, wiki, seqlen=128, max_windows=10)
    assert windows.shape == (10, 128) and windows.dtype == torch.long
    ptb = eval_windows(demo_tokenizer, resolve_text_source("ptb"), seqlen=128)
    assert ptb.shape == (97_930 // 128, 128)  # 765 windows


def test_c4_calibration_is_deterministic(demo_tokenizer):
    c4 = resolve_text_source("c4")
    a = calibration_windows(demo_tokenizer, c4, nsamples=128, seqlen=128, seed=0)
    assert a.shape == (128, 128) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(demo_tokenizer, c4, nsamples=128, seqlen=128, seed=0))
    assert not torch.equal(a, calibration_windows(demo_tokenizer, c4, nsamples=128, seqlen=128, seed=1))
    assert len({tuple(row) for row in a.tolist()}) == 128
    # Pinned: the same windows on every machine (torch's CPU generator is portable).
    assert a[0, :5].tolist() == [2590, 27270, 3400, 281, 14287]
    assert int(a.max()) < demo_tokenizer.vocab_size


def test_c4_has_65_documents_of_2048_tokens(demo_tokenizer):
    c4 = resolve_text_source("c4")
    with pytest.raises(CalibrationError, match=r"only 65 of the 2000 documents in c4 have at least seqlen=2048"):
        calibration_windows(demo_tokenizer, c4, nsamples=128, seqlen=2048, seed=0)


def _txt(tmp_path, text: str) -> str:
    path = tmp_path / "t.txt"
    path.write_text(text)
    return str(path)
