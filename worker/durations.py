"""Human-friendly durations for the config file and the environment: ``5s``, ``30m``, ``2h``, ``7d`` or plain
seconds."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Return seconds for ``value``; raise ValueError with a readable message when it is not a duration."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 5s, 10m, 2h or 7d")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _PATTERN.match(str(value))
        if not match:
            raise ValueError(f"must be a duration such as 5s, 10m, 2h or 7d (got {value!r})")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def duration_from_env(name: str, default_s: float, environ: Mapping[str, str] = os.environ) -> float:
    """Seconds from the environment variable ``name`` (a duration such as ``30s``), else ``default_s``; ValueError
    naming the variable when it is set to anything but a positive duration."""
    value = environ.get(name)
    if not value:
        return default_s
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"{name} must be a positive duration such as 30s (got {value!r})")
    return seconds
