"""The few protobuf messages of the Tinker wire that are not JSON, coded by hand (no generated module, no SDK).

In: a `ForwardBackwardRequest` body (the SDK sends forward_backward as protobuf). Out: `ForwardBackwardOutput` and
`SampleResponse` bodies (the SDK reads those two results of retrieve_future only as protobuf). Field numbers are the
SDK's `tinker/proto/tinker_public.proto` (tinker 0.38), and one of paraloop's (VERSIONS), which protobuf readers that
do not know it skip. Anything malformed raises ProtoError naming the field; sizes
are bounded by the caller before decoding (the body limit) and element counts by `Limits` after.
"""

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

FLOAT32, INT64, INT32 = 1, 2, 3  # DType
STOP, LENGTH = 0, 1  # StopReason
VERSIONS = 1000  # paraloop's own SampledSequence field: each token's weights version (no SDK field; it skips it)
_NUMPY = {FLOAT32: np.float32, INT64: np.int64, INT32: np.int32}


class ProtoError(ValueError):
    """A body that does not decode as the message it should be; `field` names where."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class DatumIn:
    tokens: np.ndarray  # (N,) int64: the model input
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # loss_fn_inputs by name


@dataclass
class ForwardBackwardIn:
    model_id: str = ""
    seq_id: int = 0
    loss_fn: str = ""
    forward_only: bool = False
    config: dict[str, float | str] = field(default_factory=dict)
    data: list[DatumIn] = field(default_factory=list)


# --- reading ---------------------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtoError(where, "truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def fields(buf: bytes, where: str) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field: an int for varints and fixed64/32 (raw bits), bytes for
    length-delimited fields."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, where)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ProtoError(where, "truncated fixed64")
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ProtoError(where, "truncated fixed32")
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos, where)
            if pos + size > len(buf):
                raise ProtoError(where, "truncated length-delimited field")
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ProtoError(where, f"unsupported wire type {wire}")
        yield number, wire, value


def _double(bits: int) -> float:
    return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def _str(value: int | bytes, where: str) -> str:
    if not isinstance(value, bytes):
        raise ProtoError(where, "expected a string")
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise ProtoError(where, "not UTF-8") from None


def _tensor(buf: bytes, where: str) -> np.ndarray:
    dense, dtype, shape = b"", 0, []
    for number, wire, value in fields(buf, where):
        if number == 1 and isinstance(value, bytes):
            dense = value
        elif number == 2:
            raise ProtoError(where, "sparse tensors are not supported here: send dense arrays")
        elif number == 3 and wire == 0:
            dtype = int(value)
        elif number == 4:  # packed (wire 2) or one varint (wire 0) per element
            if isinstance(value, bytes):
                pos = 0
                while pos < len(value):
                    dim, pos = _varint(value, pos, where)
                    shape.append(dim)
            else:
                shape.append(int(value))
    kind = _NUMPY.get(dtype)
    if kind is None:
        raise ProtoError(where, f"dtype {dtype} is not float32 or int64")
    itemsize = np.dtype(kind).itemsize
    if len(dense) % itemsize:
        raise ProtoError(where, f"{len(dense)} bytes is not a whole number of {np.dtype(kind).name} values")
    array = np.frombuffer(dense, dtype=kind)
    if shape and int(np.prod(shape)) != array.size:
        raise ProtoError(where, f"shape {shape} does not hold {array.size} values")
    if len(shape) > 1:
        raise ProtoError(where, f"shape {shape}: only 1-D loss_fn_inputs are supported")
    return array


def _datum(buf: bytes, where: str) -> DatumIn:
    tokens: list[np.ndarray] = []
    inputs: dict[str, np.ndarray] = {}
    for number, _, value in fields(buf, where):
        if number == 1 and isinstance(value, bytes):
            for cnum, _, chunk in fields(value, f"{where}.model_input"):
                if cnum != 1:
                    raise ProtoError(
                        f"{where}.model_input", "only encoded_text chunks are supported (no images, no audio)"
                    )
                for tnum, _, raw in fields(chunk, f"{where}.model_input"):
                    if tnum == 1 and isinstance(raw, bytes):
                        if len(raw) % 4:
                            raise ProtoError(f"{where}.model_input", "tokens are not int32")
                        tokens.append(np.frombuffer(raw, dtype=np.int32))
        elif number == 2 and isinstance(value, bytes):
            key, tensor = "", None
            for enum_, _, ev in fields(value, f"{where}.loss_fn_inputs"):
                if enum_ == 1:
                    key = _str(ev, f"{where}.loss_fn_inputs")
                elif enum_ == 2 and isinstance(ev, bytes):
                    tensor = ev
            inputs[key] = _tensor(tensor or b"", f"{where}.loss_fn_inputs.{key}")
    ids = np.concatenate(tokens).astype(np.int64) if tokens else np.zeros(0, np.int64)
    return DatumIn(ids, inputs)


def decode_forward_backward(body: bytes) -> ForwardBackwardIn:
    """A ForwardBackwardRequest body. Raises ProtoError."""
    out = ForwardBackwardIn()
    v2: dict[str, float | str] = {}
    for number, wire, value in fields(body, "body"):
        if number == 1:
            out.model_id = _str(value, "model_id")
        elif number == 2 and wire == 0:
            out.seq_id = int(value)
        elif number == 3 and isinstance(value, bytes):
            out.data.append(_datum(value, f"data[{len(out.data)}]"))
        elif number == 4:
            out.loss_fn = _str(value, "loss_fn")
        elif number == 5 and isinstance(value, bytes):  # legacy float map
            key, number_ = "", 0.0
            for enum_, _, ev in fields(value, "loss_fn_config"):
                if enum_ == 1:
                    key = _str(ev, "loss_fn_config")
                elif enum_ == 2 and isinstance(ev, int):
                    number_ = _double(ev)
            out.config[key] = number_
        elif number == 6 and wire == 0:
            out.forward_only = bool(value)
        elif number == 7 and isinstance(value, bytes):
            key, item = "", None
            for enum_, _, ev in fields(value, "loss_fn_config"):
                if enum_ == 1:
                    key = _str(ev, "loss_fn_config")
                elif enum_ == 2 and isinstance(ev, bytes):
                    for vnum, _, vv in fields(ev, f"loss_fn_config.{key}"):
                        item = _double(vv) if vnum == 1 and isinstance(vv, int) else _str(vv, "loss_fn_config")
            if item is not None:
                v2[key] = item
    out.config.update(v2)  # the SDK mirrors floats into both maps; v2 wins
    return out


# --- writing ---------------------------------------------------------------------------------------------------------


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(value)) + value


def _varint_field(number: int, value: int) -> bytes:
    return _key(number, 0) + _encode_varint(value)


def encode_forward_backward_output(outputs: list[dict[str, np.ndarray]], metrics: dict[str, float]) -> bytes:
    """One batched ArrayRecord of float32 1-D fields (each datum's slice by byte offsets) and the metrics."""
    record = _bytes_field(1, b"ArrayRecord") + _varint_field(3, len(outputs))
    names = list(outputs[0]) if outputs else []
    for name in names:
        arrays = [np.ascontiguousarray(o[name], dtype=np.float32) for o in outputs]
        offsets = np.concatenate([[0], np.cumsum([a.nbytes for a in arrays])]).astype(np.int64)
        tensor = (
            _bytes_field(1, b"".join(a.tobytes() for a in arrays))
            + _bytes_field(2, offsets.tobytes())
            + _varint_field(3, FLOAT32)
        )
        record += _bytes_field(2, _bytes_field(1, name.encode()) + _bytes_field(2, tensor))
    body = _bytes_field(1, b"ArrayRecord") + _bytes_field(2, record)
    for name, value in metrics.items():
        body += _bytes_field(3, _bytes_field(1, name.encode()) + _key(2, 1) + struct.pack("<d", float(value)))
    return body


@dataclass
class Sequence:
    """One sampled row as SampleResponse carries it."""

    stop: int  # STOP or LENGTH
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]  # per token: the version of the sampler save whose weights produced it


def encode_sample_response(sequences: list[Sequence], prompt_logprobs: list[float] | None = None) -> bytes:
    """SampleResponse: each sequence's stop reason, tokens, logprobs and (VERSIONS) token versions; prompt log-probs
    (NaN first) if asked."""
    body = b""
    for s in sequences:
        seq = (
            _varint_field(1, s.stop)
            + _bytes_field(2, np.asarray(s.tokens, np.int32).tobytes())
            + _bytes_field(3, np.asarray(s.logprobs, np.float32).tobytes())
            + _bytes_field(VERSIONS, np.asarray(s.versions, np.int32).tobytes())
        )
        body += _bytes_field(1, seq)
    if prompt_logprobs is not None:
        body += _bytes_field(2, np.asarray(prompt_logprobs, np.float32).tobytes())
    return body


def sample_versions(body: bytes) -> list[list[int]]:
    """Each sequence's token versions from a SampleResponse body (what a client that knows VERSIONS reads)."""
    out: list[list[int]] = []
    for number, wire, seq in fields(body, "SampleResponse"):
        if number == 1 and wire == 2:
            assert isinstance(seq, bytes)
            raw = [v for n, w, v in fields(seq, "sequences") if n == VERSIONS and w == 2]
            out.append(np.frombuffer(raw[0] if raw else b"", np.int32).tolist())  # type: ignore[arg-type]
    return out
