"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(
    model: nn.Module, weight_decay: float, trainable: Iterable[nn.Parameter] | None = None
) -> list[dict]:
    """Split trainable parameters: matrices decay; norms, biases and embeddings do not."""
    allowed = None if trainable is None else {id(p) for p in trainable}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen or (allowed is not None and id(p) not in allowed):
            continue
        seen.add(id(p))
        is_embedding = "embed" in name or "wte" in name
        (decay if p.ndim >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    trainable: Iterable[nn.Parameter] | None = None,
    fused: bool = False,
) -> torch.optim.AdamW:
    """Return AdamW over the trainable parameters (fused on CUDA)."""
    groups = [g for g in param_groups(model, weight_decay, trainable) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
