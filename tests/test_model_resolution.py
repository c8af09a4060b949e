"""Models named by Hugging Face repo id, found as mlx-lm finds them, from a hub cache on disk with HF_HUB_OFFLINE=1:
`paraloop run`, `serve` and `merge` load them, a revision picks its snapshot, and an id that is neither a directory
nor cached is one line naming it and why."""

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from support import procs
from support.hf_cache import REPO_ID, add_snapshot, offline_env

from paraloop.checkpoint import read_checkpoint
from paraloop.model import ModelNotFoundError, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.toml"
MAIN, Q4 = "a" * 40, "b" * 40  # commits: main is the float tiny model, the tag q4 its 4-bit version
DEADLINE_S = 180  # bounds a hang only


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_path, tiny_q4_model_path) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    add_snapshot(home, tiny_model_path, commit=MAIN, refs=("main",))
    add_snapshot(home, tiny_q4_model_path, commit=Q4, refs=("q4",))
    return home


@pytest.fixture
def offline(monkeypatch, hf_home):
    """This process, offline, with hf_home's cache (huggingface_hub reads these constants at each call)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def paraloop(home: Path, *args: object) -> tuple[int, str, str]:
    """`python -m paraloop ARGS` in its own process group, killed if it outlives the deadline."""
    done = procs.run([sys.executable, "-m", "paraloop", *map(str, args)], timeout=DEADLINE_S, env=offline_env(home))
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
def test_run_and_merge_load_a_repo_id_from_the_offline_cache(hf_home, tiny_model_path, tmp_path):
    run_dir, merged = tmp_path / "run", tmp_path / "merged"
    code, _, err = paraloop(
        hf_home,
        "run",
        TINY_CONFIG,
        "--model-path",
        REPO_ID,
        "--run-dir",
        run_dir,
        "--port",
        "0",
        "--steps",
        "1",
        "--no-plot",
    )
    assert code == 0, err[-3000:]
    final = read_checkpoint(run_dir)
    assert final.step == 1 and final.trainer_state["config"]["model"]["base_path"] == REPO_ID

    code, _, err = paraloop(hf_home, "merge", "--base-model", REPO_ID, "--adapter", run_dir, "--output", merged)
    assert code == 0, err[-3000:]
    assert f"base_model: {REPO_ID}" in (merged / "README.md").read_text()  # the card names the repo, as mlx_lm.fuse's
    fused, tokenizer = mlx_lm.load(str(merged))
    base, _ = mlx_lm.load(str(tiny_model_path), adapter_path=str(final.path))  # main = the float tiny model
    ids = mx.array(tokenizer.encode("The capital of France is"))[None]
    np.testing.assert_allclose(np.array(fused(ids)), np.array(base(ids)), atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(DEADLINE_S)
def test_serve_loads_a_repo_id_at_a_revision(hf_home):
    cmd = [sys.executable, "-m", "paraloop", "serve", "--model-path", REPO_ID, "--revision", "q4", "--port", "0"]
    env = {**offline_env(hf_home), "PARALOOP_LOG": "info"}
    with procs.running(cmd, env=env, stderr=subprocess.PIPE, text=True) as proc:
        lines = procs.Lines(proc.stderr)
        port = lines.expect(r"serving .* on http://127\.0\.0\.1:(\d+)", timeout=DEADLINE_S)
        assert f"snapshots/{Q4}" in lines.text(), "the q4 tag's snapshot was loaded"
        request = urllib.request.Request(
            f"http://127.0.0.1:{port[1]}/v1/completions", method="POST", data=b'{"prompt": "Hello", "max_tokens": 2}'
        )
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0


def test_a_revision_picks_its_snapshot_and_a_local_dir_wins(offline, hf_home, tiny_model_path):
    snapshots = hf_home / "hub" / "models--paraloop-test--tiny" / "snapshots"
    assert resolve_model_path(REPO_ID) == snapshots / MAIN
    assert resolve_model_path(REPO_ID, revision="q4") == snapshots / Q4
    assert resolve_model_path(REPO_ID, revision=Q4) == snapshots / Q4
    assert resolve_model_path(tiny_model_path, revision="q4") == tiny_model_path  # an existing path is local
    with pytest.raises(ModelNotFoundError, match="revision 'v9'.*HF_HUB_OFFLINE=1"):
        resolve_model_path(REPO_ID, revision="v9")


def test_an_id_not_cached_while_offline_is_one_line_everywhere(offline, tmp_path, capsys):
    from paraloop.run.main import main as run
    from paraloop.serve import main as serve
    from paraloop.tools.merge import main as merge

    absent = "paraloop-test/absent"
    codes = [
        run([str(TINY_CONFIG), "--model-path", absent, "--run-dir", str(tmp_path / "run")]),
        serve(["--model-path", absent, "--port", "0"]),
        merge(["--base-model", absent, "--adapter", str(tmp_path), "--output", str(tmp_path / "out")]),
    ]
    assert codes == [2, 2, 2]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("paraloop: error:")]
    assert len(lines) == 3
    for line in lines:
        assert absent in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # nothing began
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face repo id"):
        resolve_model_path(tmp_path / "no-such-dir")
