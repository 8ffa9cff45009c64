"""Prompt ensembles: average the label distributions of several patterns or k-shot prompts.

Averaging probabilities (not picking a vote) keeps each member's confidence; an ensemble is
usually at least as accurate as its average member, because members err on different inputs.
"""

from __future__ import annotations

import torch

from fmforge.adapt.classifier import PATTERNS, accuracy
from fmforge.adapt.icl import icl_probs
from fmforge.data.tasks import Example, Task


def average_distributions(member_probs: list[torch.Tensor]) -> torch.Tensor:
    """Return the mean of member class distributions, each (N, L)."""
    return torch.stack(member_probs).mean(0)


def ensemble_probs(
    loaded,
    task: Task,
    examples: list[Example],
    shots: int,
    n_patterns: int,
    seed: int = 0,
    max_text_tokens: int = 96,
    batch_size: int = 16,
) -> tuple[torch.Tensor, list[dict]]:
    """Return (ensemble probabilities (N, L), per-member pattern/shots/accuracy rows).

    Member i uses PATTERNS[i] and its own seeded draw of `shots` demonstrations.
    """
    labels = [task.label_index(e.label) for e in examples]
    members, rows = [], []
    for i, pattern in enumerate(PATTERNS[:n_patterns]):
        probs, used = icl_probs(
            loaded, task, examples, shots, pattern, seed + i, max_text_tokens, batch_size
        )
        members.append(probs)
        rows.append({"pattern": pattern, "shots": used, "accuracy": accuracy(probs, labels)})
    return average_distributions(members), rows
