"""Print an OpenBLAS kernel this CPU can run that is not the one OpenBLAS picks by itself (nothing if none).

`make test` runs the numerics tests (conftest.NUMERICS) once more under it (OPENBLAS_CORETYPE), so an equality that
holds only on one kernel's summation order fails here, not on a user's machine. Each candidate is tried in a child
process: the name must come back from `openblas_get_corename()` and a matmul must run (a kernel whose instructions the
CPU lacks dies of SIGILL, as SkylakeX does on an AVX2-only CPU). Prints nothing on macOS or without OpenBLAS.

    python tests/support/kernels.py          # e.g. "Haswell" on a Zen or Skylake-X machine
    python tests/support/kernels.py --own    # the kernel OpenBLAS picks here
"""

import os
import platform
import subprocess
import sys

# The common baselines first: Haswell (AVX2, most x86-64 machines of the last decade), then older ones.
CANDIDATES = {"x86_64": ("Haswell", "Sandybridge", "Nehalem"), "aarch64": ("ARMV8", "NEOVERSEN1", "CORTEXA57")}

PROBE = """
import ctypes, paraloop.blas as blas
path = blas.preload_openblas()
if path is None:
    raise SystemExit(3)
import mlx.core as mx
lib = ctypes.CDLL(path)
lib.openblas_get_corename.restype = ctypes.c_char_p
a = mx.ones((64, 64))
mx.eval(a @ a)
print(lib.openblas_get_corename().decode())
"""


def corename(coretype: str | None) -> str | None:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    return out.stdout.strip() or None if out.returncode == 0 else None


def second_kernel() -> str | None:
    own = os.environ.get("OPENBLAS_CORETYPE") or corename(None)
    if own is None:
        return None
    for name in CANDIDATES.get(platform.machine(), ()):
        if name.lower() != own.lower() and (corename(name) or "").lower() == name.lower():
            return name
    return None


if __name__ == "__main__":
    found = (os.environ.get("OPENBLAS_CORETYPE") or corename(None)) if "--own" in sys.argv else second_kernel()
    print(found or "")
