"""Partial fine-tuning as model surgery: choose which parameters train, freeze the rest.

How much to unfreeze depends on the data: with few examples, or a task close to the pretraining
data, the top blocks (or only a head: a linear probe) suffice; with more data or a distant task,
more of the network has to move.
"""

from __future__ import annotations

from torch import nn

from fmforge.errors import UserError


def freeze_all(model: nn.Module) -> None:
    """Set requires_grad=False on every parameter of `model`."""
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze_top_blocks(lm: nn.Module, k: int) -> list[str]:
    """Unfreeze the top `k` decoder blocks and the final norm of a Llama model; return names."""
    layers = lm.model.layers
    if not 0 <= k <= len(layers):
        raise UserError(f"--top-blocks must be in [0, {len(layers)}] for this model, got {k}")
    names = []
    for index in range(len(layers) - k, len(layers)):
        for name, p in layers[index].named_parameters():
            p.requires_grad_(True)
            names.append(f"model.layers.{index}.{name}")
    if k:
        lm.model.norm.weight.requires_grad_(True)
        names.append("model.norm.weight")
    return names


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the parameters that require grad, each once (tied weights are shared)."""
    seen, params = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def count_parameters(params: list[nn.Parameter]) -> int:
    """Return the number of scalars in `params`."""
    return sum(p.numel() for p in params)
