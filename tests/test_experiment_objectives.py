"""Pieces of `fmforge experiment objectives`: probe, bootstrap, BM25, decoder features, pairs,
the corpus, and the whole experiment on a tiny budget (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from fmforge.experiments import encoder_measures as measures
from fmforge.experiments import objectives as ex


def test_logistic_probe_learns_a_separable_task_and_bootstrap_brackets_it():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.standard_normal((300, 8)) + np.eye(3, 8)[y] * 3.0  # class shifts feature y
    predicted = measures.logistic_probe(x[:200], y[:200], x[200:], classes=3)
    correct = (predicted == y[200:]).astype(float)
    result = measures.bootstrap_accuracy(correct)
    assert result["accuracy"] > 0.85
    assert result["ci_low"] < result["accuracy"] < result["ci_high"]
    noise = measures.logistic_probe(x[:200], rng.integers(0, 3, 200), x[200:], classes=3)
    assert (noise == y[200:]).mean() < 0.6  # shuffled labels: no better than chance


def test_bm25_finds_the_document_that_shares_rare_words():
    pairs = [
        ("the zebra ran", "a striped zebra of africa"),
        ("bake the bread", "bread baked in an oven"),
        ("the river flows", "a large natural stream of water: a river"),
    ]
    assert measures.bm25_recall(pairs) == {"recall_at_1": 1.0, "recall_at_10": 1.0}


def test_decoder_features_ignore_right_padding(tokenizer_dir):
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=tokenizer.vocab_size)).eval()
    embed = measures.decoder_features(model, tokenizer)
    texts = ["def alpha(beta): return beta + 1", "x"]
    together = embed(texts)
    alone = np.concatenate([embed([t]) for t in texts])
    assert np.abs(together - alone).max() < 1e-5
    assert not np.allclose(together[0], together[1])


@pytest.mark.skipif(not (ex.Path("/usr/share/wordnet/data.noun")).is_file(), reason="no WordNet")
def test_usage_gloss_pairs_are_fixed_and_distinct():
    a, b = measures.usage_gloss_pairs(50), measures.usage_gloss_pairs(50)
    assert a == b and len(a) == 50
    assert all(usage != gloss and not gloss.startswith('"') for usage, gloss in a)


def test_stratified_folds_deal_every_class_evenly_and_are_seeded():
    y = np.array([0] * 10 + [1] * 7 + [2] * 3)
    fold = measures.stratified_folds(y, 5)
    assert np.array_equal(fold, measures.stratified_folds(y, 5))
    assert not np.array_equal(fold, measures.stratified_folds(y, 5, seed=1))
    for label, size in ((0, 10), (1, 7), (2, 3)):
        counts = np.bincount(fold[y == label], minlength=5)
        assert counts.sum() == size and counts.max() - counts.min() <= 1


def test_probe_task_predicts_every_example_once(monkeypatch):
    from fmforge.data.tasks import Example

    rng = np.random.default_rng(0)
    examples = [Example(f"{label} {i}", label) for label in "abc" for i in range(40)]
    monkeypatch.setattr(measures, "task_examples", lambda name: examples)
    # Features that carry the label (plus noise): the cross-validated probe finds it.
    signal = {"a": 0, "b": 1, "c": 2}

    def embed(texts):
        return np.eye(3, 6)[[signal[t[0]] for t in texts]] * 2 + rng.standard_normal(
            (len(texts), 6)
        )

    result = measures.probe_task(embed, "any")
    assert result["examples"] == 120 and result["accuracy"] > 0.8
    noise = measures.probe_task(lambda texts: rng.standard_normal((len(texts), 6)), "any")
    assert noise["accuracy"] < 0.55


@pytest.mark.skipif(
    not ex.Path("/usr/share/wordnet/data.noun").is_file()
    or not ex.Path("/usr/share/games/fortunes/computers").is_file(),
    reason="needs WordNet and fortunes (apt-get install wordnet-base fortunes)",
)
def test_english_corpus_leaves_out_every_evaluation_text(tmp_path):
    import json

    from fmforge.data.tasks import load_task

    pairs = measures.usage_gloss_pairs(50)
    held_out = ex.held_out_texts(pairs)
    task = load_task("wordnet-supersense")
    assert task.test[0].text in held_out and task.train[0].text in held_out
    counts = ex.english_corpus(tmp_path / "c.jsonl", tmp_path / "s.txt", held_out)
    assert counts["wordnet"] > 100_000 and counts["fortunes"] > 5_000
    assert counts["held_out_dropped"] >= len(pairs)
    documents = [json.loads(line)["text"] for line in open(tmp_path / "c.jsonl")]
    assert len(documents) == counts["wordnet"] + counts["fortunes"]
    corpus = "\n".join(documents)
    for usage, _ in pairs[:10]:
        assert usage not in corpus
    kept = [e.text for e in task.test[:20]]
    assert not any(text.split(": ", 1)[1] in corpus for text in kept)
    sentences = (tmp_path / "s.txt").read_text().splitlines()
    assert len(sentences) == counts["sentences"] and all(len(s.split()) >= 4 for s in sentences)
    ex.simcse_sentences(tmp_path / "s.txt", tmp_path / "p.jsonl", 100)
    records = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert len(records) == 100 and all(r["anchor"] == r["positive"] for r in records)
    assert len({r["anchor"] for r in records}) > 90


@pytest.mark.skipif(not ex.Path("/usr/share/wordnet/data.noun").is_file(), reason="no WordNet")
def test_iter_wordnet_reads_every_lemma_and_the_examples():
    from fmforge.data.tasks import iter_wordnet

    synsets = [s for s in iter_wordnet("noun") if s.lemmas[0] in ("dog", "entity")]
    entity, dog, man = synsets[:3]  # file order: entity first, then the animal before the man
    assert dog.lemmas[:2] == ("dog", "domestic dog") and "Canis familiaris" in dog.lemmas
    assert dog.definition.startswith("a member of the genus Canis")
    assert dog.examples == ["the dog barked all night"]
    assert man.lemmas == ("dog",) and man.examples == ["you lucky dog"] and man.lexfile == 18
    assert entity.examples == [] and dog.lexfile == 5


@pytest.mark.slow
@pytest.mark.skipif(
    not ex.Path("/usr/share/wordnet/data.noun").is_file()
    or not ex.Path("/usr/share/games/fortunes/computers").is_file(),
    reason="needs WordNet and fortunes (apt-get install wordnet-base fortunes)",
)
def test_the_whole_experiment_runs_on_a_tiny_budget(tmp_path):
    import json

    results = ex.run_objectives(tmp_path / "out", steps=20, simcse_steps=10)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["verdicts"] == results["verdicts"]
    models = ["causal", "mlm", "contrastive", "causal_random", "mlm_random", "contrastive_random"]
    assert sorted(saved["probe"]) == sorted(models)
    for row in saved["probe"].values():
        for task in measures.TASKS:
            assert row[task]["ci_low"] <= row[task]["accuracy"] <= row[task]["ci_high"]
    assert {"recall_at_1", "recall_at_10"} <= set(saved["retrieval"]["bm25"])
    assert saved["budget"]["training_seconds"].keys() == {"causal", "mlm", "contrastive"}
    assert (tmp_path / "out" / "objectives.png").stat().st_size > 0
    assert "SimCSE" in (tmp_path / "out" / "report.md").read_text()
