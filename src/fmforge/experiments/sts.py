"""STS Benchmark (Cer et al. 2017): sentence pairs with 0-5 similarity scores, and its measure.

The measure is the SimCSE paper's and sentence-transformers': Spearman rank correlation between
the cosine similarity of the two sentences' embeddings and the gold score. The data is read from
a directory holding the original `sts-{train,dev,test}.csv` (tab-separated; columns 5-7 are the
score and the two sentences); it is never shipped in the repository.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fmforge.errors import DataError

SPLITS = ("train", "dev", "test")


def read_sts(directory: str | os.PathLike, split: str) -> list[tuple[str, str, float]]:
    """Return (sentence1, sentence2, score) rows of an STS Benchmark split."""
    if split not in SPLITS:
        raise DataError(f"STS split {split!r} is not one of {list(SPLITS)}")
    file = Path(directory) / f"sts-{split}.csv"
    if not file.is_file():
        raise DataError(f"{file}: no such file; point at the STS Benchmark directory")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 7:
            raise DataError(f"{file}:{number}: expected 7 tab-separated fields")
        rows.append((fields[5], fields[6], float(fields[4])))
    return rows


def rankdata(values: np.ndarray) -> np.ndarray:
    """Return 1-based ranks, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Return Spearman's rank correlation of two equal-length vectors."""
    ra, rb = rankdata(np.asarray(a, dtype=np.float64)), rankdata(np.asarray(b, dtype=np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


def sts_spearman(encoder: Any, rows: list[tuple[str, str, float]], batch_size: int = 64) -> float:
    """Return the Spearman correlation of cosine similarities with the gold STS scores."""
    from fmforge.generate.embed import embed_texts

    left = embed_texts(encoder, [r[0] for r in rows], batch_size, normalize_rows=True)
    right = embed_texts(encoder, [r[1] for r in rows], batch_size, normalize_rows=True)
    cosines = (left * right).sum(axis=1)
    return spearman(cosines, np.array([r[2] for r in rows]))
