"""Inflight sampling mid-row: the official Tinker SDK against `paraloop tinker` served in this process, so the test
can hold the engine thread between two decode steps until the trainer's inflight save has reached the engine.

A row of an inflight sampling client is decoding; the training client saves new inflight weights; the row goes on
with them from the next decode step, and its per-token versions (paraloop's VERSIONS field of the SampleResponse,
which the SDK skips) change from the old save to the new one within the row. A snapshot client's row, decoding
beside it in the same batch, keeps its weights and its version. Which weights produced a token is checked from its
log-prob too: the tokens labelled with the old save match the old weights' log-probs (a forward pass of the
learner) within the sampler-vs-learner tolerance, and the first token labelled with the new save does not.
"""

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import tinker
import tinker.lib.api_future_impl as api_future_impl
from tinker import types

from paraloop.engine import worker
from paraloop.flags import settings_from_args
from paraloop.tinker import proto
from paraloop.tinker.command import build_parser, load, serve
from support.tinker_models import sharpened

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

KEY = "tml-inflight-test"
SEQUENCES = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36, 37]]
PROMPT = [41, 42, 43]
HOLD_AT = 4  # decode steps with both rows before the engine thread is held (a few tokens of each row are out by then)
MAX_TOKENS = 24
SAME = 2e-4  # a batched decode step and the learner's forward pass agree within this (test_tinker_sdk.py)


class EngineHold:
    """Holds the engine thread once, after HOLD_AT decode steps with both rows in the batch, until a Replace command
    (an inflight save reaching the engine) has been posted; the Replace is then applied before the next step."""

    def __init__(self) -> None:
        self.armed = False
        self.steps = 0
        self.held = threading.Event()
        self.replace_posted = threading.Event()

    def wrap(self, step: Callable[[Any], None], post: Callable[[Any, Any], bool]) -> tuple[Callable, Callable]:
        def held_step(w: Any) -> None:
            step(w)
            if self.armed and len(w._rows) >= 2 and not self.held.is_set():  # both rows are decoding
                self.steps += 1
                if self.steps == HOLD_AT:
                    self.held.set()
                    self.replace_posted.wait(timeout=60)

        def seen_post(w: Any, command: Any) -> bool:
            posted = post(w, command)
            if isinstance(command, worker.Replace):
                self.replace_posted.set()
            return posted

        return held_step, seen_post


def sft_datum(ids: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def sampling(seed: int) -> types.SamplingParams:
    return types.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, stop=[])  # no EOS: all tokens


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_row_in_flight_takes_the_new_inflight_weights_between_decode_steps(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold = EngineHold()
    held_step, seen_post = hold.wrap(worker.Worker._step, worker.Worker.post)
    monkeypatch.setattr(worker.Worker, "_step", held_step)
    monkeypatch.setattr(worker.Worker, "post", seen_post)
    versions_of: dict[tuple[int, ...], list[int]] = {}  # a sequence's tokens -> its VERSIONS, as the SDK got them
    deserialize = api_future_impl.deserialize_proto_response

    def recording(body: bytes, model_cls: type) -> object:
        result = deserialize(body, model_cls)
        if model_cls is types.SampleResponse:
            for seq, versions in zip(result.sequences, proto.sample_versions(body), strict=True):  # type: ignore[attr-defined]
                versions_of[tuple(seq.tokens)] = versions
        return result

    monkeypatch.setattr(api_future_impl, "deserialize_proto_response", recording)

    model = sharpened(tiny_model_path, tmp_path / "tiny-sharp")
    args = build_parser().parse_args(
        ["--model-path", str(model), "--port", "0", "--control-token", KEY, "--set", f"tinker.state_dir={tmp_path}"]
    )
    settings = settings_from_args(args)
    loaded = load(settings)

    def scenario(port: int) -> dict[str, Any]:
        with tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key=KEY) as service:
            tc = service.create_lora_training_client(base_model=str(model), rank=4).result()
            snapshot = tc.save_weights_and_get_sampling_client().result()  # version 1: the initial weights, fixed
            inflight = tc.save_weights_and_get_sampling_client(
                kind="inflight"
            ).result()  # version 2: the same, followed
            for _ in range(3):
                tc.forward_backward([sft_datum(s) for s in SEQUENCES], "cross_entropy")
                tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
            hold.armed = True
            prompt = types.ModelInput.from_ints(PROMPT)
            following = inflight.sample(prompt, num_samples=1, sampling_params=sampling(seed=3))
            fixed = snapshot.sample(prompt, num_samples=1, sampling_params=sampling(seed=4))  # other tokens: other keys
            assert hold.held.wait(timeout=120), "the engine never decoded the two rows"
            # Both rows are mid-decode and the engine thread is held: publish new inflight weights (version 3).
            tc.save_weights_and_get_sampling_client(kind="inflight").result()
            rows = {"following": following.result().sequences[0], "fixed": fixed.result().sequences[0]}
            old_lp = {}  # the initial weights' log-probs of each row's tokens: one forward pass of the learner
            for name, seq in rows.items():
                full = types.ModelInput.from_ints(PROMPT + seq.tokens)
                old_lp[name] = np.asarray(snapshot.compute_logprobs(full).result()[len(PROMPT) :], np.float64)
            return {"rows": rows, "old_lp": old_lp}

    with anyio.fail_after(280):
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve, settings, loaded)
            out = await anyio.to_thread.run_sync(scenario, port)
            tg.cancel_scope.cancel()

    rows, old_lp = out["rows"], out["old_lp"]
    following, fixed = rows["following"], rows["fixed"]
    assert len(following.tokens) == len(fixed.tokens) == MAX_TOKENS
    v_following, v_fixed = versions_of[tuple(following.tokens)], versions_of[tuple(fixed.tokens)]
    switch = v_following.index(3) if 3 in v_following else len(v_following)
    assert v_following == [2] * switch + [3] * (MAX_TOKENS - switch), v_following  # one switch, old to new
    assert 1 <= switch < MAX_TOKENS - 1, v_following  # within the row: tokens of both saves
    assert v_fixed == [1] * MAX_TOKENS  # the snapshot keeps its weights
    # The tokens labelled 2 came from the initial weights, the first labelled 3 did not; the snapshot's all did.
    sampled = np.asarray(following.logprobs, np.float64)
    assert np.abs(sampled[:switch] - old_lp["following"][:switch]).max() < SAME
    assert abs(sampled[switch] - old_lp["following"][switch]) > 10 * SAME
    assert np.abs(np.asarray(fixed.logprobs, np.float64) - old_lp["fixed"]).max() < SAME
