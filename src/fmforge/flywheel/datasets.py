"""Curated, versioned training data from feedback: SFT and DPO records with a frozen eval split.

The records come from `flywheel/export.py` (one home for what feedback means): a thumbs up or a
rating of 4-5 gives an SFT example; an edit gives an SFT example with the edit as the answer and a
DPO pair (chosen = the edit, rejected = the original); a pairwise choice gives its pair; liked and
disliked answers (thumbs, ratings 4-5 against 1-2) to the same prompt give pairs. Then the data
curation stages run on them:

1. PII scrubbing (`data/pii.py`): every prompt, answer and edit has e-mails, cards, phone and
   registration numbers and public IPs replaced by typed placeholders (`<EMAIL>`, ...).
2. Exact deduplication (`data/dedup.py`): records equal after case and whitespace normalisation
   (and after scrubbing: two answers differing only in an e-mail address) are kept once; records
   with a blank answer (a model that stopped at once) are dropped with them.
3. The frozen held-out split: a record is an evaluation record when the normalised hash of its
   prompt falls in the first `eval_percent` of 100 buckets. It depends on the prompt alone, so a
   prompt is in the eval split in every cycle, for ever, and never in training.
4. Decontamination (`data/decontam.py`): a training record containing an evaluation record's
   13-word n-gram is dropped as well.

Training records come from the feedback in the cycle's log window (start, end]; evaluation records
from all feedback up to `end`, so the frozen split grows with the logs. The dataset id is the
sha256 of the four files' bytes; building it again from the same database gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from fmforge.data.decontam import ContaminationIndex
from fmforge.data.dedup import exact_duplicates, exact_hash
from fmforge.data.pii import scrub
from fmforge.flywheel.export import dpo_records, sft_records
from fmforge.flywheel.store import FeedbackStore

FILES = ("train_sft.jsonl", "train_dpo.jsonl", "eval_sft.jsonl", "eval_dpo.jsonl")


class NothingToLearn(Exception):
    """The log window holds no feedback that makes a training record (not an error: exit 0)."""


class WindowView:
    """The store as export.py reads it, restricted to feedback with start < created <= end."""

    def __init__(self, store: FeedbackStore, start: float | None, end: float):
        self.store, self.start, self.end = store, start, end

    def list_feedback(self) -> list[dict[str, Any]]:
        """Return the feedback rows inside the window, in insertion order."""
        return [
            row
            for row in self.store.list_feedback()
            if row["created"] <= self.end and (self.start is None or row["created"] > self.start)
        ]

    def get_generation(self, generation_id: str) -> dict[str, Any] | None:
        """Return one generation (any time: feedback may come long after the answer)."""
        return self.store.get_generation(generation_id)


def canonical(record: Any) -> str:
    """Return the canonical JSON of a record (sorted keys, no spaces): what the files hold."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _scrub_value(value: Any, counts: Counter) -> Any:
    if isinstance(value, str):
        text, found = scrub(value)
        counts.update(found)
        return text
    if isinstance(value, list):
        return [_scrub_value(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: v if k == "role" else _scrub_value(v, counts) for k, v in value.items()}
    return value


def scrub_record(record: dict[str, Any], counts: Counter) -> dict[str, Any]:
    """Return `record` with PII replaced by placeholders in every text; add the spans to counts."""
    return {key: _scrub_value(value, counts) for key, value in record.items()}


def prompt_text(record: dict[str, Any]) -> str:
    """Return the text a record's prompt is judged by (chat: the turns before the answer)."""
    prompt = record.get("prompt")
    if prompt is None:  # an SFT chat record: every message but the final answer
        prompt = record["messages"][:-1]
    if isinstance(prompt, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    return str(prompt)


def record_text(record: dict[str, Any]) -> str:
    """Return all of a record's text (prompt and answers), for deduplication and decontamination."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for key in sorted(value):
                if key != "role":
                    walk(value[key])

    walk(record)
    return "\n".join(parts)


def in_eval_split(record: dict[str, Any], eval_percent: int) -> bool:
    """Return whether a record belongs to the frozen evaluation split (by its prompt's hash)."""
    return int(exact_hash(prompt_text(record)), 16) % 100 < eval_percent


def dedup(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Return the records without normalised-text duplicates (sorted) and how many were dropped."""
    by_id = {canonical(r): r for r in records}
    ids = sorted(by_id)
    removed = exact_duplicates(ids, [exact_hash(canonical(by_id[i])) for i in ids])
    kept = [by_id[i] for i in ids if i not in removed]
    return kept, len(records) - len(kept)


def feedback_counts(view: WindowView) -> dict[str, int]:
    """Return the number of feedback rows of each kind in the window."""
    return dict(sorted(Counter(row["kind"] for row in view.list_feedback()).items()))


def has_empty_answer(record: dict[str, Any]) -> bool:
    """Return whether a record's answer (or either side of a pair) is blank: nothing to learn."""
    answers = [record.get(k) for k in ("completion", "chosen", "rejected") if k in record]
    if "messages" in record:
        answers.append(record["messages"][-1]["content"])
    texts = [a if isinstance(a, str) else " ".join(m["content"] for m in a) for a in answers]
    return any(not t.strip() for t in texts)


def _curate(records: list[dict], pii: Counter) -> tuple[list[dict], int]:
    kept = [scrub_record(r, pii) for r in records if not has_empty_answer(r)]
    unique, duplicates = dedup(kept)
    return unique, duplicates + len(records) - len(kept)


def build_dataset(
    store: FeedbackStore, start: float | None, end: float, eval_percent: int = 20
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Return ({file name: records}, manifest) of the curated dataset of the window (start, end].

    Raises NothingToLearn when the window has no feedback, or none that gives a training record.
    """
    window = WindowView(store, start, end)
    counts = feedback_counts(window)
    if not counts:
        raise NothingToLearn("no feedback in the log window")
    pii: Counter = Counter()
    everything = WindowView(store, None, end)
    eval_sft, dup_eval_sft = _curate(sft_records(everything), pii)
    eval_dpo, dup_eval_dpo = _curate(dpo_records(everything), pii)
    eval_sft = [r for r in eval_sft if in_eval_split(r, eval_percent)]
    eval_dpo = [r for r in eval_dpo if in_eval_split(r, eval_percent)]
    pii = Counter()  # report the training side's placeholders (the eval side repeats old logs)
    train_sft, dup_sft = _curate(sft_records(window), pii)
    train_dpo, dup_dpo = _curate(dpo_records(window), pii)
    held_out = sum(in_eval_split(r, eval_percent) for r in train_sft + train_dpo)
    train_sft = [r for r in train_sft if not in_eval_split(r, eval_percent)]
    train_dpo = [r for r in train_dpo if not in_eval_split(r, eval_percent)]
    index = ContaminationIndex(
        [(str(i), record_text(r)) for i, r in enumerate(eval_sft + eval_dpo)]
    )
    contaminated = sum(index.match(record_text(r)) is not None for r in train_sft + train_dpo)
    train_sft = [r for r in train_sft if index.match(record_text(r)) is None]
    train_dpo = [r for r in train_dpo if index.match(record_text(r)) is None]
    files = {
        "train_sft.jsonl": train_sft,
        "train_dpo.jsonl": train_dpo,
        "eval_sft.jsonl": eval_sft,
        "eval_dpo.jsonl": eval_dpo,
    }
    manifest = {
        "dataset_id": dataset_id(files),
        "log_window": {"from": start or 0.0, "to": end},
        "feedback_counts": counts,
        "records": {name: len(records) for name, records in files.items()},
        "eval_percent": eval_percent,
        "pii_placeholders": dict(sorted(pii.items())),
        "duplicates_removed": dup_sft + dup_dpo,  # and blank answers
        "eval_duplicates_removed": dup_eval_sft + dup_eval_dpo,
        "held_out_to_eval": held_out,
        "decontaminated": contaminated,
    }
    if not train_sft and not train_dpo:
        raise NothingToLearn(
            f"the {sum(counts.values())} feedback rows in the log window give no training record "
            f"({held_out} fell in the frozen eval split; comments and lone thumbs-down teach "
            "nothing)"
        )
    return files, manifest


def file_bytes(records: list[dict[str, Any]]) -> bytes:
    """Return the JSON-lines bytes of records (one canonical JSON object per line)."""
    return "".join(canonical(r) + "\n" for r in records).encode("utf-8")


def dataset_id(files: dict[str, list[dict[str, Any]]]) -> str:
    """Return "sha256:<hex>" over the dataset's files (names and bytes, in FILES order)."""
    digest = hashlib.sha256()
    for name in FILES:
        data = file_bytes(files[name])
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def write_dataset(
    store: FeedbackStore,
    out: str | Path,
    start: float | None,
    end: float,
    eval_percent: int = 20,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the curated dataset of the window to `out` (atomically); return its manifest.

    `out` holds the four FILES and manifest.json; it appears complete or not at all.
    """
    from fmforge.artifacts import atomic_dir, write_json_atomic

    files, manifest = build_dataset(store, start, end, eval_percent)
    with atomic_dir(out, overwrite) as tmp:
        for name in FILES:
            (tmp / name).write_bytes(file_bytes(files[name]))
        write_json_atomic(tmp / "manifest.json", manifest)
    return manifest
