"""A frozen cloze test for masked LMs: mask one word of held-out lines, is it in the top 5?

The set is drawn deterministically (seeded) from held-out text (the `val` split of the shards:
whole documents the model never trained on): sentences of 8-30 words, one masked word per
sentence, chosen among whole words that are a single alphabetic token of the tokenizer (so `fill`
can name it exactly). A held-out sentence that also occurs verbatim in the training text (stage
directions, "exeunt", repeated refrains) is left out, so no item can be answered from memory.
The drawn set is written to `cloze.jsonl` beside the results: frozen, it can be re-scored.

Two unigram guesses, both fixed whatever the context:
- `unigram_top5`: the 5 most frequent single-token *words* of the training text ("the", "and",
  ...). This is the baseline the acceptance bar uses: it is the stronger one, since every answer
  is a word, while the model's top 5 may spend slots on punctuation.
- `plain_unigram_top5`: the 5 most frequent tokens of any kind (punctuation included): the
  model's own unigram prior, what an MLM that ignores context predicts.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ClozeItem:
    """One blank: the line with the word replaced by the mask token, and the word's id."""

    text: str
    answer_id: int
    answer: str


def _word_ids(tokenizer, word: str) -> list[int]:
    return tokenizer.encode(word)


def cloze_set(
    lines: Iterable[str],
    tokenizer,
    n: int = 300,
    seed: int = 0,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[ClozeItem]:
    """Return n cloze items drawn with `seed` from `lines` (a held-out text).

    exclude: sentences that must not be used (the training text's), compared verbatim.
    """
    rng = random.Random(seed)
    mask = tokenizer.roles["mask"]
    candidates = []
    for line in lines:
        words = line.split()
        if 8 <= len(words) <= 30 and line not in exclude:
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
    """Return the top-5 hit rates of the model's `fill` and of the fixed `guess` on `items`.

    `model_top5` is `fill`'s own top 5 (any token); `model_top5_words` the 5 most likely
    whole-word alphabetic tokens, the same candidate set as the words-only unigram guess.
    """
    from fmforge.generate.fill import fill_mask

    model_hits = word_hits = guess_hits = 0
    for item in items:
        fillers = fill_mask(loaded, item.text, top_k=50)[0]
        model_hits += item.answer_id in [f["token_id"] for f in fillers[:5]]
        words = [f["token_id"] for f in fillers if f["token"].isalpha()][:5]
        word_hits += item.answer_id in words
        guess_hits += item.answer_id in guess
    n = max(len(items), 1)
    return {
        "items": len(items),
        "model_top5": model_hits / n,
        "model_top5_words": word_hits / n,
        "unigram_top5": guess_hits / n,
    }


def shard_sentences(shards_dir: str, split: str, limit: int | None = None) -> list[str]:
    """Return sentences decoded from a token-shard split (lowercase WordPiece text).

    limit: read at most this many tokens of the split (None: all of it).
    """
    import re

    from fmforge.data.pack import TokenShards

    shards = TokenShards.open(shards_dir)
    tokenizer = shards.tokenizer()
    tokens = [int(t) for t in shards.split(split)[:limit]]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return [s.strip() for s in re.split(r"[.!?;]", text) if s.strip()]


def cloze_experiment(
    model_dir: str, shards_dir: str, n: int = 300, out: str | Path | None = None
) -> dict[str, Any]:
    """Return cloze top-5 rates of a trained MLM dir and its random-init twin on held-out text.

    With `out`, also write `out/results.json` and the frozen set `out/cloze.jsonl`.
    """
    import torch

    from fmforge.artifacts import write_json_atomic
    from fmforge.errors import UserError
    from fmforge.model.heads import BertForMaskedLM
    from fmforge.model.load import ModelBundle, load_bundle
    from fmforge.train.encoder_pretrain import fresh_encoder

    trained = load_bundle(model_dir, kind="encoder")
    if not isinstance(trained.model, BertForMaskedLM):
        raise UserError(f"{model_dir} has no masked-LM head: the cloze test needs an MLM dir")
    train_lines = shard_sentences(shards_dir, "train")
    items = cloze_set(
        shard_sentences(shards_dir, "val"), trained.tokenizer, n, exclude=set(train_lines)
    )
    guess = unigram_top5(train_lines, trained.tokenizer)
    plain = unigram_top5(train_lines, trained.tokenizer, words_only=False)
    torch.manual_seed(1)
    twin_model = fresh_encoder(trained.config, "mlm").eval()  # where training started
    twin = ModelBundle(twin_model, trained.tokenizer, trained.config)
    scores = cloze_scores(trained, items, guess)
    results = {
        "model": str(model_dir),
        "shards": str(shards_dir),
        "trained": scores,
        "random_twin": cloze_scores(twin, items, guess),
        "unigram_guess": [trained.tokenizer.decode([i]) for i in guess],
        "plain_unigram_top5": sum(i.answer_id in plain for i in items) / max(len(items), 1),
        "plain_unigram_guess": [trained.tokenizer.decode([i]) for i in plain],
        "ratio_to_unigram": round(scores["model_top5"] / max(scores["unigram_top5"], 1e-9), 3),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rows = "".join(json.dumps(asdict(item)) + "\n" for item in items)
        (out / "cloze.jsonl").write_text(rows, encoding="utf-8")
        write_json_atomic(out / "results.json", results)
    return results
