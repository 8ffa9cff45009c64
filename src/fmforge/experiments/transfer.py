"""Experiment: transfer learning reaches a given quality faster than training from scratch.

Claim (e.g. Howard & Ruder 2018; Raffel et al. 2020): starting from a pretrained model, a new
task/domain reaches a target quality 2-3x (or more) faster than the same architecture from random
initialisation, with the same data and budget.

Setup, all on CPU in minutes:
1. source: pretrain the `tiny` preset on the built-in `stdlib` corpus (Python code and English
   comments), or take `--base` (a model dir fmforge pretrained);
2. target: English prose (fortune-cookie quotes when the `fortunes` package is installed, else a
   held-out slice of the stdlib), tokenised with the source model's tokenizer;
3. two runs on the target with identical data order, schedule and steps: from random init
   ("scratch") and from the source model ("transfer"), both through `fmforge pretrain`;
4. target = the best validation loss scratch reaches within the budget; speedup = scratch's steps
   to it / transfer's steps to it (and the same in seconds).

Writes `results.json` (`speedup`, `speedup_seconds`, curves), `curves.png` and `report.md`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fmforge.artifacts import check_output_dir, write_json_atomic
from fmforge.errors import UserError

SOURCE_STEPS = 300
TRAIN = dict(batch_size=16, seq_len=128, lr=3e-3, warmup_steps=10, eval_batches=8, log_every=10)


def _say(message: str) -> None:
    import sys

    print(f"[transfer] {message}", file=sys.stderr, flush=True)


def _target_corpus(path: Path) -> str:
    """Write the target documents to `path` (jsonl) and return a description."""
    from fmforge.data.tasks import FORTUNES_DIR

    docs: list[str] = []
    if FORTUNES_DIR.is_dir():
        import re

        for file in sorted(FORTUNES_DIR.iterdir()):
            if file.suffix or not file.is_file() or file.name in ("off",):
                continue
            raw = file.read_text(encoding="utf-8", errors="replace")
            docs += [e.strip() for e in re.split(r"(?m)^%\s*$", raw) if e.strip()]
        source = f"fortunes ({len(docs)} quotes, {FORTUNES_DIR})"
    else:
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"]) / "email"
        docs = [p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))]
        source = f"held-out stdlib email package ({len(docs)} files)"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return source


def _preset_for(config) -> str:
    from fmforge.model.config import PRESETS

    for name, values in PRESETS.items():
        if all(getattr(config, k) == v for k, v in values.items() if k != "vocab_size"):
            return name
    raise UserError("--base must use one of the model presets (tiny, small, 124m)")


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """Return the first evaluated step whose validation loss is <= target, or None."""
    return next((step for step, loss in curve if loss <= target), None)


def run_transfer(
    out: str | Path, base: str | None = None, steps: int = 200, overwrite: bool = False
) -> dict[str, Any]:
    """Run the experiment; write results.json, curves.png, report.md into `out`; return results."""
    from fmforge.config import DataSection, ModelSection, PretrainConfig, TrainSection
    from fmforge.data.pack import prepare_shards
    from fmforge.model.load import load_model_dir
    from fmforge.tokenizer import train_from_inputs
    from fmforge.train.pretrain import pretrain

    if steps < 20:
        raise UserError(f"--steps must be >= 20 to measure a curve, got {steps}")
    out = check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if base is None:
        _say("1/4 pretraining the source model (tiny preset) on the stdlib corpus")
        train_from_inputs(["stdlib"], vocab_size=1024, out=str(out / "tokenizer"), overwrite=True)
        prepare_shards(
            ["stdlib"], str(out / "tokenizer"), str(out / "source_data"), 0.02, overwrite=True
        )
        source_cfg = PretrainConfig(
            model=ModelSection(preset="tiny"),
            data=DataSection(shards=str(out / "source_data")),
            train=TrainSection(max_steps=SOURCE_STEPS, eval_every=100, **TRAIN),
        )
        pretrain(source_cfg, out / "source", overwrite=True, progress=False)
        base_dir, preset = out / "source" / "final", "tiny"
    else:
        _say(f"1/4 using {base} as the pretrained source model")
        base_dir = Path(base)
        loaded = load_model_dir(base_dir)
        base_dir = Path(loaded.source)
        preset = _preset_for(loaded.config)
    _say("2/4 tokenising the target corpus with the source tokenizer")
    description = _target_corpus(out / "target.jsonl")
    prepare_shards(
        [str(out / "target.jsonl")], str(base_dir), str(out / "target_data"), 0.05, overwrite=True
    )
    runs = {}
    for index, (name, init) in enumerate((("scratch", None), ("transfer", str(base_dir)))):
        _say(f"{3 + index}/4 training on the target from {name} for {steps} steps")
        cfg = PretrainConfig(
            model=ModelSection(preset=preset, init_from=init),
            data=DataSection(shards=str(out / "target_data")),
            train=TrainSection(max_steps=steps, eval_every=max(5, steps // 20), **TRAIN),
        )
        summary = pretrain(cfg, out / name, overwrite=True, progress=False)
        runs[name] = {"curve": _curve(out / name), "seconds": summary["seconds"]}
    scratch, transfer = runs["scratch"], runs["transfer"]
    target = min(loss for _, loss in scratch["curve"])
    scratch_steps = steps_to_reach(scratch["curve"], target)
    transfer_steps = steps_to_reach(transfer["curve"], target)
    if transfer_steps is None:
        speedup = 0.0  # transfer never got there: the claim fails, and the report says so
    else:
        speedup = scratch_steps / transfer_steps
    step_seconds = {k: v["seconds"] / steps for k, v in runs.items()}
    speedup_seconds = (
        scratch_steps * step_seconds["scratch"] / (transfer_steps * step_seconds["transfer"])
        if transfer_steps
        else 0.0
    )
    result = {
        "speedup": round(speedup, 2),
        "speedup_seconds": round(speedup_seconds, 2),
        "target_val_loss": round(target, 4),
        "scratch_steps_to_target": scratch_steps,
        "transfer_steps_to_target": transfer_steps,
        "steps_budget": steps,
        "preset": preset,
        "source_model": str(base_dir),
        "target_corpus": description,
        "curves": {k: v["curve"] for k, v in runs.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "results.json", result)
    _plot(runs, target, out / "curves.png")
    (out / "report.md").write_text(_report(result), encoding="utf-8")
    return result


def _plot(runs: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, run in runs.items():
        ax.plot(*zip(*run["curve"]), "o-", ms=3, label=name)
    ax.axhline(target, color="grey", ls=":", label="target (best scratch)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(r: dict[str, Any]) -> str:
    verdict = (
        "reproduces the claim (>= 2x)" if r["speedup"] >= 2 else "does NOT reproduce the claim"
    )
    return "\n".join(
        [
            "# Transfer learning vs training from scratch",
            "",
            f"Source model: `{r['source_model']}` ({r['preset']} preset). Target corpus: "
            f"{r['target_corpus']}. Both target runs: same data order, schedule and "
            f"{r['steps_budget']} steps.",
            "",
            f"- target validation loss (the best scratch reaches): {r['target_val_loss']:.3f}",
            f"- scratch reaches it at step {r['scratch_steps_to_target']}; transfer at step "
            f"{r['transfer_steps_to_target']}",
            f"- **speedup {r['speedup']}x in steps, {r['speedup_seconds']}x in seconds**: "
            f"this run {verdict}.",
            f"- total wall time {r['seconds']:.0f} s",
            "",
            "![curves](curves.png)",
            "",
        ]
    )
