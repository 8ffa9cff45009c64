"""`fmforge adapt METHOD` and `fmforge eval`: write an adapted model/adapter dir, read it back.

An adapted dir always holds `adapt.json` (method, base, base fingerprint, task, labels,
verbalizer, patterns, options, test metrics). Besides it, by method:
- full, freeze: `model/` (an ordinary model dir) + `head.safetensors`;
- linear-probe: `head.safetensors` (the base is unchanged);
- lora, pet: `adapter_config.json` + `adapter_model.safetensors` (PEFT's LoRA layout);
- prompt-tuning: `adapter_config.json` + `adapter_model.safetensors` (PEFT's prompt-tuning layout);
- majority, icl, ensemble: nothing else (they are a prompt or a rule).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fmforge.adapt.classifier import (
    PATTERNS,
    HeadClassifier,
    VerbalizerClassifier,
    accuracy,
    encode,
    label_token_ids,
    predict_proba,
)
from fmforge.adapt.lora import base_fingerprint, load_lora_adapter, save_lora_adapter
from fmforge.adapt.methods import MethodRun, check_method, run_method
from fmforge.adapt.training import AdaptOptions
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

    check_method(method)
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
    from safetensors.torch import save_file

    from fmforge.model.load import save_model_dir

    method = run.row["method"]
    fingerprint = base_fingerprint(loaded.model, loaded.tokenizer)
    meta = {
        "method": method,
        "base": base,
        "base_fingerprint": fingerprint,
        "task": task.name,
        "labels": task.labels,
        "verbalizer": task.verbalizer,
        "patterns": run.extra.get("patterns", [PATTERNS[0]]),
        "options": asdict(options),
        "results": run.row,
    }
    if "label" in run.extra:
        meta["majority_label"] = run.extra["label"]
    if "members" in run.extra:
        meta["members"] = run.extra["members"]
    with atomic_dir(out, overwrite) as tmp:
        classifier = run.classifier
        if isinstance(classifier, HeadClassifier):
            head = {
                k: v.detach().cpu().contiguous() for k, v in classifier.head.state_dict().items()
            }
            save_file(head, str(tmp / "head.safetensors"))
            if method in ("full", "freeze"):
                save_model_dir(classifier.lm, loaded.tokenizer, tmp / "model", loaded.provenance)
        elif method in ("lora", "pet"):
            save_lora_adapter(classifier.lm, tmp, base, fingerprint, {"task": task.name})
        elif method == "prompt-tuning":
            embeddings = classifier.soft_prompt.embeddings.detach().cpu().contiguous()
            save_file({"prompt_embeddings": embeddings}, str(tmp / "adapter_model.safetensors"))
            config = loaded.config
            write_json_atomic(
                tmp / "adapter_config.json",
                {
                    "peft_type": "PROMPT_TUNING",
                    "task_type": "CAUSAL_LM",
                    "base_model_name_or_path": base,
                    "num_virtual_tokens": embeddings.shape[0],
                    "token_dim": embeddings.shape[1],
                    "num_transformer_submodules": 1,
                    "num_attention_heads": config.num_attention_heads,
                    "num_layers": config.num_hidden_layers,
                    "prompt_tuning_init": "TEXT",
                    "inference_mode": True,
                },
            )
        if run.extra.get("history"):
            lines = "".join(json.dumps(r) + "\n" for r in run.extra["history"])
            (tmp / "metrics.jsonl").write_text(lines, encoding="utf-8")
        write_json_atomic(tmp / "adapt.json", meta)
    return Path(out)


def load_adapted(directory: str | Path, base: str | None = None):
    """Return (classifier or None, adapt.json dict, loaded base) for an adapted dir."""
    from safetensors.torch import load_file

    import fmforge
    from fmforge.adapt.prompt_tuning import SoftPrompt

    directory = Path(directory)
    meta_file = directory / "adapt.json"
    if not meta_file.is_file():
        raise UserError(f"{directory}: no adapt.json; not a dir written by `fmforge adapt`")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    method = meta["method"]
    if method in ("full", "freeze"):
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
    label_ids = label_token_ids(loaded.tokenizer, task_like)
    if method in ("full", "freeze", "linear-probe"):
        classifier = HeadClassifier(loaded.model, len(meta["labels"]))
        classifier.head.load_state_dict(load_file(str(directory / "head.safetensors")))
    elif method in ("lora", "pet"):
        lm = copy.deepcopy(loaded.model)
        load_lora_adapter(lm, directory, meta["base_fingerprint"])
        classifier = VerbalizerClassifier(lm, label_ids)
    elif method == "prompt-tuning":
        embeddings = load_file(str(directory / "adapter_model.safetensors"))["prompt_embeddings"]
        soft_prompt = SoftPrompt(embeddings.shape[0], embeddings.shape[1], embeddings)
        classifier = VerbalizerClassifier(loaded.model, label_ids, soft_prompt)
    else:
        classifier = None
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
    labels = [task.label_index(e.label) for e in task.test]
    if meta["method"] == "majority":
        acc = sum(e.label == meta["majority_label"] for e in task.test) / len(task.test)
    elif classifier is None:  # icl / ensemble: re-run the recorded prompt recipe
        recorded = AdaptOptions(**meta["options"])
        acc = run_method(meta["method"], loaded, task, recorded).row["accuracy"]
    else:
        probs = torch.stack(
            [
                predict_proba(
                    classifier,
                    encode(
                        loaded.tokenizer, task, task.test, p, meta["options"]["max_text_tokens"]
                    ),
                )
                for p in meta["patterns"]
            ]
        ).mean(0)
        acc = accuracy(probs, labels)
    return {"model": model, "method": meta["method"], "task": task.name, "accuracy": round(acc, 4)}
