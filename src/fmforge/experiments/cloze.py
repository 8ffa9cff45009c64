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


def unigram_top5(lines: Iterable[str], tokenizer, words_only: bool = True) -> list[int]:
    """Return the ids of the 5 most frequent single-token words of `lines`.

    words_only (the stronger baseline, since every answer is a word): alphabetic words only;
    False: any token, punctuation included (the plain unigram guess).
    """
    counts: collections.Counter[int] = collections.Counter()
    for line in lines:
        for word in line.split():
            if word.isalpha() or not words_only:
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


def shard_sentences(shards_dir: str, split: str, limit: int = 200_000) -> list[str]:
    """Return sentences decoded from a token-shard split (lowercase WordPiece text)."""
    import re

    from fmforge.data.pack import TokenShards

    shards = TokenShards.open(shards_dir)
    tokenizer = shards.tokenizer()
    tokens = [int(t) for t in shards.split(split)[:limit]]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return [s.strip() for s in re.split(r"[.!?;]", text) if s.strip()]


def cloze_experiment(model_dir: str, shards_dir: str, n: int = 300) -> dict[str, Any]:
    """Return cloze top-5 rates of a trained MLM dir and its random-init twin on held-out text."""
    import torch

    from fmforge.model.heads import BertForMaskedLM
    from fmforge.model.load import ModelBundle, load_bundle

    trained = load_bundle(model_dir, kind="encoder")
    items = cloze_set(shard_sentences(shards_dir, "val"), trained.tokenizer, n)
    train_lines = shard_sentences(shards_dir, "train")
    guess = unigram_top5(train_lines, trained.tokenizer)
    plain = unigram_top5(train_lines, trained.tokenizer, words_only=False)
    torch.manual_seed(1)
    twin = ModelBundle(BertForMaskedLM(trained.config).eval(), trained.tokenizer, trained.config)
    return {
        "trained": cloze_scores(trained, items, guess),
        "random_twin": cloze_scores(twin, items, guess),
        "unigram_guess": [trained.tokenizer.decode([i]) for i in guess],
        "plain_unigram_top5": sum(i.answer_id in plain for i in items) / max(len(items), 1),
        "plain_unigram_guess": [trained.tokenizer.decode([i]) for i in plain],
    }
