"""DPO and its variants: ln 2 at step 0, closed forms, a reference that never moves, resume."""

from __future__ import annotations

import math

import pytest
import torch

from fmforge.adapt.lora import apply_lora, lora_parameters
from fmforge.config import TrainSection
from fmforge.errors import DataError
from fmforge.posttrain.preference import (
    LOSSES,
    PreferenceObjective,
    Reference,
    pair_batches,
    read_preferences,
)
from fmforge.posttrain.sequences import chat_template_of, pad_id_of, sequence_logprobs
from fmforge.train.trainer import Trainer
from posttrain_data import arithmetic_records, chat_tokenizer, tiny_lm, write_jsonl


def closed_form(name: str, h: float, beta: float, eps: float = 0.0) -> float:
    """Each variant's per-pair loss written out in plain floats (the oracle)."""
    sig = 1 / (1 + math.exp(-beta * h))
    return {
        "sigmoid": -math.log(sig),
        "cdpo": -(1 - eps) * math.log(sig) - eps * math.log(1 - sig),
        "robust": (-(1 - eps) * math.log(sig) + eps * math.log(1 - sig)) / (1 - 2 * eps),
        "hinge": max(0.0, 1 - beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
    }[name]


@pytest.fixture
def pairs(tokenizer_dir, tmp_path):
    tok = chat_tokenizer(tokenizer_dir, smollm2=False)
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, arithmetic_records(16))
    return tok, read_preferences(path, tok, chat_template_of(tok))


@pytest.mark.parametrize("lora", [False, True])
def test_step_zero_loss_is_ln2_with_zero_margins(pairs, lora):
    tok, encoded = pairs
    model = tiny_lm(tok.vocab_size)
    if lora:
        apply_lora(model, r=4)
    objective = PreferenceObjective(Reference(model, lora=lora))
    batch = pair_batches(encoded, 8, pad_id_of(tok)).next_batch()
    with torch.no_grad():
        summed, n = objective(model, batch)
    assert n == 8
    assert abs(summed.item() / n - math.log(2)) <= 1e-6
    metrics = objective.pop_metrics()
    assert metrics["reward_margin"] == 0.0
    assert metrics["reward_chosen"] == 0.0 and metrics["reward_accuracy"] == 0.0


def test_sequence_logprobs_sum_only_response_tokens(pairs):
    tok, encoded = pairs
    batch = pair_batches(encoded, 4, pad_id_of(tok)).next_batch()

    class Uniform(torch.nn.Module):
        def forward(self, ids, logits_at):
            return torch.zeros(int(logits_at.sum()), 512)  # log p = -ln 512 for every token

    scored = (batch["target_ids"] != -100).sum(-1)  # response tokens + end-of-turn per row
    expected = -scored.double() * math.log(512)
    got = sequence_logprobs(Uniform(), batch).double()
    assert torch.allclose(got, expected, atol=1e-5)
    # Only the answer and <|im_end|> are scored: chosen "17" has far fewer than the whole row.
    assert (scored < batch["attention_mask"].sum(-1) // 2).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_variant_equals_its_closed_form(name):
    # Hand-made summed log-probs: policy chosen/rejected and reference chosen/rejected.
    f64 = torch.float64
    policy_c, policy_r = (
        torch.tensor([-3.0, -5.0, -7.5], dtype=f64),
        torch.tensor([-4.0, -2.0, -7.5], dtype=f64),
    )
    ref_c, ref_r = (
        torch.tensor([-3.5, -4.5, -6.0], dtype=f64),
        torch.tensor([-3.75, -2.5, -9.0], dtype=f64),
    )
    h = (policy_c - ref_c) - (policy_r - ref_r)  # [0.75, -1.0, -3.0]
    assert h.tolist() == [0.75, -1.0, -3.0]
    beta, eps = 0.5, 0.2
    got = LOSSES[name](h, beta, eps)
    want = [closed_form(name, v, beta, eps) for v in (0.75, -1.0, -3.0)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_ln2_at_zero_for_the_logistic_variants():
    zero = torch.zeros(1, dtype=torch.float64)
    for name in ("sigmoid", "cdpo", "robust"):
        assert LOSSES[name](zero, 0.1, 0.2).item() == pytest.approx(math.log(2), abs=1e-12)


def _train(model, objective, encoded, pad_id, run_dir, steps=4, fail_at=None, resume=False):
    cfg = TrainSection(
        max_steps=steps, batch_size=4, warmup_steps=0, eval_every=1, checkpoint_every=2,
        lr=5e-3, log_every=1, weight_decay=0.0,
    )  # fmt: skip
    batches = pair_batches(encoded, 4, pad_id, seed=3)
    if fail_at is not None:
        original, calls = batches.next_batch, [0]

        def next_batch():
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError("killed")
            return original()

        batches.next_batch = next_batch
    trainer = Trainer(
        model, cfg, run_dir, batches, objective,
        eval_fn=lambda m: objective.pop_metrics(), progress=False,
        trainable=lora_parameters(model) or None,
    )  # fmt: skip
    trainer.fit(resume=resume)
    return trainer


@pytest.mark.parametrize("lora", [False, True])
def test_reference_stays_bit_identical_while_the_policy_learns(pairs, lora, tmp_path):
    tok, encoded = pairs
    model = tiny_lm(tok.vocab_size)
    if lora:
        apply_lora(model, r=4)
    reference = Reference(model, lora=lora)
    ref_model = reference.copy if not lora else model
    frozen = {n: p.detach().clone() for n, p in ref_model.named_parameters() if ".lora_" not in n}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    objective = PreferenceObjective(reference)
    trainer = _train(model, objective, encoded, pad_id_of(tok), tmp_path, steps=4)
    for n, p in ref_model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    if lora:
        assert moved and all(".lora_" in n for n in moved)
        assert any(".lora_B." in n for n in moved)
    else:
        assert len(moved) == len(start)
    losses = [r["loss"] for r in trainer.history]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0]
    assert trainer.history[-1]["reward_margin"] > 0


def test_killed_and_resumed_dpo_continues_with_identical_losses(pairs, tmp_path):
    tok, encoded = pairs
    pad = pad_id_of(tok)
    model = tiny_lm(tok.vocab_size)
    whole = _train(
        model, PreferenceObjective(Reference(model, False)), encoded, pad, tmp_path / "a"
    )
    model = tiny_lm(tok.vocab_size)
    objective = PreferenceObjective(Reference(model, False))
    with pytest.raises(RuntimeError, match="killed"):
        _train(model, objective, encoded, pad, tmp_path / "b", fail_at=3)  # after step 2
    model = tiny_lm(tok.vocab_size)  # a fresh process: base weights, reference from them
    resumed = _train(
        model, PreferenceObjective(Reference(model, False)), encoded, pad, tmp_path / "b",
        resume=True,
    )  # fmt: skip
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[2:]]


def test_missing_field_is_a_one_line_error(tokenizer_dir, tmp_path):
    tok = chat_tokenizer(tokenizer_dir, smollm2=False)
    path = tmp_path / "bad.jsonl"
    records = arithmetic_records(2)
    del records[1]["rejected"]
    write_jsonl(path, records)
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing field 'rejected'") as e:
        read_preferences(path, tok, chat_template_of(tok))
    assert "\n" not in str(e.value)


def test_precomputed_reference_logprobs_replace_the_reference_pass(pairs, tmp_path):
    tok, encoded = pairs
    pad = pad_id_of(tok)
    model = tiny_lm(tok.vocab_size)
    reference = Reference(model, lora=False)
    cache = reference.precompute(model, encoded, pad, batch_size=5)
    assert len(cache) == 2 * len(encoded)
    batch = pair_batches(encoded, 8, pad, reference_cache=cache).next_batch()
    live = reference.logprobs(model, batch)
    assert torch.allclose(batch["ref_logps"], live, atol=1e-5)

    class Unused(Reference):
        def logprobs(self, policy, batch):
            raise AssertionError("the reference pass ran although log-probs were cached")

    objective = PreferenceObjective(Unused(model, lora=True))
    with torch.no_grad():
        summed, n = objective(model, batch)
    assert abs(summed.item() / n - math.log(2)) <= 1e-6
