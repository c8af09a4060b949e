"""Load Debian's OpenBLAS into the process before MLX is imported (Linux CPU only).

MLX's Linux CPU wheel links a reference BLAS (~3 GFLOP/s float32 matmul on a 2-core Zen3).
Loading OpenBLAS with RTLD_GLOBAL first makes MLX's `sgemm` resolve to it (~40x faster; the same float32
products up to rounding: each BLAS kernel sums in its own order). Nothing happens on macOS (Accelerate) or when MLX is
already imported.
Set PARALOOP_OPENBLAS=0 to switch it off, or PARALOOP_OPENBLAS=/path/to/libopenblas.so to choose the library.
"""

import ctypes
import logging
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


SLOW = (
    "no OpenBLAS loaded: MLX's CPU matmuls run on its reference BLAS, about 40x slower (a demo step takes minutes "
    "instead of seconds). Debian/Ubuntu: sudo apt-get install libopenblas0-pthread (or `make install`); without "
    "sudo, any libopenblas.so: PARALOOP_OPENBLAS=/path/to/libopenblas.so.0 (docs/install.md)"
)


def _openblas_name(path: str) -> str:
    """`OpenBLAS 0.3.21 (Zen kernel)`, from the library itself (its kernel is what makes results differ by CPU)."""
    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_config.restype = lib.openblas_get_corename.restype = ctypes.c_char_p
        config, core = lib.openblas_get_config().decode(), lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return f"OpenBLAS {path}"
    version = next((w for w in config.split() if w[:1].isdigit()), "")
    return f"OpenBLAS {version} ({core} kernel, {path})".replace("OpenBLAS  (", "OpenBLAS (")


def blas_report() -> tuple[int, str]:
    """(log level, line) naming what MLX's matmuls run on here: WARNING when it is the slow reference BLAS."""
    if sys.platform == "darwin":
        return logging.INFO, "BLAS: Apple Accelerate on the CPU; Metal kernels on the GPU"
    if _loaded is not None:
        return (
            logging.INFO,
            f"BLAS: {_openblas_name(_loaded)}, preloaded for MLX's CPU matmuls (PARALOOP_OPENBLAS=0: off)",
        )
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return logging.INFO, "BLAS: matmuls run on the GPU (CUDA); CPU-side work uses MLX's reference BLAS"
    return logging.WARNING, f"BLAS: {SLOW}"


def log_blas() -> bool:
    """Log `blas_report`'s line (a verb's first log line); True when it warned that the CPU path is slow."""
    level, line = blas_report()
    logging.getLogger("paraloop.blas").log(level, line)
    return level >= logging.WARNING
