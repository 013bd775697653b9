"""Run directory and journal: what makes a run resumable and byte-identical.

Layout of a run directory::

    lock                  held (flock) by the live run, see runlock.py
    manifest.json         fingerprint of the job (written once, atomically)
    journal.jsonl         one fsynced JSON line per event: survey layer / survey done, scoring
                          layer / scores, layer committed
    survey/               each surveyed layer's results until the survey is done (its resume point)
    survey.safetensors    survey-pass results (so a resume never repeats the survey)
    profile.jsonl         one line per layer: timings, memory, bytes
    acts/boundary_XXXX/   activation cache (the resume point)
    staging/              output files until the run is published

A layer record is appended only after the layer's tensors and the next activation
boundary are durable; on resume the committed files' sha256 are verified first.

Opening a run repairs what a kill -9 or a power loss can leave: a torn last line of
``journal.jsonl`` / ``profile.jsonl`` is cut off before anything is appended (else the
next record would be glued onto it and lost, with every later one), and temporary files
of interrupted atomic writes are removed from ``staging/`` (else they would be published
into the output folder). Both are safe only because the caller holds the run's lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..storage import atomic
from ..storage.checkpoint import file_sha256
from ..errors import StreamPruneError
from .runlock import LOCK_NAME


class FingerprintMismatch(StreamPruneError):
    pass


@contextmanager
def disk_errors(where: str, run: RunDir):
    """Turn a full disk into an actionable message; the journal makes the retry clean."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StreamPruneError(
                f"disk full while writing {where} under {run.root}; free space (or move --work-dir) "
                "and run the same command again to resume"
            ) from e
        raise


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def repair_tail(path: Path) -> int:
    """Cut a torn tail off a JSON-lines file: bytes after the last newline, and a line that
    is not valid JSON with everything after it (what :meth:`RunDir.records` ignores).
    Returns the number of bytes removed (0 if intact or absent)."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn mid-write
        try:
            json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            break
        keep += len(line)
    if keep == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return len(data) - keep


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.journal_path = self.root / "journal.jsonl"
        self.survey_path = self.root / "survey.safetensors"
        self.survey_layers = self.root / "survey"
        self.profile_path = self.root / "profile.jsonl"
        self.acts = self.root / "acts"
        self.staging = self.root / "staging"

    # ---- opening ------------------------------------------------------------------------
    def open(self, fingerprint: dict, fresh: bool, job: dict | None = None) -> list[dict]:
        """Create or resume; returns the journal records of a resumed run ([] if new)."""
        if fresh and self.root.exists():
            self.manifest_path.unlink(missing_ok=True)  # first: a wipe killed half way is a new run
            for child in self.root.iterdir():  # all but the lock this process holds
                if child.name != LOCK_NAME:
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        if self.manifest_path.is_file():
            old = json.loads(self.manifest_path.read_text())["fingerprint"]
            if old != fingerprint:
                a, b = _flatten(old), _flatten(fingerprint)
                fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise FingerprintMismatch(
                    f"work dir {self.root} belongs to a different job (differs in: {', '.join(fields)}); "
                    "rerun with --fresh to start over, or use another --work-dir"
                )
            repair_tail(self.journal_path)
            repair_tail(self.profile_path)
            atomic.sweep_tmp(self.staging)
            atomic.sweep_tmp(self.survey_layers)
            return self.records()
        self.root.mkdir(parents=True, exist_ok=True)
        # No manifest: whatever else is here belongs to no job (a --fresh wipe or a first
        # start killed half way); a stale complete activation boundary would be reused.
        for stale in (self.journal_path, self.survey_path, self.profile_path):
            stale.unlink(missing_ok=True)
        shutil.rmtree(self.acts, ignore_errors=True)
        shutil.rmtree(self.survey_layers, ignore_errors=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        manifest = {"fingerprint": fingerprint, "fingerprint_sha256": digest(fingerprint), "job": job or {}}
        atomic.write_json(self.manifest_path, manifest)
        return []

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def fingerprint_sha256(self) -> str:
        return self.manifest()["fingerprint_sha256"]

    def profile(self) -> list[dict]:
        if not self.profile_path.is_file():
            return []
        out = []
        for line in self.profile_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn last line of a crashed run
        return out

    # ---- journal ------------------------------------------------------------------------
    def records(self) -> list[dict]:
        if not self.journal_path.is_file():
            return []
        out = []
        for line in self.journal_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash mid-append: everything before it stands
        return out

    def append(self, record: dict) -> None:
        self.staging.mkdir(exist_ok=True)
        with open(self.journal_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def committed_layers(self, records: list[dict]) -> dict[int, dict]:
        return {r["layer"]: r for r in records if r.get("event") == "layer"}

    def verify(self, records: list[dict]) -> None:
        """Committed layer files must exist with the recorded sha256."""
        for layer, rec in sorted(self.committed_layers(records).items()):
            path = self.staging / rec["file"]
            if not path.is_file() or file_sha256(path) != rec["sha256"]:
                raise StreamPruneError(
                    f"committed layer {layer} file {path} is missing or corrupted; rerun with --fresh"
                )

    # ---- survey -------------------------------------------------------------------------
    def save_survey_layer(self, layer: int, result: dict[str, torch.Tensor]) -> None:
        """Commit one surveyed layer's results (the caller has made the survey streams' next
        boundary durable): a resume continues the survey after it."""
        path = self.survey_layers / f"layer_{layer:04d}.safetensors"
        self.survey_layers.mkdir(exist_ok=True)
        atomic.write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in result.items()})
        self.append({"event": "survey_layer", "layer": layer, "file": path.name, "sha256": file_sha256(path)})

    def surveyed_layers(self, records: list[dict]) -> list[dict[str, torch.Tensor]]:
        """The committed survey results of layers ``0 .. k-1`` (the longest run from layer 0; a
        layer surveyed again after a restart counts its last record), their files verified."""
        last = {r["layer"]: r for r in records if r.get("event") == "survey_layer"}
        out = []
        while len(out) in last:
            rec = last[len(out)]
            path = self.survey_layers / rec["file"]
            if not path.is_file() or file_sha256(path) != rec["sha256"]:
                break  # the survey resumes before it
            out.append(load_file(path))
        return out

    def save_survey(self, results: list[dict[str, torch.Tensor]]) -> None:
        flat = {f"{i}.{k}": v.detach().cpu().contiguous() for i, r in enumerate(results) for k, v in r.items()}
        atomic.write_safetensors(self.survey_path, flat)
        self.append({"event": "survey", "layers": len(results), "sha256": file_sha256(self.survey_path)})
        shutil.rmtree(self.survey_layers, ignore_errors=True)  # the whole file stands for them now

    def load_survey(self, records: list[dict], num_layers: int) -> list[dict[str, torch.Tensor]] | None:
        if not any(r.get("event") == "survey" for r in records) or not self.survey_path.is_file():
            return None
        flat = load_file(self.survey_path)
        out: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        for key, t in flat.items():
            i, name = key.split(".", 1)
            out[int(i)][name] = t
        return out

    # ---- scoring pass ---------------------------------------------------------------------
    def save_scored_layer(self, layer: int) -> None:
        """Commit one layer of the scoring pass (every rank's next boundary is durable)."""
        self.append({"event": "score_layer", "layer": layer})

    def scored_layers(self, records: list[dict]) -> int:
        """How many layers of the scoring pass, from layer 0 on, a killed run committed."""
        done = {r["layer"] for r in records if r.get("event") == "score_layer"}
        n = 0
        while n in done:
            n += 1
        return n

    def save_scores(self, kls: list[float]) -> None:
        self.append({"event": "scores", "kl": [float(x) for x in kls]})

    def load_scores(self, records: list[dict]) -> list[float] | None:
        """The scoring pass's results (JSON floats round-trip exactly), or None before it ended."""
        done = [r for r in records if r.get("event") == "scores"]
        return done[-1]["kl"] if done else None
