"""fmforge's own CPU kernels for decode steps (kernels.c), compiled on first use with the system
C compiler: a multithreaded small-batch matrix product on the weights in place (B rows per step,
each weight read once), RMSNorm with the residual add, SwiGLU's silu(gate) * up, and attention with
RoPE and the KV-cache write for rows that each sit at their own cache row and position.

`library()` returns the loaded kernel library, or None when it cannot be had: not Linux/macOS on a
CPU with a C compiler (`cc`, or $CC), or FMFORGE_NATIVE=0. Callers then use torch ops instead,
so a missing compiler costs speed, never correctness. `status()` says which and why.

The shared library is cached under $XDG_CACHE_HOME/fmforge/kernels (default ~/.cache), keyed by
the source, the compiler and the CPU's feature flags, and written atomically (temp file, then
rename), so concurrent first uses are safe and later processes load it in milliseconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.c")

_library: ctypes.CDLL | None = None
_status: str | None = None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fmforge" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_library(compiler: str, source_file: Path = SOURCE, name: str = "kernels") -> Path:
    """Compile `source_file` into the cache (once per source, compiler and CPU); return the .so."""
    source = source_file.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    key = hashlib.sha256(
        b"\0".join([source, compiler.encode(), " ".join(flags).encode(), _cpu_flags().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *flags, str(source_file), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(
    source_file: Path, name: str, signatures: dict[str, tuple[list, type | None]], fallback: str
) -> tuple[ctypes.CDLL | None, str]:
    """Build (once, cached) and load a kernel source; return (library or None, a status line).

    `signatures` maps each entry point to (argument types, return type); `fallback` says what
    runs instead when the library cannot be had (FMFORGE_NATIVE=0, no compiler, a failed build).
    """
    if os.environ.get("FMFORGE_NATIVE", "1") == "0":
        return None, f"off (FMFORGE_NATIVE=0): {fallback}"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if sys.platform not in ("linux", "darwin") or compiler is None:
        return None, f"no C compiler found: {fallback} (install gcc for the native kernels)"
    try:
        loaded = ctypes.CDLL(str(build_library(compiler, source_file, name)))
        for entry, (argtypes, restype) in signatures.items():
            getattr(loaded, entry).argtypes = argtypes
            getattr(loaded, entry).restype = restype
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        first = detail.decode(errors="replace").strip().splitlines()[:1]
        return None, f"build failed ({first[0] if first else e}): {fallback}"
    return loaded, f"native {name} ({Path(compiler).name}, OpenMP)"


def library() -> ctypes.CDLL | None:
    """Return the decode kernel library (built and loaded once per process), or None."""
    global _library, _status
    if _status is None:
        _library, _status = load_library(SOURCE, "kernels", _signatures(), "decode uses torch ops")
    return _library


def _signatures() -> dict[str, tuple[list, type | None]]:
    # name -> (argument types, return type) of every entry point of kernels.c
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    return {
        "fmforge_gemm_rows": ([ptr, ptr, ptr, i64, i64, i64, i64, i32], None),
        "fmforge_gemm_group": ([ptr, ptr, ptr, i64, ptr, i64, i64, i64, i32], None),
        "fmforge_add_rmsnorm": ([ptr, ptr, ptr, f32, ptr, i64, i64], None),
        "fmforge_silu_mul": ([ptr, ptr, i64, i64], None),
        "fmforge_attend_rows": ([ptr, ptr, ptr, i64] + [ptr] * 5 + [i64] * 6 + [i32], None),
        "fmforge_attended_rows": ([], i64),
    }


def status() -> str:
    """Say whether decode steps use the native kernels, and if not, why."""
    library()
    return _status or ""
