"""The quantised-linear kernels (quant.c), compiled on first use like the decode kernels.

`library()` returns the loaded library or None (no C compiler, not Linux/macOS, FMFORGE_NATIVE=0,
a failed build); model/quantize.py then dequantises in torch, so a missing compiler costs speed,
never correctness. The shared library is cached beside the decode kernels' (same key scheme: the
source, the compiler, the flags and the CPU's feature flags; written atomically).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fmforge.model.native import _cpu_flags, cache_dir

SOURCE = Path(__file__).with_name("quant.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_library: ctypes.CDLL | None = None
_status: str | None = None


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"quant-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


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
        loaded = ctypes.CDLL(str(_build(compiler)))
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
