"""Shared fixtures: the tiny offline models, built once and cached between test sessions.

`.cache/test-models/<key>/` is keyed by the builder's source, so changing the builder rebuilds the models.
"""

import hashlib
import inspect
import os
import shutil
from pathlib import Path

import paraloop  # noqa: F401  (preloads OpenBLAS before anything imports mlx)
import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PARALOOP_TEST_CACHE", REPO / ".cache" / "test-models"))


def _cached(name: str, build) -> Path:
    import paraloop.builders as builders
    from paraloop.builders import tiny

    source = inspect.getsource(builders) + inspect.getsource(tiny)
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    out = CACHE / key / name
    if (out / "config.json").is_file():
        return out
    tmp = CACHE / key / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    build(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another session won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The float32 tiny random model (Qwen3 layout, vocab ~1k): loads with mlx_lm.load."""
    from paraloop.builders.tiny import build_tiny_model

    return _cached("tiny-f32", lambda out: build_tiny_model(out))


@pytest.fixture(scope="session")
def tiny_q4_model_path() -> Path:
    """The tiny model quantized to 4 bits by mlx-lm."""
    from paraloop.builders.tiny import build_tiny_model

    return _cached("tiny-q4", lambda out: build_tiny_model(out, quantize_bits=4))
