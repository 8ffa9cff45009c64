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
        def forward(self, ids):
            return torch.zeros(*ids.shape, 8, requires_grad=True)

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
