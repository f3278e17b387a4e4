"""The Redis settings difyq's guarantees rest on, checked when ``difyq api``, ``worker`` and ``scheduler`` start.

Job records, their queued messages and idempotency keys live only in Redis, so "a job accepted with 2xx is never
lost" needs a Redis that

* never evicts: ``maxmemory-policy noeviction``. An evicting Redis silently drops job records, queued messages or
  idempotency keys when memory runs short (accepted jobs vanish, a retried request runs twice); with
  ``noeviction`` a full Redis refuses writes instead, which producers answer with 503;
* keeps writes across a restart: ``appendonly yes`` with ``appendfsync everysec`` (or ``always``). Without AOF a
  restart loses every job accepted since the last snapshot.

An evicting Redis is refused (exit code 3) unless ``DIFYQ_ALLOW_REDIS_EVICTION=1``; AOF off is a loud warning.
Hosted Redis that forbids ``CONFIG`` is read through ``INFO`` where it can be, else a warning says what could not
be checked. An unreachable Redis is not refused: the API answers 503 and workers reconnect once it is up.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis
import structlog

from difyq.worker.redis_connect import RedisConnector

log = structlog.get_logger("difyq.redis_check")

ALLOW_EVICTION_ENV = "DIFYQ_ALLOW_REDIS_EVICTION"
EXIT_UNUSABLE_REDIS = 3
SAFE_EVICTION_POLICY = "noeviction"


@dataclass
class RedisSettings:
    """What the server said; None where it would not tell."""

    eviction_policy: str | None = None
    appendonly: str | None = None
    appendfsync: str | None = None
    unreadable: list[str] = field(default_factory=list)


def read_settings(client: redis.Redis) -> RedisSettings:
    """``CONFIG GET`` the settings, falling back to ``INFO`` for servers that forbid ``CONFIG``."""
    try:
        return _settings_from_config(client)
    except redis.ResponseError:
        return _settings_from_info(client)


def _settings_from_config(client: redis.Redis) -> RedisSettings:
    config = {_text(k): _text(v) for k, v in client.config_get("maxmemory-policy").items()}
    config.update({_text(k): _text(v) for k, v in client.config_get("append*").items()})
    return _settings(config.get("maxmemory-policy"), config.get("appendonly"), config.get("appendfsync"))


def _settings_from_info(client: redis.Redis) -> RedisSettings:
    try:
        memory, persistence = client.info("memory"), client.info("persistence")
    except redis.ResponseError:
        return _settings(None, None)
    policy = memory.get("maxmemory_policy")
    appendonly = None if "aof_enabled" not in persistence else "yes" if int(persistence["aof_enabled"]) else "no"
    return _settings(_text(policy) if policy is not None else None, appendonly)


def _settings(policy: str | None, appendonly: str | None, appendfsync: str | None = None) -> RedisSettings:
    unreadable = [name for name, value in (("maxmemory-policy", policy), ("appendonly", appendonly)) if value is None]
    return RedisSettings(policy, appendonly, appendfsync, unreadable)


def problems_and_warnings(settings: RedisSettings) -> tuple[list[str], list[str]]:
    """Settings that break the guarantees (refuse to start) and settings that weaken them (warn)."""
    problems: list[str] = []
    warnings = [f"could not read Redis' {name}; make sure it is set as the README says" for name in
                settings.unreadable]
    if settings.eviction_policy is not None and settings.eviction_policy != SAFE_EVICTION_POLICY:
        problems.append(
            f"Redis maxmemory-policy is {settings.eviction_policy!r}: when memory runs short Redis would silently "
            f"evict job records, queued messages and idempotency keys. Set `maxmemory-policy noeviction` (a full "
            f"Redis then refuses writes and the API answers 503), or set {ALLOW_EVICTION_ENV}=1 to run anyway."
        )
    if settings.appendonly == "no":
        warnings.append("Redis appendonly is off: a Redis restart loses every job accepted since the last "
                        "snapshot. Set `appendonly yes` and `appendfsync everysec`.")
    elif settings.appendfsync == "no":
        warnings.append("Redis appendfsync is 'no': a host crash can lose many seconds of accepted jobs. "
                        "Set `appendfsync everysec` (or always).")
    return problems, warnings


def enforce_redis_settings(connector: RedisConnector, environ: Mapping[str, str] = os.environ) -> None:
    """Log warnings; raise SystemExit(3) with a clear message for an evicting Redis unless overridden."""
    client = connector.client(socket_connect_timeout=2, socket_timeout=5)
    try:
        settings = read_settings(client)
    except redis.RedisError as exc:
        log.warning("redis_settings_not_checked", reason="redis unreachable", error=str(exc))
        return
    finally:
        client.close()
    problems, warnings = problems_and_warnings(settings)
    for warning in warnings:
        log.warning("redis_settings_unsafe", problem=warning)
    if not problems:
        return
    if environ.get(ALLOW_EVICTION_ENV) == "1":
        for problem in problems:
            log.error("redis_settings_unsafe_overridden", problem=problem)
        return
    for problem in problems:
        print(f"difyq: refusing to start: {problem}", file=sys.stderr)
    raise SystemExit(EXIT_UNUSABLE_REDIS)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
