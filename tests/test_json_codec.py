"""difyq.worker.json_codec: the same documents as the standard library, where orjson alone would refuse them."""

from __future__ import annotations

import json
import math

import pytest

from difyq.worker.json_codec import dumps, loads


def test_round_trip_is_compact_utf8_without_ascii_escapes() -> None:
    value = {"answer": "你好 👋", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    encoded = dumps(value)
    assert encoded == json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert loads(encoded) == value
    assert loads(encoded.decode()) == value


def test_what_orjson_refuses_still_parses_and_encodes() -> None:
    huge = 2**70
    assert loads(b'{"id": 123456789012345678901234567890, "x": NaN}')["id"] == 123456789012345678901234567890
    assert math.isnan(loads('{"x": NaN}')["x"])
    assert loads(dumps({"id": huge})) == {"id": huge}
    assert loads(dumps({1: "integer key"})) == {"1": "integer key"}


def test_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        loads(b"{not json")
    with pytest.raises(ValueError):
        loads(b"")


def test_default_handles_what_json_cannot_hold() -> None:
    marker = object()
    with pytest.raises(TypeError):
        dumps({"x": marker})
    assert loads(dumps({"x": marker}, default=lambda _: "fallback")) == {"x": "fallback"}
    assert loads(dumps({"x": marker, "big": 2**70}, default=lambda _: "fallback")) == {"x": "fallback", "big": 2**70}
