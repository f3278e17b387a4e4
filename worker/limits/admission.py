"""The values the limiter hands back: an admission decision and the reservation it holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Limit = Literal["requests", "tokens", "concurrency", "upstream", "tenant_requests", "tenant_tokens",
                "tenant_concurrency"]
LIMITS: tuple[Limit, ...] = ("requests", "tokens", "concurrency", "upstream", "tenant_requests", "tenant_tokens",
                             "tenant_concurrency")


@dataclass(frozen=True, slots=True)
class Admission:
    """One ``acquire`` answer.

    ``admitted``: the call may go now; ``reservation`` (``None`` for an app without limits) must then be
    released. Otherwise ``wait_s`` is the earliest moment every limit could admit this job, computed from the
    shared state, and ``limit`` is the one that binds (``requests|tokens|concurrency|upstream``).
    ``upstream_streak``: the key had a run of upstream 429s when this call was admitted, so its success should
    reset the cooldown escalation (``report_success``); without one the success needs no write. ``tenant``: the
    tenant whose own limits (``tenant_limits``) the reservation also holds, to release with it.
    """

    admitted: bool
    wait_s: float
    limit: str | None
    reservation: str | None
    upstream_streak: bool = False
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an opaque reservation string carries: its id, when it was admitted (Redis time), tokens reserved."""

    rid: str
    admitted_at: float
    tokens: int

    @classmethod
    def parse(cls, reservation: str) -> Reservation:
        rid, admitted_us, tokens = reservation.split(".")
        return cls(rid=rid, admitted_at=int(admitted_us) / 1e6, tokens=int(tokens))
