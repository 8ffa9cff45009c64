"""`fmforge quickstart`: the whole pretraining path on a built-in corpus in one command.

tokenizer -> token shards -> pretrain the `small` preset -> evaluate bits per byte against a
unigram model of the same tokens -> complete `def fibonacci(n):` -> `summary.json`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fmforge.artifacts import check_output_dir, write_json_atomic

# Sized for ~9 minutes in all on 2 CPU cores (about 2M tokens for the `small` preset, compiled by
# runtime.compile=auto): 0.612 of the unigram bits per byte, where 480 steps reached 0.673.
QUICKSTART_TRAIN = {
    "small": dict(
        max_steps=960,
        batch_size=8,
        seq_len=256,
        lr=3e-3,
        warmup_steps=40,
        eval_every=160,
        eval_batches=16,
        checkpoint_every=160,
        log_every=10,
    ),
    "tiny": dict(
        max_steps=60,
        batch_size=8,
        seq_len=128,
        lr=3e-3,
        warmup_steps=5,
        eval_every=20,
        eval_batches=4,
        checkpoint_every=20,
        log_every=5,
    ),
}
VOCAB_SIZE = {"small": 4096, "tiny": 512}
PROMPT = "def fibonacci(n):"
# More prompts for the report's samples, each completed with the model's sampling defaults.
SAMPLE_PROMPTS = (
    PROMPT,
    "class Stack:\n    def __init__(self):",
    "import os\n\n\ndef read_config(",
)


def _say(message: str) -> None:
    print(f"[quickstart] {message}", file=sys.stderr, flush=True)


def unigram_bits_per_byte(
    train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int, val_bytes: int
) -> float:
    """Return the bits per byte of an add-one-smoothed unigram model fit on the train tokens."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    log_probs = np.log2(counts / counts.sum())
    return float(-log_probs[np.asarray(val_tokens, dtype=np.int64)].sum() / val_bytes)


def quickstart(
    out: str = "runs/quickstart",
    overwrite: bool = False,
    max_steps: int | None = None,
    preset: str = "small",
    corpus: str = "stdlib",
) -> dict[str, Any]:
    """Run tokenizer -> shards -> pretrain -> evaluate -> sample; write and return summary.json."""
    from fmforge.config import DataSection, ModelSection, PretrainConfig, TrainSection
    from fmforge.data.pack import TokenShards, prepare_shards
    from fmforge.errors import ConfigError
    from fmforge.tokenizer import train_from_inputs
    from fmforge.train.pretrain import evaluate_loss, pretrain

    if preset not in QUICKSTART_TRAIN:
        raise ConfigError(
            f"--preset={preset!r} is not one of {sorted(QUICKSTART_TRAIN)} for the quickstart"
        )
    out_dir = check_output_dir(out, overwrite)
    started = time.perf_counter()
    _say(f"1/5 training a {VOCAB_SIZE[preset]}-token byte-level BPE tokenizer on {corpus!r}")
    train_from_inputs(
        [corpus], vocab_size=VOCAB_SIZE[preset], out=str(out_dir / "tokenizer"), overwrite=True
    )
    _say("2/5 tokenising into packed shards (train/val split by document)")
    meta = prepare_shards(
        [corpus],
        tokenizer_dir=str(out_dir / "tokenizer"),
        out=str(out_dir / "data"),
        val_fraction=0.02,
        overwrite=True,
    )
    train_overrides = dict(QUICKSTART_TRAIN[preset])
    if max_steps is not None:
        train_overrides["max_steps"] = max_steps
        train_overrides["warmup_steps"] = min(train_overrides["warmup_steps"], max_steps)
    cfg = PretrainConfig(
        model=ModelSection(preset=preset),
        data=DataSection(shards=str(out_dir / "data")),
        train=TrainSection(**train_overrides),
    )
    _say(
        f"3/5 pretraining the {preset!r} preset for {cfg.train.max_steps} steps "
        f"({cfg.train.batch_size}x{cfg.train.seq_len} tokens each)"
    )
    run_dir = out_dir / "run"
    summary = pretrain(cfg, out=run_dir, overwrite=True)

    _say("4/5 evaluating bits per byte on the whole validation split")
    from fmforge.api import load_decoder

    loaded = load_decoder(run_dir / "final")
    shards = TokenShards.open(out_dir / "data")
    val = shards.split("val")
    val_loss, scored = evaluate_loss(
        loaded.model.eval(), val, cfg.train.batch_size, cfg.train.seq_len, max_batches=None
    )
    # Bytes covered by the scored windows, pro rata (windows cover all but a tail of the split).
    val_bytes = meta["splits"]["val"]["bytes"] * scored / len(val)
    val_bpb = val_loss / math.log(2) * scored / val_bytes
    scored_targets = val[1 : scored + 1]
    unigram_bpb = unigram_bits_per_byte(
        shards.split("train"), scored_targets, loaded.config.vocab_size, val_bytes
    )

    _say(f"5/5 completing {PROMPT!r} (sampling defaults, seeded)")
    samples = write_samples(loaded, run_dir / "report.md")
    completion = samples[0]["completion"]
    result = {
        "val_bits_per_byte": round(val_bpb, 4),
        "unigram_bits_per_byte": round(unigram_bpb, 4),
        "ratio_to_unigram": round(val_bpb / unigram_bpb, 4),
        "val_loss": round(val_loss, 4),
        "model_dir": str(run_dir / "final"),
        "run_dir": str(run_dir),
        "train_tokens_seen": summary["tokens"],
        "tokens_per_second": summary.get("tokens_per_second"),
        "mfu": summary.get("mfu"),
        "peak_flops": summary.get("peak_flops"),
        "completion": PROMPT + completion,
        "samples": samples,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out_dir / "summary.json", result)
    print(f"\n{PROMPT}{completion}\n")
    mfu = f", MFU {100 * result['mfu']:.0f}%" if result["mfu"] else ""
    print(
        f"val bits/byte {val_bpb:.3f} vs unigram {unigram_bpb:.3f} "
        f"(ratio {val_bpb / unigram_bpb:.2f}); model: {run_dir / 'final'}; "
        f"{result['wall_seconds']:.0f} s{mfu}; report: {run_dir / 'report.md'}"
    )
    return result


def write_samples(loaded: Any, report: Path, max_new_tokens: int = 64) -> list[dict[str, Any]]:
    """Complete SAMPLE_PROMPTS with the model's sampling defaults; append them to `report`."""
    from fmforge.generate.defaults import sampling_defaults

    settings = sampling_defaults(loaded)
    samples = []
    for seed, prompt in enumerate(SAMPLE_PROMPTS):
        text = loaded.generate(prompt, max_new_tokens=max_new_tokens, seed=seed, **settings)
        samples.append({"prompt": prompt, "completion": text, "seed": seed})
    shown = ", ".join(f"{k} {v}" for k, v in settings.items())
    lines = ["", "## Samples", "", f"Sampling defaults: {shown}; {max_new_tokens} new tokens.", ""]
    for sample in samples:
        lines += ["```python", sample["prompt"] + sample["completion"], "```", ""]
    with open(report, "a", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return samples
