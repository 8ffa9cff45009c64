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

from fmforge.posttrain.sequences import scored_logprobs, token_logprobs
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
    optionally ref_logps (N, T) and old_logps (N, T), aligned with target_ids. Without old_logps
    the rollout policy is the policy being trained (one gradient pass per rollout batch, as
    `GRPORollouts` gives: the weights do not change between sampling and this loss), so the
    ratio's denominator is the same forward's log-probs, detached: ratio 1, the plain policy
    gradient, with no second forward.
    """

    def __init__(self, clip_eps: float = 0.2, kl_coef: float = 0.0):
        self.clip_eps, self.kl_coef = clip_eps, kl_coef
        self._stats = torch.zeros(3, dtype=torch.float64)  # kl sum, clipped tokens, tokens

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        scored = batch["target_ids"] != IGNORE_INDEX  # (N, T)
        logp = scored_logprobs(model, batch["input_ids"], batch["target_ids"])  # (N, T)
        ref = batch.get("ref_logps")
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        losses = grpo_token_losses(logp, old, batch["advantages"], self.clip_eps, self.kl_coef, ref)
        with torch.no_grad():
            ratio = torch.exp(logp - old)
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


# --- GRPO rollouts: the batch source ------------------------------------------------------------


def exact_answer(completion: str, record: dict[str, Any]) -> float:
    """Strict reward: 1 when the completion, stripped, is exactly the record's `answer`."""
    return float(completion.strip() == str(record["answer"]).strip())


def contains_answer(completion: str, record: dict[str, Any]) -> float:
    """Lenient reward: 1 when the record's `answer` appears in the completion as a whole word."""
    import re

    answer = re.escape(str(record["answer"]).strip())
    return float(re.search(rf"(?<![\w.]){answer}(?![\w])", completion) is not None)


def compiles(completion: str, record: dict[str, Any]) -> float:
    """Code reward: 1 when the prompt's code plus the completion compiles as Python."""
    prefix = record.get("prompt") if isinstance(record.get("prompt"), str) else ""
    try:
        compile(prefix + completion, "<completion>", "exec")
    except (SyntaxError, ValueError):
        return 0.0
    return 1.0


REWARD_FUNCTIONS = {"exact": exact_answer, "lenient": contains_answer, "compiles": compiles}


def reward_function(name: str) -> Any:
    """Return a built-in reward function by name, or `module:function` imported from the path."""
    from fmforge.errors import ConfigError

    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, _, fn_name = name.partition(":")
    if not fn_name:
        raise ConfigError(
            f"--reward {name!r} is neither a built-in ({', '.join(REWARD_FUNCTIONS)}) "
            "nor module:function"
        )
    import importlib

    try:
        return getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--reward {name!r} cannot be imported ({e})") from e


class GRPORollouts:
    """A resumable batch source that samples GRPO rollouts from the current policy.

    Each batch takes `prompts_per_step` prompts (seeded order, reshuffled every epoch), samples
    `group_size` completions of each with the generation engine (`generate_tokens`, batched; the
    seed of a batch depends only on the run seed and its index, so a resumed run samples exactly
    what an uninterrupted one would), scores them with `reward_fn(completion_text, record)`, and
    returns the token batch with group advantages and the reference's log-probs (ref_logps, when
    a reference is given); the rollout policy's own log-probs are the loss's forward, detached
    (`GRPOObjective`). A reward function that raises or
    returns a non-finite value gives 0 for that completion and is counted (`reward_errors`).
    """

    def __init__(
        self,
        policy: nn.Module,
        tokenizer: Any,
        prompts: list[list[int]],
        records: list[dict[str, Any]],
        reward_fn: Any,
        group_size: int = 4,
        prompts_per_step: int = 2,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        stop_ids: tuple[int, ...] = (),
        pad_id: int = 0,
        reference: Any = None,
        seed: int = 0,
    ):
        from fmforge.posttrain.sequences import ShuffledBatches

        self.policy, self.tokenizer, self.records = policy, tokenizer, records
        self.reward_fn, self.group_size, self.max_new_tokens = reward_fn, group_size, max_new_tokens
        self.temperature, self.stop_ids, self.pad_id = temperature, tuple(stop_ids), pad_id
        self.reference, self.seed = reference, seed
        self.order = ShuffledBatches(list(range(len(prompts))), prompts_per_step, list, seed)
        self.prompts = prompts
        self.calls = 0
        self.seq_len = max(len(p) for p in prompts) + max_new_tokens
        self._stats = torch.zeros(5, dtype=torch.float64)  # reward sum, n, flat, groups, errors
        self.samples: list[dict[str, Any]] = []
        self.last_rewards = torch.zeros(0)

    def _reward(self, text: str, record: dict[str, Any]) -> tuple[float, bool]:
        try:
            value = float(self.reward_fn(text, record))
        except Exception:  # a user's reward function: any failure is counted, never fatal
            return 0.0, True
        if not torch.isfinite(torch.tensor(value)):
            return 0.0, True
        return value, False

    def next_batch(self) -> dict[str, torch.Tensor]:
        from fmforge.generate.engine import generate_tokens
        from fmforge.generate.sampling import SamplingParams
        from fmforge.posttrain.sequences import pad_sequences

        picked = self.order.next_batch()  # prompt indices
        self.calls += 1
        prompts = [self.prompts[i] for i in picked for _ in range(self.group_size)]
        generations = generate_tokens(
            self.policy,
            prompts,
            self.max_new_tokens,
            SamplingParams(temperature=self.temperature),
            self.stop_ids,
            seed=self.seed * 1_000_003 + self.calls * 10_007,
        )
        rows, rewards, errors = [], [], 0
        for k, (prompt, gen) in enumerate(zip(prompts, generations)):
            record = self.records[picked[k // self.group_size]]
            value, failed = self._reward(self.tokenizer.decode(gen.tokens), record)
            rewards.append(value)
            errors += failed
            completion = gen.tokens + (
                list(self.stop_ids[:1]) if gen.finish_reason == "stop" else []
            )
            if not completion:  # nothing sampled: score the end token so the row has a target
                completion = list(self.stop_ids[:1]) or [self.pad_id]
            rows.append((prompt + completion, [IGNORE_INDEX] * len(prompt) + completion))
        batch = pad_sequences(rows, self.pad_id)
        self.last_rewards = torch.tensor(rewards)  # (N,) for recipes that shape them (PPO)
        grouped = self.last_rewards.view(len(picked), self.group_size)  # (G, n)
        advantages, flat = group_advantages(grouped)
        batch["advantages"] = advantages.flatten()
        if self.reference is not None:
            with torch.no_grad():
                batch["ref_logps"] = _reference_token_logprobs(self.reference, self.policy, batch)
        self._stats += torch.tensor(
            [sum(rewards), len(rewards), flat, len(picked), errors], dtype=torch.float64
        )
        first = generations[0].tokens
        sample = {
            "batch": self.calls,
            "reward": rewards[0],
            "completion": self.tokenizer.decode(first),
        }
        self.samples = [*self.samples[-4:], sample]  # the last five, for the report
        return batch

    def pop_metrics(self) -> dict[str, float]:
        """Return mean reward, the share of zero-variance groups and reward errors since the last
        call."""
        total, n, flat, groups, errors = self._stats.tolist()
        self._stats.zero_()
        if n == 0:
            return {}
        return {"reward": total / n, "zero_variance_groups": flat / groups, "reward_errors": errors}

    def state_dict(self) -> dict[str, int]:
        return {"calls": self.calls, **self.order.state_dict()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]
        self.order.load_state_dict({"epoch": state["epoch"], "position": state["position"]})


def _reference_token_logprobs(reference: Any, policy: nn.Module, batch: dict) -> torch.Tensor:
    # Per-token log-probs of the reference (posttrain/preference.py's Reference: a frozen copy,
    # or the policy with its adapters switched off).
    from fmforge.posttrain.preference import adapters_disabled

    if reference.copy is not None:
        return scored_logprobs(reference.copy, batch["input_ids"], batch["target_ids"])
    with adapters_disabled(policy):
        return scored_logprobs(policy, batch["input_ids"], batch["target_ids"])


# --- PPO: a value head, per-token rewards and GAE ----------------------------------------------


class PolicyWithValue(nn.Module):
    """A decoder with a value head (hidden -> 1, zero-initialised) on every position.

    forward(ids) gives logits (B, T, V) like the decoder; forward(ids, with_values=True) gives
    (logits, values (B, T)) from one pass. Rollouts sample from `.lm`, the decoder itself.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.value_head = nn.Linear(lm.config.hidden_size, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)

    def forward(self, input_ids: torch.Tensor, with_values: bool = False) -> Any:
        hidden = self.lm(input_ids, return_hidden=True)  # (B, T, C)
        logits = self.lm.lm_head(hidden)  # (B, T, V)
        if not with_values:
            return logits
        return logits, self.value_head(hidden).squeeze(-1).float()  # (B, T)


class PPORollouts(GRPORollouts):
    """GRPO's rollouts, shaped for PPO: per-token rewards, values, GAE advantages and returns.

    Each completion token t gets reward -kl_coef * (log pi_old(t) - log ref(t)) (the per-token KL
    penalty of InstructGPT), and its last token also gets the sequence's reward. GAE runs over
    the completion with the rollout values (terminal value 0); advantages are whitened over the
    batch's completion tokens. `policy` is the PolicyWithValue; sampling uses its decoder.
    """

    def __init__(self, policy: PolicyWithValue, *args: Any, kl_coef: float = 0.05,
                 gamma: float = 1.0, lam: float = 0.95, **kwargs: Any):  # fmt: skip
        super().__init__(policy.lm, *args, **kwargs)
        self.value_model, self.kl_coef, self.gamma, self.lam = policy, kl_coef, gamma, lam

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = super().next_batch()
        scored = batch["target_ids"] != IGNORE_INDEX  # (N, T), one contiguous run per row
        with torch.no_grad():  # the rollout policy's log-probs and values, from one pass
            logits, values = self.value_model(batch["input_ids"], with_values=True)  # (N, T)
            batch["old_logps"] = token_logprobs(logits, batch["target_ids"])
        values = values * scored
        rewards = torch.zeros_like(values)
        if "ref_logps" in batch:
            rewards = -self.kl_coef * (batch["old_logps"] - batch["ref_logps"]) * scored
        last = scored.long().cumsum(1).argmax(1)  # (N,) the last completion position
        rows = torch.arange(len(last))
        rewards[rows, last] += self.last_rewards.to(rewards.dtype)
        extended = torch.cat([values, torch.zeros_like(values[:, :1])], dim=1)  # (N, T + 1)
        advantages, returns = gae(rewards, extended, self.gamma, self.lam)
        picked = advantages[scored]
        advantages = (advantages - picked.mean()) / (picked.std() + 1e-8) * scored
        batch.update(token_advantages=advantages, returns=returns, old_values=values)
        return batch


class PPOObjective:
    """PPO's clipped surrogate per token plus vf_coef times the clipped value loss.

    batch: input_ids, target_ids, old_logps, token_advantages, returns, old_values (N, T).
    Returns (loss summed over completion tokens, completion tokens).
    """

    def __init__(self, clip_eps: float = 0.2, vf_coef: float = 0.1, value_clip: float = 0.2):
        self.clip_eps, self.vf_coef, self.value_clip = clip_eps, vf_coef, value_clip

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        scored = batch["target_ids"] != IGNORE_INDEX  # (N, T)
        logits, values = model(batch["input_ids"], with_values=True)
        logp = token_logprobs(logits, batch["target_ids"])  # (N, T)
        ratio = torch.exp(logp - batch["old_logps"])
        a = batch["token_advantages"]
        policy = -torch.minimum(ratio * a, ratio.clamp(1 - self.clip_eps, 1 + self.clip_eps) * a)
        old, target = batch["old_values"], batch["returns"]
        clipped = old + (values - old).clamp(-self.value_clip, self.value_clip)
        value = 0.5 * torch.maximum((values - target) ** 2, (clipped - target) ** 2)
        return ((policy + self.vf_coef * value) * scored).sum(), scored.sum()
