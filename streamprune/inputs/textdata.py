"""Calibration and evaluation token windows from bundled text, local files or HF datasets.

Sources (:func:`resolve_text_source`):
  - a bundled name: ``wikitext2`` (WikiText-2 raw test), ``ptb`` (Penn Treebank test),
    ``c4`` (2,000 C4-en validation documents, the default calibration source); see
    ``streamprune/data/README.md`` for provenance;
  - a path to a ``.txt`` file (one text) or a ``.jsonl`` file (one JSON object with a
    string ``text`` field per line = one document);
  - ``hf:NAME[:CONFIG[:SPLIT]]`` (split defaults to ``train``), a Hugging Face ``datasets``
    data set with a ``text`` column, only when ``datasets`` is installed (it downloads).

Protocols (those of the pruning papers and of the HF perplexity guide):
  - evaluation: the whole text tokenized once with the tokenizer's default special tokens,
    cut into non-overlapping ``seqlen`` windows, tail dropped. WikiText and plain ``.txt``
    are used as is; PTB lines are stripped and joined with ``" "``; documents (jsonl, hf)
    are joined with ``"\\n\\n"``.
  - calibration: ``nsamples`` windows of ``seqlen`` tokens, tokenized without special
    tokens. From documents: one window per document at a random offset, documents at
    least ``seqlen`` tokens long, chosen without replacement. From a single text: windows
    at random offsets of the whole token stream. Every draw comes from one seeded
    ``torch.Generator`` (CPU), so the windows are the same on every run and machine.

A tokenizer is anything callable as ``tokenizer(text_or_texts, add_special_tokens=bool,
verbose=False, return_attention_mask=False)`` returning a mapping with ``"input_ids"`` (a list of ints for a string, a
list of lists for a list of strings): every Hugging Face tokenizer is one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from streamprune.errors import CalibrationError, ConfigError

_DATA_DIR = Path(__file__).parents[1] / "data"  # streamprune/data/
BUNDLED: dict[str, Path] = {
    "wikitext2": _DATA_DIR / "wikitext2" / "test.txt",
    "ptb": _DATA_DIR / "ptb" / "test.txt",
    "c4": _DATA_DIR / "c4" / "validation-2k.jsonl",
}
_BUNDLED_KIND = {"wikitext2": "txt", "ptb": "ptb", "c4": "jsonl"}
_SUFFIX_KIND = {".txt": "txt", ".jsonl": "jsonl"}
KINDS = ("txt", "jsonl", "ptb", "hf")
# Documents are tokenized in batches of this many, in the seeded order, until enough long
# ones are found; the result does not depend on it.
_TOKENIZE_BATCH = 256

_ACCEPTED = (
    f"give a bundled name ({', '.join(BUNDLED)}), a path to a .txt file or to a .jsonl file "
    "with one JSON object with a 'text' field per line, or hf:NAME[:CONFIG[:SPLIT]] with "
    "the `datasets` package installed"
)


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from and how to read it; ``sha256`` is of the file bytes (None for hf)."""

    name: str
    path: Path | None
    kind: str
    sha256: str | None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"text source kind must be one of {KINDS}, got {self.kind!r}")
        if (self.path is None) != (self.kind == "hf"):
            raise ConfigError(f"text source {self.name!r} of kind {self.kind!r} has path={self.path}: "
                              "file kinds need a path, hf sources none")


def resolve_text_source(name_or_path: str) -> TextSource:
    """Turn a bundled name, a ``.txt``/``.jsonl`` path or ``hf:...`` into a checked source.

    The file is read once here (hashed, decoded, and for jsonl parsed), so a missing,
    empty or malformed file fails before any model is loaded.
    """
    spec = str(name_or_path)
    if spec in BUNDLED:
        path, kind = BUNDLED[spec], _BUNDLED_KIND[spec]
    elif spec.startswith("hf:"):
        if importlib.util.find_spec("datasets") is None:
            raise CalibrationError(
                f"text source {spec!r} needs the Hugging Face `datasets` package, which is not "
                f"installed: `pip install datasets`, or use a local text instead: bundled names "
                f"{', '.join(BUNDLED)}, or a path to a .txt or .jsonl file (one JSON object with a "
                f"'text' field per line)"
            )
        _parse_hf_spec(spec)
        return TextSource(name=spec, path=None, kind="hf", sha256=None)
    else:
        path = Path(spec).expanduser()
        kind = _SUFFIX_KIND.get(path.suffix.lower())
        if kind is None:
            what = "file" if path.exists() else "name or path"
            raise CalibrationError(f"unknown text source {what} {spec!r}: {_ACCEPTED}")
    if not path.is_file():
        hint = "reinstall streamprune" if spec in BUNDLED else "check the path"
        raise CalibrationError(f"text file {path} does not exist: {hint}")
    raw = _read_bytes(path)
    source = TextSource(name=spec, path=path, kind=kind, sha256=hashlib.sha256(raw).hexdigest())
    documents = _documents_from_bytes(raw, source)
    if not any(doc.strip() for doc in documents):
        raise CalibrationError(f"text file {path} is empty: give a file with some text ({_ACCEPTED})")
    return source


def read_documents(source: TextSource) -> list[str]:
    """The documents of ``source``: one per jsonl line / hf row, else the whole text as one."""
    if source.kind == "hf":
        return _hf_texts(source.name)
    return _documents_from_bytes(_read_bytes(source.path), source)


def evaluation_text(source: TextSource) -> str:
    """The one string that evaluation tokenizes (see the protocols in the module docstring)."""
    documents = read_documents(source)
    if source.kind in ("txt", "ptb"):
        (text,) = documents
        return text
    return "\n\n".join(documents)


def calibration_windows(tokenizer, source: TextSource, nsamples: int, seqlen: int, seed: int,
                        reuse_documents: bool = False) -> torch.Tensor:
    """``nsamples`` seeded calibration windows of ``seqlen`` tokens: LongTensor (nsamples, seqlen).

    Documents (jsonl, hf) are visited in a seeded random order and tokenized in batches only
    until ``nsamples`` of at least ``seqlen`` tokens are found; each gives one window at a
    seeded random offset. With fewer long-enough documents a CalibrationError says how many
    there are, unless ``reuse_documents`` is set: then documents are drawn again (with
    replacement) for the missing windows, which may overlap. A single text (txt, ptb) is
    tokenized once and gives windows at ``nsamples`` seeded random offsets.
    """
    _check_positive("nsamples", nsamples, "--nsamples")
    _check_positive("seqlen", seqlen, "--seqlen")
    generator = torch.Generator().manual_seed(int(seed))
    documents = read_documents(source)
    if source.kind in ("txt", "ptb"):
        ids = torch.tensor(_token_ids(tokenizer, documents[0], add_special_tokens=False), dtype=torch.long)
        if ids.numel() < seqlen:
            raise CalibrationError(
                f"calibration text {source.name} has {ids.numel()} tokens, fewer than seqlen={seqlen}: "
                f"lower --seqlen to at most {ids.numel()} or give a longer text (--calib)"
            )
        return random_windows(ids, nsamples, seqlen, generator)

    order = torch.randperm(len(documents), generator=generator).tolist()
    chosen: list[list[int]] = []  # token ids of the long-enough documents, in seeded order
    lengths: list[int] = []
    for start in range(0, len(order), _TOKENIZE_BATCH):
        batch = [documents[i] for i in order[start:start + _TOKENIZE_BATCH]]
        for ids in _token_ids(tokenizer, batch, add_special_tokens=False):
            lengths.append(len(ids))
            if len(ids) >= seqlen:
                chosen.append(ids)
                if len(chosen) == nsamples:
                    break
        if len(chosen) == nsamples:
            break
    if len(chosen) < nsamples:
        if not reuse_documents or not chosen:
            raise CalibrationError(_too_few_documents(source, lengths, nsamples, seqlen))
        extra = torch.randint(len(chosen), (nsamples - len(chosen),), generator=generator).tolist()
        chosen += [chosen[i] for i in extra]

    windows = torch.empty(nsamples, seqlen, dtype=torch.long)  # (nsamples, seqlen)
    for row, ids in enumerate(chosen):
        offset = int(torch.randint(len(ids) - seqlen + 1, (1,), generator=generator))
        windows[row] = torch.tensor(ids[offset:offset + seqlen], dtype=torch.long)
    return windows


def eval_windows(tokenizer, source: TextSource, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping evaluation windows of the whole text: LongTensor (n, seqlen), tail dropped.

    ``max_windows`` keeps the first K windows (a quick estimate on a prefix of the text).
    """
    _check_positive("seqlen", seqlen, "--seqlen")
    if max_windows is not None:
        _check_positive("max_windows", max_windows, "--max-windows")
    text = evaluation_text(source)
    ids = torch.tensor(_token_ids(tokenizer, text, add_special_tokens=True), dtype=torch.long)  # (n_tokens,)
    if ids.numel() < seqlen:
        raise CalibrationError(
            f"evaluation text {source.name} has {ids.numel()} tokens, fewer than seqlen={seqlen}: "
            f"lower --seqlen to at most {ids.numel()} or evaluate on a longer text"
        )
    return split_windows(ids, seqlen, max_windows)


def split_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(n_tokens,) -> (min(n_tokens // seqlen, max_windows), seqlen), consecutive and non-overlapping."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].reshape(n, seqlen)


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """(n_tokens,) -> (nsamples, seqlen) windows starting at seeded offsets in [0, n_tokens - seqlen]."""
    assert ids.numel() >= seqlen, "caller checks the text is long enough"
    starts = torch.randint(ids.numel() - seqlen + 1, (nsamples,), generator=generator)  # (nsamples,)
    return ids[starts[:, None] + torch.arange(seqlen)]  # (nsamples, seqlen)


def _check_positive(name: str, value, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}: pass {flag} >= 1")


def _token_ids(tokenizer, text, add_special_tokens: bool):
    # verbose=False silences "Token indices sequence length is longer than the specified
    # maximum": evaluation tokenizes the whole text on purpose and cuts it into windows.
    # No attention masks: they are all ones here and cost a third of the time.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False,
                     return_attention_mask=False)["input_ids"]


def _too_few_documents(source: TextSource, lengths: list[int], nsamples: int, seqlen: int) -> str:
    n_long = sum(length >= seqlen for length in lengths)
    fixes = [f"lower --nsamples to {n_long}"] if n_long else []
    if len(lengths) >= nsamples:
        longest_feasible = sorted(lengths, reverse=True)[nsamples - 1]
        if longest_feasible > 0:
            fixes.append(f"lower --seqlen to {longest_feasible} (the longest with {nsamples} such documents)")
    fixes.append("give a calibration text with more long documents (--calib)")
    return (f"only {n_long} of the {len(lengths)} documents in {source.name} have at least "
            f"seqlen={seqlen} tokens, but nsamples={nsamples} windows need {nsamples} documents: "
            f"{', '.join(fixes[:-1]) + ', or ' if len(fixes) > 1 else ''}{fixes[-1]}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError as e:
        raise CalibrationError(f"text file {path} is not readable (permission denied): fix its permissions (chmod a+r) or give another file") from e
    except OSError as e:
        raise CalibrationError(f"text file {path} cannot be read ({e.strerror}): check the path") from e


# Byte-order marks of the encodings a text editor may save in instead of UTF-8.
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"), (b"\xff\xfe", "UTF-16-LE"), (b"\xfe\xff", "UTF-16-BE"))


def _documents_from_bytes(raw: bytes, source: TextSource) -> list[str]:
    encoding = next((name for bom, name in _BOMS if raw.startswith(bom)), None)
    if encoding is None and b"\x00" in raw[:4096]:
        encoding = "UTF-16/32 without a byte-order mark"  # NUL bytes: valid UTF-8, but not text
    if encoding is not None:
        raise CalibrationError(
            f"text file {source.path} is {encoding}, not UTF-8: convert it, e.g. "
            f"`iconv -f {encoding.split()[0].split('/')[0]} -t UTF-8 {source.path} > converted{source.path.suffix}`"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(
            f"text file {source.path} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}; Latin-1 or "
            f"Windows-1252?): convert it, e.g. `iconv -f WINDOWS-1252 -t UTF-8 {source.path} > converted{source.path.suffix}`"
        ) from e
    if source.kind == "txt":
        return [text]
    if source.kind == "ptb":
        return [" ".join(line.strip() for line in text.splitlines())]
    documents = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise CalibrationError(f"{source.path} line {lineno} is not JSON ({e}): a .jsonl file "
                                   "needs one JSON object with a 'text' field per line") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f"{source.path} line {lineno} has no string 'text' field: a .jsonl "
                                   "file needs one JSON object with a 'text' field per line")
        documents.append(record["text"])
    return documents


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` -> (name, config or None, split, default ``train``)."""
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise CalibrationError(f"bad Hugging Face text source {spec!r}: write hf:NAME[:CONFIG[:SPLIT]], "
                               "e.g. hf:wikitext:wikitext-2-raw-v1:test")
    parts += [""] * (3 - len(parts))
    name, config, split = parts
    return name, config or None, split or "train"


def _hf_texts(spec: str) -> list[str]:
    import datasets

    name, config, split = _parse_hf_spec(spec)
    data = datasets.load_dataset(name, config, split=split)
    if "text" not in data.column_names:
        raise CalibrationError(f"Hugging Face data set {spec!r} has no 'text' column (columns: "
                               f"{data.column_names}): export it to a .jsonl file with a 'text' field")
    return list(data["text"])
