"""The runtime: device, dtype, threads, compile and data parallelism, chosen in one place.

Only this module reads the `runtime` config section. CPU: fp32, fused AdamW, and torch.compile
when the run is long enough to pay the compilation back (`compile_pays_off`). CUDA: bf16
autocast, fused AdamW and torch.compile switch on by themselves. Under `torchrun`
(WORLD_SIZE set) the process group is initialised (NCCL on CUDA, Gloo on CPU) and `wrap_model`
applies the parallelism from outside the model, which knows nothing about it:
- `ddp`: DistributedDataParallel, every rank holds the whole model;
- `fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`), each repeated block and then the root
  sharded over the ranks, for models whose weights and optimizer state do not fit on one device.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fmforge.config import RuntimeSection

TORCHRUN_HINT = "torchrun --nproc-per-node N -m fmforge.cli pretrain ..."


@dataclass
class Runtime:
    """Where and how a run computes."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    compile: bool | None  # None: decide per run from its planned work (`compile_pays_off`)
    fused_adamw: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none, ddp or fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """True when parameters are sharded over ranks (FSDP2)."""
        return self.parallel == "fsdp"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        """Wait for every rank (a no-op on one process)."""
        if self.world_size > 1:
            torch.distributed.barrier()


def setup_runtime(section: RuntimeSection | None = None) -> Runtime:
    """Pick device, dtype, compile and parallelism from config and hardware; join torchrun."""
    from fmforge.config import RuntimeSection, validate_runtime
    from fmforge.errors import ConfigError

    section = section or RuntimeSection()
    validate_runtime(section)
    under_torchrun = "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    parallel = section.parallel.lower()
    if parallel == "auto":
        parallel = "ddp" if world_size > 1 else "none"
    if parallel in ("ddp", "fsdp") and not under_torchrun:
        raise ConfigError(
            f"runtime.parallel={parallel} needs one process per rank started by torchrun: "
            f"{TORCHRUN_HINT} --runtime.parallel {parallel}"
        )
    if parallel == "none" and world_size > 1:
        raise ConfigError(
            f"runtime.parallel=none under torchrun with {world_size} ranks would train "
            f"{world_size} copies into one run dir; use runtime.parallel=ddp or fsdp"
        )
    device = section.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu"
        )
    dev = torch.device(device, local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if section.threads:
        torch.set_num_threads(section.threads)
    on_cuda = dev.type == "cuda"
    if section.dtype == "auto":
        autocast = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else None
    else:
        autocast = torch.bfloat16 if section.dtype == "bfloat16" else None
    if section.compile == "auto":
        use_compile = True if on_cuda else None  # CPU: the trainer decides from the plan
    else:
        use_compile = section.compile == "true"
    if under_torchrun and not torch.distributed.is_initialized():
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
        parallel=parallel,
    )


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the members of every `nn.ModuleList` in `model`: the blocks FSDP shards one by one.

    Family-agnostic: a decoder's `layers` and an encoder's `layer` list are both found.
    """
    blocks = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            blocks.extend(module)
    return blocks


def wrap_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Return the module the loop calls: DDP-wrapped, FSDP2-sharded in place, or the model itself.

    Call it before building the optimizer: FSDP2 replaces parameters with sharded DTensors.
    """
    if runtime.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if runtime.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        policy = MixedPrecisionPolicy()
        if runtime.autocast_dtype is not None:
            # Compute in bf16, reduce gradients and keep the sharded master weights in fp32.
            policy = MixedPrecisionPolicy(
                param_dtype=runtime.autocast_dtype, reduce_dtype=torch.float32
            )
        for block in repeated_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def gradient_sync(compute_model: torch.nn.Module, runtime: Runtime, sync: bool):
    """Return a context in which backward reduces gradients across ranks only when `sync`.

    Accumulation micro-batches before the last skip the all-reduce (DDP `no_sync`) or the
    reduce-scatter (FSDP2 `set_requires_gradient_sync`); the last one reduces the sum.
    """
    if runtime.parallel == "ddp" and not sync:
        return compute_model.no_sync()
    if runtime.parallel == "fsdp":
        compute_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state_dict(model: torch.nn.Module, runtime: Runtime) -> dict[str, torch.Tensor]:
    """Return the whole, unsharded state dict on CPU (on rank 0; empty elsewhere under FSDP).

    Under FSDP every rank must call this: it all-gathers the shards.
    """
    if not runtime.sharded:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


# What compiling the objective costs and buys on CPU, measured with bench/train_throughput.py
# (docs/performance.md): inductor takes ~30-70 s the first time (cached afterwards), and a compiled
# step runs ~1.1-1.5x an eager one; eager steps reach ~60% of the measured matmul peak.
COMPILE_SECONDS = 60.0
COMPILE_SPEEDUP = 1.2
EAGER_MFU = 0.6


def compile_pays_off(planned_flops: float, peak_flops: float) -> bool:
    """Return True when compiling saves more time over `planned_flops` than it costs (CPU).

    The eager time is estimated from the measured peak; a run whose time saved at the expected
    speed-up exceeds the compilation's cost is compiled. The decision is recorded in checkpoints
    so a resumed run computes exactly like the run it continues.
    """
    eager_seconds = planned_flops / (EAGER_MFU * peak_flops)
    return eager_seconds * (1 - 1 / COMPILE_SPEEDUP) > COMPILE_SECONDS


def compile_objective(loss_fn: Callable, runtime: Runtime) -> Callable:
    """Return the objective compiled whole (model forward and loss) when compile is on.

    Compiling the objective rather than the model alone lets inductor fuse the loss into the
    last layers. If compilation fails (no C++ compiler for inductor, say), the first call says
    so on stderr and the run continues eagerly with the same maths.
    """
    from fmforge.errors import UserError

    if not runtime.compile:
        return loss_fn
    compiled = torch.compile(loss_fn)
    state = {"fn": compiled}

    def objective(model, batch):
        try:
            return state["fn"](model, batch)
        except UserError:
            raise  # bad data is bad data, compiled or not
        except Exception as e:  # inductor/dynamo failures surface on the first call
            if state["fn"] is loss_fn:
                raise
            import sys

            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            print(f"fmforge: torch.compile failed ({first}); training eagerly", file=sys.stderr)
            runtime.compile = False
            state["fn"] = loss_fn
            return loss_fn(model, batch)

    return objective


def all_reduce_sum(values: list[float], runtime: Runtime) -> list[float]:
    """Sum Python floats over ranks in one collective (identity on one process)."""
    if runtime.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


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
