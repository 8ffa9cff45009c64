"""Train a classifier through THE training loop, and measure wall time and peak memory."""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fmforge.adapt.classifier import Encoded, ExampleBatches

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdaptOptions:
    """Budget and hyperparameters shared by every method (method-specific ones included)."""

    max_steps: int = 60  # optimizer steps for methods that train
    batch_size: int = 8  # prompts per step
    lr: float | None = None  # None: the method's default (METHOD_LR)
    seed: int = 0  # splits, demonstrations, init and data order
    max_text_tokens: int = 96  # each input text is cut to this many tokens
    rank: int = 8  # lora/pet: rank r
    alpha: float = 16.0  # lora/pet: scaling alpha (update scaled by alpha / r)
    dropout: float = 0.0  # lora/pet: dropout on the adapter input
    targets: list[str] = field(default_factory=lambda: list(ALL_LINEAR))  # lora/pet modules
    top_blocks: int = 1  # freeze: decoder blocks left trainable (from the top)
    virtual_tokens: int = 8  # prompt-tuning: soft prompt length
    shots: int = 0  # icl/ensemble: demonstrations in the prompt
    patterns: int = 4  # pet/ensemble: how many of PATTERNS to use
    eval_batch_size: int = 16
    threads: int = 0  # torch CPU threads; 0 keeps the default


# Peak learning rates, tuned on the 4M quickstart model (fortunes-topic, K=128, 120 steps:
# lora 3e-3 0.28 vs 1e-2 0.22; linear-probe 3e-2 0.31 vs 1e-2 0.23 at 40 steps).
METHOD_LR = {
    "full": 3e-4,
    "freeze": 1e-3,
    "linear-probe": 3e-2,
    "lora": 3e-3,
    "pet": 3e-3,
    "prompt-tuning": 3e-3,  # embeddings have norm ~1: 3e-2 in Adam throws the prompt off-manifold
}


# `fmforge adapt compare` trains each method for --max-steps times this. The label-word methods move
# a pretrained next-token distribution through a small change (an adapter, a soft prompt) read at
# one position; on the 4M quickstart model they stay near chance after 40 steps (lora on
# fortunes-topic, K=128: 0.24 at 40 steps, 0.28 at 120, 0.36 at 240; pet 0.28 at 120, 0.37 at 240).
# The heads see every position and already learn in 40. Every results row records its steps.
COMPARE_STEP_SCALE = {"lora": 6, "pet": 6, "prompt-tuning": 6}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process peak is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Measure:
    """Wall seconds and peak memory of a block: CUDA allocator peak, or sampled RSS above start."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.seconds = 0.0
        self.peak_memory_mb = 0.0

    def __enter__(self) -> Measure:
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start_rss = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        if self._cuda:
            self.peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_memory_mb = (max(self._peak, _rss_bytes()) - self._start_rss) / 2**20


def train_classifier(
    classifier: nn.Module,
    trainable: list[nn.Parameter],
    data: Encoded,
    options: AdaptOptions,
    lr: float,
    run_dir: str | Path,
) -> dict:
    """Optimise `trainable` on the classification loss with the shared Trainer; return summary."""
    from fmforge.config import RuntimeSection, TrainSection
    from fmforge.train.distributed import setup_runtime
    from fmforge.train.objectives import classification_loss
    from fmforge.train.trainer import Trainer

    cfg = TrainSection(
        max_steps=options.max_steps,
        batch_size=options.batch_size,
        lr=lr,
        warmup_steps=min(5, options.max_steps // 10),
        weight_decay=0.0,
        eval_every=0,
        checkpoint_every=0,
        keep_checkpoints=1,
        log_every=10,
        seed=options.seed,
    )
    batches = ExampleBatches(data, options.batch_size, seed=options.seed)
    trainer = Trainer(
        classifier,
        cfg,
        run_dir,
        batches,
        classification_loss,
        trainable=trainable,
        runtime=setup_runtime(RuntimeSection(threads=options.threads)),
        progress=False,
    )
    summary = trainer.fit()
    summary["history"] = trainer.history
    classifier.eval()
    return summary
