"""One turn of the flywheel: curate → train a candidate → evaluate → gate → register (→ promote).

`run_cycle(db, serving, out, config)` takes the feedback logged since the incumbent's log window
ended, curates it (`flywheel/datasets.py`), post-trains a candidate from the incumbent (SFT, then
DPO, through `posttrain/run.py` and the one Trainer; LoRA by default), evaluates candidate and
incumbent on the frozen held-out split and a guard set, and registers the candidate with the gate's
decision. A candidate is promoted (and picked up by a server polling the registry) only when it
beats the incumbent on the primary metric by more than `margin` and no guard regresses beyond its
tolerance.

Every stage writes its output atomically under `out/`, and that output is the stage's marker:

| stage | output (marker) |
|---|---|
| plan | `plan.json`: incumbent id, log window, config |
| curate | `dataset/`: the four files + `manifest.json` |
| incumbent | `incumbent/`: a LoRA incumbent merged into a model dir, to train from |
| sft, dpo | `sft/summary.json`, `dpo/summary.json`: posttrain run dirs, resumed from checkpoints |
| candidate | `candidate/adapter/`: one PEFT adapter over the root base (see compose_adapters) |
| evaluate | `eval.json` |
| gate | `gate.json` |
| register | `result.json`, after the registry row and the promotion event |

The log window starts where the incumbent's ended and ends at the newest feedback row at planning
time, so it depends on the database, not on the clock. A re-run of the same command after kill -9
at any point skips finished stages, resumes training from its newest checkpoint and ends with the
same registry entry as an uninterrupted run (tests/test_flywheel_cycle.py).

Guards: the held-out perplexity of a fixed slice of general text (`guard`, default the built-in
`shakespeare` corpus): a candidate may not raise it by more than `guard_tolerance` (relative);
and the zero-shot accuracy on a shipped labelled task (`guard_task`, default `chat-topic-en`, a
seeded sample of `guard_task_examples` test examples, scored by the adaptation lab's `icl`
method): a candidate may not lower it by more than `task_tolerance` (absolute).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmforge.errors import UserError

METRICS = ("pair_accuracy", "pair_margin", "eval_nll")


@dataclass
class CycleConfig:
    """What a cycle trains and how its gate decides."""

    eval_percent: int = 20  # share of prompts (by hash) in the frozen evaluation split
    lora: bool = True  # train LoRA adapters (one PEFT adapter per version); False: all weights
    rank: int = 8  # LoRA rank of each stage's adapter
    alpha: float = 16.0  # LoRA alpha of each stage's adapter
    sft_steps: int = 30  # SFT optimizer steps (0 skips SFT)
    dpo_steps: int = 30  # DPO optimizer steps (0 skips DPO)
    batch_size: int = 8  # SFT packed rows / DPO pairs per step
    seq_len: int = 256  # tokens per SFT row / per DPO sequence
    sft_lr: float | None = None  # None: posttrain's default for SFT (LoRA or full)
    dpo_lr: float | None = None  # None: posttrain's default for DPO (LoRA or full)
    lr_scale: float = 1.0  # multiplies both learning rates (100 makes a broken candidate)
    beta: float = 0.1  # DPO beta
    metric: str = "pair_accuracy"  # the gate's primary metric: pair_accuracy, pair_margin, eval_nll
    margin: float = 0.0  # the candidate must beat the incumbent by more than this on `metric`
    guard_tolerance: float = 0.05  # largest relative rise of the guard perplexity allowed
    guard: str = "shakespeare"  # guard text: a built-in corpus or a file; "" for none
    guard_tokens: int = 2048  # tokens of guard text scored
    guard_task: str = "chat-topic-en"  # a shipped labelled task scored zero-shot; "" for none
    guard_task_examples: int = 60  # test examples of it scored (a seeded sample)
    task_tolerance: float = 0.05  # largest drop of its zero-shot accuracy allowed (absolute)
    seed: int = 0  # data order and initialisation of the adapters
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"--metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if not 0 <= self.eval_percent < 100:
            raise UserError(f"--eval_percent must be in 0..99, got {self.eval_percent}")
        if self.lr_scale <= 0:
            raise UserError(f"--lr_scale must be > 0, got {self.lr_scale}")


_VERSION_ID = re.compile(r"^v\d+$")


def model_spec(model: str) -> str:
    """Return a model dir as an absolute path, and a built-in name unchanged."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _write_json(path: Path, obj: Any) -> None:
    from fmforge.artifacts import write_json_atomic

    write_json_atomic(path, obj)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


# --- plan ---------------------------------------------------------------------------------------


def _incumbent(registry: Any, serving: str | None) -> Any:
    """Return the version to train from, or None when the registry is empty (v0 = `serving`)."""
    current = registry.serving()
    serving = model_spec(serving) if serving else None
    if serving and _VERSION_ID.match(serving):
        return registry.get(serving)
    if current is None:
        if not serving:
            raise UserError("the registry is empty: pass --serving MODEL (the base to start from)")
        return None
    if serving and serving not in (current.base, current.path):
        raise UserError(
            f"the registry already serves {current.id} (base {current.base}); pass --serving "
            f"{current.id}, a version id, or omit --serving"
        )
    return current


def plan_cycle(registry: Any, store: Any, serving: str | None, config: CycleConfig) -> dict:
    """Return the plan of a new cycle without writing anything.

    Raises NothingToLearn when no feedback arrived after the incumbent's log window.
    """
    from fmforge.flywheel.datasets import NothingToLearn, build_dataset

    incumbent = _incumbent(registry, serving)
    start = incumbent.log_window.get("to") if incumbent is not None else None
    times = [row["created"] for row in store.list_feedback()]
    newer = [t for t in times if start is None or t > start]
    if not newer:
        since = f" since {incumbent.id}'s log window" if incumbent is not None else ""
        raise NothingToLearn(f"no feedback{since}")
    end = max(newer)
    build_dataset(store, start, end, config.eval_percent)  # raises NothingToLearn when empty
    return {
        "incumbent": incumbent.id if incumbent is not None else None,
        "base": model_spec(serving) if incumbent is None and serving else None,
        "log_window": {"from": start or 0.0, "to": end},
        "config": dataclasses.asdict(config),
    }


# --- training -----------------------------------------------------------------------------------


def _train(recipe: str, base: str, data: Path, run: Path, config: CycleConfig, steps: int) -> Path:
    """Run (or resume, or skip when done) one posttrain stage; return its run dir."""
    from fmforge.posttrain.options import DEFAULT_LR, PosttrainOptions
    from fmforge.posttrain.run import posttrain

    if (run / "summary.json").is_file():
        return run
    lr = config.sft_lr if recipe == "sft" else config.dpo_lr
    lr = (lr if lr is not None else DEFAULT_LR[recipe][int(config.lora)]) * config.lr_scale
    options = PosttrainOptions(
        max_steps=steps,
        batch_size=config.batch_size,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        seq_len=config.seq_len,
        lora=config.lora,
        rank=config.rank,
        alpha=config.alpha,
        beta=config.beta,
        heldout_fraction=0.0,  # the cycle's frozen split is the held-out set
        checkpoint_every=max(1, steps // 3),
        log_every=max(1, steps // 10),
        seed=config.seed,
        threads=config.threads,
    )
    posttrain(recipe, base, data, run, options, resume="auto", progress=False)
    return run


def compose_adapters(base: str, adapters: list[Path], out: Path) -> Path:
    """Write one PEFT adapter over `base` whose update is the sum of `adapters`' updates.

    Each adapter i adds B_i A_i s_i (s_i = alpha_i / r_i) to a layer; stacking the A_i as rows and
    the s_i B_i as columns gives a rank sum(r_i) adapter with scaling 1 and exactly that sum.
    """
    import torch
    from safetensors.torch import load_file

    from fmforge.adapt.lora import (
        PEFT_PREFIX,
        apply_lora,
        base_fingerprint,
        lora_modules,
        save_lora_adapter,
    )
    from fmforge.artifacts import atomic_dir
    from fmforge.model.load import load_bundle

    parts = []
    for directory in adapters:
        cfg = _read_json(directory / "adapter_config.json")
        state = load_file(str(directory / "adapter_model.safetensors"))
        parts.append((cfg["lora_alpha"] / cfg["r"], cfg["r"], state, set(cfg["target_modules"])))
    rank = sum(r for _, r, _, _ in parts)
    targets = sorted(set().union(*(t for _, _, _, t in parts)))
    bundle = load_bundle(base, kind="decoder")
    fingerprint = base_fingerprint(bundle.model, bundle.tokenizer)
    apply_lora(bundle.model, targets, r=rank, alpha=float(rank))  # scaling 1
    with torch.no_grad():
        for name, module in lora_modules(bundle.model).items():
            a_rows, b_cols = [], []
            for scaling, r, state, _ in parts:
                a = state.get(f"{PEFT_PREFIX}{name}.lora_A.weight")
                b = state.get(f"{PEFT_PREFIX}{name}.lora_B.weight")
                if a is None:  # this adapter does not touch the layer: a zero block
                    a = torch.zeros(r, module.in_features)
                    b = torch.zeros(module.out_features, r)
                a_rows.append(a.float())
                b_cols.append(b.float() * scaling)
            module.lora_A.weight.copy_(torch.cat(a_rows, 0))  # (sum r, I)
            module.lora_B.weight.copy_(torch.cat(b_cols, 1))  # (O, sum r)
    with atomic_dir(out, overwrite=True) as tmp:
        save_lora_adapter(bundle.model, tmp, base, fingerprint)
    return out


# --- evaluation ---------------------------------------------------------------------------------


def guard_ids(tokenizer: Any, guard: str, tokens: int) -> list[int]:
    """Return the first `tokens` token ids of the guard text (from the middle of its first
    document, past any header); [] when `guard` is empty."""
    from fmforge.data.sources import SkipLog, iter_documents

    if not guard:
        return []
    for document in iter_documents([guard], SkipLog()):
        text = document.text
        middle = text[len(text) // 2 :][: tokens * 8]  # ~4 characters a token, with room
        return tokenizer.encode(middle)[:tokens]
    raise UserError(f"guard text {guard!r} holds no document")


def guard_task(name: str, examples: int, seed: int) -> Any:
    """Return the guard task with a seeded sample of `examples` test examples; None when `name`
    is empty."""
    import dataclasses
    import random

    from fmforge.data.tasks import load_task

    if not name:
        return None
    task = load_task(name, None, seed)
    keep = sorted(random.Random(seed).sample(range(len(task.test)), min(examples, len(task.test))))
    return dataclasses.replace(task, test=[task.test[i] for i in keep])


def task_accuracy(bundle: Any, task: Any, seed: int) -> float:
    """Return the zero-shot accuracy of a model on `task` (label words after pattern 0)."""
    from fmforge.adapt.methods import run_method
    from fmforge.adapt.options import AdaptOptions

    return run_method("icl", bundle, task, AdaptOptions(shots=0, seed=seed)).row["accuracy"]


def _scored(model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int, chunk: int = 16):
    """Yield (summed log-prob, scored tokens) per sequence, in order."""
    import torch

    from fmforge.posttrain.sequences import pad_sequences, token_logprobs
    from fmforge.train.objectives import IGNORE_INDEX

    for i in range(0, len(sequences), chunk):
        batch = pad_sequences(sequences[i : i + chunk], pad_id)
        with torch.no_grad():
            logp = token_logprobs(model(batch["input_ids"]), batch["target_ids"])  # (B, T)
        counts = (batch["target_ids"] != IGNORE_INDEX).sum(-1)
        yield from zip(logp.sum(-1).tolist(), counts.tolist())


def evaluate(
    bundle: Any, dataset: Path, guard: list[int], seq_len: int, task: Any = None, seed: int = 0
) -> dict[str, float]:
    """Return a model's metrics on the frozen split and the guards (text, task).

    pair_accuracy: share of held-out pairs whose chosen answer has the higher mean token log-prob
    (ties count half); pair_margin: the mean of that difference; eval_nll: mean NLL per token of
    the held-out SFT answers; guard_perplexity: exp of the mean NLL per guard token;
    guard_task_accuracy: zero-shot accuracy on the guard task's sampled test examples.
    """
    from fmforge.posttrain.preference import read_preferences
    from fmforge.posttrain.sequences import chat_template_of, pad_id_of
    from fmforge.posttrain.sft import read_sft

    model, tokenizer = bundle.model.eval(), bundle.tokenizer
    template, pad_id = chat_template_of(tokenizer), pad_id_of(tokenizer)
    counts = _read_json(dataset / "manifest.json")["records"]
    metrics: dict[str, float] = {"pairs": counts["eval_dpo.jsonl"], "eval_tokens": 0}
    if counts["eval_dpo.jsonl"]:
        pairs = read_preferences(dataset / "eval_dpo.jsonl", tokenizer, template, seq_len)
        rows = [c for c, _ in pairs] + [r for _, r in pairs]
        mean = [total / max(count, 1) for total, count in _scored(model, rows, pad_id)]
        chosen, rejected = mean[: len(pairs)], mean[len(pairs) :]
        wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
        metrics["pair_accuracy"] = wins / len(pairs)
        metrics["pair_margin"] = sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)
    if counts["eval_sft.jsonl"]:
        examples, _ = read_sft(dataset / "eval_sft.jsonl", tokenizer, template)
        examples = [(ids[:seq_len], targets[:seq_len]) for ids, targets in examples]
        scored = list(_scored(model, examples, pad_id))
        tokens = sum(count for _, count in scored)
        metrics["eval_tokens"] = tokens
        metrics["eval_nll"] = -sum(total for total, _ in scored) / max(tokens, 1)
    if guard:
        windows = [guard[i : i + seq_len] for i in range(0, len(guard), seq_len)]
        scored = list(_scored(model, [(w, w) for w in windows if len(w) > 1], pad_id))
        nll = -sum(total for total, _ in scored) / sum(count for _, count in scored)
        metrics["guard_perplexity"] = math.exp(nll)
    if task is not None:
        metrics["guard_task_accuracy"] = task_accuracy(bundle, task, seed)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def gate(report: dict[str, dict], config: CycleConfig, by: str = "gate") -> dict[str, Any]:
    """Return the gate's decision on an evaluation report ({"incumbent": m, "candidate": m})."""
    inc, cand = report["incumbent"], report["candidate"]
    metric = config.metric
    if metric in ("pair_accuracy", "pair_margin") and not inc.get("pairs"):
        metric = "eval_nll"  # no held-out pairs yet: judge by the held-out answers' NLL
    metrics: dict[str, Any] = {"metric": metric, "margin": config.margin, "guards": {}}
    if metric not in inc or metric not in cand:
        reason = "no held-out feedback to judge the candidate on yet"
        return {"decision": "reject", "by": by, "reason": reason, "metrics": metrics}
    sign = -1.0 if metric == "eval_nll" else 1.0  # lower NLL is better
    delta = round(sign * (cand[metric] - inc[metric]), 6)
    metrics.update(candidate=cand[metric], incumbent=inc[metric], delta=delta)
    failed = []
    if "guard_perplexity" in inc:
        ratio = cand["guard_perplexity"] / inc["guard_perplexity"]
        ok = ratio <= 1.0 + config.guard_tolerance
        metrics["guards"]["guard_perplexity"] = {
            "candidate": cand["guard_perplexity"],
            "incumbent": inc["guard_perplexity"],
            "ratio": round(ratio, 6),
            "tolerance": config.guard_tolerance,
            "ok": ok,
        }
        if not ok:
            failed.append(f"guard perplexity x{ratio:.3g} > x{1 + config.guard_tolerance:.3g}")
    if "guard_task_accuracy" in inc and "guard_task_accuracy" in cand:
        drop = round(inc["guard_task_accuracy"] - cand["guard_task_accuracy"], 6)
        ok = drop <= config.task_tolerance
        metrics["guards"]["guard_task_accuracy"] = {
            "task": config.guard_task,
            "candidate": cand["guard_task_accuracy"],
            "incumbent": inc["guard_task_accuracy"],
            "drop": drop,
            "tolerance": config.task_tolerance,
            "ok": ok,
        }
        if not ok:
            name, limit = config.guard_task, config.task_tolerance
            failed.append(f"{name} zero-shot accuracy fell by {drop:.3f} > {limit:g}")
    if delta <= config.margin:
        failed.insert(0, f"{metric} improved by {delta:+.4g}, not more than {config.margin:g}")
    decision = "reject" if failed else "promote"
    reason = "; ".join(failed) or f"{metric} improved by {delta:+.4g}; guards hold"
    return {"decision": decision, "by": by, "reason": reason, "metrics": metrics}


# --- the cycle ----------------------------------------------------------------------------------


def _provisional(base: str, path: str, kind: str) -> Any:
    from fmforge.flywheel.registry import Version

    return Version(
        id="candidate", created=0.0, parent=None, base=base, path=path, kind=kind,
        dataset_id=None, log_window={}, feedback_counts={}, config={}, eval_report={}, gate={},
        status="candidate",
    )  # fmt: skip


def run_cycle(
    db: str | None,
    serving: str | None,
    out: str | Path,
    config: CycleConfig | None = None,
    by: str = "gate",
) -> dict[str, Any]:
    """Run (or resume) one cycle into `out`; return its result (also in out/result.json).

    Raises NothingToLearn (nothing written, no new version) when the window has no usable
    feedback.
    """
    from fmforge.flywheel.datasets import write_dataset
    from fmforge.flywheel.registry import Registry, load_version

    config = config or CycleConfig()
    out = Path(out)
    if (out / "result.json").is_file():
        return _read_json(out / "result.json")
    registry = Registry(db)
    store = registry.store
    try:
        # plan: frozen on first run, read back on a resume.
        if (out / "plan.json").is_file():
            plan = _read_json(out / "plan.json")
            if plan["config"] != dataclasses.asdict(config):
                raise UserError(
                    f"{out} holds a cycle with another config; re-run it with the same options "
                    "or choose a new --out"
                )
        else:
            if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
                raise UserError(f"--out {out} is not empty and holds no cycle; choose a new dir")
            plan = plan_cycle(registry, store, serving, config)
            if plan["incumbent"] is None:  # an empty registry: the base becomes v0
                plan["incumbent"] = registry.ensure_base(plan.pop("base")).id
            plan.pop("base", None)
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "plan.json", plan)
        incumbent = registry.get(plan["incumbent"])
        window = plan["log_window"]

        # curate
        dataset = out / "dataset"
        if not (dataset / "manifest.json").is_file():
            write_dataset(
                store, dataset, window["from"] or None, window["to"], config.eval_percent, True
            )
        manifest = _read_json(dataset / "manifest.json")
        records = manifest["records"]

        # incumbent: a model dir to train from
        if incumbent.kind == "lora":
            start = out / "incumbent"
            if not (start / "config.json").is_file():
                load_version(incumbent).save(start, overwrite=True)
            root = incumbent.base
            model_dir = str(start)
        else:
            root = model_dir = incumbent.path

        # sft, then dpo
        stages = []
        if records["train_sft.jsonl"] and config.sft_steps > 0:
            run = _train("sft", model_dir, dataset / "train_sft.jsonl", out / "sft", config,
                         config.sft_steps)  # fmt: skip
            stages.append(run)
            model_dir = str(run / "final")
        if records["train_dpo.jsonl"] and config.dpo_steps > 0:
            run = _train("dpo", model_dir, dataset / "train_dpo.jsonl", out / "dpo", config,
                         config.dpo_steps)  # fmt: skip
            stages.append(run)
            model_dir = str(run / "final")
        if not stages:
            raise UserError("no training stage ran: raise --sft_steps or --dpo_steps")

        # candidate
        if config.lora:
            adapter = out / "candidate" / "adapter"
            if not (adapter / "adapter_config.json").is_file():
                inherited = [Path(incumbent.path)] if incumbent.kind == "lora" else []
                compose_adapters(root, inherited + [r / "adapter" for r in stages], adapter)
            kind, base, path = "lora", root, str(adapter.resolve())
        else:
            kind, base, path = "full", root, str(Path(model_dir).resolve())

        # evaluate
        if not (out / "eval.json").is_file():
            candidate = load_version(_provisional(base, path, kind))
            guard = guard_ids(candidate.tokenizer, config.guard, config.guard_tokens)
            task = guard_task(config.guard_task, config.guard_task_examples, config.seed)
            args = (dataset, guard, config.seq_len, task, config.seed)
            report = {
                "candidate": evaluate(candidate, *args),
                "incumbent": evaluate(load_version(incumbent), *args),
                "eval_records": {k: v for k, v in records.items() if k.startswith("eval")},
            }
            _write_json(out / "eval.json", report)
        report = _read_json(out / "eval.json")

        # gate
        if not (out / "gate.json").is_file():
            _write_json(out / "gate.json", gate(report, config, by))
        decision = _read_json(out / "gate.json")

        # register (idempotent), then promote or reject
        version = registry.register(
            parent=incumbent.id,
            base=base,
            path=path,
            kind=kind,
            dataset_id=manifest["dataset_id"],
            log_window=window,
            feedback_counts=manifest["feedback_counts"],
            config=plan["config"],
            eval_report=report,
            gate=decision,
        )
        if decision["decision"] == "promote":
            promoted = any(
                e["version"] == version.id and e["action"] == "promote" for e in registry.history()
            )
            if not promoted:
                registry.promote(version.id, by=by)
        else:
            registry.set_status(version.id, "rejected")
        version = registry.get(version.id)
        result = {
            "version": version.id,
            "parent": version.parent,
            "decision": decision["decision"],
            "reason": decision["reason"],
            "dataset_id": version.dataset_id,
            "serving": registry.serving().id,
            "path": version.path,
        }
        _write_json(out / "result.json", result)
        return result
    finally:
        registry.close()
