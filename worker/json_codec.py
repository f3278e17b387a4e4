"""JSON for the per-job paths (Dify's stream, job records, callback bodies, API bodies): orjson where it can,
the standard library where orjson refuses (integers past 64 bits, NaN and Infinity), so both accept and produce
the same documents; orjson only makes the common case several times cheaper."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document; ValueError when it is not one."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact UTF-8 JSON (no spaces, no ASCII escaping); ``default`` turns what JSON cannot hold into what it
    can (as for ``json.dumps``), else such a value raises TypeError."""
    try:
        return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=default).encode()
