"""The values the limiter hands back: an admission decision and the reservation it holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Limit = Literal["requests", "tokens", "concurrency", "upstream", "tenant_requests", "tenant_tokens",
                "tenant_concurrency"]
LIMITS: tuple[Limit, ...] = ("requests", "tokens", "concurrency", "upstream", "tenant_requests", "tenant_tokens",
                             "tenant_concurrency")


@dataclass(frozen=True, slots=True)
class UpstreamCheck:
    """The upstream cooldown an admission leaves to the job's start to check (a key without limits: start.lua reads
    it in the start's own round trip, so the admission makes none): the key's cooldown hash, and the limiter's clock
    (``''``: Redis ``TIME``; a fake time in microseconds in tests)."""

    cool: str
    now: str


@dataclass(frozen=True, slots=True)
class Admission:
    """One ``acquire`` answer.

    ``admitted``: the call may go now; ``reservation`` (``None`` for an app without limits) must then be
    released. Otherwise ``wait_s`` is the earliest moment every limit could admit this job, computed from the
    shared state, and ``limit`` is the one that binds (``requests|tokens|concurrency|upstream``).
    ``upstream_streak``: the key had a run of upstream 429s when this call was admitted, so its success should
    reset the cooldown escalation (``report_success``); without one the success needs no write. ``tenant``: the
    tenant whose own limits (``tenant_limits``) the reservation also holds, to release with it.
    ``upstream_check``: the admission did not read the key's upstream cooldown (the key has no limits): the job's
    start checks it, and refuses a job on a cooling key as this admission would have (``limit`` ``upstream``).
    """

    admitted: bool
    wait_s: float
    limit: str | None
    reservation: str | None
    upstream_streak: bool = False
    tenant: str | None = None
    upstream_check: UpstreamCheck | None = None

    @classmethod
    def cooling(cls, wait_s: float) -> Admission:
        """The refusal of a job whose key cools down ``wait_s`` more, found by its start (``upstream_check``)."""
        return cls(admitted=False, wait_s=wait_s, limit="upstream", reservation=None)


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
