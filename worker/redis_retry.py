"""Redis writes that must not be lost to a blip: retried through connection errors for a bounded time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import redis
import structlog

log = structlog.get_logger("difyq.worker")
T = TypeVar("T")


def through_blips(write: Callable[[], T], within_s: float, event: str = "store_write_retrying") -> T:
    """``write()``, retried with a growing pause (0.1 s to 2 s) while Redis cannot be reached, for up to
    ``within_s`` (``math.inf``: until it works), each retry logged as ``event``; then the last error is raised.
    Only for writes that are safe to run twice."""
    deadline = time.monotonic() + within_s
    pause = 0.1
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() + pause > deadline:
                raise
            log.warning(event, pause_s=pause)
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
