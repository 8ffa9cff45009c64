"""The accelerator catalog: peak dense FLOP/s by dtype, memory, bandwidth, watts and a typical $/h.

The catalog lives in `gpus.json` beside this file so prices can be edited without touching code.
`cpu` is "this CPU": its fp32 rate is measured on the spot with a matmul (about a second).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fmforge.errors import UserError

CATALOG_PATH = Path(__file__).with_name("gpus.json")
DTYPES = ("fp32", "tf32", "fp16", "bf16")


@dataclass(frozen=True)
class Accelerator:
    """One accelerator: peak dense FLOP/s per dtype and what an hour of it costs."""

    name: str  # catalog key, e.g. "h100-sxm"
    label: str  # human name
    peak_tflops: dict[str, float | None]  # dtype -> dense TFLOP/s; None where unsupported
    memory_gb: float
    bandwidth_gbs: float | None
    watts: float | None  # board TDP, for energy estimates
    price_per_hour: float | None  # editable typical USD per accelerator-hour
    price_note: str
    source: str

    def peak_flops(self, dtype: str) -> float:
        """Return the peak dense FLOP/s for `dtype`; UserError names the supported ones."""
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r} is unknown (choose from {list(DTYPES)})")
        value = self.peak_tflops.get(dtype)
        if not value:
            have = [d for d in DTYPES if self.peak_tflops.get(d)]
            raise UserError(f"{self.name} has no {dtype} peak in the catalog (it has {have})")
        return value * 1e12

    def default_dtype(self) -> str:
        """Return the training dtype assumed when none is given: bf16, else fp16, else fp32."""
        return next(d for d in ("bf16", "fp16", "fp32") if self.peak_tflops.get(d))


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


@functools.lru_cache(maxsize=1)
def _catalog() -> dict:
    return json.loads(CATALOG_PATH.read_text())


def gpu_names() -> list[str]:
    """Return the catalog names, `cpu` last."""
    return [*_catalog()["accelerators"], "cpu"]


def get_gpu(name: str) -> Accelerator:
    """Return the accelerator called `name` (aliases allowed); unknown names get "did you mean"."""
    catalog = _catalog()
    key = _normalise(name)
    key = catalog["aliases"].get(key, key)
    if key == "cpu":
        return this_cpu()
    if key not in catalog["accelerators"]:
        choices = [*gpu_names(), *catalog["aliases"]]
        prefixed = [c for c in choices if c.startswith(key) or key.startswith(c)]
        close = prefixed or difflib.get_close_matches(key, choices, n=3, cutoff=0.5)
        close = list(dict.fromkeys(catalog["aliases"].get(c, c) for c in close))[:3]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"GPU {name!r} is not in the catalog (known: {gpu_names()}){hint}")
    entry = catalog["accelerators"][key]
    return Accelerator(
        name=key,
        label=entry["label"],
        peak_tflops=dict(entry["peak_tflops"]),
        memory_gb=entry["memory_gb"],
        bandwidth_gbs=entry.get("bandwidth_gbs"),
        watts=entry.get("watts"),
        price_per_hour=entry.get("price_per_hour"),
        price_note=entry.get("price_note", ""),
        source=entry.get("source", ""),
    )


def all_gpus() -> list[Accelerator]:
    """Return every catalog accelerator except the measured CPU."""
    return [get_gpu(name) for name in _catalog()["accelerators"]]


def measure_cpu_flops(size: int = 1024, seconds: float = 1.0) -> float:
    """Return this CPU's sustained fp32 matmul FLOP/s (best of repeated size×size matmuls)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and kernel selection
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def gemm_seconds(m: int, k: int, n: int, device: str = "cpu", repeats: int = 5) -> float:
    """Return the best wall time of `repeats` fp32 (m, k) @ (k, n) matmuls on `device`."""
    import torch

    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    a @ b  # warm-up: thread pool and kernel selection
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peak_flops(
    shapes: list[tuple[int, int, int]], device: str = "cpu", repeats: int = 5
) -> float:
    """Return the fastest fp32 matmul rate (FLOP/s) over `shapes` and a 1024-cube, each best-of-N.

    Measured with the caller's thread count at the shapes the model multiplies, so the
    denominator of MFU is what this hardware does on this work at its best moment; the maximum
    over shapes and repeats makes a reading above it impossible rather than merely unlikely.
    """
    rates = []
    for m, k, n in {*shapes, (1024, 1024, 1024)}:
        rates.append(2.0 * m * k * n / gemm_seconds(m, k, n, device, repeats))
    return max(rates)


def catalog_peak_flops(device_name: str, dtype: str) -> float | None:
    """Return the catalog's theoretical peak FLOP/s of a GPU named like `device_name`, or None.

    Matches the catalog keys' chip words against torch's device name (e.g. "NVIDIA H100 80GB
    HBM3" is `h100-sxm`); form-factor words (sxm) are ignored, which can only overstate the
    peak (so understate MFU), never the reverse.
    """
    name = device_name.lower()
    for key, entry in _catalog()["accelerators"].items():
        words = [w for w in key.split("-") if w and w != "sxm"]
        if all(w in name for w in words):
            value = entry["peak_tflops"].get(dtype)
            return value * 1e12 if value else None
    return None


@functools.lru_cache(maxsize=1)
def this_cpu() -> Accelerator:
    """Return "this CPU" with its fp32 rate measured now (cached for the process)."""
    import torch

    tflops = measure_cpu_flops() / 1e12
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        memory_gb = 0.0
    threads = torch.get_num_threads()
    return Accelerator(
        name="cpu",
        label=f"this CPU ({os.cpu_count()} cores, {threads} torch threads)",
        peak_tflops={"fp32": tflops, "tf32": tflops, "fp16": None, "bf16": None},
        memory_gb=round(memory_gb, 1),
        bandwidth_gbs=None,
        watts=None,
        price_per_hour=None,
        price_note="no price for this machine; pass --price-per-hour",
        source="fp32 matmul measured just now (1024x1024, best of 1 s)",
    )
