"""A multi-turn conversation through atroposlib's ManagedServer against `paraloop serve`: every turn's sequence is
the previous turn's exact ids plus new ones (so paraloop's prefix cache serves the earlier turns), the sampled turns
stay trained and the inserted text masked, and every sampled token's logprob is the model's own."""

import json
import os
from pathlib import Path

import pytest
from support.procs import run
from support.serving import Serve

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("PARALOOP_ATROPOS_VENV", REPO / ".venv-atropos"))
SCRIPT = Path(__file__).with_name("scripts") / "atropos_multiturn.py"
TURNS = 3

pytestmark = [pytest.mark.atropos, pytest.mark.timeout(240)]  # conftest: fails without the Atropos venv


def test_managed_server_turns_extend_the_previous_turns_ids_and_mask_only_the_inserted_text(tiny_model_path):
    with Serve("--model-path", str(tiny_model_path), "--host", "127.0.0.1") as server:
        port = str(server.port)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        done = run(
            [str(VENV / "bin" / "python"), str(SCRIPT), str(tiny_model_path), port, str(TURNS)], timeout=120, env=env
        )
    assert done.returncode == 0, done.stderr[-3000:]
    nodes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(nodes) == TURNS
    for before, after in zip(nodes, nodes[1:], strict=False):
        n = len(before["tokens"])
        assert after["tokens"][:n] == before["tokens"]  # the earlier turns' ids, never re-tokenised
        assert after["masks"][:n] == before["masks"] and after["logprobs"][:n] == before["logprobs"]
        assert after["masks"][n] == -100  # the new user text is not trained

    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(tiny_model_path))
    last = nodes[-1]
    tokens, masks, lps = last["tokens"], last["masks"], last["logprobs"]
    trained = [j for j, m in enumerate(masks) if m != -100]
    assert all(masks[j] == tokens[j] for j in trained) and all(lps[j] == 1.0 for j, m in enumerate(masks) if m == -100)
    spans = sum(1 for j in trained if masks[j - 1] == -100)
    assert spans == TURNS  # one trained span per turn, masked text between them
    logits = model(mx.array(tokens[:-1])[None])[0]
    expected = (logits - mx.logsumexp(logits, axis=-1, keepdims=True))[mx.arange(len(tokens) - 1), mx.array(tokens[1:])]
    got = mx.array([lps[j] for j in trained])
    assert mx.allclose(got, expected[mx.array(trained) - 1], atol=1e-4).item()
