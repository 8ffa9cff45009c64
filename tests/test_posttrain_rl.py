"""GRPO and PPO maths: advantages, zero-variance groups, k3 KL, clipping, GAE in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from fmforge.posttrain.rl import GRPOObjective, gae, group_advantages, grpo_token_losses, k3_kl


def test_group_advantages_on_a_fixed_tensor():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    advantages, flat = group_advantages(rewards, eps=1e-4)
    assert flat == 1
    for g, row in enumerate(rewards.tolist()):
        mean = sum(row) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / 3)  # the sample std
        want = [0.0] * 4 if std == 0 else [(r - mean) / (std + 1e-4) for r in row]
        assert advantages[g].tolist() == pytest.approx(want, abs=1e-6)


def test_zero_variance_groups_give_zero_gradient_and_are_counted():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    advantages, flat = group_advantages(rewards)
    assert flat == 1
    logp = torch.tensor([[-1.0, -2.0]] * 6, requires_grad=True)  # (N=6, T=2)
    old = logp.detach() - 0.1
    grpo_token_losses(logp, old, advantages.flatten()).sum().backward()
    assert torch.equal(logp.grad[:3], torch.zeros(3, 2))  # the flat group: exactly zero
    assert (logp.grad[3:].abs() > 0).all()  # the other group learns (so the test can fail)


def test_k3_kl_is_nonnegative_and_zero_at_the_reference():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=g) * 5
    ref = -torch.rand(1000, generator=g) * 5
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1000))
    # Its mean over samples of pi estimates KL(pi || ref): check on a 3-token distribution.
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    draws = torch.multinomial(p, 200_000, replacement=True, generator=g)
    estimate = k3_kl(p.log()[draws], q.log()[draws]).mean().item()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), abs=5e-3)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    logp = torch.tensor([[0.5, -0.5, 0.05]], requires_grad=True)  # ratios e^.5, e^-.5, e^.05
    old = torch.zeros(1, 3)
    loss = grpo_token_losses(logp, old, torch.tensor([1.0]), clip_eps=0.2).sum()
    loss.backward()
    # A > 0: the ratio above 1.2 is clipped (no gradient); below 0.8 the min keeps rho A.
    assert logp.grad[0, 0] == 0
    assert logp.grad[0, 1] == pytest.approx(-math.exp(-0.5))
    assert logp.grad[0, 2] == pytest.approx(-math.exp(0.05))


def test_grpo_objective_sums_completion_tokens():
    class Uniform(torch.nn.Module):
        def forward(self, ids, logits_at):
            return torch.zeros(int(logits_at.sum()), 8, requires_grad=True)

    targets = torch.tensor([[-100, 3, 4, -100], [-100, -100, 5, -100]])
    batch = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "target_ids": targets,
        "old_logps": torch.full((2, 4), -math.log(8)),
        "ref_logps": torch.full((2, 4), -math.log(8)),
        "advantages": torch.tensor([1.0, -2.0]),
    }
    objective = GRPOObjective(kl_coef=0.1)
    summed, count = objective(Uniform(), batch)
    assert int(count) == 3
    assert summed.item() == pytest.approx(-1.0 * 2 + 2.0 * 1, abs=1e-6)  # ratio 1, KL 0
    assert objective.pop_metrics() == {"kl": 0.0, "clip_fraction": 0.0}


def test_grpo_without_old_logps_equals_the_rollout_policy_as_old():
    # GRPORollouts gives no old_logps: the loss's own forward, detached, is the rollout policy's.
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.posttrain.sequences import token_logprobs

    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=64))
    ids = torch.randint(0, 64, (3, 9))
    targets = torch.full((3, 9), -100)
    targets[:, 5:] = ids[:, 5:].roll(-1, dims=1)
    targets[1, 7:] = -100
    batch = {"input_ids": ids, "target_ids": targets, "advantages": torch.tensor([1.0, -0.5, 2.0])}
    with torch.no_grad():
        old = token_logprobs(model(ids), targets)  # the full-vocabulary path
    grads = []
    for given in (dict(batch, old_logps=old), batch):
        model.zero_grad()
        summed, count = GRPOObjective()(model, given)
        summed.backward()
        grads.append(model.lm_head.weight.grad.clone())
        assert int(count) == 3 * 4 - 2
    assert summed.item() == pytest.approx(-(1.0 * 4 - 0.5 * 2 + 2.0 * 4), abs=1e-5)  # ratio 1
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gae_equals_its_closed_form():
    rewards = torch.tensor([0.0, 0.5, -1.0, 2.0])
    values = torch.tensor([0.3, -0.2, 0.7, 0.1, 0.4])  # V(s_0..s_4), s_4 the bootstrap
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, gamma, lam)
    deltas = [rewards[t] + gamma * values[t + 1] - values[t] for t in range(4)]
    for t in range(4):
        want = sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, 4))
        assert advantages[t].item() == pytest.approx(float(want), abs=1e-6)
        assert returns[t].item() == pytest.approx(float(want + values[t]), abs=1e-6)
    # lambda = 1: returns are the discounted rewards-to-go plus the discounted bootstrap.
    _, returns = gae(rewards, values, gamma, 1.0)
    for t in range(4):
        want = (
            sum(gamma ** (k - t) * rewards[k] for k in range(t, 4)) + gamma ** (4 - t) * values[4]
        )
        assert returns[t].item() == pytest.approx(float(want), abs=1e-5)


# --- rollouts through the engine and the Trainer ---------------------------------------------


def _grpo_run(tokenizer_dir, run_dir, reward_fn, steps=4, fail_at=None, resume=False):
    from fmforge.config import TrainSection
    from fmforge.posttrain.preference import Reference
    from fmforge.posttrain.rl import GRPORollouts
    from fmforge.posttrain.sequences import chat_template_of, pad_id_of
    from fmforge.train.trainer import Trainer
    from posttrain_data import arithmetic_records, chat_tokenizer, tiny_lm

    tok = chat_tokenizer(tokenizer_dir, smollm2=False)
    template = chat_template_of(tok)
    records = arithmetic_records(6)
    prompts = [template.render(tok, r["prompt"]) for r in records]
    model = tiny_lm(tok.vocab_size)
    rollouts = GRPORollouts(
        model, tok, prompts, records, reward_fn, group_size=4, prompts_per_step=2,
        max_new_tokens=6, stop_ids=tuple(template.stop_ids(tok)), pad_id=pad_id_of(tok),
        reference=Reference(model, lora=False), seed=1,
    )  # fmt: skip
    if fail_at is not None:
        original, calls = rollouts.next_batch, [0]

        def next_batch():
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError("killed")
            return original()

        rollouts.next_batch = next_batch
    objective = GRPOObjective(kl_coef=0.05)
    cfg = TrainSection(
        max_steps=steps, batch_size=8, warmup_steps=0, eval_every=1, checkpoint_every=2,
        lr=1e-2, log_every=1, weight_decay=0.0,
    )  # fmt: skip
    trainer = Trainer(
        model, cfg, run_dir, rollouts, objective, progress=False,
        eval_fn=lambda m: {**objective.pop_metrics(), **rollouts.pop_metrics()},
    )  # fmt: skip
    trainer.fit(resume=resume)
    return trainer


def _length_reward(text, record):
    return float(len(text))  # varies across a group, so the advantages are not all zero


def test_grpo_killed_and_resumed_continues_with_identical_losses(tokenizer_dir, tmp_path):
    whole = _grpo_run(tokenizer_dir, tmp_path / "a", _length_reward)
    assert all(r["zero_variance_groups"] < 1 for r in whole.history)
    assert whole.history[0]["kl"] == 0.0  # the policy starts at the reference
    assert whole.history[-1]["kl"] > 0.0
    with pytest.raises(RuntimeError, match="killed"):
        _grpo_run(tokenizer_dir, tmp_path / "b", _length_reward, fail_at=3)
    resumed = _grpo_run(tokenizer_dir, tmp_path / "b", _length_reward, resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[2:]]
    assert [r["reward"] for r in resumed.history] == [r["reward"] for r in whole.history[2:]]


def test_reward_functions_that_raise_or_return_nan_count_as_zero(tokenizer_dir, tmp_path):
    def flaky(text, record):
        if len(text) % 3 == 0:
            raise ValueError("bad completion")
        return float("nan") if len(text) % 3 == 1 else 1.0

    trainer = _grpo_run(tokenizer_dir, tmp_path, flaky, steps=2)
    errors = sum(r["reward_errors"] for r in trainer.history)
    assert errors > 0
    assert all(0.0 <= r["reward"] <= 1.0 for r in trainer.history)


def test_builtin_rewards():
    from fmforge.posttrain.rl import compiles, contains_answer, exact_answer

    record = {"prompt": "def f(x):\n", "answer": 12}
    assert exact_answer(" 12\n", record) == 1.0 and exact_answer("12.5", record) == 0.0
    assert contains_answer("the answer is 12.", record) == 1.0
    assert contains_answer("112", record) == 0.0
    assert compiles("    return x\n", record) == 1.0 and compiles("    return (\n", record) == 0.0


def _ppo_setup(tokenizer_dir):
    from fmforge.posttrain.preference import Reference
    from fmforge.posttrain.rl import PolicyWithValue, PPORollouts
    from fmforge.posttrain.sequences import chat_template_of, pad_id_of
    from posttrain_data import arithmetic_records, chat_tokenizer, tiny_lm

    tok = chat_tokenizer(tokenizer_dir, smollm2=False)
    template = chat_template_of(tok)
    records = arithmetic_records(4)
    prompts = [template.render(tok, r["prompt"]) for r in records]
    policy = PolicyWithValue(tiny_lm(tok.vocab_size))
    rollouts = PPORollouts(
        policy, tok, prompts, records, _length_reward, group_size=2, prompts_per_step=2,
        max_new_tokens=5, stop_ids=tuple(template.stop_ids(tok)), pad_id=pad_id_of(tok),
        reference=Reference(policy.lm, lora=False), seed=2, kl_coef=0.05, gamma=1.0, lam=0.9,
    )  # fmt: skip
    return policy, rollouts


def test_ppo_returns_are_gae_of_the_final_reward(tokenizer_dir):
    _, rollouts = _ppo_setup(tokenizer_dir)
    batch = rollouts.next_batch()
    scored = batch["target_ids"] != -100
    # At the start the policy is the reference (no KL penalty) and the value head is 0, so the
    # return of completion token t is lam^(last - t) * R (gamma = 1): GAE's closed form.
    for row, reward in enumerate(rollouts.last_rewards.tolist()):
        positions = scored[row].nonzero().squeeze(1).tolist()
        last = positions[-1]
        for t in positions:
            want = 0.9 ** (last - t) * reward
            assert batch["returns"][row, t].item() == pytest.approx(want, abs=1e-5)
    picked = batch["token_advantages"][scored]
    assert picked.mean().abs().item() < 1e-5  # whitened over the completion tokens
    assert (batch["token_advantages"][~scored] == 0).all()


def test_ppo_trains_the_policy_and_its_value_head(tokenizer_dir, tmp_path):
    from fmforge.config import TrainSection
    from fmforge.posttrain.rl import PPOObjective
    from fmforge.train.trainer import Trainer

    policy, rollouts = _ppo_setup(tokenizer_dir)
    start = policy.value_head.weight.detach().clone()
    cfg = TrainSection(
        max_steps=2, batch_size=4, warmup_steps=0, eval_every=0, checkpoint_every=0, lr=1e-2,
        log_every=1, weight_decay=0.0,
    )  # fmt: skip
    trainer = Trainer(policy, cfg, tmp_path, rollouts, PPOObjective(), progress=False)
    trainer.fit()
    assert all(math.isfinite(r["loss"]) for r in trainer.history)
    assert not torch.equal(policy.value_head.weight, start)


def test_scored_logprobs_equal_the_full_vocabulary_path():
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.posttrain.sequences import scored_logprobs, token_logprobs

    torch.manual_seed(1)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=64))
    ids = torch.randint(0, 64, (2, 7))
    targets = torch.tensor([[-100, -100, 5, 9, 1, -100, -100], [-100, 3, -100, -100, 2, 8, 4]])
    full = token_logprobs(model(ids), targets)
    fast = scored_logprobs(model, ids, targets)
    assert (full != 0).sum() == 7
    assert torch.allclose(fast, full, atol=1e-6)
    assert (fast[targets == -100] == 0).all()
