"""Reinforcement-learning maths: GRPO's group advantages and clipped objective, the k3 KL
estimator, and PPO's generalised advantage estimation (GAE).

GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1): sample n completions per prompt, score each with a
reward function, and use the group-normalised reward as every token's advantage:

    A_i = (r_i - mean(r)) / (std(r) + eps)        std: the sample (n-1) standard deviation, as TRL

A group whose rewards are all equal carries no signal: its advantages are exactly 0, so its
policy gradient is exactly 0; such groups are counted (`zero_variance_groups`) and logged, which is
why a GRPO loss can read 0 while learning is fine or stalled. Per token t of completion i, with
ratio rho = pi(t) / pi_old(t):

    loss_t = -min(rho A_i, clip(rho, 1 - eps_clip, 1 + eps_clip) A_i) + beta * KL_t

KL_t is Schulman's k3 estimator of KL(pi || ref) from samples of pi:
exp(ref - logp) - (ref - logp) - 1, which is >= 0 for every sample and exactly 0 where pi = ref.
Normalisation is token-level (DAPO, Yu et al. 2025; TRL's loss_type="dapo"): the loss is summed
over every completion token and divided by the window's total, through the Trainer's contract,
so long completions are not down-weighted as the paper's per-sequence mean does.

PPO's GAE (Schulman et al. 2016, eq. 16): delta_t = r_t + gamma V_{t+1} - V_t and
A_t = sum_l (gamma lambda)^l delta_{t+l}, computed backwards; returns (value targets) = A + V.

Notation: G groups (prompts), n completions per group, N = G n sequences, T tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fmforge.posttrain.sequences import token_logprobs
from fmforge.train.objectives import IGNORE_INDEX


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, int]:
    """Return ((G, n) advantages (r - mean) / (std + eps) per group, zero-variance group count).

    rewards: (G, n) one row per prompt. A group with equal rewards gets advantages exactly 0.
    """
    rewards = rewards.double()
    mean = rewards.mean(dim=1, keepdim=True)  # (G, 1)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    flat = (rewards == rewards[:, :1]).all(dim=1)  # (G,) no variance in the group
    advantages = ((rewards - mean) / (std + eps)).masked_fill(flat.unsqueeze(1), 0.0)
    return advantages.float(), int(flat.sum())


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Return the per-token k3 estimate of KL(pi || ref): exp(d) - d - 1 with d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the per-token clipped-surrogate loss (+ beta * k3 KL), shape (N, T).

    logp, old_logp, ref_logp: (N, T) log-probs of the sampled tokens; advantages (N,).
    """
    ratio = torch.exp(logp - old_logp)  # (N, T)
    a = advantages.unsqueeze(1)  # (N, 1): every token of a completion shares its advantage
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    loss = -surrogate
    if kl_coef and ref_logp is not None:
        loss = loss + kl_coef * k3_kl(logp, ref_logp)
    return loss


class GRPOObjective:
    """GRPO on rollout batches: (loss summed over completion tokens, completion tokens).

    batch: input_ids (N, T), target_ids (N, T) (-100 outside completions), advantages (N,),
    old_logps (N, T) and optionally ref_logps (N, T), both aligned with target_ids.
    """

    def __init__(self, clip_eps: float = 0.2, kl_coef: float = 0.0):
        self.clip_eps, self.kl_coef = clip_eps, kl_coef
        self._stats = torch.zeros(3, dtype=torch.float64)  # kl sum, clipped tokens, tokens

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        scored = batch["target_ids"] != IGNORE_INDEX  # (N, T)
        logp = token_logprobs(model(batch["input_ids"]), batch["target_ids"])  # (N, T)
        ref = batch.get("ref_logps")
        losses = grpo_token_losses(
            logp, batch["old_logps"], batch["advantages"], self.clip_eps, self.kl_coef, ref
        )
        with torch.no_grad():
            ratio = torch.exp(logp - batch["old_logps"])
            clipped = ((ratio - 1).abs() > self.clip_eps) & scored
            kl = k3_kl(logp, ref)[scored].sum() if ref is not None else torch.zeros(())
            self._stats += torch.tensor(
                [float(kl), float(clipped.sum()), float(scored.sum())], dtype=torch.float64
            )
        return (losses * scored).sum(), scored.sum()

    def pop_metrics(self) -> dict[str, float]:
        """Return the mean k3 KL per token and the clipped share since the last call."""
        kl, clipped, tokens = self._stats.tolist()
        self._stats.zero_()
        return {} if tokens == 0 else {"kl": kl / tokens, "clip_fraction": clipped / tokens}


def gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (advantages, returns), each (..., T), by generalised advantage estimation.

    rewards (..., T); values (..., T + 1): V(s_0..s_T), the last the bootstrap value of the state
    after the final step (0 when the episode ended there).
    """
    steps = rewards.shape[-1]
    deltas = rewards + gamma * values[..., 1:] - values[..., :-1]  # (..., T)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(steps)):
        running = deltas[..., t] + gamma * lam * running
        advantages[..., t] = running
    return advantages, advantages + values[..., :-1]
