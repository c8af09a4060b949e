"""Load Debian's OpenBLAS into the process before MLX is imported (Linux CPU only).

MLX's Linux CPU wheel links a reference BLAS (~3 GFLOP/s float32 matmul on a 2-core Zen3).
Loading OpenBLAS with RTLD_GLOBAL first makes MLX's `sgemm` resolve to it (~40x faster; the same float32
products up to rounding: each BLAS kernel sums in its own order). Nothing happens on macOS (Accelerate) or when MLX is already imported.
Set PARALOOP_OPENBLAS=0 to switch it off, or PARALOOP_OPENBLAS=/path/to/libopenblas.so to choose the library.
"""

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: str | None = None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally; return its path, or None when skipped or unavailable."""
    global _loaded
    if _loaded is not None:
        return _loaded
    setting = os.environ.get("PARALOOP_OPENBLAS", "1").strip()
    if sys.platform != "linux" or setting.lower() in ("0", "false", "off", "no"):
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    paths = (setting,) if setting not in ("1", "true", "on", "yes", "") else CANDIDATES
    for path in paths:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            _loaded = path
            return path
    return None


def openblas_path() -> str | None:
    """The OpenBLAS library loaded by `preload_openblas`, if any."""
    return _loaded
