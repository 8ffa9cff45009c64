"""Golden first-step losses of every objective: a silent change in any of them fails here.

Each case builds a tiny seeded model and a fixed batch, then records the per-target loss before
the first optimizer step (summed loss / scored) and after one step of the Trainer (lr 1e-2). The
values were produced by this code; a change that moves them must say why and update them.
"""

from __future__ import annotations

import pytest
import torch

from fmforge.config import TrainSection
from fmforge.model.config import preset_config
from fmforge.model.llama import LlamaForCausalLM
from fmforge.train.objectives import causal_lm_loss, classification_loss, input_tokens
from fmforge.train.trainer import Trainer


class OneBatch:
    """The same batch forever; resumable trivially."""

    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _causal_case():
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny"))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (4, 32), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, :5] = -100  # a masked prefix, as SFT prompts are
    return model, (x, y), causal_lm_loss


def _classification_case():
    from fmforge.adapt.classifier import HeadClassifier

    torch.manual_seed(0)
    lm = LlamaForCausalLM(preset_config("tiny"))
    model = HeadClassifier(lm, num_labels=3)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 512, (4, 12), generator=g)
    lengths = torch.tensor([12, 9, 5, 7])
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    batch = {"input_ids": ids, "lengths": lengths, "labels": torch.tensor([0, 2, 1, 2])}
    return model, batch, classification_loss


def _dpo_case():
    from fmforge.posttrain.preference import PreferenceObjective, Reference
    from fmforge.posttrain.sequences import pad_sequences

    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny"))
    g = torch.Generator().manual_seed(3)
    rows = []
    for n, start in ((14, 6), (9, 4), (12, 8), (7, 3)):  # 2 pairs: chosen rows, rejected rows
        ids = torch.randint(1, 512, (n,), generator=g).tolist()
        rows.append((ids, [-100] * start + ids[start:]))  # the response starts at `start`
    batch = pad_sequences(rows, pad_id=0)
    return model, batch, PreferenceObjective(Reference(model, lora=False))


def _encoder_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 512, (4, 16), generator=g)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 11:] = 0  # a padded row
    ids[1, 11:] = 0
    return ids, mask, g


def _tiny_bert(config_cls, presets):
    # Dropout off: CPU dropout masks depend on the thread count, golden values must not.
    return config_cls(
        vocab_size=512,
        max_position_embeddings=64,
        **{**presets["tiny"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    )


def _masked_lm_case():
    from fmforge.model.bert import BERT_PRESETS, BertConfig
    from fmforge.model.heads import BertForMaskedLM
    from fmforge.train.objectives import mask_tokens, masked_lm_loss

    torch.manual_seed(0)
    model = BertForMaskedLM(_tiny_bert(BertConfig, BERT_PRESETS))
    ids, mask, g = _encoder_batch(4)
    inputs, labels = mask_tokens(ids, mask, {0, 1, 2, 3}, 4, 512, g, probability=0.3)
    return model, {"input_ids": inputs, "attention_mask": mask, "labels": labels}, masked_lm_loss


def _info_nce_case():
    from fmforge.model.bert import BERT_PRESETS, BertConfig
    from fmforge.model.heads import BertForMaskedLM
    from fmforge.train.objectives import info_nce_loss

    torch.manual_seed(0)
    model = BertForMaskedLM(_tiny_bert(BertConfig, BERT_PRESETS))
    ids, mask, _ = _encoder_batch(5)
    return model, {"input_ids": ids, "attention_mask": mask}, info_nce_loss


def _sft_case():
    from fmforge.posttrain.sft import collate, pack, sft_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny"))
    g = torch.Generator().manual_seed(4)
    examples = []
    for n, start in ((10, 4), (7, 5), (12, 3), (6, 2)):  # assistant targets from `start` on
        ids = torch.randint(1, 512, (n,), generator=g).tolist()
        examples.append((ids, [-100] * start + ids[start:]))
    batch = collate(pack(examples, seq_len=20), pad_id=0)  # 2 rows of 2 packed examples
    return model, batch, sft_loss


def _reward_case():
    from fmforge.posttrain.reward import RewardModel, RewardObjective, collate_pairs

    torch.manual_seed(0)
    model = RewardModel(LlamaForCausalLM(preset_config("tiny")))
    g = torch.Generator().manual_seed(5)
    pairs = []
    for n, m in ((9, 6), (5, 11)):  # chosen and rejected lengths
        chosen = torch.randint(1, 512, (n,), generator=g).tolist()
        rejected = torch.randint(1, 512, (m,), generator=g).tolist()
        pairs.append((chosen, rejected, 0.0))
    return model, collate_pairs(pairs, pad_id=0), RewardObjective()


CASES = {
    "causal_lm": _causal_case,
    "classification": _classification_case,
    "dpo": _dpo_case,
    "sft": _sft_case,
    "reward": _reward_case,
    "masked_lm": _masked_lm_case,
    "info_nce": _info_nce_case,
}

# objective -> (loss before the first step, loss after it), nats per scored target.
GOLDEN = {
    "causal_lm": (6.2407684, 5.6228547),
    "classification": (1.0651900, 0.5224066),
    "dpo": (0.6931472, 0.3773170),  # ln 2 before: the policy is its own reference
    "sft": (6.2026549, 5.3835071),  # 2 rows of 2 packed examples, assistant targets only
    "reward": (0.6931472, 0.4677106),  # ln 2 before: the head starts at zero
    "masked_lm": (6.2402763, 5.3939304),
    "info_nce": (0.5810660, 0.0000001),  # one step at lr 1e-2 separates the 4 sentences
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_first_step_loss(name, tmp_path):
    model, batch, objective = CASES[name]()
    with torch.no_grad():
        summed, scored = objective(model, batch)
    before = summed.item() / int(scored)
    cfg = TrainSection(
        max_steps=1, batch_size=1, warmup_steps=0, eval_every=0, checkpoint_every=0, lr=1e-2
    )
    trainer = Trainer(model, cfg, tmp_path, OneBatch(batch), objective, progress=False)
    trainer.fit()
    with torch.no_grad():
        summed, scored = objective(model, batch)
    after = summed.item() / int(scored)
    golden_before, golden_after = GOLDEN[name]
    assert before == pytest.approx(golden_before, abs=1e-5)
    assert after == pytest.approx(golden_after, abs=1e-5)
    assert trainer.history[0]["loss"] == pytest.approx(golden_before, abs=1e-5)


def test_objectives_return_summed_loss_and_scored_count():
    model, (x, y), objective = _causal_case()
    summed, scored = objective(model, (x, y))
    assert int(scored) == 4 * (32 - 5)
    with torch.no_grad():
        logits = model(x)
        mean = torch.nn.functional.cross_entropy(logits.view(-1, 512), y.reshape(-1))
    assert summed.item() == pytest.approx(mean.item() * int(scored), rel=1e-5)
    assert input_tokens((x, y)) == 4 * 32
    _, batch, _ = _classification_case()
    assert input_tokens(batch) == 12 + 9 + 5 + 7


def test_fused_head_loss_equals_cross_entropy_of_the_logits(monkeypatch):
    """causal_lm_loss's chunked head + loss (`_LinearCrossEntropy`) gives the loss and every
    gradient of cross-entropy over the full logits, with ignored targets and a ragged last chunk."""
    import torch.nn.functional as F

    from fmforge.train import objectives

    monkeypatch.setattr(objectives, "HEAD_CHUNK_ROWS", 7)  # 120 rows: 17 chunks, the last of 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny"))
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 512, (3, 40), generator=g)
    y = torch.randint(0, 512, (3, 40), generator=g)
    y[0, :5] = -100
    y[2, 33:] = -100
    assert objectives._fused_head(model)
    loss, scored = causal_lm_loss(model, (x, y))
    loss.backward()
    fused = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = F.cross_entropy(model(x).view(-1, 512), y.view(-1), reduction="sum")
    reference.backward()
    assert int(scored) == 3 * 40 - 5 - 7
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for ours, theirs in zip(fused, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    assert any(grad.abs().sum() > 0 for grad in fused)


def test_fused_head_loss_only_for_a_bare_fp32_model_in_training():
    torch.manual_seed(0)
    from fmforge.train.objectives import _fused_head

    model = LlamaForCausalLM(preset_config("tiny"))
    assert _fused_head(model)
    with torch.no_grad():
        assert not _fused_head(model)  # evaluation: logits path, no gradients computed
    assert not _fused_head(torch.nn.Sequential(model))  # a wrapper runs its own forward
    assert not _fused_head(LlamaForCausalLM(preset_config("tiny")).to(torch.bfloat16))
