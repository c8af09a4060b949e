"""Hypothesis strategies for HTTP requests to paraloop, generated from its own /openapi.json.

`requests(doc)` draws one `FuzzRequest`: a body the document describes (which the server may still refuse on a
value, e.g. a token id outside the vocabulary), or one broken on purpose: wrong types, unknown and missing fields,
integers and floats beyond any range, deep nesting, huge arrays, invalid UTF-8, malformed bytes, wrong methods,
content types and paths.
"""

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
NO_RANDOM_CALL = {"/control/stop", "/control/resume", "/control/step"}  # end, unpause or train: called once, at the end
BIG_NUMBERS = [
    "1" + "0" * 30,
    "-1" + "0" * 30,
    "1" + "0" * 4400,
    "9223372036854775808",
    "-9223372036854775809",
    "1e400",
    "-1e400",
    "1e-400",
    "2147483648",
    "4294967296",
]


@dataclass
class FuzzRequest:
    kind: str  # how it was made (for the report)
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    param: str | None = None  # the field it broke, which a 400 must name (None: no one field)


json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


def from_schema(schema: dict[str, Any], components: dict[str, Any], refs: dict | None = None) -> st.SearchStrategy[Any]:
    """Values valid under the (msgspec-generated) JSON schema subset the document uses, kept small. Build once:
    each referenced schema becomes one strategy, shared."""
    refs = {} if refs is None else refs
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        if name not in refs:
            refs[name] = None
            refs[name] = from_schema(components[name], components, refs)
        return st.deferred(lambda: refs[name])
    if "anyOf" in schema:
        return st.one_of([from_schema(s, components, refs) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        small = st.integers(min_value=low if low is not None else -5, max_value=min(high or 1200, 1200))
        return small | st.integers(min_value=low, max_value=high) if high is None or high > 1200 else small
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(
            min_value=low,
            max_value=schema.get("maximum"),
            allow_nan=False,
            allow_infinity=False,
            exclude_min="exclusiveMinimum" in schema,
        )
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 24), 24))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), components, refs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object" and "properties" in schema:
        required = set(schema.get("required", []))
        props = {k: from_schema(v, components, refs) for k, v in schema["properties"].items()}
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    if kind == "object":
        return st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    return json_values  # {}: any JSON


def accepted_as_no_body(body: bytes | None) -> bool:
    """What a POST route without a body accepts (and then acts on): nothing, whitespace, or an empty object."""
    if body is None or not body.strip():
        return True
    try:
        return json.loads(body) == {}
    except ValueError:
        return False


def concrete(path: str) -> str:
    """A documented path with its parameters filled in (an agent session's id: one the fuzz also tags turns with)."""
    return path.replace("{session_id}", SESSION_IDS[0])


def body_schemas(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for path, ops in doc["paths"].items():
        body = ops.get("post", {}).get("requestBody")
        if body:
            out[concrete(path)] = body["content"]["application/json"]["schema"]
    return out


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]]) -> tuple[str, bytes]:
    """A documented body, broken in one way."""
    body = draw(bodies)
    how = draw(
        st.sampled_from(
            [
                "wrong_type",
                "unknown_field",
                "drop_field",
                "big_number",
                "deep",
                "huge_array",
                "bad_utf8",
                "truncated",
                "not_object",
            ]
        )
    )
    keys = sorted(body)
    key = draw(st.sampled_from(keys)) if keys else "prompt"
    if how == "wrong_type":
        return how, encode({**body, key: draw(json_values)})
    if how == "unknown_field":
        return how, encode({**body, draw(st.text(min_size=1, max_size=10)): draw(json_values)})
    if how == "drop_field":
        return how, encode({k: v for k, v in body.items() if k != key})
    if how == "big_number":
        return how, encode({**body, key: "@@"}).replace(b'"@@"', draw(st.sampled_from(BIG_NUMBERS)).encode())
    if how == "deep":
        depth = draw(st.sampled_from([33, 300, 3000, 300_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return how, encode({**body, key: "@@"}).replace(b'"@@"', (opener * depth + "1" + closer * depth).encode())
    if how == "huge_array":
        size = draw(st.sampled_from([9000, 100_000, 1_000_000]))  # the largest can exceed max_body_bytes
        item = draw(st.sampled_from([b"5", b'"x"', b"[]", b"{}"]))
        return how, encode({**body, key: "@@"}).replace(b'"@@"', b"[" + (item + b",") * (size - 1) + item + b"]")
    if how == "bad_utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xf0\x28\x8c\x28", b"\x80"]))
        return how, encode({**body, key: "@@"}).replace(b'"@@"', b'"a' + bad + b'b"')
    if how == "truncated":
        raw = encode(body)
        return how, raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    return how, encode(draw(st.lists(json_values, max_size=3) | json_scalars))


def well_formed() -> st.SearchStrategy[FuzzRequest]:
    """A few requests every server must answer 200: small, valid, streaming or not."""
    sampling = st.fixed_dictionaries(
        {"max_tokens": st.integers(1, 4)},
        optional={
            "n": st.integers(1, 3),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.1, 1),
            "top_k": st.integers(0, 50),
            "seed": st.integers(0, 2**32),
            "stream": st.booleans(),
            "stop": st.lists(st.text(min_size=1, max_size=5), max_size=2),
            "ignore_eos": st.booleans(),
        },
    )
    text = st.sampled_from(["Hello", "The capital of France is", "1 2 3", "é ü ✓ 漢字", "a\nb"])
    completion = st.builds(lambda s, p: ("/v1/completions", {**s, "prompt": p}), sampling, text)
    chat = st.builds(
        lambda s, p: ("/v1/chat/completions", {**s, "messages": [{"role": "user", "content": p}]}), sampling, text
    )
    gen = st.builds(
        lambda s, ids: ("/generate", {**s, "prompt": {"prompt_token_ids": ids}}),
        sampling,
        st.lists(st.integers(1, 900), min_size=1, max_size=8),
    )
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        }
    ]
    constrained = st.sampled_from(
        [{"response_format": {"type": "json_object"}}, {"tools": tools}, {"tools": tools, "tool_choice": "required"}]
    )
    agents = st.builds(
        lambda s, c: (
            "/v1/chat/completions",
            {**s, **c, "ignore_eos": False, "messages": [{"role": "user", "content": "hi"}]},
        ),
        sampling,
        constrained,
    )
    gets = st.sampled_from(
        [
            ("/health", None),
            ("/v1/models", None),
            ("/openapi.json", None),
            ("/control/status", None),
            ("/metrics", None),
        ]
    )
    return st.one_of(completion, chat, gen, agents, gets).map(
        lambda pb: FuzzRequest(
            "well_formed", "POST" if pb[1] is not None else "GET", pb[0], encode(pb[1]) if pb[1] is not None else None
        )
    )


HOSTILE_SCHEMAS = [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "minItems": 10**9, "items": {"type": "integer"}},
    {"type": "string", "minLength": 10**9},
    {"type": "string", "pattern": "(a*)*b"},
    {"type": "string", "pattern": "[a-z]{1000}{1000}"},
    {"type": "string", "pattern": "(a"},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"not": {}},
    {"enum": list(range(5000))},
    {"type": "string", "format": "nonsense"},
    {"type": "integer", "multipleOf": 0},
    {"anyOf": [{"type": "string", "pattern": f"^{i}[a-z]+$"} for i in range(500)]},
    {"type": 5},
    {"$ref": 5},
    {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}},
]


def agent_bodies() -> st.SearchStrategy[FuzzRequest]:
    """Chat bodies with hostile tools, tool_choice, response_format and tool histories: answered 200 or 4xx, in time
    (a grammar that cannot start is refused; one that runs out of fuel ends its answer)."""
    schema = st.sampled_from(HOSTILE_SCHEMAS) | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
    tool = st.builds(
        lambda name, params: {"type": "function", "function": {"name": name, "parameters": params}},
        st.sampled_from(["f", "g", "bad name", ""]) | st.text(max_size=70),
        schema,
    )
    choice = st.sampled_from(["auto", "none", "required", "any", {"type": "function", "function": {"name": "f"}}])
    call = st.fixed_dictionaries(
        {
            "id": st.sampled_from(["c1", "c2"]),
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": st.just("f"), "arguments": st.text(max_size=20)}),
        }
    )
    history = st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "tool", "system"])},
            optional={
                "content": st.none() | st.text(max_size=8),
                "tool_calls": st.lists(call, max_size=2),
                "tool_call_id": st.sampled_from(["c1", "c2", "zz"]),
            },
        ),
        min_size=1,
        max_size=4,
    )
    fmt = st.one_of(
        st.just({"type": "json_object"}),
        st.just({"type": "text"}),
        schema.map(lambda s: {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}),
        json_values,
    )
    body = st.fixed_dictionaries(
        {"messages": history | st.just([{"role": "user", "content": "hi"}]), "max_tokens": st.integers(1, 8)},
        optional={
            "tools": st.lists(tool, max_size=3),
            "tool_choice": choice,
            "parallel_tool_calls": st.booleans(),
            "response_format": fmt,
            "stream": st.booleans(),
            "n": st.integers(1, 2),
            "seed": st.integers(0, 9),
        },
    )
    return body.map(lambda b: FuzzRequest("agents", "POST", "/v1/chat/completions", encode(b)))


SESSION_IDS = ["s1", "s2", "s3"]  # few, so tagged turns, rewards and groups meet


def session_requests() -> st.SearchStrategy[FuzzRequest]:
    """Agent sessions (docs/agents.md): turns tagged by metadata or header, well or badly, and rewards of known,
    unknown and malformed sessions with bodies right and wrong. A run of another source answers 400 to the tags
    and 404 to the reward route; a sessions run records, groups and bounds them."""
    sid = st.sampled_from(SESSION_IDS) | st.text(max_size=140)
    ids = st.lists(st.integers(1, 900), min_size=1, max_size=8)
    sampling = st.fixed_dictionaries(
        {"max_tokens": st.integers(1, 8)},
        optional={
            "n": st.integers(1, 2),
            "stream": st.booleans(),
            "model": st.sampled_from(["policy", "base", "nope"]),
            "temperature": st.sampled_from([0.0, 0.5, 1.0]),
        },
    )
    turn = st.builds(
        lambda path, s, prompt, tag, by_header: FuzzRequest(
            "sessions",
            "POST",
            path,
            encode({**s, **prompt} | ({} if by_header else {"metadata": {"paraloop_session": tag}})),
            {"Content-Type": "application/json"} | ({"X-Paraloop-Session": tag} if by_header else {}),
        ),
        st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
        sampling,
        st.one_of(ids.map(lambda i: {"prompt": i}), st.just({"messages": [{"role": "user", "content": "hi"}]})),
        sid.filter(lambda t: t.isascii() and t.isprintable()),
        st.booleans(),
    )
    reward = st.builds(
        lambda tag, body: FuzzRequest(
            "sessions", "POST", f"/v1/sessions/{urllib.parse.quote(tag, safe='')}/reward", encode(body)
        ),
        sid.filter(bool),
        st.fixed_dictionaries({"reward": st.floats(-2, 2), "group": st.sampled_from(["g", "h", "i"])})
        | st.fixed_dictionaries(
            {},
            optional={
                "reward": st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4) | st.none(),
                "group": st.sampled_from(["g", "h"]) | st.text(max_size=140),
                "extra": json_values,
            },
        )
        | json_values,
    )
    return st.one_of(turn, reward)


def requests(doc: dict[str, Any]) -> st.SearchStrategy[FuzzRequest]:
    components = doc["components"]["schemas"]
    schemas = body_schemas(doc)
    ops = sorted((concrete(path), method.upper()) for path, methods in doc["paths"].items() for method in methods)

    refs: dict[str, Any] = {}
    valid = {path: from_schema(schema, components, refs) for path, schema in sorted(schemas.items())}
    by_schema = st.one_of(
        [
            bodies.map(lambda body, path=path: FuzzRequest("by_schema", "POST", path, encode(body)))
            for path, bodies in valid.items()
        ]
    )
    broken = st.one_of(
        [
            mutated(bodies).map(lambda made, path=path: FuzzRequest(made[0], "POST", path, made[1]))
            for path, bodies in valid.items()
        ]
    )
    no_body = (
        st.sampled_from([(p, m) for p, m in ops if (p, m) not in {(s, "POST") for s in schemas}])
        .flatmap(
            lambda op: st.one_of(st.none(), st.just(b"{}"), st.binary(max_size=40), json_values.map(encode)).map(
                lambda body: FuzzRequest("no_body_route", op[1], op[0], body)
            )
        )
        .filter(lambda r: not (r.method == "POST" and r.path in NO_RANDOM_CALL and accepted_as_no_body(r.body)))
    )
    wrong_method = (
        st.tuples(st.sampled_from([p for p, _ in ops]), st.sampled_from(METHODS))
        .filter(lambda pm: pm not in set(ops) and not (pm[1] == "HEAD"))
        .map(lambda pm: FuzzRequest("wrong_method", pm[1], pm[0], b"{}"))
    )
    content_type = st.tuples(
        st.sampled_from(sorted(schemas)),
        st.sampled_from(
            [
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/xml",
                "application/json; charset=latin-1",
                "",
                "*/*",
            ]
        ),
    ).map(lambda pc: FuzzRequest("content_type", "POST", pc[0], b'{"prompt": "x"}', {"Content-Type": pc[1]}))
    garbage = st.tuples(st.sampled_from(sorted(schemas)), st.binary(max_size=300)).map(
        lambda pb: FuzzRequest("malformed_bytes", "POST", pb[0], pb[1])
    )
    unknown_path = (
        st.tuples(st.sampled_from(METHODS), st.from_regex(r"/[a-z0-9/._%-]{0,30}", fullmatch=True))
        .filter(lambda mp: mp[1].rstrip("/") not in {p for p, _ in ops})
        .map(lambda mp: FuzzRequest("unknown_path", mp[0], mp[1], None))
    )
    weighted = [
        (well_formed(), 1),
        (by_schema, 4),
        (broken, 8),
        (no_body, 2),
        (wrong_method, 1),
        (content_type, 1),
        (garbage, 1),
        (unknown_path, 1),
        (agent_bodies(), 2),
        (session_requests(), 2),
    ]
    choices = [strategy for strategy, weight in weighted for _ in range(weight)]
    return st.sampled_from(range(len(choices))).flatmap(lambda i: choices[i])
