"""Method recipes: each is a transformation of a copy of the base plus the shared objective/loop.

| method | transformation | scores | trains |
|---|---|---|---|
| majority | none | the most frequent train label | nothing |
| full | + linear head | head on the last token | every parameter |
| freeze | + linear head | head | the top k blocks + final norm + head |
| linear-probe | + linear head | head | the head |
| lora | LoRA on target linears | label-word log-likelihood | the LoRA matrices |
| prompt-tuning | soft prompt | label-word log-likelihood | n virtual tokens |
| pet | LoRA | label words, several patterns | the LoRA matrices |
| icl | none | label words after k demonstrations | nothing |
| ensemble | none | label words, averaged over patterns | nothing |
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fmforge.adapt import METHODS
from fmforge.adapt.classifier import (
    PATTERNS,
    HeadClassifier,
    VerbalizerClassifier,
    accuracy,
    encode,
    label_token_ids,
    predict_proba,
)
from fmforge.adapt.freeze import (
    count_parameters,
    freeze_all,
    trainable_parameters,
    unfreeze_top_blocks,
)
from fmforge.adapt.training import METHOD_LR, AdaptOptions, Measure, train_classifier
from fmforge.data.tasks import Task
from fmforge.errors import UserError

TRAINED = ("full", "freeze", "linear-probe", "lora", "prompt-tuning", "pet")


@dataclass
class MethodRun:
    """What one method produced: the results row and what `save_adapted` needs."""

    row: dict[str, Any]
    classifier: nn.Module | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_method(method: str) -> None:
    """Raise UserError for an unknown method name, suggesting the closest."""
    if method not in METHODS:
        import difflib

        close = difflib.get_close_matches(method, METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown method {method!r}: choose one of {METHODS}{hint}")


def build_classifier(method: str, lm: nn.Module, task: Task, tokenizer, options: AdaptOptions):
    """Return (classifier, trainable parameters) for a trained method, applied to `lm` in place."""
    from fmforge.adapt.lora import apply_lora, lora_parameters
    from fmforge.adapt.prompt_tuning import soft_prompt_from_tokens

    label_ids = label_token_ids(tokenizer, task)
    if method in ("full", "freeze", "linear-probe"):
        classifier = HeadClassifier(lm, len(task.labels))
        if method != "full":
            freeze_all(lm)
        if method == "freeze":
            unfreeze_top_blocks(lm, options.top_blocks)
        return classifier, trainable_parameters(classifier)
    if method in ("lora", "pet"):
        apply_lora(lm, options.targets, options.rank, options.alpha, options.dropout)
        return VerbalizerClassifier(lm, label_ids), lora_parameters(lm)
    if method == "prompt-tuning":
        if options.virtual_tokens < 1:
            raise UserError(f"--virtual-tokens must be >= 1, got {options.virtual_tokens}")
        freeze_all(lm)
        words = [i for ids in label_ids for i in ids]
        soft_prompt = soft_prompt_from_tokens(lm, options.virtual_tokens, words)
        classifier = VerbalizerClassifier(lm, label_ids, soft_prompt)
        return classifier, [soft_prompt.embeddings]
    raise UserError(f"method {method!r} does not train")


def run_method(
    method: str,
    loaded,
    task: Task,
    options: AdaptOptions,
    run_dir: str | None = None,
) -> MethodRun:
    """Adapt (a copy of) `loaded` to `task` with `method`; evaluate on the test split."""
    check_method(method)
    torch.manual_seed(options.seed)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{loaded.source}: the model dir has no tokenizer.json")
    test_labels = [task.label_index(e.label) for e in task.test]
    per_class = task.provenance.get("examples_per_class")
    row: dict[str, Any] = {
        "method": method,
        "examples_per_class": per_class,
        "trainable_params": 0,
        "train_seconds": 0.0,
    }
    extra: dict[str, Any] = {}
    classifier = None
    if method == "majority":
        with Measure() as measure:
            majority = Counter(e.label for e in task.train).most_common(1)[0][0]
        row["accuracy"] = sum(e.label == majority for e in task.test) / len(task.test)
        extra["label"] = majority
    elif method == "icl":
        from fmforge.adapt.icl import icl_probs

        with Measure() as measure:
            probs, used = icl_probs(
                loaded,
                task,
                task.test,
                options.shots,
                PATTERNS[0],
                options.seed,
                options.max_text_tokens,
                options.eval_batch_size,
            )
        row.update(accuracy=accuracy(probs, test_labels), shots=used)
    elif method == "ensemble":
        from fmforge.adapt.ensemble import ensemble_probs

        with Measure() as measure:
            probs, members = ensemble_probs(
                loaded,
                task,
                task.test,
                options.shots,
                options.patterns,
                options.seed,
                options.max_text_tokens,
                options.eval_batch_size,
            )
        row.update(accuracy=accuracy(probs, test_labels), shots=options.shots)
        row["member_accuracies"] = [m["accuracy"] for m in members]
        row["mean_member_accuracy"] = round(sum(row["member_accuracies"]) / len(members), 6)
        extra["members"] = members
    else:
        classifier, row, extra, measure = _run_trained(method, loaded, task, options, row, run_dir)
    row["peak_memory_mb"] = round(measure.peak_memory_mb, 1)
    row["accuracy"] = round(row["accuracy"], 4)
    return MethodRun(row, classifier, extra)


def _run_trained(method, loaded, task, options, row, run_dir):
    from fmforge.adapt.pet import multi_pattern_data, pattern_ensemble_probs

    tokenizer = loaded.tokenizer
    patterns = PATTERNS[: max(1, options.patterns)] if method == "pet" else PATTERNS[:1]
    with Measure() as measure:
        lm = copy.deepcopy(loaded.model)
        classifier, trainable = build_classifier(method, lm, task, tokenizer, options)
        if method == "pet":
            data = multi_pattern_data(
                tokenizer, task, task.train, patterns, options.max_text_tokens
            )
        else:
            data = encode(tokenizer, task, task.train, patterns[0], options.max_text_tokens)
        lr = options.lr or METHOD_LR[method]
        with tempfile.TemporaryDirectory(prefix="fmforge-adapt-") as tmp:
            summary = train_classifier(classifier, trainable, data, options, lr, run_dir or tmp)
    if method == "pet":
        probs = pattern_ensemble_probs(
            classifier,
            tokenizer,
            task,
            task.test,
            patterns,
            options.max_text_tokens,
            options.eval_batch_size,
        )
    else:
        test = encode(tokenizer, task, task.test, patterns[0], options.max_text_tokens)
        probs = predict_proba(classifier, test, options.eval_batch_size)
    row.update(
        accuracy=accuracy(probs, [task.label_index(e.label) for e in task.test]),
        trainable_params=count_parameters(trainable),
        train_seconds=round(measure.seconds, 2),
        steps=summary["steps"],
        final_loss=round(summary["final_loss"], 4),
        lr=lr,
    )
    extra = {"patterns": patterns, "history": summary["history"], "lr": lr}
    return classifier, row, extra, measure
