"""Decontamination: flag training documents that contain an evaluation item's word n-grams.

An item of at least `ngram` (13, as in GPT-3, Brown et al. 2020, App. C) words is indexed by all
its 13-grams; a shorter item of at least MIN_ITEM_WORDS words by its whole word sequence. Words
are lowercased runs of letters and digits, so punctuation and case never hide an overlap. A
flagged document names the item it overlaps (`task:split:index` or `file:line`).

Evaluation sets: the validation and test splits of every task fmforge ships whose data is
installed (`fmforge.data.tasks.TASKS`), plus any `.jsonl` (a `text` field) or text file (one item
per line) the user names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import xxhash

from fmforge.errors import UserError

NGRAM = 13
MIN_ITEM_WORDS = 8  # shorter items are too generic to call a match contamination
_WORD = re.compile(r"\w+")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _word_hashes(words: list[str]) -> np.ndarray:
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in words), np.uint64, len(words)
    )


def _window_keys(hashes: np.ndarray, n: int) -> np.ndarray:
    count = len(hashes) - n + 1
    if count < 1:
        return np.zeros(0, dtype=np.uint64)
    keys = np.full(count, np.uint64(n), dtype=np.uint64)
    for j in range(n):  # order-sensitive combination; uint64 wrap-around intended
        keys = (keys ^ hashes[j : j + count]) * _MIX
        keys ^= keys >> np.uint64(31)
    return keys


class ContaminationIndex:
    """Word n-gram keys of evaluation items, each mapped to the item's name."""

    def __init__(self, items: list[tuple[str, str]], ngram: int = NGRAM) -> None:
        self.ngram = ngram
        self.owner: dict[tuple[int, int], str] = {}  # (n, key) -> item name
        for name, text in items:
            words = _words(text)
            if len(words) < MIN_ITEM_WORDS:
                continue
            n = min(ngram, len(words))
            for key in _window_keys(_word_hashes(words), n).tolist():
                self.owner.setdefault((n, key), name)
        self.lengths = sorted({n for n, _ in self.owner})
        self.items = len(items)

    def match(self, text: str) -> str | None:
        """Return the name of the first item (in text order) whose n-gram `text` contains."""
        if not self.owner:
            return None
        hashes = _word_hashes(_words(text))
        best: tuple[int, str] | None = None
        for n in self.lengths:
            for pos, key in enumerate(_window_keys(hashes, n).tolist()):
                name = self.owner.get((n, key))
                if name is not None:
                    if best is None or pos < best[0]:
                        best = (pos, name)
                    break
        return None if best is None else best[1]


def builtin_items() -> list[tuple[str, str]]:
    """Return (name, text) of the validation and test items of every installed shipped task."""
    from fmforge.data.tasks import TASKS, load_task

    items = []
    for task_name in sorted(TASKS):
        try:
            task = load_task(task_name)
        except UserError:
            continue  # its data is not installed here
        for split in ("validation", "test"):
            for i, example in enumerate(getattr(task, split)):
                items.append((f"{task_name}:{split}:{i}", example.text))
    return items


def file_items(path: str) -> list[tuple[str, str]]:
    """Return (name, text) items of a .jsonl (`text` field) or a text file (one per line)."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"decontamination file {path}: cannot read it ({e}); fix the path") from e
    items = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        text = line
        if file.suffix == ".jsonl":
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(
                    f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})"
                ) from None
        items.append((f"{file.name}:{lineno}", str(text)))
    return items
