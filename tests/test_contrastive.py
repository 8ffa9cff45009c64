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
