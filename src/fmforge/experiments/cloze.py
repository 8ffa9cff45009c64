"""A frozen cloze test for masked LMs: mask one word of held-out lines, is it in the top 5?

The set is drawn deterministically (seeded) from held-out text: lines of 8-30 words, one masked
word per line, chosen among whole words that are a single alphabetic token of the tokenizer (so
"fill" can name it exactly). The baseline is a unigram guess: the 5 most frequent such words of
the training text, whatever the context.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClozeItem:
    """One blank: the line with the word replaced by the mask token, and the word's id."""

    text: str
    answer_id: int
    answer: str


def _word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer.encode(word)


def cloze_set(lines: Iterable[str], tokenizer, n: int = 300, seed: int = 0) -> list[ClozeItem]:
    """Return n cloze items drawn with `seed` from `lines` (a held-out text)."""
    rng = random.Random(seed)
    mask = tokenizer.roles["mask"]
    candidates = []
    for line in lines:
        words = line.split()
        if 8 <= len(words) <= 30:
            candidates.append(words)
    rng.shuffle(candidates)
    items = []
    for words in candidates:
        positions = [
            i for i, w in enumerate(words) if w.isalpha() and len(_word_ids(tokenizer, w)) == 1
        ]
        if not positions:
            continue
        i = rng.choice(positions)
        answer_id = _word_ids(tokenizer, words[i])[0]
        text = " ".join([*words[:i], mask, *words[i + 1 :]])
        items.append(ClozeItem(text, answer_id, tokenizer.decode([answer_id])))
        if len(items) == n:
            break
    return items


def unigram_top5(lines: Iterable[str], tokenizer) -> list[int]:
    """Return the ids of the 5 most frequent single-token alphabetic words of `lines`."""
    counts: collections.Counter[int] = collections.Counter()
    for line in lines:
        for word in line.split():
            if word.isalpha():
                ids = _word_ids(tokenizer, word)
                if len(ids) == 1:
                    counts[ids[0]] += 1
    return [token for token, _ in counts.most_common(5)]


def cloze_scores(loaded: Any, items: list[ClozeItem], guess: list[int]) -> dict[str, float]:
    """Return the top-5 hit rates of the model's `fill` and of the fixed `guess` on `items`."""
    from fmforge.generate.fill import fill_mask

    model_hits = guess_hits = 0
    for item in items:
        top = [f["token_id"] for f in fill_mask(loaded, item.text, top_k=5)[0]]
        model_hits += item.answer_id in top
        guess_hits += item.answer_id in guess
    n = max(len(items), 1)
    return {"items": len(items), "model_top5": model_hits / n, "unigram_top5": guess_hits / n}
