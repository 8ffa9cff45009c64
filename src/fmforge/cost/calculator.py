"""Training cost and memory calculators behind `fmforge cost`.

`estimate_cost` turns a FLOP count and an accelerator rate into GPU-hours, wall-clock, dollars and
energy; `plan_memory` says whether a training step fits on an accelerator and what would make it
fit. Every result carries `assumptions`, the plain-words list of what was assumed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fmforge.cost.flops import num_params, training_flops_per_token, training_memory
from fmforge.cost.hardware import Accelerator, all_gpus, get_gpu
from fmforge.errors import UserError
from fmforge.model.config import LlamaConfig, preset_config

DEFAULT_MFU = 0.4  # a well-tuned dense transformer run reaches 35-55% MFU on modern GPUs
SECONDS_PER_HOUR = 3600.0
HOURS_PER_YEAR = 24 * 365
PF_DAY = 1e15 * 86400  # FLOPs in one petaFLOP/s-day
MEMORY_HEADROOM = 0.9  # usable fraction of device memory (CUDA context, fragmentation)


def _positive(name: str, value: float | None) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise UserError(f"{name} must be a positive number, got {value}")


def load_model_config(preset: str | None = None, model_config: str | None = None) -> LlamaConfig:
    """Return the config named by a preset or read from an HF `config.json` file."""
    if preset and model_config:
        raise UserError("give either --preset or --model-config, not both")
    if preset:
        return preset_config(preset)
    if model_config:
        path = Path(model_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{model_config}: no such config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        return LlamaConfig.from_hf_dict(data)
    raise UserError("give --preset NAME or --model-config FILE")


def total_training_flops(
    flops: float | None = None,
    params: float | None = None,
    tokens: float | None = None,
    config: LlamaConfig | None = None,
    seq_len: int | None = None,
) -> tuple[float, str]:
    """Return (total training FLOPs, how they were computed) from exactly one way of stating them.

    flops: given directly; params + tokens: 6·N·D; config + tokens: tokens × (6N + 12·L·H·D·T).
    """
    for name, value in (
        ("--flops", flops),
        ("--params", params),
        ("--tokens", tokens),
        ("--seq-len", seq_len),
    ):
        _positive(name, value)
    ways = sum(x is not None for x in (flops, params, config))
    if ways != 1:
        raise UserError(
            "give exactly one of --flops, --params (with --tokens) or --preset/--model-config "
            "(with --tokens)"
        )
    if flops is not None:
        if tokens is not None:
            raise UserError("--tokens goes with --params or a model, not with --flops")
        return flops, f"{flops:.3g} FLOPs (given)"
    if tokens is None:
        raise UserError("--tokens is needed with --params or a model config")
    if params is not None:
        total = 6.0 * params * tokens
        return total, (
            f"6 x {params:.3g} params x {tokens:.3g} tokens = {total:.3g} FLOPs "
            "(6ND: forward 2N + backward 4N per token; attention FLOPs not counted)"
        )
    assert config is not None
    t = seq_len or config.max_position_embeddings
    per_token = training_flops_per_token(config, t)
    total = per_token * tokens
    return total, (
        f"{tokens:.3g} tokens x {per_token:.3g} FLOPs/token = {total:.3g} FLOPs "
        f"(6N + 12·L·H·D·T with N = {num_params(config):,} params, T = {t}, PaLM appendix B)"
    )


def estimate_cost(
    total_flops: float,
    gpu: str | None = None,
    tflops: float | None = None,
    mfu: float | None = None,
    dtype: str | None = None,
    gpus: int = 1,
    price_per_hour: float | None = None,
    watts: float | None = None,
    flops_note: str = "",
) -> dict[str, Any]:
    """Return GPU-hours, GPU-years, wall-clock, dollars, kWh and PF-days for a training run.

    The per-GPU rate is `tflops` (sustained, as measured) or `mfu` × the catalog peak for `dtype`
    (DEFAULT_MFU when neither is given). Wall-clock assumes perfect scaling over `gpus`.
    """
    _positive("total FLOPs", total_flops)
    for name, value in (
        ("--tflops", tflops),
        ("--gpus", gpus),
        ("--price-per-hour", price_per_hour),
        ("--watts", watts),
    ):
        _positive(name, value)
    if mfu is not None and not 0 < mfu <= 1:
        raise UserError(f"--mfu is a fraction of peak in (0, 1], got {mfu}")
    if tflops is not None and mfu is not None:
        raise UserError(
            "give either --tflops (sustained rate) or --mfu (fraction of peak), not both"
        )
    if gpu is None and tflops is None:
        raise UserError("give --gpu NAME (see fmforge cost --list-gpus) or a sustained --tflops")
    if int(gpus) != gpus:
        raise UserError(f"--gpus must be a whole number, got {gpus}")
    accel: Accelerator | None = get_gpu(gpu) if gpu else None
    if dtype is not None and tflops is not None:
        raise UserError("--dtype picks the catalog peak for --mfu; it has no effect with --tflops")
    assumptions: dict[str, str] = {"flops": flops_note or f"{total_flops:.3g} FLOPs (given)"}
    device = "GPU" if accel is None else accel.label
    owner = "this CPU's" if accel is not None and accel.name == "cpu" else f"the {device}'s"
    if tflops is not None:
        rate = tflops * 1e12
        used_mfu = rate / accel.peak_flops(accel.default_dtype()) if accel else None
        assumptions["rate"] = f"{tflops:g} TFLOP/s sustained per {device} (given)"
        assumptions["dtype"] = "not used: the sustained rate was given"
    else:
        assert accel is not None
        dtype = dtype or accel.default_dtype()
        used_mfu = DEFAULT_MFU if mfu is None else mfu
        peak = accel.peak_flops(dtype)
        rate = used_mfu * peak
        why = "given" if mfu is not None else "default; pass --mfu or --tflops"
        assumptions["rate"] = (
            f"{used_mfu:.0%} MFU ({why}) of {owner} {peak / 1e12:.4g} TFLOP/s dense {dtype} "
            f"peak = {rate / 1e12:.3g} TFLOP/s sustained per GPU"
        )
        assumptions["dtype"] = f"{dtype} (the peak the MFU is taken of)"
    gpu_hours = total_flops / rate / SECONDS_PER_HOUR
    if price_per_hour is None and accel is not None and accel.price_per_hour is not None:
        price_per_hour = accel.price_per_hour
        assumptions["price"] = f"${price_per_hour:g} per GPU-hour (catalog: {accel.price_note})"
    elif price_per_hour is not None:
        assumptions["price"] = f"${price_per_hour:g} per GPU-hour (given)"
    else:
        assumptions["price"] = "no price known: pass --price-per-hour for dollars"
    if watts is None and accel is not None and accel.watts is not None:
        watts = accel.watts
        assumptions["energy"] = (
            f"{watts:g} W per GPU (catalog TDP), GPUs only: no host, cooling or PUE"
        )
    elif watts is not None:
        assumptions["energy"] = f"{watts:g} W per GPU (given), GPUs only: no host, cooling or PUE"
    else:
        assumptions["energy"] = "no power draw known: pass --watts for kWh"
    assumptions["scaling"] = (
        f"wall-clock assumes {int(gpus)} GPU(s) in parallel with perfect scaling, no restarts or "
        "evaluation time"
    )
    return {
        "total_flops": total_flops,
        "pf_days": total_flops / PF_DAY,
        "gpu": accel.name if accel else None,
        "gpus": int(gpus),
        "dtype": None if tflops is not None else dtype,
        "sustained_tflops_per_gpu": rate / 1e12,
        "mfu": used_mfu,
        "gpu_hours": gpu_hours,
        "gpu_years": gpu_hours / HOURS_PER_YEAR,
        "wall_hours": gpu_hours / gpus,
        "price_per_hour": price_per_hour,
        "cost_usd": gpu_hours * price_per_hour if price_per_hour is not None else None,
        "watts": watts,
        "energy_kwh": gpu_hours * watts / 1000 if watts is not None else None,
        "assumptions": assumptions,
    }


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} minutes"
    if hours < 48:
        return f"{hours:.2f} hours"
    if hours < 24 * 365:
        return f"{hours / 24:.1f} days"
    return f"{hours / HOURS_PER_YEAR:.2f} years"


def format_cost(result: dict[str, Any]) -> str:
    """Return the human-readable report of `estimate_cost`."""
    cost = result["cost_usd"]
    energy = result["energy_kwh"]
    lines = [
        f"total compute   {result['total_flops']:.3g} FLOPs = {result['pf_days']:,.4g} PF-days",
        f"GPU time        {result['gpu_hours']:,.1f} GPU-hours "
        f"= {result['gpu_years']:,.4g} GPU-years",
        f"wall-clock      {_duration(result['wall_hours'])} on {result['gpus']} GPU(s)",
        f"cost            ${cost:,.0f}" if cost is not None else "cost            unknown",
        f"energy          {energy:,.1f} kWh" if energy is not None else "energy          unknown",
        "assumptions:",
        *(f"  - {key}: {text}" for key, text in result["assumptions"].items()),
    ]
    return "\n".join(lines)


def catalog_costs(total_flops: float, mfu: float = DEFAULT_MFU) -> list[dict[str, Any]]:
    """Return what `total_flops` costs on each catalog GPU at `mfu` of its default-dtype peak."""
    rows = []
    for accel in all_gpus():
        r = estimate_cost(total_flops, gpu=accel.name, mfu=mfu)
        rows.append({k: r[k] for k in ("gpu", "dtype", "gpu_hours", "cost_usd", "energy_kwh")})
    return rows


# ---------------------------------------------------------------------------------------------
# Memory planner.
# ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_memory(
    config: LlamaConfig,
    batch_size: int,
    seq_len: int,
    gpu: str | None = None,
    dtype: str | None = None,
    checkpointing: bool = False,
    lora_rank: int = 0,
) -> dict[str, Any]:
    """Return whether one AdamW training step fits on `gpu`, each term explained, and fixes.

    dtype defaults to bf16 mixed precision on accelerators that have it (fp16 on V100) and fp32 on
    the CPU or when no accelerator is named. Fixes are tried one at a time, cheapest first.
    """
    accel = get_gpu(gpu) if gpu else None
    if dtype is None:
        dtype = "fp32" if accel is None or accel.name == "cpu" else accel.default_dtype()
        if dtype == "fp16" or dtype == "bf16":
            dtype_why = f"{dtype} mixed precision (default on {accel.name if accel else 'GPU'})"
        else:
            dtype_why = "fp32 (default on CPU)"
    else:
        dtype_why = f"{dtype} (given)"
    if dtype not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--dtype for training memory must be fp32, bf16 or fp16, got {dtype!r}")
    estimate = training_memory(config, batch_size, seq_len, dtype, checkpointing, lora_rank)
    capacity = accel.memory_gb * 1e9 if accel else None
    usable = capacity * MEMORY_HEADROOM if capacity else None

    def fits(m) -> bool | None:
        return None if usable is None else m.total_bytes <= usable

    suggestions: list[dict[str, Any]] = []
    if usable is not None and not fits(estimate):
        options = []
        if dtype == "fp32" and accel and accel.name != "cpu":
            options.append(
                ("bf16 mixed precision (16-bit activations)", dict(dtype=accel.default_dtype()))
            )
        if not checkpointing:
            options.append(
                (
                    "activation checkpointing (recompute each block in backward, "
                    "about +33% compute)",
                    dict(checkpointing=True),
                )
            )
        if lora_rank == 0:
            options.append(
                ("LoRA r=8 on all projections (adapters trained, base frozen)", dict(lora_rank=8))
            )
        base = dict(dtype=dtype, checkpointing=checkpointing, lora_rank=lora_rank)
        for what, change in options:
            m = training_memory(config, batch_size, seq_len, **(base | change))
            suggestions.append({"change": what, "total_bytes": m.total_bytes, "fits": fits(m)})
        micro = batch_size
        while micro > 1:
            micro //= 2
            m = training_memory(config, micro, seq_len, **base)
            if fits(m):
                steps = math.ceil(batch_size / micro)
                suggestions.append(
                    {
                        "change": f"batch {micro} with {steps} gradient-accumulation steps "
                        f"(same effective batch {micro * steps})",
                        "total_bytes": m.total_bytes,
                        "fits": True,
                    }
                )
                break
        states = sum(
            t.bytes for t in estimate.terms if t.name in ("weights", "gradients", "optimizer")
        )
        shards = math.ceil(states / max(usable - (estimate.total_bytes - states), 1))
        if not any(s["fits"] for s in suggestions) and shards > 1:
            suggestions.append(
                {
                    "change": "shard weights, gradients and optimizer state over at least "
                    f"{shards} GPUs (FSDP), combined with the fixes above",
                    "total_bytes": None,
                    "fits": None,
                }
            )
    where = f"{accel.label} ({accel.memory_gb:g} GB)" if accel else "no device named"
    return {
        "params": num_params(config),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "dtype": dtype,
        "checkpointing": checkpointing,
        "lora_rank": lora_rank,
        "terms": [{"name": t.name, "bytes": t.bytes, "formula": t.formula} for t in estimate.terms],
        "total_bytes": estimate.total_bytes,
        "gpu": accel.name if accel else None,
        "capacity_bytes": capacity,
        "fits": fits(estimate),
        "suggestions": suggestions,
        "assumptions": {
            "dtype": dtype_why,
            "optimizer": "AdamW with fp32 state (2 values per trainable parameter)",
            "device": where + (f"; {MEMORY_HEADROOM:.0%} of it usable" if accel else ""),
            "not counted": "framework/CUDA context, allocator fragmentation, data loader",
        },
    }


def format_memory(plan: dict[str, Any]) -> str:
    """Return the human-readable report of `plan_memory`."""
    lines = [
        f"training step: {plan['params']:,} params, batch {plan['batch_size']} x seq "
        f"{plan['seq_len']}, {plan['dtype']}"
        + (", activation checkpointing" if plan["checkpointing"] else "")
        + (f", LoRA r={plan['lora_rank']}" if plan["lora_rank"] else ""),
    ]
    for term in plan["terms"]:
        lines.append(f"  {term['name']:<12} {_gib(term['bytes']):>11}   {term['formula']}")
    lines.append(f"  {'total':<12} {_gib(plan['total_bytes']):>11}")
    if plan["fits"] is not None:
        usable = plan["capacity_bytes"] * MEMORY_HEADROOM
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{verdict} on {plan['gpu']} ({_gib(usable)} usable)")
    for s in plan["suggestions"]:
        size = f"{_gib(s['total_bytes'])}, " if s["total_bytes"] is not None else ""
        ok = {True: "fits", False: "still too big", None: ""}[s["fits"]]
        lines.append(f"  to fit: {s['change']} -> {size}{ok}".rstrip(", "))
    lines.append("assumptions:")
    lines.extend(f"  - {key}: {text}" for key, text in plan["assumptions"].items())
    return "\n".join(lines)
