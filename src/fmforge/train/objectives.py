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


def classification_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """Cross-entropy over class scores (a head's logits or label-word log-likelihoods).

    batch: input_ids (B, T) right-padded, lengths (B,), labels (B,) class indices. The model maps
    (input_ids, lengths) to scores (B, L); for label words this is PET's verbalizer-token loss.
    """
    scores = model(batch["input_ids"], batch["lengths"])  # (B, L)
    loss = F.cross_entropy(scores.float(), batch["labels"])
    return loss, int(batch["lengths"].sum())
