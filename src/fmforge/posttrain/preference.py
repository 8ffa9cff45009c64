"""Direct preference optimisation (DPO) and its variants, as an objective for the one Trainer.

Each example is a (prompt, chosen, rejected) triple. With log pi(y|x) summed over the response
tokens only (the prompt and padding are never scored), the policy and the frozen reference give

    h = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)]

and the variants are per-pair losses of h (beta > 0, smoothing eps in [0, 0.5)):

- sigmoid: -log sigma(beta h). Rafailov et al. 2023, "Direct Preference Optimization", eq. 7.
- cdpo: -(1-eps) log sigma(beta h) - eps log sigma(-beta h). Mitchell 2023, "A note on DPO with
  noisy preferences" (conservative DPO: smoothed labels; TRL's `label_smoothing`).
- robust: [-(1-eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps). Chowdhury et al.
  2024, "Provably Robust DPO", eq. 9 (unbiased when labels flip with rate eps).
- hinge: max(0, 1 - beta h). Zhao et al. 2023, SLiC-HF's calibration loss (margin 1/beta, scaled).
- ipo: (h - 1/(2 beta))^2. Azar et al. 2023, "A General Theoretical Paradigm to Understand
  Learning from Human Preferences", eq. 17 with tau = beta.

The anchors disagree on IPO: the paper uses summed sequence log-probs (used here); TRL averages them
over tokens. Every variant gives h = 0 when the policy equals the reference; sigmoid's loss is then
exactly ln 2 and cdpo's too (robust's is ln 2 as well, since its eps terms cancel to (1-2eps) ln 2).

The reference is the frozen base: under LoRA the same model with its adapters switched off
(scaling 0, so the base path runs unchanged), otherwise a frozen deep copy made before training.
Logged per window: implicit rewards beta * (log pi - log ref) of chosen and rejected responses,
their margin and the share of pairs whose chosen reward is higher (accuracy).

Notation: B pairs per micro-batch; a batch holds 2B rows, the B chosen then the B rejected.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fmforge.errors import ConfigError, DataError
from fmforge.posttrain.sequences import (
    ShuffledBatches,
    encode_conversation,
    encode_text_pair,
    pad_sequences,
    read_jsonl,
    sequence_logprobs,
)

DEFAULT_BETA = 0.1


def sigmoid_loss(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    return -F.logsigmoid(beta * h)


def cdpo_loss(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def robust_loss(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def hinge_loss(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    return torch.relu(1 - beta * h)


def ipo_loss(h: torch.Tensor, beta: float, eps: float = 0.0) -> torch.Tensor:
    return (h - 1 / (2 * beta)) ** 2


# name -> per-pair loss of the log-ratio difference h (B,) -> (B,); see the module docstring.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base inside the block: every LoRA update is scaled by 0, then restored."""
    from fmforge.adapt.lora import lora_modules

    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise ConfigError("a merged LoRA model has no separate base to use as the reference")
    saved = [m.scaling for m in modules]
    try:
        for m in modules:
            m.scaling = 0.0
        yield
    finally:
        for m, scaling in zip(modules, saved):
            m.scaling = scaling


class Reference:
    """The frozen reference policy: `policy` with adapters off (LoRA) or a frozen copy of it."""

    def __init__(self, policy: nn.Module, lora: bool):
        self.copy: nn.Module | None = None
        if not lora:
            self.copy = copy.deepcopy(policy).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    def logprobs(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the reference's summed response log-probs of each row, (2B,), without grad."""
        with torch.no_grad():
            if self.copy is not None:
                self.copy.to(batch["input_ids"].device)
                return sequence_logprobs(self.copy, batch)
            with adapters_disabled(policy):
                return sequence_logprobs(policy, batch)

    def precompute(
        self, policy: nn.Module, pairs: list[tuple], pad_id: int, batch_size: int = 8
    ) -> dict[str, float]:
        """Return the reference log-prob of every response, keyed by the content hash of its
        (ids, targets), computed once before training in fixed batches (so a resumed run gets the
        same values); `pair_batches(..., reference_cache=...)` then skips the reference pass."""
        device = next(policy.parameters()).device
        rows = [row for pair in pairs for row in pair]
        cache: dict[str, float] = {}
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = {k: v.to(device) for k, v in pad_sequences(chunk, pad_id).items()}
            for row, value in zip(chunk, self.logprobs(policy, batch).tolist()):
                cache[content_hash(row)] = value
        return cache


def content_hash(row: tuple[list[int], list[int]]) -> str:
    """Return the sha256 of a sequence's ids and targets (the key of cached reference log-probs)."""
    import hashlib

    ids, targets = row
    return hashlib.sha256(json.dumps([ids, targets]).encode()).hexdigest()


class PreferenceObjective:
    """DPO-family objective: (summed per-pair loss, pairs); implicit-reward stats accumulate."""

    def __init__(
        self,
        reference: Reference,
        beta: float = DEFAULT_BETA,
        loss: str = "sigmoid",
        label_smoothing: float = 0.0,
    ):
        if loss not in LOSSES:
            raise ConfigError(f"--loss {loss!r} is unknown (choose from {', '.join(LOSSES)})")
        if beta <= 0:
            raise ConfigError(f"--beta must be > 0, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
        self.reference, self.beta, self.loss = reference, beta, loss
        self.label_smoothing = label_smoothing
        self._stats = torch.zeros(4, dtype=torch.float64)  # chosen, rejected, correct, pairs

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, int]:
        policy = sequence_logprobs(model, batch)  # (2B,)
        ref = batch.get("ref_logps")  # (2B,) precomputed and cached, or computed now
        if ref is None:
            ref = self.reference.logprobs(model, batch)
        b = policy.shape[0] // 2
        ratios = policy - ref  # (2B,): log pi - log ref per response
        h = ratios[:b] - ratios[b:]  # (B,)
        losses = LOSSES[self.loss](h, self.beta, self.label_smoothing)
        rewards = self.beta * ratios.detach()
        chosen, rejected = rewards[:b], rewards[b:]
        self._stats += torch.tensor(
            [chosen.sum(), rejected.sum(), (chosen > rejected).sum(), b], dtype=torch.float64
        )
        return losses.sum(), b

    def pop_metrics(self) -> dict[str, float]:
        """Return mean implicit rewards, margin and accuracy since the last call, and reset."""
        chosen, rejected, correct, pairs = self._stats.tolist()
        self._stats.zero_()
        if pairs == 0:
            return {}
        return {
            "reward_chosen": chosen / pairs,
            "reward_rejected": rejected / pairs,
            "reward_margin": (chosen - rejected) / pairs,
            "reward_accuracy": correct / pairs,
        }


# --- data ---------------------------------------------------------------------------------------

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def _as_messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value:
        return value
    raise DataError(f"{where} must be a string or a non-empty list of messages")


def encode_preference(
    tokenizer: Any, template: Any, record: dict[str, Any], where: str = "record"
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """Return ((ids, targets) chosen, (ids, targets) rejected); only the responses are targets.

    A record is fmforge's DPO export: `prompt` a message list (chat) or a string (completion),
    `chosen`/`rejected` a message list ending with the assistant answer, or a string.
    """
    for key in PREFERENCE_FIELDS:
        if key not in record:
            raise DataError(
                f"{where}: missing field {key!r} (each record needs prompt, chosen, rejected)"
            )
    prompt = record["prompt"]
    if isinstance(prompt, str) and isinstance(record["chosen"], str):
        if not isinstance(record["rejected"], str):
            raise DataError(f"{where}: rejected must be a string like chosen")
        return (
            encode_text_pair(tokenizer, prompt, record["chosen"]),
            encode_text_pair(tokenizer, prompt, record["rejected"]),
        )
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: prompt must be a string or a non-empty list of messages")
    try:
        pair = tuple(
            encode_conversation(
                tokenizer, template, prompt + _as_messages(record[key], f"{where}: {key}"), True
            )
            for key in ("chosen", "rejected")
        )
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    for key, (_, targets) in zip(("chosen", "rejected"), pair):
        if all(t < 0 for t in targets):
            raise DataError(f"{where}: {key} does not end with an assistant turn")
    return pair  # type: ignore[return-value]


def read_preferences(path: Any, tokenizer: Any, template: Any, max_tokens: int = 0) -> list[tuple]:
    """Return the encoded (chosen, rejected) pairs of a JSONL preference file.

    max_tokens > 0 cuts each sequence to its first max_tokens tokens (a pair whose responses are
    cut away entirely is an error, not a silent skip).
    """
    pairs = []
    for number, record in read_jsonl(path):
        chosen, rejected = encode_preference(tokenizer, template, record, f"{path}:{number}")
        if max_tokens:
            chosen = (chosen[0][:max_tokens], chosen[1][:max_tokens])
            rejected = (rejected[0][:max_tokens], rejected[1][:max_tokens])
            if all(t < 0 for t in chosen[1][1:]) or all(t < 0 for t in rejected[1][1:]):
                raise DataError(
                    f"{path}:{number}: the response starts after --max-tokens {max_tokens}"
                )
        pairs.append((chosen, rejected))
    return pairs


def pair_batches(
    pairs: list[tuple],
    batch_size: int,
    pad_id: int,
    seed: int = 0,
    reference_cache: dict[str, float] | None = None,
) -> Any:
    """Return resumable seeded batches of preference pairs: (2B, T), the B chosen rows first.

    With `reference_cache` (from `Reference.precompute`) each batch carries `ref_logps` (2B,).
    """
    if not pairs:
        raise DataError("no preference pairs to train on")

    def make_batch(picked: list[tuple]) -> dict[str, torch.Tensor]:
        rows = [c for c, _ in picked] + [r for _, r in picked]
        batch = pad_sequences(rows, pad_id)
        if reference_cache is not None:
            batch["ref_logps"] = torch.tensor([reference_cache[content_hash(r)] for r in rows])
        return batch

    seq_len = max(max(len(c[0]), len(r[0])) for c, r in pairs)
    return ShuffledBatches(pairs, batch_size, make_batch, seed, seq_len)
