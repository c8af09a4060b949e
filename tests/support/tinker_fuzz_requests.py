"""Hypothesis strategies for requests to `paraloop tinker` (every route of src/paraloop/tinker/routes.py ROUTES).

`requests(ids, routes)` draws one `FuzzRequest`. Valid ones are what the official SDK sends: its own request types
with drawn values, dumped as it dumps them (forward_backward: its own protobuf), naming real ids made through the SDK
first (`Ids`), so they pass "unknown id" and reach the checks behind it. Broken ones: one field at any depth of
another type, missing, or a number at or beyond the edge of every range (kind "field"; `param` is the field a 400
must name), the whole body broken as fuzz_requests.mutated breaks it, forward_backward's protobuf random, truncated
or corrupted, wrong methods, content types and encodings, unknown paths under /api/v1, hostile path parameters, and
one in five without the X-API-Key header or with a wrong one. `hostile_protos(ids)`: hand-made protobuf bodies,
each sent once.
"""

import dataclasses
import gzip
import json
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import Phase, find, settings
from hypothesis import strategies as st
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from support.fuzz_requests import METHODS, FuzzRequest, json_values, mutated

PROTO = "application/x-protobuf"
LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo")
CONFIG_KEYS = {
    "ppo": ("clip_low_threshold", "clip_high_threshold"),
    "cispo": ("clip_high_threshold",),
    "dro": ("beta",),
}
NAMES = ("fuzz-a", "fuzz-b")  # checkpoint names the fuzz may write (a few: each save is a directory on disk)
EDGE_NUMBERS = [2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 10**30, 1e308, -1e308, 1.5, -0.0]
BEYOND = ["1e400", "-1e400"]  # JSON numbers no float holds
HOSTILE_IDS = [
    "",
    ".",
    "..",
    "../../etc/passwd",
    "%00",
    "%ff%fe",
    "%ed%a0%80",
    "a%2Fb",
    "x" * 2000,
    "sampler-1-00000000",
    "session-000000000000",
    "%C3%A9%E6%BC%A2",
    "tinker:%2F%2Fx%2Fweights%2Fy",
    "%25",
    "a%20b",
]


@dataclass(frozen=True)
class Ids:
    """Real things of the server under test, made through the SDK before the fuzz starts."""

    base_model: str
    session_id: str  # the fuzz makes training clients and samplers in it (never finishes it)
    spare_session_id: str  # one the fuzz may finish
    model_id: str  # a training client the fuzz trains, saves and loads
    sampler_id: str
    sampler_path: str  # tinker://MODEL_ID/sampler_weights/NAME
    state_path: str  # tinker://MODEL_ID/weights/NAME
    vocab: int
    key: str  # the server's X-API-Key


def dump(request: Any) -> dict[str, Any]:
    """A request type as the SDK puts it on the wire (its resources' model_dump arguments)."""
    return request.model_dump(exclude_unset=False, exclude_none=True, mode="json")


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


# --- valid bodies, as the SDK sends them --------------------------------------------------------------------------


seq_ids = st.integers(1, 10**6)


def tokens(ids: Ids, *, min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, ids.vocab - 1), min_size=min_size, max_size=max_size)


@st.composite
def datum(draw: st.DrawFn, ids: Ids, loss_fn: str) -> types.Datum:
    model_input = draw(tokens(ids, min_size=1, max_size=6))
    n = len(model_input)
    floats = st.lists(st.floats(-2, 2, width=32), min_size=n, max_size=n)
    inputs: dict[str, Any] = {"target_tokens": draw(tokens(ids, min_size=n, max_size=n))}
    if loss_fn != "cross_entropy":
        inputs |= {"logprobs": draw(st.lists(st.floats(-5, 0, width=32), min_size=n, max_size=n))}
        inputs |= {"advantages": draw(floats)}
    if draw(st.booleans()):
        inputs["weights"] = draw(floats)
    return types.Datum(model_input=types.ModelInput.from_ints(model_input), loss_fn_inputs=inputs)


@st.composite
def forward_backward_proto(draw: st.DrawFn, ids: Ids) -> bytes:
    """A ForwardBackwardRequest the SDK would send, serialized by the SDK's own code."""
    loss_fn = draw(st.sampled_from(LOSS_FNS))
    data = draw(st.lists(datum(ids, loss_fn), min_size=1, max_size=3))
    keys = CONFIG_KEYS.get(loss_fn, ())
    config = draw(st.none() | st.fixed_dictionaries({}, optional={k: st.floats(0, 2) for k in keys}))
    fb = types.ForwardBackwardInput(data=data, loss_fn=loss_fn, loss_fn_config=config)
    request = types.ForwardBackwardRequest(forward_backward_input=fb, model_id=ids.model_id, seq_id=draw(seq_ids))
    message = forward_backward_request_to_proto(request)
    message.forward_only = draw(st.booleans())
    return message.SerializeToString()


def sampling_params() -> st.SearchStrategy[types.SamplingParams]:
    stop = (
        st.none()
        | st.just([])
        | st.lists(st.text(min_size=1, max_size=4), max_size=2)
        | st.lists(st.integers(0, 50), min_size=1, max_size=2)
    )
    return st.builds(
        types.SamplingParams,
        max_tokens=st.integers(1, 4),
        seed=st.none() | st.integers(0, 2**64 - 1),
        stop=stop,
        temperature=st.floats(0, 2),
        top_k=st.integers(-1, 50),
        top_p=st.floats(0.05, 1),
    )


def valid_bodies(ids: Ids) -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    """JSON routes: the body the SDK sends, by path (path parameters filled with real ids)."""
    model = st.just(ids.model_id)
    new_seq = st.integers(1000, 10**9)  # model_seq_id / sampling_session_seq_id: new ones
    lora = st.builds(types.LoraConfig, rank=st.integers(1, 8), seed=st.none() | st.integers(0, 2**64 - 1))
    adam = st.builds(
        types.AdamParams,
        learning_rate=st.floats(0, 1e-3),
        beta1=st.floats(0, 0.99),
        beta2=st.floats(0, 0.999),
        eps=st.floats(1e-12, 1e-6),
        weight_decay=st.floats(0, 0.1),
        grad_clip_norm=st.floats(0, 10),
    )
    sampler_source = st.sampled_from(
        [{"base_model": ids.base_model}, {"model_path": ids.sampler_path}, {"model_path": ids.state_path}]
    )
    inflight = st.builds(types.SaveWeightsForSamplerRequest, model_id=model, kind=st.just("inflight"))
    snapshot = st.builds(
        types.SaveWeightsForSamplerRequest,
        model_id=model,
        path=st.none() | st.sampled_from(NAMES),
        sampling_session_seq_id=st.none() | new_seq,
        seq_id=st.none() | seq_ids,
    )
    load_into = st.builds(
        types.LoadWeightsRequest, model_id=model, path=st.just(ids.state_path), optimizer=st.booleans(), seq_id=seq_ids
    )
    load_new = st.builds(
        types.LoadWeightsRequest,
        session_id=st.just(ids.session_id),
        model_seq_id=new_seq,
        base_model=st.none() | st.just(ids.base_model),
        path=st.just(ids.state_path),
        optimizer=st.booleans(),
    )
    sdk = {
        "/api/v1/create_session": st.builds(
            types.CreateSessionRequest,
            tags=st.lists(st.text(max_size=6), max_size=2),
            user_metadata=st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=2),
            sdk_version=st.just("0.38.0"),
        ),
        "/api/v1/session_heartbeat": st.builds(
            types.SessionHeartbeatRequest, session_id=st.sampled_from([ids.session_id, ids.spare_session_id])
        ),
        "/api/v1/create_model": st.builds(
            types.CreateModelRequest,
            session_id=st.just(ids.session_id),
            model_seq_id=new_seq,
            base_model=st.just(ids.base_model),
            lora_config=st.none() | lora,
        ),
        "/api/v1/get_info": st.builds(types.GetInfoRequest, model_id=model),
        "/api/v1/optim_step": st.builds(
            types.OptimStepRequest, optim_params=adam, model_id=model, seq_id=st.none() | seq_ids
        ),
        "/api/v1/save_weights": st.builds(
            types.SaveWeightsRequest, model_id=model, path=st.none() | st.sampled_from(NAMES), seq_id=seq_ids
        ),
        "/api/v1/load_weights": load_into | load_new,
        "/api/v1/save_weights_for_sampler": snapshot | inflight,
        "/api/v1/create_sampling_session": st.builds(
            lambda seq, source: types.CreateSamplingSessionRequest(
                session_id=ids.session_id, sampling_session_seq_id=seq, **source
            ),
            new_seq,
            sampler_source,
        ),
        "/api/v1/join_sampling_session": st.builds(
            types.JoinSamplingSessionRequest, sampling_session_id=st.just(ids.sampler_id)
        ),
        "/api/v1/asample": st.builds(
            types.SampleRequest,
            num_samples=st.integers(1, 4),
            prompt=tokens(ids).map(types.ModelInput.from_ints),
            sampling_params=sampling_params(),
            sampling_session_id=st.just(ids.sampler_id),
            seq_id=seq_ids,
            prompt_logprobs=st.none() | st.booleans(),
        ),
        "/api/v1/retrieve_future": st.builds(
            types.FutureRetrieveRequest,
            request_id=st.integers(1, 3000).map(lambda n: f"req-{n}"),
            allow_metadata_only=st.booleans(),
        ),
    }
    out = {path: strategy.map(dump) for path, strategy in sdk.items()}
    out[f"/api/v1/sessions/{ids.spare_session_id}/finish"] = st.fixed_dictionaries(
        {"reason": st.fixed_dictionaries({"type": st.sampled_from(["success", "errored", "interrupted"])})},
        optional={"detail": st.none() | st.text(max_size=20)},
    )
    out["/api/v1/telemetry"] = st.fixed_dictionaries(
        {
            "events": st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=3), max_size=3),
            "platform": st.just("linux"),
            "sdk_version": st.just("0.38.0"),
            "session_id": st.just(ids.session_id),
            "process_uuid": st.uuids().map(str),
        }
    )
    out["/api/v1/cancel_future"] = st.fixed_dictionaries({"request_id": st.integers(1, 3000).map(lambda n: f"req-{n}")})
    return out


# --- broken bodies -------------------------------------------------------------------------------------------------


def fields(value: Any, name: str = "") -> list[tuple[str, tuple]]:
    """(the name a route gives it, the key path) of every field of a body, at any depth (list items NAME[i])."""
    out: list[tuple[str, tuple]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        child_name = f"{name}[{key}]" if isinstance(value, list) else f"{name}.{key}" if name else key
        out.append((child_name, (key,)))
        out += [(n, (key, *path)) for n, path in fields(child, child_name)]
    return out


def replaced(body: Any, path: tuple, value: Any) -> Any:
    """A copy of `body` with the field at `path` set to `value` (..., the Ellipsis: removed)."""
    if not path:
        return value
    copy = dict(body) if isinstance(body, dict) else list(body)
    child = replaced(copy[path[0]], path[1:], value)
    if child is ... and isinstance(copy, dict):
        del copy[path[0]]
    elif child is ...:
        copy.pop(path[0])
    else:
        copy[path[0]] = child
    return copy


JSON_KINDS = {
    type(None): st.none(),
    bool: st.booleans(),
    int: st.integers(-5, 5),
    float: st.floats(-10, 10).filter(lambda f: not f.is_integer()),
    str: st.text(max_size=6),
    list: st.lists(st.integers(0, 3), max_size=2),
    dict: st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
}


def other_type(value: Any) -> st.SearchStrategy[Any]:
    """A JSON value of another JSON type (a float where an int was is another type; an int where a float was is not:
    JSON numbers)."""
    same = {type(value)} | ({int} if type(value) is float else set())
    return st.one_of([strategy for kind, strategy in JSON_KINDS.items() if kind not in same])


@st.composite
def broken_field(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]]) -> tuple[str | None, bytes]:
    """A valid body with one field (at any depth) broken: of another type, missing, a number at or beyond the
    edge of every range, or a hostile string. Returns the field's name (None where the break is not the field's:
    an escaped lone surrogate makes the whole body undecodable) and the body."""
    body = draw(bodies)
    name, path = draw(st.sampled_from(fields(body)))
    current: Any = body
    for key in path:
        current = current[key]
    how = draw(st.sampled_from(["type", "missing", "edge", "beyond", "string", "surrogate"]))
    if how == "beyond":  # not a Python value: spliced into the JSON text
        return name, encode(replaced(body, path, "@@")).replace(b'"@@"', draw(st.sampled_from(BEYOND)).encode())
    if how == "surrogate":
        return None, encode(replaced(body, path, "\ud800"))
    value = {
        "type": other_type(current),
        "missing": st.just(...),
        "edge": st.sampled_from(EDGE_NUMBERS),
        "string": st.sampled_from(["", "\x00", "\U0001f600" * 3, "x" * 10_000, "tinker://x/weights/.."]),
    }[how]
    return name, encode(replaced(body, path, draw(value)))


# --- protobuf ------------------------------------------------------------------------------------------------------


def hostile_protos(ids: Ids) -> list[FuzzRequest]:
    """forward_backward bodies of the SDK's own schema that hold what no SDK sends (each sent once, after the
    fuzz: too many to meet each in a few hundred draws)."""

    def request(*data: pb.Datum, loss_fn: str = "cross_entropy", **config: float) -> bytes:
        message = pb.ForwardBackwardRequest(model_id=ids.model_id, seq_id=1, loss_fn=loss_fn, data=list(data))
        for key, number in config.items():
            message.loss_fn_config[key] = number
            message.loss_fn_config_v2[key].number = number
        return message.SerializeToString()

    def tensor(values: Any, dtype: int, shape: list[int] | None = None) -> pb.Tensor:
        kind = np.float32 if dtype == pb.DTYPE_FLOAT32 else np.int64
        return pb.Tensor(dense=np.asarray(values, kind).tobytes(), dtype=dtype, shape=shape or [])

    def one(tokens: list[int], targets: pb.Tensor, **inputs: pb.Tensor) -> pb.Datum:
        chunk = pb.Chunk(encoded_text=pb.EncodedTextChunk(tokens=np.asarray(tokens, np.int32).tobytes()))
        d = pb.Datum(model_input=[chunk])
        d.loss_fn_inputs["target_tokens"].CopyFrom(targets)
        for key, t in inputs.items():
            d.loss_fn_inputs[key].CopyFrom(t)
        return d

    good = tensor([1, 2], pb.DTYPE_INT64)
    sparse = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2], sparse_csr=pb.SparseCsr(values=b"\0" * 8))
    image = pb.Datum(model_input=[pb.Chunk(image=pb.ImageChunk(data=b"\x89PNG", format="png"))])
    bodies = [
        request(one([1, 2], tensor([1, 2], pb.DTYPE_INT64, [2**62, 2**62]))),
        request(one([1, 2], tensor([1, 2], pb.DTYPE_INT64, [2**63 - 1] * 40))),
        request(one([1, 2], tensor([1, 2], pb.DTYPE_INT64, [1, 2]))),
        request(one([1, 2], pb.Tensor(dense=b"\0" * 16, dtype=99))),
        request(one([1, 2], tensor([1.0, 2.0], pb.DTYPE_FLOAT32))),
        request(one([1, 2], sparse)),
        request(one([1, -5], tensor([ids.vocab, -1], pb.DTYPE_INT64))),
        request(one([2**31 - 1, 1], good)),
        request(one([1, 2], tensor([2**63 - 1, -(2**63)], pb.DTYPE_INT64))),
        request(one([1, 2], good, weights=tensor([np.inf, np.nan], pb.DTYPE_FLOAT32))),
        request(one([1, 2], good, nope=tensor([1.0, 2.0], pb.DTYPE_FLOAT32))),
        request(one([], tensor([], pb.DTYPE_INT64))),
        request(image),
        request(pb.Datum()),
        request(),
        request(*[one([1, 2], good)] * 17),  # one more than the test's tinker.max_data
        request(one([1, 2], good), loss_fn="custom"),
        request(one([1, 2], good), loss_fn=""),
        request(one([1, 2], good, advantages=tensor([1.0, 1.0], pb.DTYPE_FLOAT32)), loss_fn="ppo"),
        request(
            one([1, 2], good, logprobs=tensor([0.0, 0.0], pb.DTYPE_FLOAT32), advantages=tensor([1, 1], 1)),
            loss_fn="ppo",
            clip_low_threshold=float("nan"),
            clip_high_threshold=float("inf"),
        ),
        request(one([1, 2], good), nope=1.0),
        pb.ForwardBackwardRequest(model_id="\U0001f600" * 100, loss_fn="cross_entropy").SerializeToString(),
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",  # model_id of length 2**63-ish
        b"\x1a\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an overlong varint
        b"\x0b\x0c",  # group wire types
        b"\x0a\x04\xff\xfe\xfd\xfc",  # model_id not UTF-8
    ]
    headers = {"Content-Type": PROTO, "X-API-Key": ids.key}
    return [FuzzRequest("proto_hostile", "POST", "/api/v1/forward_backward", body, headers) for body in bodies]


@st.composite
def protobuf_body(draw: st.DrawFn, ids: Ids) -> tuple[str, bytes]:
    """A forward_backward body: valid, or broken (truncated, bytes changed or inserted, random)."""
    how = draw(st.sampled_from(["valid", "valid", "truncated", "changed", "inserted", "random"]))
    if how == "random":
        return how, draw(st.binary(max_size=400))
    body = draw(forward_backward_proto(ids))
    at = draw(st.integers(0, len(body)))
    if how == "truncated":
        return how, body[: min(at, len(body) - 1)]
    if how == "changed":
        junk = draw(st.binary(min_size=1, max_size=4))
        return how, body[:at] + junk + body[at + len(junk) :]
    if how == "inserted":
        return how, body[:at] + draw(st.binary(min_size=1, max_size=12)) + body[at:]
    return "well_formed", body


# --- requests ------------------------------------------------------------------------------------------------------


def content_encoded(encoding: str, honest: bool, path: str, body: bytes) -> FuzzRequest:
    """`body` sent with Content-Encoding `encoding`, compressed as it says (`honest`, where Python can) or not."""
    if honest and encoding == "gzip":
        body = gzip.compress(body)
    elif honest and encoding == "deflate":
        body = zlib.compress(body)
    kind = "application/x-protobuf" if path.endswith("forward_backward") else "application/json"
    return FuzzRequest("content_encoding", "POST", path, body, {"Content-Type": kind, "Content-Encoding": encoding})


def keyed(request: FuzzRequest, key: str | None, server_key: str) -> FuzzRequest:
    """The request with X-API-Key `key` (None: no header). Any other than the server's makes it a "no_key" one."""
    headers = {**request.headers, "X-API-Key": key} if key is not None else dict(request.headers)
    if key == server_key:
        return dataclasses.replace(request, headers=headers)
    return dataclasses.replace(request, kind="no_key", param=None, headers=headers)


BODYLESS = [("GET", "/api/v1/healthz"), ("GET", "/api/v1/get_server_capabilities")]
BODYLESS += [("POST", "/api/v1/client/config"), ("POST", "/api/v1/client/dynamic_config")]


def simplest(ids: Ids) -> list[FuzzRequest]:
    """The simplest valid request of every route (hypothesis.find's smallest example of each body), to send once:
    every route is then known to take one, whatever the draws miss."""
    quiet = settings(database=None, max_examples=1, phases=[Phase.generate, Phase.shrink])
    bodies = {path: find(strategy, lambda _: True, settings=quiet) for path, strategy in valid_bodies(ids).items()}
    out = [FuzzRequest("well_formed", "POST", path, encode(body)) for path, body in bodies.items()]
    out += [FuzzRequest("well_formed", m, p, None if m == "GET" else b"{}") for m, p in BODYLESS]
    out.append(FuzzRequest("well_formed", "GET", f"/api/v1/samplers/{ids.sampler_id}", None))
    proto = find(forward_backward_proto(ids), lambda _: True, settings=quiet)
    out.append(FuzzRequest("well_formed", "POST", "/api/v1/forward_backward", proto, {"Content-Type": PROTO}))
    return [dataclasses.replace(r, headers={**r.headers, "X-API-Key": ids.key}) for r in out]


def requests(ids: Ids, routes: list[tuple[str, str]]) -> st.SearchStrategy[FuzzRequest]:
    """`routes`: (method, path) of every route the server has (ROUTES), path parameters as {name}."""
    bodies = valid_bodies(ids)
    paths = sorted(bodies)

    def each_path(make: Any) -> st.SearchStrategy[FuzzRequest]:
        return st.one_of([make(path) for path in paths])

    well_formed = each_path(lambda p: bodies[p].map(lambda b: FuzzRequest("well_formed", "POST", p, encode(b))))
    field = each_path(
        lambda p: broken_field(bodies[p]).map(lambda nb: FuzzRequest("field", "POST", p, nb[1], param=nb[0]))
    )
    whole = each_path(lambda p: mutated(bodies[p]).map(lambda made: FuzzRequest(made[0], "POST", p, made[1])))
    proto = protobuf_body(ids).map(
        lambda made: FuzzRequest(
            made[0] if made[0] == "well_formed" else f"proto_{made[0]}",
            "POST",
            "/api/v1/forward_backward",
            made[1],
            {"Content-Type": PROTO},
        )
    )
    proto_headers = st.tuples(
        st.sampled_from([{"Content-Type": "application/json"}, {"Content-Type": "text/plain"}, {}]),
        forward_backward_proto(ids),
    ).map(lambda hb: FuzzRequest("content_type", "POST", "/api/v1/forward_backward", hb[1], hb[0]))
    encoded = st.tuples(
        st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "bogus"]),
        st.booleans(),
        st.sampled_from(paths).flatmap(lambda p: bodies[p].map(lambda b: (p, encode(b))))
        | forward_backward_proto(ids).map(lambda b: ("/api/v1/forward_backward", b)),
    ).map(lambda e: content_encoded(e[0], e[1], *e[2]))
    hostile = st.sampled_from(HOSTILE_IDS) | st.text(max_size=40).map(lambda t: urllib.parse.quote(t, safe=""))
    path_params = st.one_of(
        hostile.map(lambda i: FuzzRequest("path_param", "GET", f"/api/v1/samplers/{i}", None)),
        st.tuples(hostile, bodies[f"/api/v1/sessions/{ids.spare_session_id}/finish"]).map(
            lambda ib: FuzzRequest("path_param", "POST", f"/api/v1/sessions/{ib[0]}/finish", encode(ib[1]))
        ),
        st.just(FuzzRequest("well_formed", "GET", f"/api/v1/samplers/{ids.sampler_id}", None)),
    )
    concrete = sorted({(m, p.replace("{sampler_id}", ids.sampler_id).replace("{session_id}", "s")) for m, p in routes})
    any_body = st.tuples(
        st.sampled_from(concrete), st.one_of(st.none(), st.just(b"{}"), st.binary(max_size=40), json_values.map(encode))
    ).map(lambda mpb: FuzzRequest("any_body", mpb[0][0], mpb[0][1], mpb[1]))
    wrong_method = (
        st.tuples(st.sampled_from([p for _, p in concrete]), st.sampled_from(METHODS))
        .filter(lambda pm: (pm[1], pm[0]) not in set(concrete))
        .map(lambda pm: FuzzRequest("wrong_method", pm[1], pm[0], b"{}"))
    )
    content_type = st.tuples(
        st.sampled_from(paths),
        st.sampled_from(["text/plain", PROTO, "multipart/form-data; boundary=x", "application/json; charset=latin-1"]),
    ).map(lambda pc: FuzzRequest("content_type", "POST", pc[0], b"{}", {"Content-Type": pc[1]}))
    unknown_path = st.tuples(st.sampled_from(METHODS), st.from_regex(r"[a-z0-9/._%-]{0,30}", fullmatch=True)).map(
        lambda mp: FuzzRequest("unknown_path", mp[0], f"/api/v1/x{mp[1]}", b"{}")
    )
    weighted = [
        (well_formed, 6),
        (field, 10),
        (whole, 6),
        (proto, 5),
        (proto_headers, 1),
        (encoded, 1),
        (path_params, 2),
        (any_body, 2),
        (wrong_method, 1),
        (content_type, 1),
        (unknown_path, 1),
    ]
    wrong = [None, "tml-wrong", "", ids.key + "x", ids.key[:-1], "\u00ff\u00fe", "Bearer " + ids.key]  # \u00ff: a byte
    key = st.sampled_from([ids.key] * 4 * len(wrong) + wrong)  # one in five without the server's key
    made = st.sampled_from([strategy for strategy, weight in weighted for _ in range(weight)]).flatmap(lambda s: s)
    return st.tuples(made, key).map(lambda rk: keyed(rk[0], rk[1], ids.key))
