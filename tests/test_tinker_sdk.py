"""The official Tinker SDK (tinker 0.38) against `paraloop tinker` on the tiny model: the loops Tinker programs run.

Each test drives the SDK's synchronous API, as a user's script would; the server is one `paraloop tinker` child
process for the module, on the tiny model with a sharpened output norm (`sharpened`). What is compared bitwise is the
same computation on the same shapes in the same order
(a state saved and loaded, a client untouched by another's steps); the sampler's and the learner's log-probs of the
same tokens come from different kernels (a batched decode step vs one forward pass) and agree within 2e-4.
"""

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tinker
from tinker import types

from support import procs
from support.tinker_models import sharpened
from support.tinker_server import KEY, Server, serving

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sharp_model(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sharpened(tiny_model_path, tmp_path_factory.mktemp("model") / "tiny-sharp")


@pytest.fixture(scope="module")
def tinker_server(sharp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(sharp_model, tmp_path_factory.mktemp("tinker-state")) as (server, _):
        yield server


@pytest.fixture(scope="module")
def service(tinker_server: Server) -> Iterator["tinker.ServiceClient"]:
    with tinker.ServiceClient(base_url=tinker_server.url, api_key=KEY) as service:  # closed: its heartbeats stop
        yield service


SEQUENCES = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36, 37]]


def sft_datum(ids: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
    )


def forward_logprobs(tc: tinker.TrainingClient, ids: list[int]) -> np.ndarray:
    out = tc.forward([sft_datum(ids)], "cross_entropy").result()
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def test_supervised_loop_loss_falls(service: tinker.ServiceClient, tinker_server: Server) -> None:
    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=8).result()
    assert tc.get_info().lora_rank == 8
    tokenizer = tc.get_tokenizer()  # offline: the server names its local model directory
    assert tokenizer.decode(tokenizer.encode("ab")).strip()
    data = [sft_datum(s) for s in SEQUENCES]
    losses = []
    for _ in range(12):
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=5e-3))
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    assert losses[-1] < 0.75 * losses[0] and losses[-1] == min(losses), losses


def reward(tokens: list[int], vocab_half: int) -> float:
    """The test's task: emit low token ids (a reward the tiny random model can learn in a few steps)."""
    return float(np.mean([t < vocab_half for t in tokens])) if tokens else 0.0


def test_rl_loop_importance_sampling(service: tinker.ServiceClient, tinker_server: Server) -> None:
    """The cookbook's rl_loop shape: sample a group per prompt from the latest weights, advantages = reward - group
    mean, importance_sampling forward_backward, optim_step, new sampling client."""
    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=8).result()
    vocab_half = len(tc.get_tokenizer()) // 2
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, stop=[])
    sampler = tc.save_weights_and_get_sampling_client().result()
    means = []
    for step in range(10):
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), num_samples=8, sampling_params=params) for p in prompts
        ]
        data, rewards = [], []
        for prompt, fut in zip(prompts, futures, strict=True):
            seqs = fut.result().sequences
            group = [reward(s.tokens, vocab_half) for s in seqs]
            rewards += group
            for seq, r in zip(seqs, group, strict=True):
                full = prompt + seq.tokens
                pad = len(prompt) - 1
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={
                            "target_tokens": full[1:],
                            "logprobs": [0.0] * pad + seq.logprobs,
                            "advantages": [0.0] * pad + [r - float(np.mean(group))] * len(seq.tokens),
                        },
                    )
                )
        if step == 0:  # on-policy: the learner scores the sampled tokens as the sampler did
            out = tc.forward(data[:4], "importance_sampling").result()
            for datum, row in zip(data[:4], out.loss_fn_outputs, strict=True):
                pad = len(datum.loss_fn_inputs["target_tokens"].tolist()) - 6
                sampled = datum.loss_fn_inputs["logprobs"].to_numpy()[pad:]
                assert np.abs(row["logprobs"].to_numpy()[pad:] - sampled).max() < 2e-4
        tc.forward_backward(data, "importance_sampling").result()
        # 5e-3: at 1e-2 Adam's unit-size steps on near-zero advantages once the task is learned made the reward
        # dip to 0.5 and, in one make test run in ~10, collapse to 0 in the last steps; 5e-3 learns it by step 3
        # (8 runs, Zen / Haswell / Sandybridge: last three steps' mean 0.97-1.0)
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        means.append(float(np.mean(rewards)))
    assert means[0] < 0.8 and np.mean(means[-3:]) > 0.9, means


def test_two_clients_interleaved(service: tinker.ServiceClient, tinker_server: Server) -> None:
    a = service.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    b = service.create_lora_training_client(base_model=tinker_server.model, rank=8).result()
    x, y = SEQUENCES[0], SEQUENCES[1]
    b_before = forward_logprobs(b, x)
    for _ in range(3):  # interleaved: A's step, B's forward_backward, B's step, A's forward_backward
        a.forward_backward([sft_datum(x)], "cross_entropy")
        b.forward_backward([sft_datum(y)], "cross_entropy")
        a.optim_step(types.AdamParams(learning_rate=1e-2))
        b.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert forward_logprobs(a, x).sum() > b_before.sum() + 1.0  # A learned x
    b_forward = forward_logprobs(b, y)
    c = service.create_lora_training_client(base_model=tinker_server.model, rank=8).result()
    c_before = forward_logprobs(c, x)
    for _ in range(2):
        a.forward_backward([sft_datum(x)], "cross_entropy")
        a.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    np.testing.assert_array_equal(forward_logprobs(c, x), c_before)  # A's steps never touch C
    np.testing.assert_array_equal(forward_logprobs(b, y), b_forward)
    # both samplers in one decode batch, each with its own adapter
    sa, sb = a.save_weights_and_get_sampling_client().result(), b.save_weights_and_get_sampling_client().result()
    la, lb = sa.compute_logprobs(types.ModelInput.from_ints(x)), sb.compute_logprobs(types.ModelInput.from_ints(y))
    np.testing.assert_allclose(la.result()[1:], forward_logprobs(a, x), atol=2e-4)
    np.testing.assert_allclose(lb.result()[1:], forward_logprobs(b, y), atol=2e-4)
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=7)
    ra = sa.sample(types.ModelInput.from_ints(x[:3]), num_samples=3, sampling_params=params)
    rb = sb.sample(types.ModelInput.from_ints(x[:3]), num_samples=3, sampling_params=params)
    alone = sa.sample(types.ModelInput.from_ints(x[:3]), num_samples=3, sampling_params=params).result()
    assert [s.tokens for s in ra.result().sequences] == [s.tokens for s in alone.sequences]  # seeded rows repeat
    assert len(rb.result().sequences) == 3


def test_inflight_sampler_follows_its_trainer(service: tinker.ServiceClient, tinker_server: Server) -> None:
    """An inflight sampling client samples from its training client's latest inflight save; a snapshot client keeps
    the weights it was made with."""
    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    prompt, params = SEQUENCES[0][:3], types.SamplingParams(max_tokens=4, temperature=1.0, seed=5, stop=[])

    def sampled_vs_learner(sampler: tinker.SamplingClient) -> float:
        seq = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1, sampling_params=params).result()
        full = prompt + seq.sequences[0].tokens
        return float(np.abs(forward_logprobs(tc, full)[len(prompt) - 1 :] - seq.sequences[0].logprobs).max())

    inflight = tc.save_weights_and_get_sampling_client(kind="inflight").result()
    snapshot = tc.save_weights_and_get_sampling_client().result()
    assert sampled_vs_learner(inflight) < 2e-4
    for _ in range(3):
        tc.forward_backward([sft_datum(s) for s in SEQUENCES], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    assert sampled_vs_learner(snapshot) > 1e-2  # the snapshot is the old weights
    assert sampled_vs_learner(inflight) > 1e-2  # no inflight save yet
    tc.save_weights_and_get_sampling_client(kind="inflight").result()  # an inflight save: updates `inflight` too
    assert sampled_vs_learner(inflight) < 2e-4  # the old client now samples the new weights


def test_save_and_load_continue_exactly(service: tinker.ServiceClient, tinker_server: Server) -> None:
    def train(tc: tinker.TrainingClient, steps: int) -> None:
        for _ in range(steps):
            tc.forward_backward([sft_datum(s) for s in SEQUENCES], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2, weight_decay=0.01)).result()

    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    train(tc, 2)
    saved = tc.save_state("two-steps").result()
    assert saved.path.startswith("tinker://") and saved.path.endswith("/weights/two-steps")
    train(tc, 2)
    expected = forward_logprobs(tc, SEQUENCES[2])
    resumed = service.create_training_client_from_state_with_optimizer(saved.path).result()
    train(resumed, 2)
    np.testing.assert_array_equal(forward_logprobs(resumed, SEQUENCES[2]), expected)
    weights_only = service.create_training_client_from_state(saved.path).result()
    train(weights_only, 2)  # fresh Adam moments: a different trajectory
    assert not np.array_equal(forward_logprobs(weights_only, SEQUENCES[2]), expected)
    step_dirs = list((tinker_server.state_dir / tc.model_id / "two-steps" / "checkpoints").glob("step_*"))
    assert [p.name for p in step_dirs] == ["step_000002"]


@pytest.mark.filterwarnings("ignore:Using the future as the SamplingClient:FutureWarning")  # as rl_loop.py uses it
def test_the_cookbook_loops_sampler_and_checkpoint_paths(service: tinker.ServiceClient, tinker_server: Server) -> None:
    """What tinker-cookbook's rl_loop.py and sl_loop.py do besides the loops above: a named sampler save whose path
    makes the step's sampling client (`create_sampling_client(model_path=...)`), and checkpoint_utils'
    kind="both" save (save_state and save_weights_for_sampler under one name) whose state path a sampler and a
    resumed client can be made from."""
    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    tc.forward_backward([sft_datum(s) for s in SEQUENCES], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)).result()
    x = types.ModelInput.from_ints(SEQUENCES[0])
    path = tc.save_weights_for_sampler(name="000001").result().path
    assert path == f"tinker://{tc.model_id}/sampler_weights/000001"
    sampler = service.create_sampling_client(model_path=path)
    in_memory = np.asarray(sampler.compute_logprobs(x).result()[1:], np.float64)
    np.testing.assert_allclose(in_memory, forward_logprobs(tc, SEQUENCES[0]), atol=2e-4)
    seq = sampler.sample(x, num_samples=2, sampling_params=types.SamplingParams(max_tokens=3, stop=[])).result()
    assert [len(s.tokens) for s in seq.sequences] == [3, 3]
    state = tc.save_state("final").result().path
    tc.save_weights_for_sampler(name="final").result()
    from_disk = service.create_sampling_client(model_path=state)  # read from the checkpoint directory
    np.testing.assert_array_equal(np.asarray(from_disk.compute_logprobs(x).result()[1:], np.float64), in_memory)
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    np.testing.assert_array_equal(forward_logprobs(resumed, SEQUENCES[0]), forward_logprobs(tc, SEQUENCES[0]))


def test_kill_9_then_load_continues_bitwise(sharp_model: Path, tmp_path: Path) -> None:
    """save_state, then the server dies by SIGKILL mid-training; a new server on the same state directory resumes
    the client from the checkpoint and its next steps reproduce the first server's bit for bit."""

    def train(tc: tinker.TrainingClient, steps: int) -> None:
        for _ in range(steps):
            tc.forward_backward([sft_datum(s) for s in SEQUENCES], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    with serving(sharp_model, tmp_path) as (server, proc):
        service = tinker.ServiceClient(base_url=server.url, api_key=KEY)
        tc = service.create_lora_training_client(base_model=server.model, rank=4).result()
        train(tc, 2)
        path = tc.save_state("before-kill").result().path
        train(tc, 2)
        expected = forward_logprobs(tc, SEQUENCES[0])
        tc.forward_backward([sft_datum(s) for s in SEQUENCES], "cross_entropy")  # in flight when it dies
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with serving(sharp_model, tmp_path) as (server, _), tinker.ServiceClient(base_url=server.url, api_key=KEY) as s:
        resumed = s.create_training_client_from_state_with_optimizer(path).result()
        train(resumed, 2)
        np.testing.assert_array_equal(forward_logprobs(resumed, SEQUENCES[0]), expected)


def test_the_key_is_the_control_token(tinker_server: Server) -> None:
    start = time.monotonic()
    wrong = tinker.ServiceClient(base_url=tinker_server.url, api_key="tml-wrong")
    with pytest.raises(tinker.AuthenticationError, match="X-API-Key"):
        wrong.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    assert time.monotonic() - start < 60  # answered, not retried: the SDK retries a 5xx for minutes


def test_a_closed_service_makes_no_new_client_and_its_work_stays(tinker_server: Server) -> None:
    """ServiceClient.close() (the end of a `with` block) finishes the session on the server: its checkpoints and
    samplers stay, a new training client in it is refused naming session_id; a second finish keeps the first reason."""
    import httpx

    with tinker.ServiceClient(base_url=tinker_server.url, api_key=KEY) as closed:
        tc = closed.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
        tc.forward_backward([sft_datum(SEQUENCES[0])], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        path = tc.save_weights_for_sampler("closed").result().path
        session = closed.holder.get_session_id()
    with tinker.ServiceClient(base_url=tinker_server.url, api_key=KEY) as service:
        sampler = service.create_sampling_client(model_path=path).result()
        assert sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
    headers = {"X-API-Key": KEY}

    def post(route: str, body: dict) -> httpx.Response:
        return httpx.post(f"{tinker_server.url}/api/v1/{route}", json=body, headers=headers, timeout=30)

    again = post(f"sessions/{session}/finish", {"reason": {"type": "errored"}})
    assert again.status_code == 200
    model = {"session_id": session, "model_seq_id": 99, "base_model": tinker_server.model}
    refused = post("create_model", model)
    assert refused.status_code == 400
    assert (
        "session_id" in refused.json()["error"]["message"]
        and "finished (success)" in refused.json()["error"]["message"]
    )
    bad = post(f"sessions/{session}/finish", {"reason": {"type": "done"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reason.type"
    assert post("sessions/session-unknown/finish", {"reason": {"type": "success"}}).status_code == 404


EXAMPLE = Path(__file__).parents[1] / "examples" / "tinker_rl.py"


def test_the_example_rl_loop_runs(tinker_server: Server, tmp_path: Path) -> None:
    """examples/tinker_rl.py, one step and its held-out evaluations before and after (its reward task is for
    SmolLM2: here it only has to run), ending with `paraloop run`'s tables and PNG."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "TINKER_API_KEY": KEY}
    run_dir = tmp_path / "run"
    argv = ["--url", tinker_server.url, "--base-model", tinker_server.model, "--steps", "1", "--prompts", "2"]
    argv += ["--group", "2", "--max-tokens", "4", "--eval-every", "1", "--eval-prompts", "2", "--eval-samples", "2"]
    out = procs.run([sys.executable, str(EXAMPLE), *argv, "--run-dir", str(run_dir)], timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(line.get("kind", "train"), line["step"]) for line in lines] == [("eval", 0), ("train", 1), ("eval", 1)]
    keys = {"reward_mean", "reward_std", "loss", "step_time_s", "tokens_per_s", "rollout_ratio_outside", "time"}
    assert keys <= set(lines[1]) and 0 < lines[1]["completion_length_mean"] <= 4
    assert lines[0]["time"] < lines[1]["time"] < lines[2]["time"]  # make bench's steps are the gaps between lines
    assert 0 < lines[1]["mismatch_tokens"] <= 2 * 2 * 4 and lines[1]["mismatch_abs_max"] < 2e-4  # on-policy: rounding
    assert {"pass@1", "pass@2", "prompts", "samples"} <= set(lines[2])
    assert "reward_mean" in out.stdout and "held-out eval (one_word, 2 prompts x 2 samples)" in out.stdout
    assert (run_dir / "metrics.png").stat().st_size > 10_000


def test_the_example_report_of_a_run(tmp_path: Path) -> None:
    """`examples/tinker_rl.py --report`: make tinker-demo's last part on metrics written here, with no server: the
    per-step and held-out tables of `paraloop run` and its PNG."""
    rows = [{"kind": "eval", "step": 0, "version": 0, "task": "one_word", "reward_mean": 0.25, "pass@1": 0.25}]
    rows[0].update({"pass@4": 0.5, "prompts": 8.0, "samples": 4.0})
    for step in (1, 2, 3):
        rows.append({"step": step, "version": step, "reward_mean": 0.2 * step, "reward_std": 0.1, "loss": -1.0})
        rows[-1]["step_time_s"] = 12.5
    rows.append({**rows[0], "step": 3, "version": 3, "reward_mean": 0.75, "pass@1": 0.75})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = procs.run([sys.executable, str(EXAMPLE), "--report", "--run-dir", str(tmp_path)], timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.split("held-out eval")[0].strip().splitlines()
    assert table[0].split() == [
        "step",
        "reward_mean",
        "reward_std",
        "loss",
        "kl",
        "entropy",
        "clip_fraction",
        "step_time_s",
    ]
    assert [line.split()[:2] for line in table[2:]] == [["1", "0.2000"], ["2", "0.4000"], ["3", "0.6000"]]
    assert "held-out eval (one_word, 8 prompts x 4 samples)" in out.stdout
    assert out.stdout.rstrip().endswith(f"wrote {tmp_path / 'metrics.png'}")
    assert (tmp_path / "metrics.png").stat().st_size > 10_000


def test_sampling_params(service: tinker.ServiceClient, tinker_server: Server) -> None:
    sampler = service.create_sampling_client(base_model=tinker_server.model).result()
    assert len(sampler.get_tokenizer()) > 100  # offline: the sampler's base_model is the local directory
    prompt = types.ModelInput.from_ints([5, 6, 7])
    seeded = types.SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, top_k=20, seed=3, stop=[])
    one = sampler.sample(prompt, num_samples=4, sampling_params=seeded).result()
    two = sampler.sample(prompt, num_samples=4, sampling_params=seeded).result()
    assert [s.tokens for s in one.sequences] == [s.tokens for s in two.sequences]
    assert all(len(s.tokens) == 5 and s.stop_reason == "length" and len(s.logprobs) == 5 for s in one.sequences)
    assert len({s.sequence_id for s in one.sequences}) == 4
    first = one.sequences[0].tokens[0]
    stopped = sampler.sample(
        prompt,
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, top_k=20, seed=3, stop=[first]),
    ).result()
    assert stopped.sequences[0].stop_reason == "stop" and stopped.sequences[0].tokens == [first]
    huge = types.SamplingParams(max_tokens=2, seed=2**64 - 1, stop=[])  # any 64-bit seed
    assert len(sampler.sample(prompt, num_samples=1, sampling_params=huge).result().sequences[0].tokens) == 2
    greedy = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
    g = sampler.sample(prompt, num_samples=2, sampling_params=greedy).result()
    assert g.sequences[0].tokens == g.sequences[1].tokens


def test_bad_inputs_are_answered_at_once(service: tinker.ServiceClient, tinker_server: Server) -> None:
    """4xx, raised by the SDK within seconds (a 5xx would be retried for minutes)."""
    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    sampler = service.create_sampling_client(base_model=tinker_server.model).result()
    vocab = len(tc.get_tokenizer())
    short = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]},
    )
    far = sft_datum([1, 2, vocab + 5])
    rl_without_advantages = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3], "logprobs": [0.0, 0.0]}
    )
    cases = [
        (lambda: tc.forward_backward([short], "cross_entropy").result(), "target_tokens"),
        (lambda: tc.forward_backward([far], "cross_entropy").result(), "target_tokens"),
        (lambda: tc.forward_backward([rl_without_advantages], "ppo").result(), "advantages"),
        (
            lambda: tc.forward_backward(
                [sft_datum([1, 2, 3])], "ppo", loss_fn_config={"clip_low_threshold": 0.5, "nope": 1.0}
            ).result(),
            "nope",
        ),
        (lambda: tc.optim_step(types.AdamParams(learning_rate=1e-3, beta1=1.5)).result(), "beta1"),
        (
            lambda: sampler.sample(
                types.ModelInput.from_ints([1, 2]), num_samples=999, sampling_params=types.SamplingParams(max_tokens=2)
            ).result(),
            "num_samples",
        ),
        (
            lambda: sampler.sample(
                types.ModelInput.from_ints([1, vocab]),
                num_samples=1,
                sampling_params=types.SamplingParams(max_tokens=2),
            ).result(),
            "prompt",
        ),
        (
            lambda: sampler.sample(
                types.ModelInput.from_ints([1, 2]),
                num_samples=1,  # the engine's own limit
                sampling_params=types.SamplingParams(max_tokens=10**9),
            ).result(),
            "sampling_params.max_tokens",
        ),
        (lambda: service.create_lora_training_client(base_model="not/served", rank=4).result(), "base_model"),
        (lambda: service.create_lora_training_client(base_model=tinker_server.model, rank=100000).result(), "rank"),
        (lambda: service.create_training_client_from_state("tinker://x/weights/../../etc").result(), "path"),
    ]
    for call, field in cases:
        start = time.monotonic()
        with pytest.raises(Exception) as info:  # noqa: PT011 (the SDK's class differs by route: BadRequestError, ...)
            call()
        assert time.monotonic() - start < 60, field
        assert field in str(info.value), (field, info.value)
        assert isinstance(info.value, (tinker.BadRequestError, tinker.RequestFailedError, ValueError)), info.value
    # the training client still works after refused requests
    assert tc.forward_backward([sft_datum([1, 2, 3])], "cross_entropy").result().metrics["loss:sum"] > 0


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("cross_entropy", None),
        ("importance_sampling", None),
        ("ppo", {"clip_low_threshold": 0.9}),
        ("cispo", {"clip_high_threshold": 1.1}),
        ("dro", {"beta": 0.2}),
        ("gspo", None),
    ],
)
def test_every_loss_fn_through_the_sdk(
    service: tinker.ServiceClient, tinker_server: Server, loss_fn: str, config: dict | None
) -> None:
    """loss:sum over the wire (protobuf both ways, loss_fn_config included) equals the float64 reference evaluated on
    the target log-probs the same call returns (tests/test_tinker_losses.py checks the gradients)."""
    from paraloop.tinker.losses import resolve_config
    from support.tinker_losses import inputs_for, reference

    tc = service.create_lora_training_client(base_model=tinker_server.model, rank=4).result()
    lps = [forward_logprobs(tc, s).astype(np.float64) for s in SEQUENCES]
    xs = inputs_for(loss_fn, lps, np.random.default_rng(3))
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={"target_tokens": s[1:], **{k: v.tolist() for k, v in x.items()}},
        )
        for s, x in zip(SEQUENCES, xs, strict=True)
    ]
    out = tc.forward_backward(data, loss_fn, loss_fn_config=config).result()
    got = [row["logprobs"].to_numpy().astype(np.float64) for row in out.loss_fn_outputs]
    for g, lp in zip(got, lps, strict=True):  # one padded batch of 3 vs one datum alone: other shapes, ~2e-6 apart
        np.testing.assert_allclose(g, lp, atol=2e-5)
    resolved = resolve_config(loss_fn, config or {})
    expected = sum(reference(loss_fn, lp, x, resolved)[0] for lp, x in zip(got, xs, strict=True))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
