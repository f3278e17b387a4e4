"""Naming: the hashed id of a Dify API key, and the Redis keys that hold its limiter state."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from difyq.worker.config import AppConfig, AppLimits


def key_id(api_key: str) -> str:
    """A short, stable SHA-256 id of a Dify API key: what Redis key names, logs and metrics see instead."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class LimitNames:
    """The Redis keys of one set of limits with its waiting line: a Dify key's, or one tenant's on that key."""

    req: str  # ZSET reservation id -> admission time: the sliding request log
    tok: str  # ZSET reservation id -> time: the sliding token log
    amt: str  # HASH reservation id -> tokens counted for it
    state: str  # HASH tok (tokens in the window), hold (mean slot hold time, µs), tat (pacing), vt (fair round)
    lease: str  # ZSET reservation -> lease expiry: the concurrency slots
    line: str  # ZSET ticket -> place: the waiting line
    due: str  # ZSET ticket -> when the waiter was told to come back
    need: str  # HASH ticket -> the waiter's token estimate

    @classmethod
    def under(cls, prefix: str) -> LimitNames:
        return cls(**{name: prefix + name for name in LimitNames.__dataclass_fields__})

    def all(self) -> list[str]:
        return [self.req, self.tok, self.amt, self.state, self.lease, self.line, self.due, self.need]


@dataclass(frozen=True)
class KeyNames(LimitNames):
    """Every Redis key of one Dify key's limiter, all under ``{namespace}:limits:{key_id}:``; a tenant's limits
    and line (``tenant_limits``) are under ``{namespace}:limits:{key_id}:t:{tenant}:``."""

    cool: str = ""  # HASH until, streak: the upstream (429) cooldown
    rounds: str = ""  # ZSET tenant -> the round of its last job in the fair line (``fairness: tenant``)
    low: str = ""  # ZSET ticket -> place: the waiters below normal priority (``jobs.low_priority_min_share``)

    @classmethod
    def of(cls, namespace: str, kid: str) -> KeyNames:
        prefix = f"{namespace}:limits:{kid}:"
        return cls(**{name: prefix + name for name in cls.__dataclass_fields__})

    def tenant(self, tenant: str) -> LimitNames:
        """The keys of ``tenant``'s own limits and line on this Dify key."""
        return LimitNames.under(self.req.removesuffix("req") + f"t:{tenant}:")

    def acquire(self, tenant: str) -> list[str]:
        return [*self.all(), self.cool, self.rounds, self.low, *self.tenant(tenant).all()]


def shared_limits(apps: Mapping[str, AppConfig]) -> dict[str, AppLimits | None]:
    """Each app's limits as its *key* should enforce them: apps that share a Dify key get, per limit, the
    strictest value any of them configures (a ``burst`` no larger than the strictest request limit), so every
    app checks the same numbers against the shared state (an app without a limits block is held to its key's
    limits too; each app keeps its own token estimate).
    An app whose key no app limits gets ``None`` (only the upstream cooldown applies)."""
    by_key: dict[str, list[AppLimits]] = {}
    for app in apps.values():
        if app.limits is not None:
            by_key.setdefault(app.api_key.get_secret_value(), []).append(app.limits)
    merged: dict[str, AppLimits] = {}
    for api_key, found in by_key.items():
        def strictest(field: str, found: list[AppLimits] = found) -> int | None:
            values = [getattr(limits, field) for limits in found if getattr(limits, field) is not None]
            return min(values) if values else None

        requests_per_minute = strictest("requests_per_minute")
        burst = strictest("burst")
        merged[api_key] = AppLimits(
            requests_per_minute=requests_per_minute,
            burst=None if burst is None or requests_per_minute is None else min(burst, requests_per_minute),
            tokens_per_minute=strictest("tokens_per_minute"),
            max_concurrency=strictest("max_concurrency"),
            estimated_tokens_per_call=max(limits.estimated_tokens_per_call for limits in found),
        )
    result: dict[str, AppLimits | None] = {}
    for name, app in apps.items():
        shared = merged.get(app.api_key.get_secret_value())
        if shared is not None and app.limits is not None:
            shared = shared.model_copy(update={"estimated_tokens_per_call": app.limits.estimated_tokens_per_call})
        result[name] = shared
    return result
