"""THE training loop: pretraining and every adaptation method run through `Trainer.fit`.

A method supplies hooks, never a copy of the loop:
- `batches`: a stateful source with `next_batch()`, `state_dict()`, `load_state_dict()`;
- `loss_fn(model, batch) -> (loss, tokens)`: the objective (mean loss over the micro-batch);
- `trainable`: the parameters to optimise (None: every parameter that requires grad);
- `eval_fn(model) -> dict[str, float]`: periodic validation metrics.

The loop owns AdamW with decay groups, warmup + cosine LR, gradient accumulation and clipping,
metrics.jsonl, the progress bar, checkpoints and exact resume (model, optimizer, RNG, sampler
position and counters are restored, so a resumed run reproduces an uninterrupted one bit for bit
on CPU).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from fmforge.config import TrainSection
from fmforge.train import checkpoint as ckpt
from fmforge.train.distributed import (
    Runtime,
    all_reduce_mean,
    compile_objective,
    setup_runtime,
    wrap_model,
)
from fmforge.train.optim import build_optimizer, lr_at

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
EvalFn = Callable[[nn.Module], dict[str, float]]


class BatchSource(Protocol):
    """A resumable stream of training batches."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def trainable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the state dict to checkpoint with every tensor once (tied copies are dropped)."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue  # e.g. an lm_head tied to the embedding: restored by the tie itself
        seen.add(key)
        state[name] = tensor
    return state


def measure_matmul_flops(n: int = 1024, repeats: int = 10, device: str = "cpu") -> float:
    """Return the fp32 matmul FLOP/s measured now on `device` (the MFU denominator).

    The best of `repeats` runs, so a moment of co-tenant load does not shrink the peak (and
    inflate MFU past 100%).
    """
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class Trainer:
    """Runs optimisation steps with checkpoints, metrics and exact resume."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainSection,
        run_dir: str | Path,
        batches: BatchSource,
        loss_fn: LossFn,
        *,
        eval_fn: EvalFn | None = None,
        trainable: Iterable[nn.Parameter] | None = None,
        config_dict: dict[str, Any] | None = None,
        flops_per_token: float | None = None,
        runtime: Runtime | None = None,
        progress: bool | None = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.runtime = runtime or setup_runtime(
            cfg.device, cfg.dtype, str(cfg.compile).lower(), cfg.threads
        )
        self.model = model.to(self.runtime.device)
        self.batches = batches
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.config_dict = config_dict or {}
        self.flops_per_token = flops_per_token
        self.trainable = list(trainable) if trainable is not None else None
        self.optimizer = build_optimizer(
            self.model,
            cfg.lr,
            cfg.weight_decay,
            (cfg.beta1, cfg.beta2),
            self.trainable,
            fused=self.runtime.fused_adamw,
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.step = 0
        self.tokens = 0
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (main process only)."""
        if not self.runtime.is_main:
            return None
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "sampler": self.batches.state_dict(),
            "config": self.config_dict,
        }
        return ckpt.save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            trainable_weights(self.model),
            self.optimizer.state_dict(),
            state,
            keep=self.cfg.keep_checkpoints,
        )

    def resume(self) -> bool:
        """Restore the newest valid checkpoint; return False when there is none."""
        path = ckpt.latest_valid_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            self._truncate_metrics(0)
            return False
        saved = ckpt.load_checkpoint(path)
        self.model.load_state_dict(saved["weights"], strict=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        ckpt.restore_rng(saved["rng"])
        self.batches.load_state_dict(saved["state"]["sampler"])
        self.step = saved["state"]["step"]
        self.tokens = saved["state"]["tokens"]
        self._truncate_metrics(self.step)
        print(f"fmforge: resumed from {path} (step {self.step})", file=sys.stderr)
        return True

    def _truncate_metrics(self, step: int) -> None:
        # Records after the restored step were produced by the killed run; they are redone.
        if not self.metrics_file.exists() or not self.runtime.is_main:
            return
        kept = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.metrics_file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(self.metrics_file)

    # -- the loop ------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.runtime.is_main:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, float]:
        """Run `eval_fn` in eval mode without gradients."""
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.runtime.autocast():
            result = self.eval_fn(self.model)
        self.model.train()
        return {k: all_reduce_mean(v, self.runtime) for k, v in result.items()}

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `max_steps`; return a summary (final loss, tokens, seconds, tokens/s, MFU)."""
        from tqdm import tqdm

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        else:
            self._truncate_metrics(0)
        peak_flops = None
        if self.flops_per_token:
            peak_flops = measure_matmul_flops(device=self.runtime.device.type) * (
                self.runtime.world_size
            )
        compute_model = wrap_model(self.model, self.runtime)
        objective = compile_objective(self.loss_fn, self.runtime)
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        window_seconds, window_tokens = 0.0, 0  # training time only: evals and saves excluded
        loss_value = float("nan")
        try:
            while self.step < cfg.max_steps:
                step_start = time.perf_counter()
                lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for _ in range(cfg.grad_accum):
                    batch = _to_device(self.batches.next_batch(), self.runtime.device)
                    with self.runtime.autocast():
                        loss, n_tokens = objective(compute_model, batch)
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item()
                    window_tokens += n_tokens * self.runtime.world_size
                    self.tokens += n_tokens * self.runtime.world_size
                grad_norm = None
                if cfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip).item()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                loss_value = all_reduce_mean(loss_sum / cfg.grad_accum, self.runtime)
                window_seconds += time.perf_counter() - step_start
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
                last = self.step == cfg.max_steps
                record: dict[str, Any] | None = None
                if self.step % cfg.log_every == 0 or last or self.step == 1:
                    tps = window_tokens / window_seconds if window_seconds > 0 else 0.0
                    record = {
                        "step": self.step,
                        "tokens": self.tokens,
                        "loss": loss_value,
                        "lr": lr,
                        "tokens_per_second": round(tps, 2),
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    if peak_flops:
                        record["mfu"] = round(tps * self.flops_per_token / peak_flops, 4)
                    window_seconds, window_tokens = 0.0, 0
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                    record = record or {
                        "step": self.step,
                        "tokens": self.tokens,
                        "loss": loss_value,
                        "lr": lr,
                    }
                    record.update(self.evaluate())
                if record is not None:
                    self._log(record)
                if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or last):
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint()
            print(
                f"\nfmforge: interrupted at step {self.step}; checkpoint {path}; "
                "continue with --resume auto",
                file=sys.stderr,
            )
            raise
        bar.close()
        seconds = time.perf_counter() - started
        steady = [r["tokens_per_second"] for r in self.history[1:] if "tokens_per_second" in r]
        summary = {
            "steps": self.step,
            "tokens": self.tokens,
            "final_loss": loss_value,
            "seconds": round(seconds, 2),
            "tokens_per_second": round(sorted(steady)[len(steady) // 2], 2) if steady else None,
            "peak_flops": peak_flops,
            "seq_len": getattr(self.batches, "seq_len", None),
        }
        if peak_flops and summary["tokens_per_second"]:
            summary["mfu"] = round(
                summary["tokens_per_second"] * self.flops_per_token / peak_flops, 4
            )
        evals = [r for r in self.history if any(k.startswith("val_") for k in r)]
        if evals:
            summary.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
        return summary


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
