"""Pure functions on next-token logits: penalties, bias, temperature, top-k, top-p, sampling.

Every function takes logits (B, V) and returns new logits (B, V) or token ids (B,); none keeps
state. `SamplingParams` bundles the knobs and `sample_next` applies them in the usual order
(penalties -> bias -> temperature -> top-k -> top-p -> min-p -> draw), as vLLM and HF
transformers do.
Notation: B batch, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fmforge.errors import UserError


@dataclass
class SamplingParams:
    """How the next token is chosen; the defaults are greedy decoding."""

    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits are divided by it
    top_k: int | None = None  # keep the k most likely tokens (and any tied with the k-th)
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI style: subtract once for each token already output
    frequency_penalty: float = 0.0  # OpenAI style: subtract per occurrence in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added logit

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        """Return True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Return True when token counts are needed (any penalty is on)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Return the argmax token ids (B,) of logits (B, V)."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return logits / temperature (temperature > 0)."""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Return logits with everything below the k-th largest value set to -inf.

    Tokens tied with the k-th value are all kept, so the result never depends on how the sort
    breaks ties (it may keep more than k tokens).
    """
    if k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Return logits keeping the smallest most-likely set whose total probability is >= p.

    The most likely token is always kept; tokens tied with the last kept one are kept too.
    """
    if p >= 1.0:
        return logits
    sorted_logits, _ = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    # Probability mass strictly before each sorted position; keep positions that start below p.
    mass_before = probs.cumsum(dim=-1) - probs
    keep = mass_before < p
    keep[..., 0] = True
    n_keep = keep.sum(dim=-1, keepdim=True)  # (B, 1)
    threshold = sorted_logits.gather(-1, n_keep - 1)  # (B, 1): the smallest kept logit
    return logits.masked_fill(logits < threshold, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Return logits keeping tokens whose probability is >= min_p times the largest one.

    In log space: logit >= max_logit + log(min_p); the most likely token is always kept.
    """
    if min_p <= 0.0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """Return logits with bias[token] added to each listed token's logit."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    logits = logits.clone()
    logits[:, ids] += values
    return logits


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    output_counts: torch.Tensor,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> torch.Tensor:
    """Return penalised logits.

    seen bool (B, V): tokens in the prompt or output (repetition penalty: positive logits are
    divided by it, negative ones multiplied). output_counts (B, V): occurrences in the output
    (presence: minus presence_penalty if > 0; frequency: minus frequency_penalty * count).
    """
    if repetition_penalty != 1.0:
        penalised = torch.where(
            logits > 0, logits / repetition_penalty, logits * repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if presence_penalty != 0.0 or frequency_penalty != 0.0:
        counts = output_counts.to(logits.dtype)
        logits = logits - presence_penalty * (counts > 0).to(logits.dtype)
        logits = logits - frequency_penalty * counts
    return logits


def sample_from_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Return token ids (B,) drawn from softmax(logits); `generator` makes it reproducible."""
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the next token ids (B,) for logits (B, V) under `params`."""
    if params.uses_penalties:
        if seen is None or output_counts is None:
            raise ValueError("penalties need `seen` and `output_counts`")
        logits = apply_penalties(
            logits,
            seen,
            output_counts,
            params.repetition_penalty,
            params.presence_penalty,
            params.frequency_penalty,
        )
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.greedy:
        return greedy(logits)
    logits = apply_temperature(logits, params.temperature)
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p is not None:
        logits = min_p_filter(logits, params.min_p)
    return sample_from_logits(logits, generator)
