"""Which MLX backend this environment has installed, and one-line answers when that install is broken.

On Linux the `mlx` package carries no compiled library: mlx-cpu, mlx-cuda-12 and mlx-cuda-13 (the extras `cpu`,
`cuda12`, `cuda13`) each install the same file, mlx/lib/libmlx.so. Two of them in one environment overwrite each
other without a word (the last installed wins: a CUDA user who later installs mlx[cpu] computes on the CPU), and
uninstalling either deletes the file the other needs. `install_problem` names such a clash before anything imports
mlx.core, reading only package metadata (and the library's size, or hash when sizes tie, to say whose it is);
`import_error_message` turns the ImportErrors of a missing backend or a CUDA build without a driver into one line.
"""

import base64
import hashlib
import importlib.metadata as md
import sys
from pathlib import Path

BACKEND_PACKAGES = {"mlx-cpu": "cpu", "mlx-cuda-12": "cuda12", "mlx-cuda-13": "cuda13"}  # package -> extra
LIBRARY = "mlx/lib/libmlx.so"
EXTRAS_HINT = (
    "pip install 'mlx[cpu]', or 'mlx[cuda12]' / 'mlx[cuda13]' for NVIDIA GPUs (in a checkout: "
    "pip install -e '.[cpu]', '.[cuda12]' or '.[cuda13]')"
)


def _distributions(path: list[str] | None) -> dict[str, md.Distribution]:
    """The MLX backend packages installed here (or under `path`), by name."""
    where = {} if path is None else {"path": path}
    found = {}
    for name in BACKEND_PACKAGES:
        dist = next(iter(md.Distribution.discover(name=name, **where)), None)
        if dist is not None:
            found[name] = dist
    return found


def installed_backends(path: list[str] | None = None) -> dict[str, str]:
    """The MLX backend packages installed here (or under `path`), with their versions."""
    return {name: dist.version for name, dist in _distributions(path).items()}


def library_owner(dists: dict[str, md.Distribution]) -> str | None:
    """Which of `dists` wrote the libmlx.so now in place (by its RECORD size, then sha256), or None."""
    candidates = []
    for name, dist in sorted(dists.items()):
        entry = next((f for f in dist.files or [] if str(f) == LIBRARY), None)
        if entry is not None and entry.hash is not None:
            candidates.append((name, entry))
    if not candidates:
        return None
    path = Path(candidates[0][1].locate())
    if not path.is_file():
        return None
    size = path.stat().st_size
    same_size = [(name, entry) for name, entry in candidates if entry.size == size]
    if len(same_size) == 1:
        return same_size[0][0]
    digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
    return next((name for name, entry in same_size if entry.hash.value == digest), None)


def install_problem(path: list[str] | None = None) -> str | None:
    """One line describing a clash of MLX backends on Linux (more than one installed), or None."""
    if sys.platform != "linux":
        return None
    dists = _distributions(path)
    if len(dists) < 2:
        return None
    found = {name: dist.version for name, dist in dists.items()}
    owner = library_owner(dists)
    now = f"{owner}'s library is the one in place" if owner else "none of their libraries is intact"
    pins = " or ".join(f"'mlx[{BACKEND_PACKAGES[n]}]=={v}'" for n, v in sorted(found.items()))
    return (
        f"several MLX backends are installed ({', '.join(f'{n} {v}' for n, v in sorted(found.items()))}); they "
        f"share {LIBRARY}, so only one can work and {now}. Keep one: `pip uninstall -y {' '.join(sorted(found))}`"
        f", then `pip install {pins}`"
    )


def import_error_message(error: ImportError) -> str | None:
    """One line for an ImportError of MLX's native library (no backend, or CUDA without a driver), else None."""
    text = str(error)
    if "libmlx" in text:
        return f"MLX has no backend installed ({text}). On Linux install one: {EXTRAS_HINT}"
    if "libcuda" in text or "libcudart" in text or "libnvrtc" in text:
        cuda = [n for n in installed_backends() if n.startswith("mlx-cuda")]
        which = cuda[0] if cuda else "mlx-cuda-12/13"
        return (
            f"MLX's CUDA build ({which}) cannot load ({text}): it needs an NVIDIA GPU and its driver. On a machine "
            f"without one use the CPU build: `pip uninstall -y {which} && pip install 'mlx[cpu]'`"
        )
    return None
