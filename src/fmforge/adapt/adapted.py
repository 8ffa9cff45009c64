"""`fmforge adapt METHOD` and `fmforge eval`: write an adapted model/adapter dir, read it back.

An adapted dir always holds `adapt.json` (method, base, base fingerprint, task, labels,
verbalizer, patterns, options, test metrics); besides it, each method writes and reads its own
files (`Method.save`/`Method.load` in adapt/methods.py: a model dir and a head, a PEFT adapter,
or nothing for a prompt or a rule).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fmforge.adapt.classifier import PATTERNS, label_token_ids
from fmforge.adapt.lora import base_fingerprint
from fmforge.adapt.methods import MethodRun, get_method, run_method
from fmforge.adapt.options import AdaptOptions
from fmforge.artifacts import atomic_dir, check_output_dir, write_json_atomic
from fmforge.data.tasks import Task, load_task
from fmforge.errors import UserError


def adapt(
    method: str,
    base: str,
    task_name: str,
    out: str | Path,
    options: AdaptOptions,
    examples_per_class: int | None = None,
    verbalizer: dict[str, str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Adapt `base` to the task with `method`, write the adapted dir, return its results row."""
    import fmforge

    get_method(method)
    check_output_dir(out, overwrite)
    task = load_task(task_name, examples_per_class, options.seed, verbalizer)
    if options.threads:
        torch.set_num_threads(options.threads)
    loaded = fmforge.load(base)
    run = run_method(method, loaded, task, options)
    save_adapted(run, out, loaded, base, task, options, overwrite)
    return run.row


def save_adapted(
    run: MethodRun, out, loaded, base: str, task: Task, options: AdaptOptions, overwrite: bool
) -> Path:
    """Write the adapted dir for a finished `run` atomically."""
    method = get_method(run.row["method"])
    fingerprint = base_fingerprint(loaded.model, loaded.tokenizer)
    meta = {
        "method": method.name,
        "base": base,
        "base_fingerprint": fingerprint,
        "task": task.name,
        "labels": task.labels,
        "verbalizer": task.verbalizer,
        "patterns": run.extra.get("patterns", [PATTERNS[0]]),
        "options": asdict(options),
        "results": run.row,
        **method.meta(run),
    }
    with atomic_dir(out, overwrite) as tmp:
        method.save(run, tmp, loaded, base, fingerprint, task)
        if run.extra.get("history"):
            lines = "".join(json.dumps(r) + "\n" for r in run.extra["history"])
            (tmp / "metrics.jsonl").write_text(lines, encoding="utf-8")
        write_json_atomic(tmp / "adapt.json", meta)
    return Path(out)


def load_adapted(directory: str | Path, base: str | None = None):
    """Return (classifier or None, adapt.json dict, loaded base) for an adapted dir."""
    import fmforge

    directory = Path(directory)
    meta_file = directory / "adapt.json"
    if not meta_file.is_file():
        raise UserError(f"{directory}: no adapt.json; not a dir written by `fmforge adapt`")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    method = get_method(meta["method"])
    if method.model_in_dir():
        loaded = fmforge.load(str(directory / "model"))
    else:
        loaded = fmforge.load(base or meta["base"])
        fingerprint = base_fingerprint(loaded.model, loaded.tokenizer)
        if fingerprint != meta["base_fingerprint"]:
            raise UserError(
                f"{directory}: adapted from a different base model than {base or meta['base']} "
                f"(fingerprint {meta['base_fingerprint']} != {fingerprint}); pass the original "
                "base with --base"
            )
    task_like = Task(meta["task"], meta["labels"], [], [], [], meta["verbalizer"])
    classifier = method.load(directory, meta, loaded, label_token_ids(loaded.tokenizer, task_like))
    if classifier is not None:
        classifier.eval()
    return classifier, meta, loaded


def evaluate(
    model: str,
    task_name: str | None = None,
    shots: int = 0,
    base: str | None = None,
    options: AdaptOptions | None = None,
    verbalizer: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Return test accuracy of an adapted dir, or of a base model prompted with `shots` demos."""
    import fmforge

    options = options or AdaptOptions()
    adapted = Path(model) / "adapt.json"
    if not adapted.is_file():
        if task_name is None:
            raise UserError("--task is required when MODEL is a base model")
        task = load_task(task_name, None, options.seed, verbalizer)
        loaded = fmforge.load(model)
        options = AdaptOptions(**{**asdict(options), "shots": shots})
        row = run_method("icl", loaded, task, options).row
        return {"model": model, "task": task.name, **row}
    classifier, meta, loaded = load_adapted(model, base)
    task = load_task(task_name or meta["task"], None, meta["options"]["seed"], meta["verbalizer"])
    if task.labels != meta["labels"]:
        raise UserError(
            f"{model} was adapted to labels {meta['labels']}; task {task.name} has {task.labels}"
        )
    acc = get_method(meta["method"]).test_accuracy(classifier, meta, loaded, task)
    return {"model": model, "method": meta["method"], "task": task.name, "accuracy": round(acc, 4)}
