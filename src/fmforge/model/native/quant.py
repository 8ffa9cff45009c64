"""The quantised-linear kernels (quant.c), compiled on first use like the decode kernels.

`library()` returns the loaded library or None (no C compiler, not Linux/macOS, FMFORGE_NATIVE=0,
a failed build); model/quantize.py then dequantises in torch, so a missing compiler costs speed,
never correctness. The shared library is cached beside the decode kernels' (same key scheme: the
source, the compiler, the flags and the CPU's feature flags; written atomically).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from fmforge.model.native import load_library

SOURCE = Path(__file__).with_name("quant.c")

_library: ctypes.CDLL | None = None
_status: str | None = None


def library() -> ctypes.CDLL | None:
    """Return the quantised-linear kernel library (built and loaded once per process), or None."""
    global _library, _status
    if _status is None:
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        group = [ptr, i64, i64, i64, i32, i64, i32] + [ptr, ptr, ptr, i64] * 3 + [ptr, i32, i32]
        signatures = {
            "fmforge_quantize_rows": ([ptr, i64, i64, i64, ptr, ptr, ptr], None),
            "fmforge_quant_group": (group, None),
        }
        _library, _status = load_library(
            SOURCE, "quant", signatures, "quantised linears dequantise in torch"
        )
    return _library


def status() -> str:
    """Say whether quantised linears use the native kernels, and if not, why."""
    library()
    return _status or ""
