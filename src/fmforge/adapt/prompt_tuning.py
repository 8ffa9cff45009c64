"""Prompt tuning (Lester et al. 2021): n trainable virtual tokens before a frozen model's input.

The soft prompt is the only trainable tensor; it starts from the embeddings of real tokens (the
task's label words, cycled), which trains faster than random vectors. Saved in PEFT's
prompt-tuning layout: `adapter_model.safetensors` with the key `prompt_embeddings` (n, C).
"""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    """Prepends `num_tokens` learned embeddings: (B, T, C) -> (B, n + T, C)."""

    def __init__(self, num_tokens: int, hidden_size: int, init: torch.Tensor | None = None):
        super().__init__()
        self.num_tokens = num_tokens
        weight = torch.randn(num_tokens, hidden_size) * 0.02 if init is None else init.clone()
        self.embeddings = nn.Parameter(weight)  # (n, C)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        prompt = self.embeddings.to(embeds.dtype).expand(embeds.shape[0], -1, -1)  # (B, n, C)
        return torch.cat([prompt, embeds], dim=1)


def soft_prompt_from_tokens(lm: nn.Module, num_tokens: int, token_ids: list[int]) -> SoftPrompt:
    """Return a soft prompt initialised from the embeddings of `token_ids` (cycled to n)."""
    weight = lm.model.embed_tokens.weight.detach()
    ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(num_tokens)])
    return SoftPrompt(num_tokens, weight.shape[1], weight[ids.to(weight.device)].cpu())
