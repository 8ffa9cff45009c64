"""Pieces of `fmforge experiment objectives`: probe, bootstrap, BM25, decoder features, pairs."""

from __future__ import annotations

import numpy as np
import pytest

from fmforge.experiments import objectives as ex


def test_logistic_probe_learns_a_separable_task_and_bootstrap_brackets_it():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.standard_normal((300, 8)) + np.eye(3, 8)[y] * 3.0  # class shifts feature y
    predicted = ex.logistic_probe(x[:200], y[:200], x[200:], classes=3)
    correct = (predicted == y[200:]).astype(float)
    result = ex.bootstrap_accuracy(correct)
    assert result["accuracy"] > 0.85
    assert result["ci_low"] < result["accuracy"] < result["ci_high"]
    noise = ex.logistic_probe(x[:200], rng.integers(0, 3, 200), x[200:], classes=3)
    assert (noise == y[200:]).mean() < 0.6  # shuffled labels: no better than chance


def test_bm25_finds_the_document_that_shares_rare_words():
    pairs = [
        ("the zebra ran", "a striped zebra of africa"),
        ("bake the bread", "bread baked in an oven"),
        ("the river flows", "a large natural stream of water: a river"),
    ]
    assert ex.bm25_recall(pairs) == {"recall_at_1": 1.0, "recall_at_10": 1.0}


def test_decoder_features_ignore_right_padding(tokenizer_dir):
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=tokenizer.vocab_size)).eval()
    embed = ex.decoder_features(model, tokenizer)
    texts = ["def alpha(beta): return beta + 1", "x"]
    together = embed(texts)
    alone = np.concatenate([embed([t]) for t in texts])
    assert np.abs(together - alone).max() < 1e-5
    assert not np.allclose(together[0], together[1])


@pytest.mark.skipif(not (ex.Path("/usr/share/wordnet/data.noun")).is_file(), reason="no WordNet")
def test_usage_gloss_pairs_are_fixed_and_distinct():
    a, b = ex.usage_gloss_pairs(50), ex.usage_gloss_pairs(50)
    assert a == b and len(a) == 50
    assert all(usage != gloss and not gloss.startswith('"') for usage, gloss in a)
