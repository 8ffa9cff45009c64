"""Reward model: Bradley-Terry closed form, held-out accuracy on a rule, an HF dir that loads."""

from __future__ import annotations

import math

import pytest
import torch

from fmforge.config import TrainSection
from fmforge.posttrain.reward import (
    RewardModel,
    RewardObjective,
    bradley_terry,
    collate_pairs,
    load_reward_model,
    pairwise_accuracy,
    read_reward_pairs,
    reward_batches,
    save_reward_model,
)
from fmforge.posttrain.sequences import chat_template_of, pad_id_of
from fmforge.train.trainer import Trainer
from posttrain_data import chat_tokenizer, tiny_lm, write_jsonl

GOOD = ["alpha", "gamma", "value", "total"]
BAD = ["beta", "delta", "count", "index"]


def rule_records(n, seed):
    """Chat pairs: an answer of GOOD words beats an answer of BAD words (the rule)."""
    g = torch.Generator().manual_seed(seed)

    def words(pool):
        return " ".join(pool[int(i)] for i in torch.randint(0, 4, (2,), generator=g))

    records = []
    for _ in range(n):
        prompt = [
            {"role": "user", "content": f"say {int(torch.randint(0, 99, (1,), generator=g))}"}
        ]
        records.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": words(GOOD)}],
                "rejected": [{"role": "assistant", "content": words(BAD)}],
            }
        )
    return records


def test_bradley_terry_equals_its_closed_form():
    chosen = torch.tensor([1.5, -0.25, 0.0], dtype=torch.float64)
    rejected = torch.tensor([0.5, 0.75, 0.0], dtype=torch.float64)
    margin = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    got = bradley_terry(chosen, rejected, margin, centring=0.01).tolist()
    want = []
    for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist()):
        want.append(math.log(1 + math.exp(-(c - r - m))) + 0.01 * (c + r) ** 2)
    assert got == pytest.approx(want, abs=1e-12)
    assert bradley_terry(chosen[2:], rejected[2:], None, 0.0).item() == pytest.approx(math.log(2))


@pytest.fixture(scope="module")
def trained(tokenizer_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    tok = chat_tokenizer(tokenizer_dir, smollm2=False)
    template = chat_template_of(tok)
    write_jsonl(tmp / "train.jsonl", rule_records(64, seed=1))
    write_jsonl(tmp / "heldout.jsonl", rule_records(40, seed=2))
    train = read_reward_pairs(tmp / "train.jsonl", tok, template)
    heldout = read_reward_pairs(tmp / "heldout.jsonl", tok, template)
    torch.manual_seed(0)
    model = RewardModel(tiny_lm(tok.vocab_size))
    pad = pad_id_of(tok)
    before = pairwise_accuracy(model, heldout, pad)
    cfg = TrainSection(
        max_steps=12, batch_size=8, warmup_steps=2, eval_every=0, checkpoint_every=0, lr=3e-3,
        log_every=5,
    )  # fmt: skip
    objective = RewardObjective(centring=0.01)
    Trainer(model, cfg, tmp / "run", reward_batches(train, 8, pad), objective, progress=False).fit()
    after = pairwise_accuracy(model, heldout, pad)
    return model, tok, heldout, before, after, tmp


def test_heldout_pairwise_accuracy_from_a_rule(trained):
    _, _, heldout, before, after, _ = trained
    assert len(heldout) == 40
    print(f"held-out pairwise accuracy {before:.3f} -> {after:.3f}")
    assert after >= 0.8, (before, after)
    assert before == 0.0  # a zero head ties every pair


def test_saved_dir_loads_in_transformers_with_equal_scores(trained):
    transformers = pytest.importorskip("transformers")
    model, tok, heldout, _, _, tmp = trained
    out = save_reward_model(model, tok, tmp / "rm")
    batch = collate_pairs(heldout[:6], pad_id_of(tok))
    model.eval()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["lengths"])
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert type(hf).__name__ == "LlamaForSequenceClassification"
        assert hf.config.num_labels == 1
        theirs = hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.squeeze(-1)
        reloaded, _ = load_reward_model(out)
        again = reloaded(batch["input_ids"], batch["lengths"])
    assert (batch["lengths"] < batch["input_ids"].shape[1]).any()  # padding was exercised
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
    assert torch.equal(ours, again)
