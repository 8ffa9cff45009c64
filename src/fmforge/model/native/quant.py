"""The quantised-linear kernels (quant.c), compiled on first use like the decode kernels.

`library()` returns the loaded library or None (no C compiler, not Linux/macOS, FMFORGE_NATIVE=0,
a failed build); model/quantize.py then dequantises in torch, so a missing compiler costs speed,
never correctness. The shared library is cached beside the decode kernels' (same key scheme: the
source, the compiler, the flags and the CPU's feature flags; written atomically).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fmforge.model.native import build_library

SOURCE = Path(__file__).with_name("quant.c")

_library: ctypes.CDLL | None = None
_status: str | None = None


def library() -> ctypes.CDLL | None:
    """Return the quantised-linear kernel library (built and loaded once per process), or None."""
    global _library, _status
    if _status is not None:
        return _library
    if os.environ.get("FMFORGE_NATIVE", "1") == "0":
        _status = "off (FMFORGE_NATIVE=0): quantised linears dequantise in torch"
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if sys.platform not in ("linux", "darwin") or compiler is None:
        _status = "no C compiler found: quantised linears dequantise in torch"
        return None
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "fmforge_quantize_rows": [ptr, i64, i64, i64, ptr, ptr, ptr],
        "fmforge_quant_group": [ptr, i64, i64, i64, i32, i64, i32]
        + [ptr, ptr, ptr, i64] * 3
        + [ptr, i32, i32],
    }
    try:
        loaded = ctypes.CDLL(str(build_library(compiler, SOURCE, "quant")))
        for name, argtypes in signatures.items():
            getattr(loaded, name).argtypes = argtypes
            getattr(loaded, name).restype = None
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        first = detail.decode(errors="replace").strip().splitlines()[:1]
        _status = f"build failed ({first[0] if first else e}): quantised linears use torch"
        return None
    _library = loaded
    _status = f"native quantised kernels ({Path(compiler).name}, OpenMP)"
    return _library


def status() -> str:
    """Say whether quantised linears use the native kernels, and if not, why."""
    library()
    return _status or ""
