"""Pattern-Exploiting Training (Schick & Schuetze 2021) for causal language models.

The task is rephrased as a cloze by several patterns; a verbalizer maps each label to a word; the
model is trained on the verbalizer-token loss (cross-entropy over the label words' log-likelihood
after the pattern). Here the trained parameters are a LoRA adapter shared by all patterns, so the
base model does not change (PET's original recipe fine-tunes every weight, one model per pattern,
then distils their ensemble; parameter-efficient PET keeps one base and one small adapter).
Prediction averages the label distributions of all patterns.
"""

from __future__ import annotations

import torch

from fmforge.adapt.classifier import Encoded, encode, predict_proba
from fmforge.data.tasks import Example, Task


def multi_pattern_data(
    tokenizer, task: Task, examples: list[Example], patterns: list[str], max_text_tokens: int
) -> Encoded:
    """Return every example rendered by every pattern (the PET training set)."""
    ids, labels = [], []
    for pattern in patterns:
        data = encode(tokenizer, task, examples, pattern, max_text_tokens)
        ids += data.ids
        labels += data.labels
    return Encoded(ids, labels)


def pattern_ensemble_probs(
    classifier,
    tokenizer,
    task: Task,
    examples: list[Example],
    patterns: list[str],
    max_text_tokens: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """Return class probabilities (N, L) averaged over `patterns`."""
    probs = [
        predict_proba(classifier, encode(tokenizer, task, examples, p, max_text_tokens), batch_size)
        for p in patterns
    ]
    return torch.stack(probs).mean(0)
