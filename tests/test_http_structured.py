"""response_format (json_object, json_schema) through the official openai client, on the tiny random model.

Hypothesis draws JSON schemas from the features agents use (objects, arrays, enums, consts, bounded numbers and
strings, patterns, anyOf, $defs/$ref), some with a keyword llguidance does not implement: every answer parses and
validates against its schema, or the schema is refused with a 400 whose message names the keyword. A schema made
only of supported features must never be refused.
"""

import copy
import json

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.http_harness import running_server, sse_events

USER = [{"role": "user", "content": "Answer in JSON."}]
SCHEMA_FIELD = "response_format.json_schema.schema"
UNSUPPORTED = {
    "not": {"type": "string"},
    "if": {"type": "object"},
    "uniqueItems": True,
    "dependentSchemas": {"a": {}},
    "contains": {"type": "integer"},
}
MAX_TOKENS = 512  # far more than any drawn schema's longest answer needs (the tiny tokenizer: ~1 token a char)


@pytest.fixture(scope="module", params=["cpu", "mlx-lm"])
def server(request, tiny_model_path):
    with running_server(tiny_model_path, overrides={"engine": {"decode": request.param}}) as s:
        yield s


class Client:
    """The openai client and the served model's name."""

    def __init__(self, server) -> None:
        self.openai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        self.model = self.openai.models.list().data[0].id

    def create(self, **kwargs):
        return self.openai.chat.completions.create(
            **{"model": self.model, "messages": USER, "max_tokens": MAX_TOKENS, **kwargs}
        )


@pytest.fixture(scope="module")
def client(server):
    made = Client(server)
    with made.openai:
        yield made


names = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
leaves = st.one_of(
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-1000, 1000),
        st.integers(0, 1000),
    ),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 10}, st.integers(-50, 50)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda lo, span: {"type": "string", "minLength": lo, "maxLength": lo + span},
        st.integers(0, 3),
        st.integers(0, 8),
    ),
    st.lists(
        st.text(alphabet='xyz é{}"\\', max_size=4) | st.integers(-5, 5) | st.booleans(),
        min_size=1,
        max_size=4,
        unique=True,
    ).map(lambda values: {"enum": values}),
    st.text(alphabet='ab{}"', max_size=4).map(lambda v: {"const": v}),
    st.sampled_from([{"type": "string", "pattern": "^[a-z]{1,5}$"}, {"type": "string", "pattern": "^[0-9]{3}-x$"}]),
)


def containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    obj = st.dictionaries(names, inner, min_size=1, max_size=4).flatmap(
        lambda props: st.builds(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": sorted(required),
                "additionalProperties": False,
            },
            st.sets(st.sampled_from(sorted(props))),
        )
    )
    arr = st.builds(
        lambda items, lo, span: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + span},
        inner,
        st.integers(0, 2),
        st.integers(0, 3),
    )
    any_of = st.lists(inner, min_size=2, max_size=3).map(lambda options: {"anyOf": options})
    return st.one_of(obj, arr, any_of)


supported = st.recursive(leaves, containers, max_leaves=6)


@st.composite
def schemas(draw: st.DrawFn) -> tuple[dict, str | None]:
    """(schema, the unsupported keyword it holds or None); the top level is an object, as OpenAI requires."""
    props = copy.deepcopy(draw(st.dictionaries(names, supported, min_size=1, max_size=3)))  # changed below
    schema = {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": False}
    if draw(st.integers(0, 9)) == 0:  # one in ten: via $defs and a $ref
        key = sorted(props)[0]
        schema["$defs"] = {"d": props[key]}
        props[key] = {"$ref": "#/$defs/d"}
    bad = None
    if draw(st.integers(0, 5)) == 0:  # one in six: an unsupported keyword somewhere in it
        bad = draw(st.sampled_from(sorted(UNSUPPORTED)))
        target = props[draw(st.sampled_from(sorted(props)))]
        target[bad] = UNSUPPORTED[bad]
    return schema, bad


def response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def check_answer(text: str, schema: dict, finish: str) -> None:
    assert finish == "stop", f"cut at max_tokens={MAX_TOKENS}: {text!r}"
    jsonschema.validate(json.loads(text), schema)


EXAMPLES = {"cpu": 120, "mlx-lm": 80}  # 200 schemas in all


def test_every_answer_validates_against_its_schema_or_the_schema_is_refused_naming_the_feature(client, server):
    @settings(
        max_examples=EXAMPLES[server.settings.engine.decode],
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(drawn=schemas(), seed=st.integers(0, 2**31), n=st.integers(1, 2))
    def check(drawn, seed, n):
        schema, bad = drawn
        try:
            answer = client.create(response_format=response_format(schema), seed=seed, n=n)
        except openai.BadRequestError as e:
            error = e.body
            assert bad is not None, f"a supported schema was refused: {error}"
            assert error["param"] == SCHEMA_FIELD
            assert bad in error["message"]
            return
        assert bad is None, f"{bad!r} was accepted (it is not enforced)"
        assert len(answer.choices) == n
        for choice in answer.choices:
            check_answer(choice.message.content, schema, choice.finish_reason)

    check()


def test_json_object_answers_are_json_objects_and_seeds_repeat(client):
    answers = [
        client.create(response_format={"type": "json_object"}, seed=7, n=3, temperature=0.7, max_tokens=48)
        for _ in range(2)
    ]
    texts = [[c.message.content for c in a.choices] for a in answers]
    assert texts[0] == texts[1]
    for choice in answers[0].choices:
        if choice.finish_reason == "stop":  # an open object may run to max_tokens on random weights
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.message.content.startswith("{")


SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"enum": ["a", "b"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


def test_streaming_logprobs_and_versions_come_with_constrained_answers(server):
    body = {
        "messages": USER,
        "response_format": response_format(SCHEMA),
        "max_tokens": 64,
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = server.post("/v1/chat/completions", body).json()["choices"][0]
    check_answer(whole["message"]["content"], SCHEMA, whole["finish_reason"])
    assert whole["constrained"] is True and whole["adapter_versions"] == [0]
    assert len(whole["logprobs"]["content"]) == len(whole["token_ids"]) == len(whole["token_logprobs"])
    chunks = [e for e in sse_events(server.post("/v1/chat/completions", {**body, "stream": True})) if e != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole["message"]["content"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]


def test_constrained_logprobs_are_those_of_the_unconstrained_distribution(server, tiny_model_path):
    """Each reported log-prob is log_softmax(logits / T) over the whole vocabulary, as for any row (what the learner
    recomputes), not of the grammar-masked distribution the token was drawn from."""
    from support.engines import greedy_logprobs

    from paraloop.model import load_model
    from paraloop.server.prepare import chat_prompt
    from paraloop.server.schemas import ChatBody, decode

    body = {"messages": USER, "response_format": response_format(SCHEMA), "max_tokens": 64, "temperature": 0}
    choice = server.post("/v1/chat/completions", body).json()["choices"][0]
    chat = decode(json.dumps({"messages": USER}).encode(), ChatBody, max_depth=32)
    prompt = chat_prompt(server.engine.tokenizer, chat, None, config=server.settings.engine)
    model, _, _, _ = load_model(tiny_model_path)
    full = greedy_logprobs(model, prompt, choice["token_ids"])
    assert choice["token_logprobs"] == pytest.approx(full, abs=2e-3)  # test_http_serve's bound (float32 sums)
    assert min(full) < -3  # the grammar forced tokens the model alone finds unlikely: masked log-probs would be ~0


def test_bad_response_formats_are_a_400_naming_the_field(server):
    def refused(fmt, **extra):
        reply = server.post(
            "/v1/chat/completions", {"messages": USER, "response_format": fmt, "max_tokens": 1, **extra}
        )
        assert reply.status_code == 400, reply.text
        return reply.json()["error"]

    assert refused({"type": "xml"})["param"] == "response_format.type"
    assert refused({"type": "json_schema"})["param"] == "response_format.json_schema"
    assert refused({"type": "json_schema", "json_schema": {"name": "a b"}})["param"] == (
        "response_format.json_schema.name"
    )
    assert refused(response_format({"type": "strin"}))["param"] == SCHEMA_FIELD
    assert refused(response_format({"$ref": "#/nowhere"}))["param"] == SCHEMA_FIELD
    assert "no JSON value satisfies it" in refused(response_format({"$ref": "#"}))["message"]
    assert refused(response_format({"type": "string", "pattern": "(a"}))["param"] == SCHEMA_FIELD
    huge = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(8000)}}
    error = refused(response_format(huge))
    assert error["param"] == SCHEMA_FIELD and "server.max_schema_bytes" in error["message"]
    assert refused({"type": "json_object"}, ignore_eos=True)["param"] == "ignore_eos"
