"""`fmforge adapt recommend`: pick a method from the task's size and its distance from the base.

Distance is measured, not guessed: the base model's perplexity on the task's text divided by its
perplexity on its own validation data (from the model dir's provenance). A ratio near 1 means the
task reads like what the model was trained on; a large ratio means new ground. With a
`compare` results.json for the same base and task, the measured winner at the nearest
examples-per-class decides and the heuristics only explain.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fmforge.data.tasks import load_task
from fmforge.errors import UserError


@torch.no_grad()
def text_nll(loaded, texts: list[str], max_tokens: int = 128) -> float:
    """Return the mean next-token loss (nats) of the model on `texts`."""
    total, count = 0.0, 0
    for text in texts:
        ids = loaded.tokenizer.encode(text)[:max_tokens]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        logits = loaded.model(x[:, :-1])
        total += F.cross_entropy(logits[0].float(), x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return total / max(count, 1)


def reference_nll(loaded) -> float | None:
    """Return the model's loss on its own validation split, when its provenance names one."""
    shards = (loaded.provenance.get("data") or {}).get("shards")
    if not shards or not Path(shards).is_dir():
        return None
    from fmforge.data.pack import TokenShards
    from fmforge.train.pretrain import evaluate_loss

    val = TokenShards.open(shards).split("val")
    seq_len = min(256, loaded.config.max_position_embeddings)
    loss, _ = evaluate_loss(loaded.model, val, 8, seq_len, max_batches=4)
    return loss


def recommend(
    base: str, task_name: str, examples_per_class: int | None = None, results: str | None = None
) -> dict[str, Any]:
    """Return {method, reason, measurements} for adapting `base` to the task."""
    import fmforge

    task = load_task(task_name, examples_per_class)
    per_class = min(sum(e.label == label for e in task.train) for label in task.labels)
    loaded = fmforge.load(base)
    sample = [e.text for e in task.train[:200]]
    task_ppl = math.exp(text_nll(loaded, sample))
    ref = reference_nll(loaded)
    ratio = task_ppl / math.exp(ref) if ref is not None else None
    similar = ratio is not None and ratio < 2.0
    distance = (
        f"task perplexity {task_ppl:.1f} is {ratio:.1f}x the model's own validation perplexity"
        if ratio is not None
        else f"task perplexity {task_ppl:.1f} (no validation data recorded for this base)"
    )
    if per_class <= 16:
        method = "pet" if similar or ratio is None else "linear-probe"
        why = (
            f"{per_class} examples per class is few: reuse what the model knows through label "
            "words (pet trains a small adapter on several cloze patterns)"
            if method == "pet"
            else f"{per_class} examples per class is few and the text is far from the "
            "pretraining data: a linear probe cannot overfit much"
        )
    elif per_class <= 128 or similar:
        method = "lora"
        why = (
            f"{per_class} examples per class: enough to train a low-rank adapter, which keeps "
            "the base frozen and small to store"
        )
    else:
        method = "full"
        why = f"{per_class} examples per class and distant text: update every parameter"
    measured = None
    if results:
        measured = _measured_winner(results, per_class)
        if measured is not None:
            method = measured["method"]
            why = (
                f"measured by compare: {method} scored {measured['accuracy']:.3f} at "
                f"{measured['examples_per_class']} examples per class, the best there; " + why
            )
    return {
        "method": method,
        "reason": f"{why}; {distance}",
        "examples_per_class": per_class,
        "task_perplexity": round(task_ppl, 2),
        "perplexity_ratio": round(ratio, 3) if ratio is not None else None,
        "measured": measured,
    }


def _measured_winner(results: str, per_class: int) -> dict | None:
    path = Path(results)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{results}: no results.json from `fmforge adapt compare`")
    rows = [r for r in json.loads(path.read_text(encoding="utf-8"))["rows"] if r.get("method")]
    sizes = sorted({r["examples_per_class"] for r in rows if r["examples_per_class"]})
    if not sizes:
        return None
    nearest = min(sizes, key=lambda k: abs(math.log(k) - math.log(max(per_class, 1))))
    candidates = [r for r in rows if r["examples_per_class"] == nearest]
    return max(candidates, key=lambda r: r["accuracy"])
