"""Training objectives: each maps (model, batch) to (mean loss, tokens counted)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_lm_loss(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Next-token prediction: cross-entropy of logits(x) against y = x shifted by one.

    batch: x, y int64 (B, T). Positions where y == -100 are ignored (loss masks).
    """
    x, y = batch
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(
        logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100
    )
    return loss, int(y.numel())
