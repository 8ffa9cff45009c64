"""Train a classifier through THE training loop, and measure wall time and peak memory."""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

import torch
from torch import nn

from fmforge.adapt.classifier import Encoded, ExampleBatches
from fmforge.adapt.options import AdaptOptions


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
