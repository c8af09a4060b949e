"""Shared fixtures: the tiny offline models, built once and cached between test sessions; the Atropos venv rule.

`.cache/test-models/<key>/` is keyed by the builder's source, so changing the builder rebuilds the models.

Tests marked `atropos` need the Atropos venv (`make atropos-venv`, or PARALOOP_ATROPOS_VENV). Without it they
fail, so `make test` can never pass by skipping them; PARALOOP_SKIP_ATROPOS=1 turns that into a skip, for running
pytest by hand on a machine without it.
"""

import hashlib
import inspect
import os
import shutil
from pathlib import Path
from typing import Any

import paraloop  # noqa: F401  (preloads OpenBLAS before anything imports mlx)
import pytest
from support.compute_paths import COMPUTES, write_tolerance_report
from support.trainers import base  # noqa: F401  (a fixture: the tiny float32 model, one load per module)

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PARALOOP_TEST_CACHE", REPO / ".cache" / "test-models"))
ATROPOS_VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))


# The numerics tests: their results depend on floating-point summation order (BLAS kernels, batch shapes), so
# `make test` runs them once more under a second OpenBLAS kernel (tests/support/kernels.py). Each compares two
# computations
# either bitwise, where they are the same operations on the same shapes in the same order, or within a tolerance of
# support/compute_paths.py measured on several kernels. This set is the one home of the marker.
NUMERICS = {
    "test_compute_paths",
    "test_engine",
    "test_engine_adapters",
    "test_engine_admission",
    "test_engine_cpu_decode",
    "test_engine_kv_memory",
    "test_engine_prefill",
    "test_engine_prefix",
    "test_engine_sampling",
    "test_engine_score_many",
    "test_learner_engine_agreement",
    "test_learn_logprobs",
    "test_learn_loss",
    "test_learn_memory",
    "test_learn_trainer",
    "test_learn_variants",
    "test_distill_loss",
    "test_distill_teacher",
    "test_tinker_losses",
    "test_distributed_trainer",
    "test_tools",
    "test_checkpoint_mlx_lm",
    "test_predecessor",
    "test_model_resolution",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in NUMERICS:
            item.add_marker(pytest.mark.numerics)


def pytest_sessionfinish(session: pytest.Session) -> None:
    write_tolerance_report()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("atropos") is None or (ATROPOS_VENV / "bin" / "run-api").is_file():
        return
    missing = f"no Atropos venv at {ATROPOS_VENV} (make atropos-venv, or bash scripts/setup-atropos-venv.sh)"
    if os.environ.get("PARALOOP_SKIP_ATROPOS") == "1":
        pytest.skip(f"{missing}; skipped: PARALOOP_SKIP_ATROPOS=1")
    pytest.fail(f"{missing}; set PARALOOP_SKIP_ATROPOS=1 to skip the Atropos tests instead", pytrace=False)


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


@pytest.fixture(scope="module")
def tiny(tiny_model_path: Path) -> tuple[Any, Any]:
    """The float32 tiny model and its tokenizer, loaded once per module (for tests that do not change it)."""
    from paraloop.model import load_model

    model, tokenizer, _, _ = load_model(tiny_model_path)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_q4_model_path() -> Path:
    """The tiny model quantized to 4 bits by mlx-lm."""
    from paraloop.builders.tiny import build_tiny_model

    return _cached("tiny-q4", lambda out: build_tiny_model(out, quantize_bits=4))


@pytest.fixture(scope="session", params=COMPUTES)
def compute(request: pytest.FixtureRequest) -> str:
    """`[model] compute` for the tiny 4-bit model: each test that takes it runs once per path
    (support/compute_paths.py)."""
    return request.param


@pytest.fixture(scope="session")
def tiny_q4_bf16_model_path() -> Path:
    """The tiny model in bfloat16, quantized to 4 bits: the layout of mlx-community's 4-bit models, which most Mac
    users run (bfloat16 scales, norms and activations)."""
    from paraloop.builders.tiny import build_tiny_model

    return _cached("tiny-q4-bf16", lambda out: build_tiny_model(out, quantize_bits=4, dtype="bfloat16"))
