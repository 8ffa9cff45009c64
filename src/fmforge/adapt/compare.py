"""`fmforge adapt compare`: every method on one base, one task, the same splits, seed and budget.

Writes `results.json` (one row per method and examples-per-class: method, examples_per_class,
accuracy, trainable_params, train_seconds, peak_memory_mb, ...), `report.md` (the table and what it
shows) and `accuracy_vs_examples.png`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fmforge.adapt.methods import METHODS, get_method
from fmforge.adapt.options import AdaptOptions
from fmforge.artifacts import check_output_dir, write_json_atomic
from fmforge.data.tasks import load_task
from fmforge.errors import UserError


def compare(
    base: str,
    task_name: str,
    out: str | Path,
    examples_per_class: list[int] = (8, 32, 128),
    methods: list[str] | None = None,
    options: AdaptOptions | None = None,
    overwrite: bool = False,
    verbalizer: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `methods` (default: all) for each K in `examples_per_class`; write the report dir."""
    import fmforge

    options = options or AdaptOptions()
    methods = list(methods or METHODS)
    for method in methods:
        get_method(method)
    if not examples_per_class:
        raise UserError("--examples-per-class needs at least one value")
    out = check_output_dir(out, overwrite)
    tasks = {
        k: load_task(task_name, k, options.seed, verbalizer) for k in sorted(examples_per_class)
    }  # before the slow load: a K larger than the split fails at once
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    loaded = fmforge.load(base)
    started = time.perf_counter()
    rows = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(
            f"[compare] {row['method']:<13} K={row['examples_per_class']!s:<4} "
            f"acc {row['accuracy']:.3f}  params {row['trainable_params']:,}  "
            f"{row['train_seconds']:.1f}s",
            file=sys.stderr,
            flush=True,
        )

    smallest = min(tasks)
    for k, task in tasks.items():
        for method in methods:
            for row in METHODS[method].compare_rows(loaded, task, options, first=k == smallest):
                record(row)
    seconds = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "base": base,
        "task": task_name,
        "seed": options.seed,
        "options": asdict(options),
        "test_examples": len(next(iter(tasks.values())).test),
        "labels": next(iter(tasks.values())).labels,
        "seconds": round(seconds, 1),
        "rows": rows,
    }
    write_json_atomic(out / "results.json", result)
    plot_accuracy(rows, out / "accuracy_vs_examples.png", task_name)
    (out / "report.md").write_text(report_markdown(result), encoding="utf-8")
    return result


def plot_accuracy(rows: list[dict], path: Path, task_name: str) -> None:
    """Save accuracy against examples per class, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["method"] == "icl" and row["examples_per_class"] == 0:
            ax.axhline(row["accuracy"], color="grey", ls=":", label="icl 0-shot")
            continue
        by_method.setdefault(row["method"], []).append((row["examples_per_class"], row["accuracy"]))
    for method, points in by_method.items():
        points.sort()
        style = "--" if method == "majority" else "o-"
        ax.plot(*zip(*points), style, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training examples per class")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{task_name}: accuracy vs examples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _accs(rows: list[dict], method: str) -> list[float]:
    return [r["accuracy"] for r in rows if r["method"] == method]


def _scale_text() -> str:
    """'lora, prompt-tuning, pet 6x': the methods that train longer in compare, and how much."""
    by_scale: dict[int, list[str]] = {}
    for m in METHODS.values():
        if m.compare_step_scale != 1:
            by_scale.setdefault(m.compare_step_scale, []).append(m.name)
    return "; ".join(f"{', '.join(names)} {s}x" for s, names in sorted(by_scale.items()))


def report_markdown(result: dict[str, Any]) -> str:
    """Return report.md: the table, then what it shows (honestly, including failures)."""
    rows = result["rows"]
    majority = {r["examples_per_class"]: r["accuracy"] for r in rows if r["method"] == "majority"}
    base_acc = max(majority.values()) if majority else 0.0
    lines = [
        f"# Adaptation lab: {result['task']} on {result['base']}",
        "",
        f"Every method on the same seeded splits ({result['test_examples']} test examples, "
        f"labels {', '.join(result['labels'])}), seed {result['seed']}, "
        f"batch {result['options']['batch_size']}; methods that train run "
        f"{result['options']['max_steps']} steps ({_scale_text()}: see `steps`). "
        f"Total {result['seconds']:.0f} s.",
        "",
        "| method | examples/class | shots | steps | accuracy | trainable params | train s "
        "| peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['examples_per_class']} | {r.get('shots', '')} | "
            f"{r.get('steps', '')} | "
            f"{r['accuracy']:.3f} | {r['trainable_params']:,} | {r['train_seconds']:.1f} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    lines += ["", "![accuracy vs examples](accuracy_vs_examples.png)", "", "## What it shows", ""]
    trained = [r for r in rows if METHODS[r["method"]].trains]
    if trained:
        beat = sorted({r["method"] for r in trained if r["accuracy"] > base_acc})
        missed = sorted({r["method"] for r in trained} - set(beat))
        best = max(trained, key=lambda r: r["accuracy"])
        lines.append(
            f"- Majority baseline: {base_acc:.3f}. Best trained method: {best['method']} with "
            f"{best['accuracy']:.3f} at {best['examples_per_class']} examples per class "
            f"({best['trainable_params']:,} trainable parameters)."
        )
        lines.append(
            f"- Trained methods that beat the baseline (best K): {', '.join(beat) or 'none'}."
        )
        n = max(1, result["test_examples"])
        margin = 2 * math.sqrt(max(base_acc * (1 - base_acc), 1e-6) / n)
        clear = [m for m in beat if max(_accs(trained, m)) > base_acc + margin]
        marginal = [m for m in beat if m not in clear]
        lines.append(
            f"- With {n} test examples, chance wobbles by about +-{margin:.3f} (two binomial "
            f"standard errors at the baseline). Clearly above it: {', '.join(clear) or 'none'}"
            + (f"; above it only within that noise: {', '.join(marginal)}." if marginal else ".")
        )
        for method in missed:
            lines.append(
                f"- {method} did not beat the majority baseline at any K within this budget."
            )
        per_method = {}
        for r in trained:
            per_method.setdefault(r["method"], []).append(r)
        for method, method_rows in per_method.items():
            ordered = sorted(method_rows, key=lambda r: r["examples_per_class"])
            if len(ordered) > 1:
                trend = ", ".join(f"{r['accuracy']:.2f}@{r['examples_per_class']}" for r in ordered)
                lines.append(f"- {method}: {trend}")
    icl = [r for r in rows if r["method"] == "icl"]
    zero = [r for r in icl if r["examples_per_class"] == 0]
    shot = [r for r in icl if r["examples_per_class"]]
    if zero and shot:
        best_shot = max(r["accuracy"] for r in shot)
        n = max(1, result["test_examples"])
        noise = 2 * math.sqrt(max(base_acc * (1 - base_acc), 1e-6) / n)
        if abs(best_shot - zero[0]["accuracy"]) <= noise:
            verdict = "is within test noise of"
        else:
            verdict = "beats" if best_shot > zero[0]["accuracy"] else "does not beat"
        lines.append(
            f"- In-context learning: k-shot ({best_shot:.3f}) {verdict} 0-shot "
            f"({zero[0]['accuracy']:.3f})."
        )
        if max(best_shot, zero[0]["accuracy"]) <= base_acc + 0.02:
            lines.append(
                "  Prompting is near chance here: a small model pretrained for minutes has not "
                "learned to follow demonstrations (in-context learning emerges with scale and "
                "data); the trained methods are the honest choice for this base."
            )
    for r in rows:
        if r["method"] == "ensemble" and "mean_member_accuracy" in r:
            relation = ">=" if r["accuracy"] >= r["mean_member_accuracy"] else "<"
            lines.append(
                f"- Ensemble at K={r['examples_per_class']}: {r['accuracy']:.3f} {relation} "
                f"mean member {r['mean_member_accuracy']:.3f} "
                f"(members {', '.join(f'{a:.2f}' for a in r['member_accuracies'])})."
            )
    lines += [
        "",
        "Trainable parameters count what the optimizer updates; train seconds cover copying the "
        "base and training (evaluation excluded); peak MB is the CUDA allocator peak, or on CPU "
        "the resident memory the method added (sampled every 20 ms).",
        "",
    ]
    return "\n".join(lines)
