"""THE training loop: pretraining, every adaptation method and every post-training recipe run
through `Trainer.fit`.

A method supplies hooks, never a copy of the loop:
- `batches`: a stateful source with `next_batch()`, `state_dict()`, `load_state_dict()`;
  under data parallelism each rank's source yields that rank's share of the examples;
- `loss_fn(model, batch) -> (summed_loss, scored)`: the objective (train/objectives.py): the SUM
  of per-target losses and how many targets it summed;
- `trainable`: the parameters to optimise (None: every parameter that requires grad);
- `eval_fn(model) -> dict[str, float]`: periodic validation metrics.

The loop owns AdamW with decay groups, warmup + cosine LR, gradient accumulation and clipping,
metrics.jsonl, the progress bar, checkpoints and exact resume (model, optimizer, RNG, sampler
position and counters are restored, so a resumed run reproduces an uninterrupted one bit for bit
on CPU).

Token weighting: backward runs on each micro-batch's summed loss; after the accumulation window the
scored targets are summed over micro-batches and ranks, and the gradients are divided by that
total once. So the step's gradient is the mean over every scored target of the window, however
unevenly they fall into micro-batches or ranks.
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
from fmforge.errors import DataError
from fmforge.train import checkpoint as ckpt
from fmforge.train.distributed import (
    Runtime,
    all_reduce_sum,
    compile_objective,
    compile_pays_off,
    gradient_sync,
    setup_runtime,
    wrap_model,
)
from fmforge.train.objectives import input_tokens
from fmforge.train.optim import build_optimizer, lr_at

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]
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


def model_gemm_shapes(model: nn.Module, tokens: int) -> list[tuple[int, int, int]]:
    """Return the (M, K, N) matmul shapes of the model's linear layers for `tokens` rows."""
    shapes = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            shapes.add((tokens, module.in_features, module.out_features))
        elif isinstance(module, nn.Embedding):  # a tied output head multiplies by it
            shapes.add((tokens, module.embedding_dim, module.num_embeddings))
    return sorted(shapes)


class PeakFlops:
    """The MFU denominator of a run: a catalog peak on known GPUs, else measured here, often.

    On CPU (and unknown GPUs) the peak is the fastest fp32 matmul at the model's own GEMM shapes
    and a 1024-cube, with the run's thread count, best of several; it is measured before the
    first step, again whenever a reading would exceed it, and kept as the maximum. Each rank
    measures its own device; the run's peak is their sum.
    """

    def __init__(self, model: nn.Module, tokens_per_batch: int, runtime: Runtime):
        from fmforge.cost.hardware import catalog_peak_flops

        self.runtime = runtime
        self.shapes = model_gemm_shapes(model, tokens_per_batch)
        self.theoretical = None
        if runtime.device.type == "cuda":
            dtype = "bf16" if runtime.autocast_dtype == torch.bfloat16 else "fp32"
            name = torch.cuda.get_device_name(runtime.device)
            self.theoretical = catalog_peak_flops(name, dtype)
        self.value = 0.0
        self.source = ""
        self.remeasure()

    def remeasure(self) -> float:
        """Measure again (unless theoretical) and keep the maximum; return the run's peak."""
        from fmforge.cost.hardware import measure_peak_flops

        if self.theoretical is not None:
            self.value = self.theoretical * self.runtime.world_size
            self.source = "theoretical peak from the GPU catalog"
            return self.value
        local = measure_peak_flops(self.shapes, self.runtime.device.type)
        (total,) = all_reduce_sum([local], self.runtime)
        self.value = max(self.value, total)
        self.source = (
            f"fastest fp32 matmul measured in this run at the model's GEMM shapes, "
            f"{torch.get_num_threads()} threads"
        )
        return self.value

    def mfu(self, tokens_per_second: float, flops_per_token: float) -> float | None:
        """Return MFU in [0, 1]; re-measure once if a reading exceeds 1, else refuse (None)."""
        from fmforge.cost.flops import ImpossibleMFU, mfu

        try:
            return mfu(tokens_per_second, flops_per_token, self.value)
        except ImpossibleMFU:
            self.remeasure()
        try:
            return mfu(tokens_per_second, flops_per_token, self.value)
        except ImpossibleMFU as e:
            print(f"fmforge: no MFU reported: {e}", file=sys.stderr)
            return None


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
        self.runtime = runtime or setup_runtime()
        self.model = model.to(self.runtime.device)
        # Parallelism is applied before the optimizer sees the parameters (FSDP2 shards them).
        self.compute_model = wrap_model(self.model, self.runtime)
        self.batches = batches
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.config_dict = config_dict or {}
        self.flops_per_token = flops_per_token
        self.trainable = list(trainable) if trainable is not None else None
        fused = self.runtime.fused_adamw and not self.runtime.sharded
        self.optimizer = build_optimizer(
            self.model,
            cfg.lr,
            cfg.weight_decay,
            (cfg.beta1, cfg.beta2),
            self.trainable,
            fused=fused,
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.step = 0
        self.tokens = 0
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []
        self.peak: PeakFlops | None = None

    # -- checkpoints ---------------------------------------------------------------------------

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "sampler": self.batches.state_dict(),
            "config": self.config_dict,
            "world_size": self.runtime.world_size,
            "parallel": self.runtime.parallel,
            "compile": bool(self.runtime.compile),
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (every rank's shards under FSDP, else rank 0)."""
        root = self.run_dir / "checkpoints"
        keep = self.cfg.keep_checkpoints
        if self.runtime.sharded:
            return ckpt.save_sharded_checkpoint(
                root, self.step, self.model, self.optimizer, self._checkpoint_state(), keep,
                self.runtime,
            )  # fmt: skip
        if not self.runtime.is_main:
            return None
        return ckpt.save_checkpoint(
            root,
            self.step,
            trainable_weights(self.model),
            self.optimizer.state_dict(),
            self._checkpoint_state(),
            keep=keep,
        )

    def resume(self) -> bool:
        """Restore the newest valid checkpoint; return False when there is none."""
        from fmforge.errors import ConfigError

        path = ckpt.latest_valid_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            self._truncate_metrics(0)
            return False
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        saved_world, saved_parallel = state.get("world_size", 1), state.get("parallel", "none")
        sharded = ckpt.is_sharded(path)
        if sharded != self.runtime.sharded or (sharded and saved_world != self.runtime.world_size):
            raise ConfigError(
                f"checkpoint {path} was written by {saved_world} rank(s) with "
                f"runtime.parallel={saved_parallel}; this run has {self.runtime.world_size} "
                f"with runtime.parallel={self.runtime.parallel}. Resume it the way it ran "
                f"(torchrun --nproc-per-node {saved_world} ... --runtime.parallel "
                f"{saved_parallel}), or start a new run from its weights with --model.init_from"
            )
        if saved_world != self.runtime.world_size:
            raise ConfigError(
                f"checkpoint {path} was written by {saved_world} rank(s) and each rank's "
                f"data position depends on it; resume with torchrun --nproc-per-node "
                f"{saved_world}, or start a new run with --model.init_from"
            )
        if sharded:
            saved = ckpt.load_sharded_checkpoint(
                path, self.model, self.optimizer, self.runtime.rank
            )
        else:
            saved = ckpt.load_checkpoint(path)
            self.model.load_state_dict(saved["weights"], strict=False)
            self.optimizer.load_state_dict(saved["optimizer"])
        ckpt.restore_rng(saved["rng"])
        self.batches.load_state_dict(saved["state"]["sampler"])
        if self.runtime.compile is None and "compile" in saved["state"]:
            self.runtime.compile = saved["state"]["compile"]  # compute as the run did
        self.step = saved["state"]["step"]
        self.tokens = saved["state"]["tokens"]
        self._truncate_metrics(self.step)
        if self.runtime.is_main:
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
        """Run `eval_fn` in eval mode without gradients; average the metrics over ranks."""
        if self.eval_fn is None:
            return {}
        self.model.eval()
        with torch.no_grad(), self.runtime.autocast():
            result = self.eval_fn(self.model)
        self.model.train()
        names = sorted(result)
        totals = all_reduce_sum([float(result[k]) for k in names], self.runtime)
        return {k: v / self.runtime.world_size for k, v in zip(names, totals)}

    def _accumulate(self, objective: Callable) -> tuple[float, int, int]:
        """Run forward + backward over one accumulation window; return its global totals.

        Returns (summed loss, scored targets, input tokens), each summed over the window's
        micro-batches and over the ranks; the gradients are left as the global per-target mean.
        """
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        scored, fed = 0, 0
        for micro in range(self.cfg.grad_accum):
            batch = _to_device(self.batches.next_batch(), self.runtime.device)
            last = micro == self.cfg.grad_accum - 1
            with gradient_sync(self.compute_model, self.runtime, sync=last):
                with self.runtime.autocast():
                    summed, n_scored = objective(self.compute_model, batch)
                summed.backward()
            loss_sum += summed.detach()
            scored += int(n_scored)
            fed += input_tokens(batch)
        total_loss, total_scored, total_fed = all_reduce_sum(
            [loss_sum.item(), float(scored), float(fed)], self.runtime
        )
        if total_scored == 0:
            raise DataError(
                f"step {self.step + 1}: no scored targets in the whole accumulation window "
                "(every label is -100); check the loss mask of the training data"
            )
        # DDP and FSDP average gradients over ranks; undo that and divide by the global count.
        scale = self.runtime.world_size / total_scored
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        return total_loss, int(total_scored), int(total_fed)

    def _compile_pays_off(self) -> bool:
        if self.peak is None or not self.flops_per_token:
            return False  # no estimate of the work: stay eager
        per_step = self.cfg.batch_size * self.cfg.grad_accum * self.runtime.world_size
        per_step *= getattr(self.batches, "seq_len", 1)
        planned = (self.cfg.max_steps - self.step) * per_step * self.flops_per_token
        return compile_pays_off(planned, self.peak.value)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `max_steps`; return a summary (final loss, tokens, seconds, tokens/s, MFU)."""
        from tqdm import tqdm

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        else:
            self._truncate_metrics(0)
        if self.flops_per_token:
            tokens = cfg.batch_size * getattr(self.batches, "seq_len", 1)
            self.peak = PeakFlops(self.model, tokens, self.runtime)
        if self.runtime.compile is None:  # auto on CPU: compile when it pays for itself
            self.runtime.compile = self._compile_pays_off()
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
                total_loss, scored, fed = self._accumulate(objective)
                grad_norm = None
                if cfg.grad_clip > 0:
                    grad_norm = _as_float(
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens += fed
                window_tokens += fed
                loss_value = total_loss / scored
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
                        "scored": scored,
                        "loss": loss_value,
                        "lr": lr,
                        "tokens_per_second": round(tps, 2),
                    }
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    if self.peak is not None and self.step > 1:  # step 1 includes warm-up
                        value = self.peak.mfu(tps, self.flops_per_token)
                        if value is not None:
                            record["mfu"] = round(value, 4)
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
            "seq_len": getattr(self.batches, "seq_len", None),
            "compiled": bool(self.runtime.compile),
        }
        if self.peak is not None and summary["tokens_per_second"]:
            self.peak.remeasure()  # the end of the run may be quieter than its start
            value = self.peak.mfu(summary["tokens_per_second"], self.flops_per_token)
            summary["peak_flops"] = self.peak.value
            summary["peak_source"] = self.peak.source
            if value is not None:
                summary["mfu"] = round(value, 4)
        evals = [r for r in self.history if any(k.startswith("val_") for k in r)]
        if evals:
            summary.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
        return summary


def _as_float(value: torch.Tensor) -> float:
    # Under FSDP2 the norm is a DTensor over the shards; full_tensor() gathers the global value.
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
