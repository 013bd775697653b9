"""Local lm-evaluation-harness tasks over bundled WikiText-2 text (no download at run time).

``wikicloze.jsonl`` holds 40 items built by :func:`build_items` from the bundled
WikiText-2 test text (``../wikitext2/test.txt``): a sentence's first words are the
context, its remaining words the true ending; three distractor endings are the endings of
other sentences. The gold index cycles 0..3. Rebuild (byte-identical) with
``python streamprune/data/lmeval/wikicloze.py``.

Tasks (YAML files beside this one; pass this folder to lm-eval's ``--include_path``):
``streamprune_wikicloze`` (multiple choice, acc / acc_norm: log-likelihood of each ending)
and ``streamprune_wikigen`` (generate_until: greedy continuation of the context, exact
match with the true ending). They are smoke tests of the harness on a pruned folder, not
benchmarks.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "wikicloze.jsonl"
SOURCE = HERE.parent / "wikitext2" / "test.txt"
N_ITEMS = 40
CONTEXT_WORDS = 8
ENDING_WORDS = (4, 10)  # endings of this many words (inclusive), cut to the sentence end
DISTRACTOR_OFFSETS = (7, 19, 31)


def _sentences(text: str) -> list[list[str]]:
    """Word lists of the plain sentences of WikiText paragraphs (headings and markup skipped)."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sent in line.split(" . "):
            words = sent.split()
            if any(w.startswith("@") or w in ('"', "(", ")", ";", ":") for w in words):
                continue
            lo, hi = ENDING_WORDS
            if CONTEXT_WORDS + lo <= len(words) <= CONTEXT_WORDS + hi:
                out.append(words)
    return out


def build_items(text: str, n: int = N_ITEMS) -> list[dict]:
    """``n`` cloze items from WikiText-2 text; deterministic (no random draw)."""
    sents = _sentences(text)
    step = len(sents) // (n + max(DISTRACTOR_OFFSETS) + 1)
    pool = sents[::step]
    items = []
    for i in range(n):
        words = pool[i]
        gold = " ".join(words[CONTEXT_WORDS:])
        others = [" ".join(pool[i + k][CONTEXT_WORDS:]) for k in DISTRACTOR_OFFSETS]
        label = i % 4
        endings = others[:label] + [gold] + others[label:]
        items.append({"id": i, "context": " ".join(words[:CONTEXT_WORDS]), "endings": endings, "label": label})
    return items


def load(**kwargs):
    """lm-eval ``custom_dataset``: the shipped items as a ``datasets.Dataset`` (split ``test``)."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line]
    return {"test": datasets.Dataset.from_list(rows)}


def gold_ending(doc: dict) -> str:
    return doc["endings"][doc["label"]]


if __name__ == "__main__":
    items = build_items(SOURCE.read_text())
    DATA.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    print(f"wrote {len(items)} items to {DATA}")
