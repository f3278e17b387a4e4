"""wait_for: poll until a condition holds, with a deadline. Tests wait for what they expect to happen, never
for a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 20.0, *, interval: float = 0.05,
             what: str = "the condition") -> T:
    """The first truthy value ``condition()`` returns, polled every ``interval`` seconds; AssertionError naming
    ``what`` and the last value when none came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not hold within {timeout:g} s (last value: {value!r})")
        time.sleep(interval)
