"""Contrastive InfoNCE: parity with sentence-transformers, SimCSE views, supervised pairs."""

from __future__ import annotations

import pytest
import torch

from encoders import tiny_bert_config
from fmforge.model.bert import BertModel
from fmforge.train.objectives import info_nce, info_nce_loss


def test_info_nce_equals_multiple_negatives_ranking_loss():
    pytest.importorskip("sentence_transformers")
    g = torch.Generator().manual_seed(3)
    anchors, positives = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    positives[:4] = anchors[:4] + 0.1 * positives[:4]  # some easy pairs, some hard
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    mnrl = MultipleNegativesRankingLoss(model=None, scale=20.0)  # the maths needs no model
    expected = mnrl.compute_loss_from_embeddings([anchors, positives], None)
    got = info_nce(anchors, positives, temperature=0.05) / len(anchors)
    assert abs(got.item() - expected.item()) <= 1e-6
    assert got.item() > 0.1  # hard pairs: not a degenerate zero


def _batch(ids_rows):
    width = max(len(r) for r in ids_rows)
    ids = torch.zeros(len(ids_rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(ids_rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def test_simcse_views_differ_only_through_dropout():
    model = BertModel(tiny_bert_config(60))
    ids, mask = _batch([[2, 7, 8, 9, 3], [2, 10, 11, 3], [2, 12, 3], [2, 13, 14, 15, 16, 3]])
    batch = {"input_ids": ids, "attention_mask": mask}
    model.train()
    loss, count = info_nce_loss(model, batch)
    assert count == 4 and loss.item() > 0
    loss.backward()
    assert model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    # Without dropout the two views are identical, so each anchor's positive is itself.
    model.eval()
    with torch.no_grad():
        eval_loss, _ = info_nce_loss(model, batch)
        from fmforge.model.heads import mean_pool

        pooled = mean_pool(model(ids, mask), mask)
        expected = info_nce(pooled, pooled)
    assert torch.allclose(eval_loss, expected, atol=1e-5)


def test_supervised_pairs_use_the_pair_as_positive():
    model = BertModel(tiny_bert_config(60)).eval()
    a_ids, a_mask = _batch([[2, 7, 8, 3], [2, 10, 3], [2, 12, 13, 3]])
    b_ids, b_mask = _batch([[2, 7, 9, 3], [2, 11, 3], [2, 14, 13, 15, 3]])
    batch = {
        "input_ids": a_ids,
        "attention_mask": a_mask,
        "pair_input_ids": b_ids,
        "pair_attention_mask": b_mask,
    }
    from fmforge.model.heads import mean_pool

    with torch.no_grad():
        loss, count = info_nce_loss(model, batch)
        a = mean_pool(model(a_ids, a_mask), a_mask)
        b = mean_pool(model(b_ids, b_mask), b_mask)
    assert count == 3
    assert torch.allclose(loss, info_nce(a, b), atol=1e-6)
    assert not torch.allclose(loss, info_nce(b.flip(0), a), atol=1e-3)


def _pairs_file(path):
    import json

    from encoders import SENTENCES

    # A positive is its anchor with the words reversed: same words, different order.
    rows = [{"anchor": s, "positive": " ".join(reversed(s.split()))} for s in SENTENCES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_supervised_pairs_from_the_cli_config_train_an_embedder(tmp_path):
    from encoders import tiny_embedder_dir
    from fmforge.api import load_encoder
    from fmforge.config import PretrainConfig
    from fmforge.train.pretrain import pretrain

    base = tiny_embedder_dir(tmp_path / "base")
    cfg = PretrainConfig.from_dict(
        {
            "model": {"preset": "tiny", "init_from": str(base), "dropout": 0.0},
            "data": {"pairs": str(_pairs_file(tmp_path / "pairs.jsonl"))},
            "train": {"max_steps": 12, "batch_size": 4, "seq_len": 32, "warmup_steps": 1,
                      "lr": 3e-3, "eval_every": 0, "checkpoint_every": 12, "log_every": 1},
            "runtime": {"device": "cpu", "threads": 1},
        }
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        pretrain(cfg, tmp_path / "run", objective="contrastive")
    finally:
        torch.set_num_threads(threads)
    import json

    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in history if "loss" in r]
    assert losses[-1] < losses[0]  # it learned to match each anchor to its pair
    assert history[0]["scored"] == 4  # one scored pair per example
    before, after = load_encoder(base), load_encoder(tmp_path / "run" / "final")
    assert after.embed(["the river"]).shape == (1, 64)
    w0 = before.model.encoder.layer[0].attention.self.query.weight
    w1 = after.model.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(w0, w1)
    provenance = json.loads((tmp_path / "run" / "final" / "fmforge.json").read_text())
    assert provenance["data"]["pairs"]["sha256"]


def test_pair_batches_are_seeded_distinct_and_resume_exactly(tmp_path):
    from encoders import wordpiece_tokenizer
    from fmforge.train.encoder_pretrain import PairBatches, read_pairs

    pairs = read_pairs(str(_pairs_file(tmp_path / "p.jsonl")), wordpiece_tokenizer(), 16)
    assert len(pairs) == 8 and all(a[0] == 2 and a[-1] == 3 for a, _ in pairs)
    source = PairBatches(pairs, 0, 3, seed=5)
    first = [source.next_batch() for _ in range(2)]
    rows = {tuple(r[r != 0].tolist()) for b in first for r in b["input_ids"]}
    assert len(rows) == 6  # no pair twice within an epoch
    state = source.state_dict()
    later = source.next_batch()  # the epoch's remainder (2) is dropped: a new epoch starts
    assert state == {"epoch": 0, "position": 6} and source.epoch == 1
    resumed = PairBatches(pairs, 0, 3, seed=5)
    resumed.load_state_dict(state)
    again = resumed.next_batch()
    assert all(torch.equal(later[k], again[k]) for k in later)
    with pytest.raises(Exception, match="batch_size"):
        PairBatches(pairs, 0, 9, seed=5)


def test_bad_pair_records_and_objective_get_one_line_errors(tmp_path):
    from encoders import wordpiece_tokenizer
    from fmforge.config import PretrainConfig
    from fmforge.errors import ConfigError, DataError
    from fmforge.train.encoder_pretrain import read_pairs
    from fmforge.train.pretrain import pretrain

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"anchor": "a b", "positive": "c"}\n{"anchor": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_pairs(str(bad), wordpiece_tokenizer(), 16)
    cfg = PretrainConfig.from_dict({"data": {"pairs": str(bad)}})
    with pytest.raises(ConfigError, match="contrastive only"):
        pretrain(cfg, tmp_path / "run", objective="mlm")


def test_projection_head_dir_loads_in_automodel_and_sentence_transformers(tmp_path):
    import numpy as np

    import fmforge
    from encoders import SENTENCES, wordpiece_tokenizer
    from fmforge.model.heads import add_projection
    from fmforge.model.load import SentenceSpec, save_encoder_dir

    st = pytest.importorskip("sentence_transformers")
    transformers = pytest.importorskip("transformers")
    tokenizer = wordpiece_tokenizer()
    torch.manual_seed(0)
    model = add_projection(BertModel(tiny_bert_config(tokenizer.vocab_size)), 24).eval()
    with torch.no_grad():  # a non-zero bias, so a test notices if it is dropped
        model.projection.linear.bias.normal_(0, 0.5)
    path = save_encoder_dir(model, tokenizer, tmp_path / "proj", sentence=SentenceSpec(32))
    assert (path / "2_Dense" / "model.safetensors").is_file()
    _, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the head is not in it
    texts = [*SENTENCES, "an unseen sentence with zebra words", "x"]
    expected = st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    got = fmforge.load(path).embed(texts)
    assert got.shape == expected.shape == (len(texts), 24)
    assert np.abs(got - expected).max() <= 1e-5
    again = fmforge.load(path).model.projection.linear.bias
    assert torch.equal(again, model.projection.linear.bias)


def test_contrastive_training_with_a_projection_head(tmp_path):
    from encoders import tiny_embedder_dir
    from fmforge.api import load_encoder
    from fmforge.config import PretrainConfig
    from fmforge.errors import ConfigError
    from fmforge.train.pretrain import pretrain

    base = tiny_embedder_dir(tmp_path / "base")
    settings = {
        "model": {"init_from": str(base), "projection": 16},
        "data": {"pairs": str(_pairs_file(tmp_path / "pairs.jsonl"))},
        "train": {"max_steps": 3, "batch_size": 4, "seq_len": 32, "warmup_steps": 1,
                  "eval_every": 0, "checkpoint_every": 3},
        "runtime": {"device": "cpu", "threads": 1},
    }  # fmt: skip
    threads = torch.get_num_threads()
    try:
        pretrain(PretrainConfig.from_dict(settings), tmp_path / "run", objective="contrastive")
        with pytest.raises(ConfigError, match="already projects to 16"):
            settings["model"] = {"init_from": str(tmp_path / "run" / "final"), "projection": 8}
            pretrain(PretrainConfig.from_dict(settings), tmp_path / "r2", objective="contrastive")
    finally:
        torch.set_num_threads(threads)
    final = load_encoder(tmp_path / "run" / "final")
    assert final.embed(["the river", "the teacher"]).shape == (2, 16)
    assert (tmp_path / "run" / "final" / "2_Dense" / "config.json").is_file()
