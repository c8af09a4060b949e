"""The distillation teacher (run/teacher.py) on the tiny model: an adapter co-served by the engine, another model
directory, and an OpenAI-compatible server (paraloop's own) each give the teacher's log-prob of every token, checked
against the teacher's own forward pass; Atropos distill arrays (atropos/translate.py) become the same field, and
malformed ones are refused."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import pytest
from support.http_harness import running_server

from support.adapter_files import random_adapter
from support import wire_group
from support.engines import serve
from paraloop.atropos.translate import InvalidGroup, to_scored_group
from paraloop.config import EngineConfig, LoraConfig, load_config
from paraloop.engine import Engine
from paraloop.lora import AdapterSlots, adapter_config, apply_adapter, attach_lora
from paraloop.messages import RolloutBatch, ScoredGroup
from paraloop.mlx_thread import MlxThread
from paraloop.model import load_model
from paraloop.run.teacher import (
    AdapterTeacher,
    ModelTeacher,
    TeacherError,
    UrlTeacher,
    distilled,
    make_teacher,
    parse_echo,
)

TOKENS = [5, 17, 33, 2, 91, 64, 8, 120, 44, 3, 77]
TOL = 2e-3  # test_http_serve's bound between the engine's scoring and a separate load's forward


def reference(model, tokens: list[int], temperature: float = 1.0) -> list[float]:
    """log softmax(logits / T) of tokens[t] at position t - 1, from one forward pass."""
    logits = model(mx.array(tokens[:-1])[None])[0].astype(mx.float32) / temperature
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return logp[mx.arange(len(tokens) - 1), mx.array(tokens[1:])].tolist()


@pytest.fixture(scope="module")
def teacher_adapter(tiny_model_path, tmp_path_factory):
    cfg = LoraConfig(rank=4, keys="all", num_layers=-1, scale=2.0)
    return random_adapter(tmp_path_factory.mktemp("teacher") / "adapter", tiny_model_path, cfg, seed=3)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_an_adapter_teacher_is_co_served_by_the_engine_and_scores_as_its_own_forward(
    tiny_model_path, teacher_adapter, temperature
):
    model, tokenizer, _, _ = load_model(tiny_model_path)
    attach_lora(model, adapter_config(LoraConfig(rank=4, keys="all", num_layers=-1), model), seed=0)  # the student
    engine = Engine(model, tokenizer, config=EngineConfig(decode="cpu", prefix_cache_mb=0), adapter=AdapterSlots(model))
    teacher = AdapterTeacher(engine, name="distill-teacher", path=teacher_adapter, temperature=temperature)

    async def body(engine):
        before = engine._worker.score_groups
        scored, short = await teacher.score_many([TOKENS, TOKENS[:4]])
        return scored, short, engine.adapters.names(), engine._worker.score_groups - before

    scored, short, names, groups = serve(engine, body, deadline=60)
    assert groups == 1  # both sequences in one batched forward
    adapted, _, _, _ = load_model(tiny_model_path)
    apply_adapter(adapted, teacher_adapter)
    assert scored == pytest.approx(reference(adapted, TOKENS, temperature), abs=TOL)
    assert short == pytest.approx(scored[:3], abs=1e-5)
    assert "distill-teacher" in names  # loaded once, beside the policy
    base, _, _, _ = load_model(tiny_model_path)
    gap = max(abs(a - b) for a, b in zip(scored, reference(base, TOKENS, temperature), strict=True))
    assert gap > 0.05, "the teacher adapter changed nothing: the check above could not fail"


def test_a_model_directory_teacher_is_loaded_once_and_scores_on_the_given_thread(tiny_model_path):
    settings = load_config(
        None,
        {
            "model": {"base_path": str(tiny_model_path)},
            "distill": {"teacher": str(tiny_model_path), "temperature": 0.8},
        },
    )
    _, tokenizer, _, _ = load_model(tiny_model_path)
    thread = MlxThread("test-teacher")
    try:

        async def main():
            teacher = await make_teacher(settings, None, tokenizer, thread)
            assert isinstance(teacher, ModelTeacher)
            return await teacher.score_many([TOKENS, TOKENS[:6]])

        (scored, short) = anyio.run(main)
    finally:
        thread.close()
    base, _, _, _ = load_model(tiny_model_path)
    assert scored == pytest.approx(reference(base, TOKENS, 0.8), abs=TOL)
    assert short == pytest.approx(scored[:5], abs=1e-5)


def test_a_url_teacher_reads_prompt_logprobs_from_an_openai_compatible_server(tiny_model_path):
    base, _, _, _ = load_model(tiny_model_path)
    expected = reference(base, TOKENS)
    with running_server(tiny_model_path) as server:

        async def main():
            with anyio.fail_after(120):
                good, short = await UrlTeacher(server.url + "/v1", model=None, timeout_s=30).score_many(
                    [TOKENS, TOKENS[:5]]
                )
                assert short == pytest.approx(good[:4], abs=1e-5)
                with pytest.raises(TeacherError, match="HTTP 404"):  # a 4xx is not retried
                    await UrlTeacher(server.url + "/v1", model="no-such-model", timeout_s=30).score(TOKENS)
            return good

        scored = anyio.run(main)
    assert scored == pytest.approx(expected, abs=TOL)


def test_a_url_teacher_that_does_not_answer_ends_with_the_reason():
    async def main():
        with anyio.fail_after(30):
            await UrlTeacher("http://127.0.0.1:9/v1", model=None, timeout_s=2).score(TOKENS)

    with pytest.raises(TeacherError, match="did not answer after 3 tries"):
        anyio.run(main)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ({}, "no choices"),
        ({"choices": [{"logprobs": {"token_logprobs": [None, -1.0]}}]}, "2 prompt log-probs for a prompt of 3"),
        ({"choices": [{"logprobs": {"token_logprobs": [None, -1.0, 0.5]}}]}, r"\[2\] = 0.5 is not a log-prob"),
        ({"choices": [{"logprobs": {"token_logprobs": [None, "x", -1]}}]}, "is not a log-prob"),
        ({"choices": [{"logprobs": {"token_logprobs": [None, float("nan"), -1]}}]}, "is not a log-prob"),
    ],
)
def test_an_echo_answer_is_checked_before_use(answer, why):
    with pytest.raises(TeacherError, match=why):
        parse_echo(answer, 3)
    assert parse_echo({"choices": [{"logprobs": {"token_logprobs": [None, -1, -2.5, -0.1]}}]}, 3) == [-1.0, -2.5]


class Recording:
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    async def score_many(self, sequences: list[list[int]]) -> list[list[float]]:
        self.seen.append(sequences)
        return [[-0.5 * t for t in range(1, len(tokens))] for tokens in sequences]


class Short(Recording):
    async def score_many(self, sequences: list[list[int]]) -> list[list[float]]:
        return [values[:-1] for values in await super().score_many(sequences)]


def test_distilled_scores_every_group_that_has_no_teacher_logprobs_yet_in_one_call_per_batch():
    fresh = ScoredGroup(tokens=[[1, 2, 3], [1, 2, 4, 5]], masks=[[-100, 2, 3], [-100, 2, 4, 5]], scores=[1.0, 0.0])
    given = ScoredGroup(tokens=[[7, 8]], masks=[[-100, 8]], scores=[0.5], teacher_logprobs=[[1.0, -3.0]])
    other = ScoredGroup(tokens=[[9, 9]], masks=[[-100, 9]], scores=[0.0])

    async def source():
        yield RolloutBatch(groups=[fresh, given, other], source="test")

    async def main(teacher):
        return [b async for b in distilled(source(), teacher)]

    teacher = Recording()
    (batch,) = anyio.run(main, teacher)
    assert batch.groups[0].teacher_logprobs == [[1.0, -0.5, -1.0], [1.0, -0.5, -1.0, -1.5]]
    assert batch.groups[1] == given
    assert batch.groups[2].teacher_logprobs == [[1.0, -0.5]]
    assert teacher.seen == [[[1, 2, 3], [1, 2, 4, 5], [9, 9]]]  # the batch's sequences in one call
    with pytest.raises(TeacherError, match="gave 1 log-probs for 3 tokens"):
        anyio.run(main, Short())


# --- Atropos distill arrays ----------------------------------------------------------------------------------------


def distill_arrays():
    """[sequence][position][k] for wire_group's tokens: the sampled token listed at some positions, not at others."""
    ids = [[[], [], [], [40, 7], [9, 8]], [[], [], [], [50], [51, 3], [1, 2, 52]]]
    lps = [[[], [], [], [-0.25, -2.0], [-0.5, -4.0]], [[], [], [], [-0.1], [-0.75, -3.0], [-0.2, -1.0, -1.5]]]
    return ids, lps


def test_atropos_distill_arrays_become_teacher_logprobs():
    ids, lps = distill_arrays()
    group = to_scored_group(wire_group(distill_token_ids=ids, distill_logprobs=lps))
    # listed: its own log-prob; [0][4] = 41 is not listed: the top-k's smallest, -4.0
    assert group.teacher_logprobs == [[1.0, 1.0, 1.0, -0.25, -4.0], [1.0, 1.0, 1.0, -0.1, -0.75, -1.5]]
    assert to_scored_group(wire_group()).teacher_logprobs is None


def test_an_empty_trained_position_leaves_the_group_undistilled(caplog):
    ids, lps = distill_arrays()
    ids[1][4], lps[1][4] = [], []
    group = to_scored_group(wire_group(distill_token_ids=ids, distill_logprobs=lps))
    assert group.teacher_logprobs is None
    assert "trained without the teacher term" in caplog.text


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda ids, lps: ids.pop(), "sequences"),
        (lambda ids, lps: ids[0].pop(), "one position per token"),
        (lambda ids, lps: lps[0][3].pop(), "same length"),
        (lambda ids, lps: lps[0][3].__setitem__(0, 0.5), "finite numbers <= 0"),
        (lambda ids, lps: lps[0][3].__setitem__(0, float("inf")), "finite numbers <= 0"),
        (lambda ids, lps: ids[0][3].__setitem__(0, "40"), "integers"),
        (
            lambda ids, lps: (ids[0].__setitem__(3, list(range(1025))), lps[0].__setitem__(3, [-1.0] * 1025)),
            "more than 1024",
        ),
    ],
)
def test_malformed_distill_arrays_reject_the_group(change, why):
    ids, lps = distill_arrays()
    change(ids, lps)
    with pytest.raises(InvalidGroup, match=why):
        to_scored_group(wire_group(distill_token_ids=ids, distill_logprobs=lps))


# --- a whole run -----------------------------------------------------------------------------------------------------


def test_a_run_distils_from_an_adapter_teacher_and_reports_the_kl(tiny_model_path, teacher_adapter, tmp_path):
    """`paraloop run` with [distill] teacher = an adapter dir: the engine co-serves it, every step's metrics carry
    the teacher-student KL, and a teacher that cannot be found stops the run before it starts, naming the key."""
    import json

    from support.runs import run_to_end

    done = run_to_end(
        tiny_model_path,
        tmp_path / "run",
        "--steps",
        "2",
        "--no-plot",
        "--set",
        f"distill.teacher={teacher_adapter}",
        "--set",
        "distill.reward_weight=0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "step" in line and "loss" in line]
    assert len(steps) == 2
    for line in steps:
        assert line["distill_kl"] > 0 and line["distill_tokens"] > 0 and line["distill_rows_missing"] == 0
    missing = run_to_end(
        tiny_model_path,
        tmp_path / "nope",
        "--steps",
        "1",
        "--no-plot",
        "--set",
        f"distill.teacher={tmp_path / 'absent'}",
    )
    assert missing.returncode != 0 and "distill.teacher" in missing.stderr


def test_a_config_files_teacher_path_is_relative_to_the_file_and_a_url_or_name_stays(tmp_path):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    for teacher, expected in [
        ("../runs/demo", str(tmp_path / "runs" / "demo")),
        ("http://127.0.0.1:8001/v1", "http://127.0.0.1:8001/v1"),
        ("tutor", "tutor"),
    ]:
        path = tmp_path / "configs" / "c.toml"
        path.write_text(f'[distill]\nteacher = "{teacher}"\n')
        assert load_config(path).distill.teacher == expected
    with pytest.raises(ValueError, match="temperature"):
        load_config(None, {"distill": {"teacher": "http://h/v1", "temperature": 0.5}})
