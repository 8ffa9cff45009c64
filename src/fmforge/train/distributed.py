"""Devices, dtypes and process groups, chosen in one place.

CPU: fp32, fused AdamW, no compile. CUDA: bf16 autocast, fused AdamW and torch.compile switch on
by themselves.
Under `torchrun` (WORLD_SIZE > 1) the process group is initialised (NCCL on CUDA, Gloo on CPU) and
the model is wrapped in DDP from outside; the model file knows nothing about it.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Runtime:
    """Where and how a run computes."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    compile: bool
    fused_adamw: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(
    device: str = "auto", dtype: str = "auto", compile: str = "auto", threads: int = 0
) -> Runtime:
    """Pick device/dtype/compile from the config and the hardware; join torchrun's group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from fmforge.errors import ConfigError

        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if threads:
        torch.set_num_threads(threads)
    on_cuda = dev.type == "cuda"
    if dtype == "auto":
        autocast = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else None
    else:
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
    use_compile = on_cuda if compile == "auto" else compile == "true"
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if on_cuda else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Runtime(
        dev,
        autocast,
        use_compile,
        fused_adamw=True,  # CPU and CUDA kernels; also transformers' Trainer default
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
    )


def wrap_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Return the module the loop calls: DDP-wrapped under torchrun, else the model itself."""
    if runtime.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return model


def compile_objective(loss_fn: Callable, runtime: Runtime) -> Callable:
    """Return the objective compiled whole (model forward and loss) when compile is on.

    Compiling the objective rather than the model alone lets inductor fuse the loss into the
    last layers: on the CPU here that is ~1.2x an eager step, against ~1.1x for the model alone.
    """
    return torch.compile(loss_fn) if runtime.compile else loss_fn


def all_reduce_mean(value: float, runtime: Runtime) -> float:
    """Average a Python float over ranks (identity on one process)."""
    if runtime.world_size == 1:
        return value
    t = torch.tensor([value], device=runtime.device)
    torch.distributed.all_reduce(t)
    return t.item() / runtime.world_size


def environment_report() -> dict[str, Any]:
    """Return versions, devices and thread counts for `fmforge env` and run provenance."""
    from fmforge import __version__

    report: dict[str, Any] = {
        "fmforge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return report
