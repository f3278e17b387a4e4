"""When to try a callback again: the configured schedule, with jitter, honouring the receiver's Retry-After.

``callbacks.retry_schedule`` lists the delays after each failed attempt (Svix's 5 s, 5 m, 30 m, 2 h, 5 h, 10 h,
10 h by default), so a schedule of N steps allows N + 1 attempts in all. Each delay is spread by ±20 % so that
callbacks that failed together (a receiver outage) do not all come back in the same second.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

JITTER = 0.2


class UniformSource(Protocol):
    """What ``next_delay`` needs from a random source: ``random`` itself or a seeded ``random.Random``."""

    def uniform(self, a: float, b: float) -> float: ...


def next_delay(
    attempt_number: int,
    schedule: Sequence[float],
    retry_after_s: float | None,
    rng: UniformSource = random,
) -> float | None:
    """Seconds to wait after the ``attempt_number``-th failed attempt (1 = the first), or None when none is left.

    The step's delay gets ±20 % jitter. A ``Retry-After`` from the receiver replaces the step's delay and is
    jittered upwards only (up to +20 %, so the retry never comes earlier than asked), then capped at the next
    step's delay (this step's, after the last one) so a receiver cannot park a callback for longer than the
    schedule would.
    """
    if attempt_number < 1:
        raise ValueError("attempt_number counts failed attempts from 1")
    if attempt_number > len(schedule):
        return None
    step = float(schedule[attempt_number - 1])
    if retry_after_s is None:
        return step * rng.uniform(1 - JITTER, 1 + JITTER)
    cap = float(schedule[attempt_number]) if attempt_number < len(schedule) else step
    return min(max(retry_after_s, 0.0) * rng.uniform(1.0, 1 + JITTER), cap)
