"""Exact and near-duplicate removal: recall at Jaccard 0.80-0.85, false merges at <= 0.6, the
LSH formula against observation, and order independence."""

from __future__ import annotations

import math
import random
import string

import numpy as np
import pytest

from fmforge.data import dedup

_RNG = random.Random(5)
_VOCAB = sorted(
    {
        "".join(_RNG.choice(string.ascii_lowercase) for _ in range(_RNG.randint(3, 9)))
        for _ in range(20000)
    }
)


def _base(rng: random.Random) -> list[str]:
    return [rng.choice(_VOCAB) for _ in range(rng.randint(200, 260))]


def _variant(words: list[str], low: float, high: float, rng: random.Random) -> tuple[str, float]:
    """Return a copy with scattered word swaps whose measured 5-gram Jaccard is in [low, high]."""
    text = " ".join(words)
    # Each swap far from the others changes 5 shingles: J ~ (S - 5m) / (S + 5m).
    shingles = len(words) - 4
    target = (low + high) / 2
    m = max(1, round(shingles * (1 - target) / (1 + target) / 5))
    for _ in range(200):
        out = list(words)
        for pos in rng.sample(range(len(words)), m):
            out[pos] = rng.choice(_VOCAB)
        similarity = dedup.jaccard(text, " ".join(out))
        if low <= similarity <= high:
            return " ".join(out), similarity
        m += 1 if similarity > high else -1
        m = max(1, m)
    raise AssertionError("no variant in range")


@pytest.fixture(scope="module")
def corpus():
    rng = random.Random(11)
    bases = [_base(rng) for _ in range(1000)]
    ids = [f"b{i:04d}" for i in range(1000)]
    texts = [" ".join(b) for b in bases]
    high, low = [], []
    for i in range(300):  # near-duplicates of bases 0..299
        text, sim = _variant(bases[i], 0.80, 0.85, rng)
        ids.append(f"v{i:04d}")
        texts.append(text)
        high.append((f"b{i:04d}", f"v{i:04d}", sim))
    for i in range(300, 600):  # far variants of bases 300..599
        text, sim = _variant(bases[i], 0.50, 0.60, rng)
        ids.append(f"w{i:04d}")
        texts.append(text)
        low.append((f"b{i:04d}", f"w{i:04d}", sim))
    return ids, texts, high, low


def _signatures(texts: list[str], num_perm: int) -> np.ndarray:
    hasher = dedup.MinHasher(num_perm, seed=1)
    return np.stack([hasher.signature(t) for t in texts])


def test_recall_and_false_merges_with_the_default_bands(corpus):
    ids, texts, high, low = corpus
    bands, rows = dedup.choose_bands(0.8, 0.98)
    verify = dedup.verify_threshold(0.8, bands * rows)
    removed, _ = dedup.near_duplicates(ids, _signatures(texts, bands * rows), bands, rows, verify)
    found = sum(removed.get(v, ("",))[0] == b for b, v, _ in high)
    recall = found / len(high)
    merged_low = sum(w in removed for _, w, _ in low) / len(low)
    print(f"bands={bands}x{rows} verify={verify:.3f} recall={recall:.3f} low={merged_low:.4f}")
    assert recall >= 0.95
    assert merged_low <= 0.01
    # No base document is ever removed: each cluster keeps its smallest id (the base).
    assert not any(doc.startswith("b") for doc in removed)


def test_observed_recall_matches_the_formula_at_14_bands_of_8_rows(corpus):
    ids, texts, high, _ = corpus
    bands, rows = 14, 8
    _, candidates = dedup.near_duplicates(ids, _signatures(texts, bands * rows), bands, rows, 0.7)
    candidate_pairs = {(a, b) for a, b, _, _ in candidates}
    observed = sum((b, v) in candidate_pairs for b, v, _ in high) / len(high)
    expected = sum(dedup.lsh_recall(sim, bands, rows) for _, _, sim in high) / len(high)
    half_width = 2.58 * math.sqrt(expected * (1 - expected) / len(high))  # 99% binomial
    print(f"observed={observed:.3f} formula={expected:.3f} +- {half_width:.3f}")
    assert abs(observed - expected) <= half_width
    assert dedup.lsh_recall(0.8, 14, 8) == pytest.approx(0.9235, abs=1e-4)


def test_exact_duplicates_keep_the_smallest_id_in_any_order():
    ids = ["d3", "d1", "d2", "d4"]
    texts = ["Hello  World", "hello world", "HELLO\nWORLD ", "something else"]
    for seed in range(5):
        order = list(range(4))
        random.Random(seed).shuffle(order)
        removed = dedup.exact_duplicates(
            [ids[i] for i in order], [dedup.exact_hash(texts[i]) for i in order]
        )
        assert removed == {"d3": "d1", "d2": "d1"}


def test_near_duplicates_do_not_depend_on_order(corpus):
    ids, texts, _, _ = corpus
    ids, texts = ids[:400] + ids[1000:1100], texts[:400] + texts[1000:1100]
    bands, rows = dedup.choose_bands()
    signatures = _signatures(texts, bands * rows)
    first, _ = dedup.near_duplicates(ids, signatures, bands, rows, 0.7)
    order = list(range(len(ids)))
    random.Random(3).shuffle(order)
    second, _ = dedup.near_duplicates([ids[i] for i in order], signatures[order], bands, rows, 0.7)
    assert first == second and len(first) >= 95


def test_union_find_roots_at_the_smallest_id():
    forest = dedup.UnionFind()
    forest.union("c", "d")
    forest.union("b", "d")
    forest.union("e", "a")
    forest.union("e", "c")
    assert {forest.find(x) for x in "abcde"} == {"a"}


def test_text_without_spaces_uses_character_shingles():
    text = "東京特許許可局長今日急遽休暇許可拒否" * 3
    assert len(dedup.shingle_hashes(text)) > 10
    assert dedup.jaccard(text, text[:-1] + "。") > 0.8


def test_choose_bands_meets_the_recall_target():
    bands, rows = dedup.choose_bands(0.8, 0.98, 128)
    assert bands * rows <= 128 and dedup.lsh_recall(0.8, bands, rows) >= 0.98
    assert dedup.lsh_recall(0.5, bands, rows) < 0.2
