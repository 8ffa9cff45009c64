"""In-context learning: zero-, one- and k-shot prompts, classified by label-word log-likelihood.

A k-shot prompt is k demonstrations from the train split (seeded, round-robin over labels), each
"<pattern filled with the text> <label word>", then the test input in the same pattern. The
demonstrations are the same for every test input, so their keys/values are computed once per batch
(`VerbalizerClassifier.prefix_ids`). Demonstrations that do not fit the context are dropped.
"""

from __future__ import annotations

import torch

from fmforge.adapt.classifier import (
    Encoded,
    VerbalizerClassifier,
    choose_demonstrations,
    encode,
    label_token_ids,
    predict_proba,
    render_ids,
)
from fmforge.data.tasks import Example, Task

MAX_DEMO_TOKENS = 48  # each demonstration's text is cut to this many tokens


def demonstration_prefix(
    tokenizer, task: Task, demos: list[Example], pattern: str, max_tokens: int
) -> tuple[list[int], int]:
    """Return (ids of the demonstrations that fit in `max_tokens`, how many fit)."""
    separator = tokenizer.encode("\n\n")
    prefix: list[int] = []
    used = 0
    for demo in demos:
        ids = render_ids(tokenizer, pattern, demo.text, MAX_DEMO_TOKENS)
        ids += tokenizer.encode(" " + task.verbalizer[demo.label]) + separator
        if len(prefix) + len(ids) > max_tokens:
            break
        prefix += ids
        used += 1
    return prefix, used


def icl_probs(
    loaded,
    task: Task,
    examples: list[Example],
    shots: int,
    pattern: str,
    seed: int = 0,
    max_text_tokens: int = 96,
    batch_size: int = 16,
) -> tuple[torch.Tensor, int]:
    """Return (class probabilities (N, L) for `examples`, demonstrations that fit the context)."""
    tokenizer = loaded.tokenizer
    data = encode(tokenizer, task, examples, pattern, max_text_tokens)
    label_ids = label_token_ids(tokenizer, task)
    classifier = VerbalizerClassifier(loaded.model, label_ids)
    context = loaded.config.max_position_embeddings
    room = context - max(len(x) for x in data.ids) - max(len(x) for x in label_ids)
    demos = choose_demonstrations(task.train, shots, task.labels, seed) if shots else []
    prefix, used = demonstration_prefix(tokenizer, task, demos, pattern, room)
    classifier.prefix_ids = prefix or None
    classifier.to(next(loaded.model.parameters()).device)
    return predict_proba(classifier, Encoded(data.ids, data.labels), batch_size), used
