"""What the scheduler keeps in Redis per schedule: how far its fires are handled, and a guard per fire.

``{ns}:schedule:state:{name}`` is a hash: ``cursor`` (every fire up to this instant, in epoch ms, is handled),
``spec`` (the cron and zone the cursor belongs to), ``last_fire`` (epoch ms of the last fire enqueued). It expires
a while after the schedule stops firing, so a removed schedule's state goes away by itself.

``{ns}:schedule:fired:{name}:{fire iso}`` guards one fire: ``pending:{holder}`` while a replica submits it (a
short TTL, so a replica killed mid-submit does not block the fire for long), then ``fired:{holder}`` for as long
as the job store remembers idempotency keys. Every write checks the leader lease in the same script, so a replica
whose lease ran out cannot claim fires or move the cursor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis import Redis

from difyq.producers.schedules.fires import fire_iso
from difyq.producers.schedules.lease import LeaderLease
from difyq.worker.lua_scripts import script_source
from difyq.worker.redis_keys import RedisKeys

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


class Claim(enum.Enum):
    """What claiming a fire found."""

    CLAIMED = 1  # this replica submits it now
    FIRED = 0  # already enqueued (another replica, or this one before a crash): a duplicate
    PENDING = 2  # another replica is submitting it, or died doing so: wait until it confirms or its claim expires
    NOT_LEADER = -1  # the lease is gone: fire nothing


@dataclass(frozen=True)
class ScheduleState:
    """One schedule's stored progress; all None for a schedule never seen (or whose state expired)."""

    cursor: datetime | None
    spec: str | None
    last_fire: datetime | None


class ScheduleStore:
    """Schedule state and fire guards under ``namespace``, fenced by ``lease``."""

    def __init__(self, redis: Redis, namespace: str, lease: LeaderLease):
        self.redis = redis
        self.namespace = namespace
        self.lease = lease
        self._claim = redis.register_script(script_source("difyq.producers.schedules", None, "claim"))
        self._confirm = redis.register_script(script_source("difyq.producers.schedules", None, "confirm"))
        self._abandon = redis.register_script(script_source("difyq.producers.schedules", None, "abandon"))
        self._advance = redis.register_script(script_source("difyq.producers.schedules", None, "advance"))

    def state_key(self, name: str) -> str:
        return RedisKeys(self.namespace).schedule_state(name)

    def fired_key(self, name: str, fire_time: datetime) -> str:
        return RedisKeys(self.namespace).schedule_fire(name, fire_iso(fire_time))

    def load(self, names: list[str]) -> dict[str, ScheduleState]:
        """The state of each schedule in ``names``, in one round trip."""
        pipeline = self.redis.pipeline(transaction=False)
        for name in names:
            pipeline.hmget(self.state_key(name), "cursor", "spec", "last_fire")
        states = {}
        for name, (cursor, spec, last_fire) in zip(names, pipeline.execute(), strict=True):
            states[name] = ScheduleState(
                cursor=_from_ms(cursor),
                spec=spec.decode() if isinstance(spec, bytes) else spec,
                last_fire=_from_ms(last_fire),
            )
        return states

    def advance(
        self, name: str, spec: str, cursor: datetime, last_fire: datetime | None, ttl_s: float
    ) -> bool:
        """Move the cursor forward (never back, unless ``spec`` changed) and record ``last_fire``; False when this
        replica no longer holds the lease."""
        args = [self.lease.holder, _to_ms(cursor), spec, _ttl_ms(ttl_s), "" if last_fire is None else _to_ms(last_fire)]
        return self._advance(keys=[self.lease.key, self.state_key(name)], args=args) == 1

    def claim(self, name: str, fire_time: datetime, pending_ttl_s: float) -> Claim:
        """Claim a fire for submitting, if this replica leads and nobody fired or is firing it."""
        keys = [self.lease.key, self.fired_key(name, fire_time)]
        return Claim(int(self._claim(keys=keys, args=[self.lease.holder, _ttl_ms(pending_ttl_s)])))

    def confirm(self, name: str, fire_time: datetime, ttl_s: float) -> None:
        """Mark a claimed fire as enqueued, for ``ttl_s``."""
        self._confirm(keys=[self.fired_key(name, fire_time)], args=[self.lease.holder, _ttl_ms(ttl_s)])

    def abandon(self, name: str, fire_time: datetime) -> None:
        """Drop this replica's claim on a fire whose submit failed, so the next pass tries it again."""
        self._abandon(keys=[self.fired_key(name, fire_time)], args=[self.lease.holder])


def _to_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // _MS


def _from_ms(value: bytes | str | None) -> datetime | None:
    return None if value is None else _EPOCH + int(value) * _MS


def _ttl_ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))
