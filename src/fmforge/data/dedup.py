"""Exact and near-duplicate detection: normalised-text hashes and MinHash-LSH, order-free.

Exact: the xxh3-128 hash of `curate.dedup_key(text)` (casefold, NFKC, whitespace runs as one
space). Near: MinHash over word 5-gram shingles (character 5-grams for text written without
spaces), signatures of `bands × rows` multiply-shift hashes of xxh3-64 shingle hashes; documents
sharing a band are candidates, each candidate pair is verified on the whole signature, verified
pairs are joined into connected components, and each component keeps its smallest id. Every step
is a function of the set of (id, text) only, so the result never depends on input order, shard
layout, worker count or executor.

LSH recall at Jaccard s is 1 - (1 - s^r)^b (Leskovec, Rajaraman & Ullman, Mining of Massive
Datasets, §3.4); `choose_bands` picks the (b, r) that reaches the target recall at the target
Jaccard with the fewest false candidates at s = 0.5.
"""

from __future__ import annotations

import numpy as np
import xxhash

from fmforge.data.curate import dedup_key

SHINGLE = 5  # words (or characters) per shingle
_MIX = np.uint64(0x9E3779B97F4A7C15)


def exact_hash(text: str) -> str:
    """Return the hex xxh3-128 of the normalised text (case and whitespace ignored)."""
    return xxhash.xxh3_128_hexdigest(dedup_key(text).encode("utf-8"))


def lsh_recall(similarity: float, bands: int, rows: int) -> float:
    """Return the probability that a pair at Jaccard `similarity` shares at least one band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def choose_bands(
    jaccard: float = 0.8, recall: float = 0.98, max_perm: int = 128
) -> tuple[int, int]:
    """Return (bands, rows) with recall >= `recall` at `jaccard` and fewest candidates at 0.5."""
    best = None
    for rows in range(1, 33):
        for bands in range(1, max_perm // rows + 1):
            if lsh_recall(jaccard, bands, rows) >= recall:
                score = (lsh_recall(0.5, bands, rows), bands * rows)
                if best is None or score < best[0]:
                    best = (score, (bands, rows))
                break
    if best is None:
        raise ValueError(f"no bands x rows <= {max_perm} reaches recall {recall} at {jaccard}")
    return best[1]


def verify_threshold(jaccard: float, num_perm: int) -> float:
    """Return the signature agreement a candidate pair needs: `jaccard` minus two standard errors.

    The estimate of a pair at exactly `jaccard` has standard error sqrt(j(1-j)/num_perm), so about
    98% of pairs at the threshold pass, and pairs far below it almost never do.
    """
    return jaccard - 2 * (jaccard * (1 - jaccard) / num_perm) ** 0.5


def _uses_spaces(text: str) -> bool:
    words = text.split()
    return bool(words) and len(text) / len(words) < 20


def shingle_hashes(text: str) -> np.ndarray:
    """Return the unique uint64 hashes of the text's shingles (word or character 5-grams)."""
    key = dedup_key(text)
    if _uses_spaces(key):
        units = key.split()
    else:
        units = list(key.replace(" ", ""))
    unit_hash = np.fromiter(
        (xxhash.xxh3_64_intdigest(u.encode("utf-8")) for u in units),
        dtype=np.uint64,
        count=len(units),
    )
    if len(unit_hash) < SHINGLE:
        combined = np.array([xxhash.xxh3_64_intdigest(key.encode("utf-8"))], dtype=np.uint64)
    else:
        count = len(unit_hash) - SHINGLE + 1
        combined = np.zeros(count, dtype=np.uint64)
        for j in range(SHINGLE):  # a rolling combination of the unit hashes; wrap-around intended
            combined = (combined ^ unit_hash[j : j + count]) * _MIX
            combined ^= combined >> np.uint64(29)
    return np.unique(combined)


class MinHasher:
    """MinHash signatures of `num_perm` multiply-shift hashes with fixed, seeded parameters."""

    def __init__(self, num_perm: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        # Odd multipliers make a*x mod 2^64 a permutation; the top 32 bits are the hash.
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(
            1
        )
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        """Return the (num_perm,) uint32 signature of `text`."""
        hashes = shingle_hashes(text)
        out = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        for start in range(0, len(hashes), 4096):  # bounded (4096, num_perm) temporaries
            block = hashes[start : start + 4096, None] * self.a + self.b  # (n, num_perm)
            low = block.min(axis=0) >> np.uint64(32)  # min commutes with the monotone shift
            np.minimum(out, low.astype(np.uint32), out=out)
        return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Return (N, bands) uint64 keys, one per band of each (N, bands*rows) signature row."""
    n = signatures.shape[0]
    grouped = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    keys = np.broadcast_to(np.arange(bands, dtype=np.uint64), (n, bands)).copy()
    for r in range(rows):  # order-sensitive mix of the band's rows; wrap-around intended
        keys = (keys ^ grouped[:, :, r]) * _MIX
        keys ^= keys >> np.uint64(29)
    return keys


def bucket_pairs(
    keys: np.ndarray, rank: np.ndarray, max_all_pairs: int = 64
) -> set[tuple[int, int]]:
    """Return (i, j) row pairs that share a key in some band, i before j in `rank` order.

    A bucket of up to `max_all_pairs` rows gives every pair, so one failed verification cannot
    split a cluster; a larger one gives a star and a chain, so the pair count stays linear.
    """
    pairs: set[tuple[int, int]] = set()
    for band in range(keys.shape[1]):
        column = keys[:, band]
        order = np.lexsort((rank, column))  # by key, then by id rank
        sorted_keys = column[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = order[start:end].tolist()
            if len(members) <= max_all_pairs:
                pairs.update((a, b) for k, a in enumerate(members) for b in members[k + 1 :])
            else:
                pairs.update((members[0], b) for b in members[1:])
                pairs.update(zip(members[1:], members[2:]))
    return pairs


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Return the share of equal signature entries: an unbiased estimate of the Jaccard."""
    return float(np.mean(a == b))


def jaccard(text_a: str, text_b: str) -> float:
    """Return the exact Jaccard similarity of the two texts' shingle sets."""
    a, b = shingle_hashes(text_a), shingle_hashes(text_b)
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union if union else 1.0


class UnionFind:
    """Disjoint sets over string ids whose root is always the smallest id of its set."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        """Return the smallest id of x's set."""
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, x: str, y: str) -> None:
        """Join the sets of x and y."""
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            low, high = (rx, ry) if rx < ry else (ry, rx)
            self.parent[high] = low
            self.parent.setdefault(low, low)


def exact_duplicates(ids: list[str], hashes: list[str]) -> dict[str, str]:
    """Return {removed id: kept id} where the kept one is the smallest id with the same hash."""
    keeper: dict[str, str] = {}
    for doc_id, h in zip(ids, hashes):
        if h not in keeper or doc_id < keeper[h]:
            keeper[h] = doc_id
    return {doc_id: keeper[h] for doc_id, h in zip(ids, hashes) if keeper[h] != doc_id}


def near_duplicates(
    ids: list[str],
    signatures: np.ndarray,
    bands: int,
    rows: int,
    verify_jaccard: float,
) -> tuple[dict[str, tuple[str, float]], list[tuple[str, str, float, bool]]]:
    """Return ({removed id: (kept id, estimated Jaccard to it)}, candidate pairs).

    signatures: (N, bands*rows) uint32, row i for ids[i]. Candidate pairs are
    (id_a, id_b, estimated Jaccard, verified) with id_a < id_b, sorted.
    """
    rank = np.empty(len(ids), dtype=np.int64)  # id order makes every loop order-free
    rank[sorted(range(len(ids)), key=ids.__getitem__)] = np.arange(len(ids))
    pairs = bucket_pairs(band_keys(signatures, bands, rows), rank) if len(ids) else set()
    candidates = []
    forest = UnionFind()
    for i, j in sorted(pairs, key=lambda p: (ids[p[0]], ids[p[1]])):
        similarity = estimated_jaccard(signatures[i], signatures[j])
        ok = similarity >= verify_jaccard
        a, b = sorted((ids[i], ids[j]))
        candidates.append((a, b, similarity, ok))
        if ok:
            forest.union(a, b)
    index = {doc_id: i for i, doc_id in enumerate(ids)}
    removed = {}
    for doc_id in sorted(forest.parent):
        root = forest.find(doc_id)
        if root != doc_id:
            sim = estimated_jaccard(signatures[index[doc_id]], signatures[index[root]])
            removed[doc_id] = (root, sim)
    return removed, candidates
