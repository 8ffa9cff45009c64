"""Measures of an encoder's features, for `fmforge experiment objectives`.

- features: mean-pooled last hidden states of a BERT encoder or a causal decoder;
- probe: standardised features, multinomial logistic regression (L2), 5-fold cross-validated
  accuracy over every labelled example of a shipped task, with a 95% bootstrap interval;
- sentence similarity: Spearman of cosine similarities on the STS Benchmark dev split
  (../shared/data/stsb, None when absent);
- retrieval: a WordNet usage example -> its synset's gloss, recall@1 and @10, and BM25's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

TASKS = ("wordnet-supersense", "fortunes-topic", "chat-topic-en")
STSB = Path(__file__).resolve().parents[4] / "shared" / "data" / "stsb"
RETRIEVAL_PAIRS = 500
BOOTSTRAP = 1000
PROBE_FOLDS = 5

Embed = Callable[[list[str]], np.ndarray]


# --- features ------------------------------------------------------------------------------------


def encoder_features(bundle: Any) -> Embed:
    """Return texts -> mean-pooled (unnormalised) features of a BERT encoder bundle."""
    from fmforge.generate.embed import embed_texts

    return lambda texts: embed_texts(bundle, texts, batch_size=64, normalize_rows=False)


def decoder_features(model: torch.nn.Module, tokenizer, max_tokens: int = 128) -> Embed:
    """Return texts -> mean-pooled last hidden states of a causal decoder (right-padded)."""
    from fmforge.generate.embed import pad_batch
    from fmforge.model.heads import mean_pool

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        rows = [(tokenizer.encode(t) or [tokenizer.eos_id])[:max_tokens] for t in texts]
        out = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        for start in range(0, len(order), 64):
            index = order[start : start + 64]
            ids, mask = pad_batch([rows[i] for i in index], 0)
            # Causal attention: real tokens never see the padding that follows them.
            hidden = model(ids, return_hidden=True)  # (B, T, C)
            out[index] = mean_pool(hidden, mask).numpy()
        return out

    return embed


# --- measures -----------------------------------------------------------------------------------


def logistic_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, classes: int, l2: float = 1e-2
) -> np.ndarray:
    """Return test predictions of an L2 multinomial logistic regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.tensor((train_x - mean) / std, dtype=torch.float64)
    y = torch.tensor(train_y)
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    test = torch.tensor((test_x - mean) / std, dtype=torch.float64)
    with torch.no_grad():
        return (test @ w + b).argmax(1).numpy()


def bootstrap_accuracy(correct: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Return accuracy and its 95% percentile bootstrap interval over test examples."""
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(correct), (BOOTSTRAP, len(correct)))
    means = correct[samples].mean(1)
    return {
        "accuracy": round(float(correct.mean()), 4),
        "ci_low": round(float(np.percentile(means, 2.5)), 4),
        "ci_high": round(float(np.percentile(means, 97.5)), 4),
    }


def probe_task(embed: Embed, task_name: str, folds: int = PROBE_FOLDS) -> dict[str, float]:
    """Return the probe's cross-validated accuracy and interval for one task.

    Every labelled example of the task (its train, validation and test splits) is predicted once,
    by a probe fitted on the other folds (stratified, seeded): the tasks' fixed test splits hold
    89-180 examples, whose +-0.07 intervals are too wide to tell two encoders apart.
    """
    examples = task_examples(task_name)
    labels = sorted({e.label for e in examples})
    y = np.array([labels.index(e.label) for e in examples])
    x = embed([e.text for e in examples])
    fold = stratified_folds(y, folds)
    predicted = np.zeros_like(y)
    for k in range(folds):
        test = fold == k
        predicted[test] = logistic_probe(x[~test], y[~test], x[test], len(labels))
    return {**bootstrap_accuracy((predicted == y).astype(np.float64)), "examples": len(y)}


def task_examples(task_name: str) -> list:
    """Return every labelled example of a shipped task (train, validation and test)."""
    from fmforge.data.tasks import load_task

    task = load_task(task_name)
    return task.train + task.validation + task.test


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Return a fold number per example: each class dealt round-robin in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        fold[members] = np.arange(len(members)) % folds
    return fold


def sts_dev(embed: Embed) -> float | None:
    """Return the STS-B dev Spearman of cosine similarities, or None without the data."""
    from fmforge.experiments.sts import read_sts, spearman

    if not STSB.is_dir():
        return None
    rows = read_sts(STSB, "dev")
    left = _unit(embed([r[0] for r in rows]))
    right = _unit(embed([r[1] for r in rows]))
    return round(spearman((left * right).sum(1), np.array([r[2] for r in rows])), 4)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def usage_gloss_pairs(n: int = RETRIEVAL_PAIRS, seed: int = 0) -> list[tuple[str, str]]:
    """Return n seeded (usage example, gloss) pairs from WordNet's nouns, one per synset."""
    from fmforge.data.tasks import iter_wordnet

    pairs = []
    for synset in iter_wordnet("noun"):
        examples = [e for e in synset.examples if len(e) > 10]
        if examples and synset.definition and not synset.definition.startswith('"'):
            pairs.append((examples[0], synset.definition))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)
    return [pairs[i] for i in sorted(chosen)]


def retrieval_recall(embed: Embed, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Return recall@1 and @10 of each usage example retrieving its gloss among all glosses."""
    from fmforge.search.index import exact_top_k

    queries = _unit(embed([p[0] for p in pairs]).astype(np.float32))
    docs = _unit(embed([p[1] for p in pairs]).astype(np.float32))
    _, ids = exact_top_k(docs, queries, 10)
    return _recalls(ids)


def _recalls(ids: np.ndarray) -> dict[str, float]:
    truth = np.arange(len(ids))[:, None]
    return {
        "recall_at_1": round(float((ids[:, :1] == truth).any(1).mean()), 4),
        "recall_at_10": round(float((ids == truth).any(1).mean()), 4),
    }


def bm25_recall(pairs: list[tuple[str, str]], k1: float = 1.5, b: float = 0.75) -> dict:
    """Return BM25's recall@1/@10 on the same pairs (lowercased word tokens)."""

    def words(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    docs = [words(p[1]) for p in pairs]
    average = sum(map(len, docs)) / len(docs)
    frequency = Counter(w for d in docs for w in set(d))
    idf = {w: math.log(1 + (len(docs) - f + 0.5) / (f + 0.5)) for w, f in frequency.items()}
    counts = [Counter(d) for d in docs]
    ranked = []
    for query, _ in pairs:
        scores = np.zeros(len(docs))
        for w in set(words(query)):
            if w not in idf:
                continue
            for j, c in enumerate(counts):
                tf = c.get(w, 0)
                if tf:
                    norm = tf + k1 * (1 - b + b * len(docs[j]) / average)
                    scores[j] += idf[w] * tf * (k1 + 1) / norm
        ranked.append(np.argsort(-scores, kind="stable")[:10])
    return _recalls(np.array(ranked))
