"""The first log line of `paraloop run` and `paraloop serve` names the BLAS MLX's CPU matmuls use; on a Linux CPU
without OpenBLAS it is a warning saying ~40x slower and how to fix it, repeated at the end of a run (where a demo's
user looks). Subprocesses, as a user starts them: the preload happens once, before MLX is imported."""

import os
import sys
from pathlib import Path

import pytest

from support import procs
from paraloop.blas import CANDIDATES

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the OpenBLAS preload is Linux-only")


def paraloop(*args: object, openblas: str | None, timeout: float = 120) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PARALOOP_") and "__" in k)}
    env.pop("PARALOOP_OPENBLAS", None)
    env.update(PARALOOP_LOG="info", **({"PARALOOP_OPENBLAS": openblas} if openblas is not None else {}))
    done = procs.run([sys.executable, "-m", "paraloop", *map(str, args)], timeout=timeout, env=env)
    return done.returncode, done.stderr.splitlines()


def test_without_openblas_serve_says_so_first_and_loudly(tmp_path):
    code, lines = paraloop("serve", "--model-path", tmp_path / "missing", openblas="0")
    assert code == 2
    assert " WARNING " in lines[0] and "BLAS: no OpenBLAS" in lines[0] and "40x" in lines[0], lines[0]
    assert "libopenblas0-pthread" in lines[0] and "PARALOOP_OPENBLAS=" in lines[0]


@pytest.mark.skipif(not any(os.path.exists(p) for p in CANDIDATES), reason="no system OpenBLAS on this machine")
def test_with_openblas_the_first_line_names_it_and_its_kernel(tmp_path):
    code, lines = paraloop("serve", "--model-path", tmp_path / "missing", openblas=None)
    assert code == 2
    assert " INFO " in lines[0] and "BLAS: OpenBLAS " in lines[0] and " kernel, " in lines[0], lines[0]
    assert os.environ.get("OPENBLAS_CORETYPE", "") in lines[0]  # the kernel OpenBLAS runs, e.g. Haswell when forced


@pytest.mark.slow  # a learner step on MLX's reference BLAS
def test_a_run_without_openblas_warns_at_the_start_and_again_at_the_end(tiny_model_path, tmp_path):
    code, lines = paraloop(
        "run",
        REPO / "configs" / "tiny.toml",
        "--model-path",
        tiny_model_path,
        "--run-dir",
        tmp_path / "run",
        "--steps",
        "1",
        "--port",
        "0",
        "--no-plot",
        openblas="0",
        timeout=240,
    )
    assert code == 0, "\n".join(lines[-20:])
    assert " WARNING " in lines[0] and "BLAS: no OpenBLAS" in lines[0], lines[0]
    assert "this run was slow for want of OpenBLAS" in lines[-1], lines[-5:]
