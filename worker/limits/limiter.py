"""KeyLimiter: requests/min, tokens/min, concurrency and the upstream cooldown of Dify API keys, shared
through Redis by every worker process on every host.

Every operation is one EVALSHA of a script in ``lua/`` that reads the time from Redis ``TIME``:

* requests: an exact sliding log (ZSET of admission times): never more than N admissions in any window;
  plus GCRA pacing beyond a burst (``limits.burst``, N/6 by default), so a saturated key runs at a steady N per
  window instead of replaying a burst of N at the start of every window (a burst of N: the log alone);
* tokens: a sliding log of reserved estimates, reconciled with Dify's real ``total_tokens`` on release;
* concurrency: slot leases (ZSET reservation -> expiry); a dead holder's lease lapses and is reclaimed; a waiter
  comes back when the slot ahead of it should free, from the mean hold seen on the key (a tenth of a hold
  later while its holder overruns; after ``poll_s`` while no hold has been seen);
* upstream: after a 429 the key cools down for everyone, 1 s doubling to 60 s, reset by a success;
* fairness: a waiting line per key, ordered by first deferral (``waiting_since``). A refused job is told the
  moment *its* turn comes (its position replayed against the logs and the pacing), not a moment shared with
  every other waiter. The oldest waiter, and every older waiter due back now, hold one unit of each limit
  that no younger job can take: the head of the line cannot starve, and capacity beyond those holds is
  still used by whoever comes. A waiter that stays away longer than ``grace_s`` after its moment loses its
  hold (not its place: it returns with ``waiting_since``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from difyq.worker.config import AppLimits, TenantLimits
from difyq.worker.limits.admission import Admission, Reservation, UpstreamCheck
from difyq.worker.limits.estimate import TokenEstimator
from difyq.worker.limits.keys import KeyNames, key_id
from difyq.worker.limits.scripts import scripts_for
from difyq.worker.lua_scripts import ScriptCall

US = 1_000_000


def _us(seconds: float) -> int:
    return round(seconds * US)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class KeyUsage:
    """One Dify key's limiter state: requests, tokens and slots in use in the window, jobs waiting in its line
    (and how long the first has waited), the upstream cooldown left."""

    requests: int
    tokens: int
    in_use: int
    waiting: int
    oldest_wait_s: float | None
    cooldown_s: float


@dataclass(frozen=True)
class FairLine:
    """A fair line's spread over tenants: how many have jobs waiting, and how many rounds the one with the most
    waiting still holds (its backlog, in jobs, as its jobs join one round apart)."""

    tenants: int
    largest_backlog: int


# The limits are per minute as Dify sees the calls, and Dify sees each call a little after its admission (the job's
# start, the request sent), by a delay that differs from call to call: counted over exactly a minute at admission,
# a full window's last call could reach Dify less than a minute after its first. Counted over a minute and
# ARRIVAL_MARGIN_S, the calls of one window reach Dify a minute apart unless the first is delayed that much more than
# the last. The cost: at most 1 - 60 / 60.25 (0.4 %) of a saturated key's limit.
ARRIVAL_MARGIN_S = 0.25
WINDOW_S = 60.0 + ARRIVAL_MARGIN_S

class KeyLimiter:
    """The limits of Dify API keys, by hashed key id, under ``{namespace}:limits:{key_id}:*``.

    ``window_s`` is ``WINDOW_S`` in production (shorter only in tests and benchmarks). ``grace_s``: how long after the
    moment it was told to come back a waiter keeps its place and hold before it counts as gone (it regains its
    place when it returns with ``waiting_since``). ``poll_s``: how often a job waiting for a slot re-checks
    while the key has no hold-time history. ``clock`` is test-only: a fake time in seconds instead of Redis ``TIME``.
    """

    def __init__(
        self,
        redis: redis.Redis,
        namespace: str,
        *,
        window_s: float = WINDOW_S,
        grace_s: float = 10.0,
        poll_s: float = 1.0,
        cooldown_base_s: float = 1.0,
        cooldown_cap_s: float = 60.0,
        clock: Callable[[], float] | None = None,
    ):
        self.redis = redis
        self.namespace = namespace
        self.window_s = window_s
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.cooldown_base_s = cooldown_base_s
        self.cooldown_cap_s = cooldown_cap_s
        self.tokens = TokenEstimator()
        self._clock = clock
        self._scripts = scripts_for(redis)

    def key_id(self, api_key: str) -> str:
        """The hashed id of ``api_key``; the raw key never reaches Redis, logs or metrics."""
        return key_id(api_key)

    def keys(self, key_id: str) -> KeyNames:
        return KeyNames.of(self.namespace, key_id)

    @property
    def clock_is_fake(self) -> bool:
        return self._clock is not None

    def _now(self) -> str:
        return "" if self._clock is None else str(_us(self._clock()))

    def acquire(
        self,
        key_id: str,
        limits: AppLimits | None,
        *,
        estimated_tokens: int,
        lease_s: float,
        ticket: str,
        waiting_since: float | None = None,
        priority_offset_s: float = 0.0,
        tenant: str = "",
        fair: bool = False,
        tenant_limits: TenantLimits | None = None,
        low_share: float = 0.0,
    ) -> Admission:
        """Admit one call on this key now (recording the request, reserving the tokens, taking a slot) or
        nothing, in one round trip. ``ticket`` identifies the job across deferrals (its message id);
        ``waiting_since`` is when it was first deferred (seconds since the epoch), passed while it waits so a
        job whose place was dropped gets it back; ``priority_offset_s`` moves that place ahead (a higher priority)
        or back (a lower one). ``fair``: the key's line is round-robin across tenants; ``tenant_limits``: the
        ``tenant``'s own limits within the key's, in the same admission (the admission then holds the tenant's
        slot too: release it with ``tenant``). ``low_share``: the share of the key's admissions that jobs below
        normal priority (a negative offset) get while they wait, however many higher ones wait with them.
        Without ``limits`` (nor ``tenant_limits``) only the upstream cooldown applies, and no round trip is made: the
        admission carries the check for the job's start to make (``upstream_check``)."""
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        if not ticket:
            raise ValueError("ticket must not be empty")
        rpm = tpm = conc = burst = 0
        if limits is not None:
            rpm = limits.requests_per_minute or 0
            burst = limits.request_burst
            tpm = limits.tokens_per_minute or 0
            conc = limits.max_concurrency or 0
        trpm = ttpm = tconc = 0
        if tenant_limits is not None:
            trpm = tenant_limits.requests_per_minute or 0
            ttpm = tenant_limits.tokens_per_minute or 0
            tconc = tenant_limits.max_concurrency or 0
        names = self.keys(key_id)
        if limits is None and not (trpm or ttpm or tconc):
            return Admission(admitted=True, wait_s=0.0, limit=None, reservation=None,
                             upstream_check=UpstreamCheck(names.cool, self._now()))
        answer = self._scripts.acquire(
            keys=names.acquire(tenant),
            args=[
                ticket,
                secrets.token_hex(8),
                rpm,
                tpm,
                conc,
                max(0, int(estimated_tokens)),
                _us(lease_s),
                _us(self.window_s),
                -1 if waiting_since is None else _us(waiting_since),
                _us(self.grace_s),
                _us(self.poll_s),
                burst,
                self._now(),
                _us(priority_offset_s),
                1 if fair else 0,
                tenant,
                trpm,
                ttpm,
                tconc,
                repr(low_share),
            ],
        )
        return self._admission(answer, tenant, bool(trpm or ttpm or tconc))

    @staticmethod
    def _admission(answer: list[Any], tenant: str, tenant_limited: bool) -> Admission:
        """An ``acquire.lua`` answer as an Admission (``tenant_limited``: the reservation also
        holds the tenant's slot)."""
        admitted, wait_us, limit, reservation, *streak = answer
        return Admission(
            admitted=bool(admitted),
            wait_s=int(wait_us) / US,
            limit=_text(limit) or None,
            reservation=_text(reservation) or None,
            upstream_streak=bool(streak and int(streak[0])),
            tenant=tenant if reservation and tenant_limited else None,
        )

    def renew(self, key_id: str, reservation: str | None, lease_s: float, tenant: str | None = None) -> bool:
        """Extend the slot lease of a call still running (and of its tenant's slot, when it holds one); False when
        it was released or had lapsed."""
        if reservation is None:
            return True
        names = self.keys(key_id)
        leases = [names.lease] + ([names.tenant(tenant).lease] if tenant is not None else [])
        return bool(self._scripts.renew(keys=leases, args=[reservation, _us(lease_s), self._now()]))

    def release(self, key_id: str, reservation: str | None, actual_tokens: int | None,
                tenant: str | None = None) -> bool:
        """Free the slot (and the ``tenant``'s, for an admission under tenant limits) and, when Dify reported
        usage, make the reserved tokens the real ``actual_tokens`` (down or up) in the window, in one round trip.
        Call it on success, failure, time limit and cancellation; calling it twice is harmless. Returns whether
        the slot was still held."""
        call = self.release_call(key_id, reservation, actual_tokens, tenant)
        return call is not None and bool(call.run())

    def release_call(self, key_id: str, reservation: str | None, actual_tokens: int | None,
                     tenant: str | None = None, *, called: bool = True) -> ScriptCall | None:
        """``release`` as a call not sent yet, to go in the same round trip as another write (``run_together``);
        None without a reservation. The token estimate learns ``actual_tokens`` now. ``called`` False: the call
        was never made, so the admission is withdrawn whole (its request and reserved tokens leave the window) and
        the estimate learns nothing."""
        if reservation is None:
            return None
        names = self.keys(key_id)
        actual = -1 if actual_tokens is None or not called else max(0, int(actual_tokens))
        keys = [names.tok, names.amt, names.state, names.lease, names.req]
        if tenant is not None:
            own = names.tenant(tenant)
            keys += [own.tok, own.amt, own.state, own.lease, own.req]
        if actual >= 0:
            self.tokens.observe(key_id, actual)
        return ScriptCall(self._scripts.release, keys,
                          [reservation, actual, _us(self.window_s), self._now(), "" if called else "1"])

    def abandon(self, key_id: str, ticket: str, tenant: str | None = None) -> None:
        """Take a waiting job out of the line (and its tenant's) at once (canceled, or failed for waiting too
        long)."""
        names = self.keys(key_id)
        with self.redis.pipeline(transaction=True) as pipe:
            for line in [names] + ([names.tenant(tenant)] if tenant is not None else []):
                pipe.zrem(line.line, ticket).zrem(line.due, ticket).hdel(line.need, ticket)
            pipe.zrem(names.low, ticket).execute()

    def report_upstream_limited(self, key_id: str) -> float:
        """Dify said 429 / ``too_many_requests``: cool the key down for every worker. The cooldown is 1 s,
        doubling with each further 429 after a cooldown ends, up to 60 s. Returns the seconds left."""
        names = self.keys(key_id)
        left = self._scripts.upstream(
            keys=[names.cool],
            args=[_us(self.cooldown_base_s), _us(self.cooldown_cap_s), _us(300.0), self._now()],
        )
        return int(left) / US

    def report_success(self, key_id: str) -> None:
        """A call went through: the next 429 starts from the base cooldown again. Writes only if needed."""
        self._scripts.success(keys=[self.keys(key_id).cool], args=[])

    def remaining(self, key_id: str, limits: AppLimits | None) -> dict[str, float]:
        """What is left of each configured limit right now (requests, tokens, concurrency), for the gauge."""
        if limits is None:
            return {}
        names = self.keys(key_id)
        requests, tokens, in_use, _cooldown_us = self._scripts.remaining(
            keys=[names.req, names.tok, names.amt, names.state, names.lease, names.cool],
            args=[_us(self.window_s), self._now()],
        )
        left: dict[str, float] = {}
        if limits.requests_per_minute is not None:
            left["requests"] = float(max(0, limits.requests_per_minute - int(requests)))
        if limits.tokens_per_minute is not None:
            left["tokens"] = float(max(0, limits.tokens_per_minute - int(tokens)))
        if limits.max_concurrency is not None:
            left["concurrency"] = float(max(0, limits.max_concurrency - int(in_use)))
        return left

    def usage(self, key_id: str) -> KeyUsage:
        """The key's use of its window right now, its waiting line and its upstream cooldown (for the console)."""
        names = self.keys(key_id)
        requests, tokens, in_use, cooldown_us = self._scripts.remaining(
            keys=[names.req, names.tok, names.amt, names.state, names.lease, names.cool],
            args=[_us(self.window_s), self._now()],
        )
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(names.line)
        pipe.zrange(names.line, 0, 0, withscores=True)
        pipe.time()
        waiting, oldest, (seconds, micros) = pipe.execute()
        now_us = _us(self._clock()) if self._clock is not None else int(seconds) * US + int(micros)
        return KeyUsage(requests=int(requests), tokens=int(tokens), in_use=int(in_use), waiting=int(waiting),
                        oldest_wait_s=max(0.0, (now_us - oldest[0][1]) / US) if oldest else None,
                        cooldown_s=int(cooldown_us) / US)

    def fair_line(self, key_id: str) -> FairLine:
        """The tenants waiting in the key's fair line (``fairness: tenant``) and the largest tenant backlog, from
        the round each tenant's last job joined at and the round being served (three reads, no Lua)."""
        names = self.keys(key_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(names.state, "vt")
        pipe.zrange(names.rounds, 0, 0, withscores=True)
        pipe.zrevrange(names.rounds, 0, 0, withscores=True)
        served, first, last = pipe.execute()
        if not last:
            return FairLine(tenants=0, largest_backlog=0)
        current = float(served) if served is not None else first[0][1]
        waiting = self.redis.zcount(names.rounds, current, "+inf")
        return FairLine(tenants=int(waiting), largest_backlog=max(0, round((last[0][1] - current) / US) + 1))

    def cooldown_left(self, key_id: str) -> float:
        """Seconds of upstream cooldown left on this key (0 when none)."""
        names = self.keys(key_id)
        *_, cooldown_us = self._scripts.remaining(
            keys=[names.req, names.tok, names.amt, names.state, names.lease, names.cool],
            args=[_us(self.window_s), self._now()],
        )
        return int(cooldown_us) / US

    @staticmethod
    def parse(reservation: str) -> Reservation:
        """What a reservation string holds (id, admission time, tokens reserved)."""
        return Reservation.parse(reservation)
