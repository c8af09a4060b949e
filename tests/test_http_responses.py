"""server/responses.json_response, the one JSON answer helper: msgspec's null for a non-finite float, or
Python's json literals where the client reads floats that may not be finite (the Tinker SDK)."""

import json
import math

import msgspec

from paraloop.server.responses import json_response


def test_non_finite_floats_are_null_by_default_and_literals_when_asked():
    plain = json_response({"x": float("nan"), "y": 1.5, "z": [1, "a"]}, status=201, headers={"X-A": "b"})
    assert msgspec.json.decode(plain.body) == {"x": None, "y": 1.5, "z": [1, "a"]}
    assert (plain.status, plain.headers["X-A"], plain.content_type) == (201, "b", "application/json")
    literal = json_response({"grad_norm": float("nan"), "up": float("inf"), "y": 1.5}, nan_literals=True)
    decoded = json.loads(literal.body)
    assert math.isnan(decoded["grad_norm"]) and decoded["up"] == math.inf and decoded["y"] == 1.5
    assert literal.content_type == "application/json"
