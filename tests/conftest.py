"""Shared fixtures: tiny configs, seeded, CPU, fp32."""

from __future__ import annotations

import os

import pytest
import torch

from fmforge.model.config import LlamaConfig, preset_config


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> LlamaConfig:
    """2 layers, d 64, GQA 4/2, vocab 512, untied to exercise lm_head separately."""
    return preset_config("tiny", tie_word_embeddings=False)


@pytest.fixture
def tiny_tied_config() -> LlamaConfig:
    return preset_config("tiny")


def _corpus_lines() -> list[str]:
    """A small inline corpus of Python-ish text; big enough for a few hundred windows."""
    words = ["alpha", "beta", "gamma", "delta", "value", "count", "index", "total", "item"]
    lines = []
    for i in range(400):
        a, b = words[i % len(words)], words[(i * 7) % len(words)]
        lines.append(f"def {a}_{i % 13}({b}):\n    return {b} + {i % 17}  # {a} {b}\n")
    return lines


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A jsonl corpus file of 400 short documents."""
    import json

    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _corpus_lines()))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_file):
    """A 300-token byte-level BPE tokenizer trained in-process on the inline corpus."""
    from fmforge.tokenizer import train_from_inputs

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_from_inputs([str(corpus_file)], vocab_size=300, out=str(out))
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory, corpus_file, tokenizer_dir):
    """Token shards of the inline corpus with a 10% validation split."""
    from fmforge.data.pack import prepare_shards

    out = tmp_path_factory.mktemp("shards") / "data"
    prepare_shards([str(corpus_file)], str(tokenizer_dir), str(out), val_fraction=0.1)
    return out


POSTGRES_URL = os.environ.get("FMFORGE_TEST_POSTGRES_URL")


def _postgres_reachable() -> bool:
    if not POSTGRES_URL:
        return False
    try:
        import psycopg

        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
        return True
    except Exception:
        return False


def _empty_postgres(url: str) -> None:
    """Drop the store's and the registry's tables (not through Registry: a test may leave a
    newer schema behind)."""
    from fmforge.flywheel.registry import registry_metadata
    from fmforge.flywheel.store import FeedbackStore, metadata

    store = FeedbackStore(url)
    registry_metadata.drop_all(store.engine)
    metadata.drop_all(store.engine)
    store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """An empty database: SQLite, and PostgreSQL when FMFORGE_TEST_POSTGRES_URL reaches one
    (emptied before and after, so a later test or server on it starts clean)."""
    if request.param == "sqlite":
        yield str(tmp_path / "feedback.db")
        return
    if not _postgres_reachable():
        pytest.skip("no PostgreSQL server (set FMFORGE_TEST_POSTGRES_URL)")
    _empty_postgres(POSTGRES_URL)
    yield POSTGRES_URL
    _empty_postgres(POSTGRES_URL)
