"""The cron producer (``difyq scheduler``): fires each configured schedule as a job, once per fire, from any number
of replicas.

One replica at a time holds the leader lease (``{ns}:scheduler:leader``) and does the work; the others tick as
standbys and take over within the lease TTL (``DIFYQ_SCHEDULER_LEASE``, 15 s by default) when the leader dies, or
at once when it shuts down and releases the lease. Each fire is guarded twice: by its own Redis claim
(``{ns}:schedule:fired:{name}:{fire iso}``, which tells the metrics ``fired`` from ``duplicate``) and by the job
store's idempotency key ``schedule:{name}:{fire iso}``.

Per schedule a cursor records how far its fires are handled, so a restart or a handover neither repeats nor drops
a fire. A fire more than the misfire grace late (``2 * lease TTL + 2 * tick`` unless set: a handover is not a
misfire) was missed, e.g. while no replica ran; then the schedule's ``catch_up`` decides: ``none`` skips every
missed fire and logs how many, ``latest`` runs the most recent missed fire once (unless a fire is due on time in
the same pass, which then stands for it). A schedule seen for the first time, or whose cron or zone changed,
starts from now without catching up. Schedules are read from the config at start; one that was removed simply
stops, and its state expires in Redis.

DST behaviour is the timetable's (``difyq.producers.schedules.timetable``): a fixed-hour schedule fires once on either
transition day (a skipped 02:30 at the instant of the jump, a repeated 02:30 the first time); an every-hour
schedule follows real time.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import takewhile
from typing import Any, Literal

import structlog
from redis import Redis, RedisError

from difyq.producers.schedules.fires import fire_idempotency_key, render_fire
from difyq.producers.schedules.lease import LeaderLease
from difyq.producers.schedules.pauses import SchedulePauses
from difyq.producers.schedules.store import Claim, ScheduleState, ScheduleStore
from difyq.producers.schedules.timetable import Timetable
from difyq.worker import metrics
from difyq.worker.config import Config, ScheduleConfig
from difyq.worker.durations import duration_from_env
from difyq.worker.redis_connect import RedisConnector
from difyq.worker.redis_keys import RedisKeys

SubmitFire = Callable[[str, ScheduleConfig, datetime, dict[str, Any]], object]
Outcome = Literal["fired", "duplicate", "skipped_missed", "error"]

LEASE_ENV = "DIFYQ_SCHEDULER_LEASE"
DEFAULT_LEASE_S = 15.0
DEFAULT_TICK_S = 1.0
MISSED_COUNT_LIMIT = 10_000  # missed fires counted one by one after downtime; beyond this the count is a floor
FIRED_TTL_MIN_S = 86_400.0  # a fire's guard outlives the job store's default idempotency window
STATE_TTL_MIN_S = 30 * 86_400.0  # a removed (or long stopped) schedule's state expires after this
_WAKE_MARGIN_S = 0.005
_MS = timedelta(milliseconds=1)

logger = structlog.get_logger()


def utcnow() -> datetime:
    """The real clock, aware and in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class FireRecord:
    """What one pass did with a fire; a ``skipped_missed`` record stands for ``count`` fires, the latest named."""

    schedule: str
    fire_time: datetime  # aware, in the schedule's zone
    outcome: Outcome
    idempotency_key: str
    count: int = 1


@dataclass(frozen=True)
class _Schedule:
    """A configured schedule with its timetable and the TTLs its period asks for."""

    name: str
    config: ScheduleConfig
    timetable: Timetable
    interval_s: float | None

    @property
    def spec(self) -> str:
        return f"{self.timetable.expression}|{self.config.timezone}"

    @property
    def fired_ttl_s(self) -> float:
        return max(FIRED_TTL_MIN_S, 2 * (self.interval_s or 0.0))

    @property
    def state_ttl_s(self) -> float:
        return max(STATE_TTL_MIN_S, 3 * (self.interval_s or 0.0))


@dataclass(frozen=True)
class _Missed:
    """Fires a pass skips: how many (a floor when ``capped``), the first and the last."""

    count: int
    capped: bool
    first: datetime
    last: datetime


@dataclass(frozen=True)
class _Plan:
    """One pass over a schedule: missed fires to skip (all up to ``skipped_until``), then fires to submit."""

    missed: _Missed | None
    skipped_until: datetime
    fires: list[datetime]


class Scheduler:
    """Fires ``schedules`` through ``submit_fire(name, schedule, fire_time, rendered)``; see the module docstring.

    ``tick()`` is one pass, ``run()`` loops it until a stop event, ``release()`` gives the lease up.
    """

    def __init__(
        self,
        schedules: Mapping[str, ScheduleConfig],
        redis: Redis,
        namespace: str,
        submit_fire: SubmitFire,
        *,
        clock: Callable[[], datetime] = utcnow,
        lease_ttl_s: float = DEFAULT_LEASE_S,
        tick_s: float = DEFAULT_TICK_S,
        instance_id: str | None = None,
        misfire_grace_s: float | None = None,
    ):
        if tick_s <= 0 or lease_ttl_s < 2 * tick_s:
            raise ValueError("tick_s must be positive and lease_ttl_s at least twice tick_s (each tick renews it)")
        self.submit_fire = submit_fire
        self.tick_s = tick_s
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = LeaderLease(redis, RedisKeys(namespace).scheduler_leader, self.instance_id, lease_ttl_s)
        self.store = ScheduleStore(redis, namespace, self.lease)
        self.pauses = SchedulePauses(redis, namespace)
        self._paused: set[str] = set()
        grace_s = 2 * lease_ttl_s + 2 * tick_s if misfire_grace_s is None else misfire_grace_s
        self.misfire_grace = timedelta(seconds=grace_s)
        self.is_leader = False
        self._clock = clock
        self._pending_ttl_s = lease_ttl_s
        self._next_fire: datetime | None = None
        self._failing_since: dict[tuple[str, datetime], datetime] = {}
        now = self._now()
        self._schedules = [self._prepare(name, config, now) for name, config in schedules.items()]

    def tick(self) -> list[FireRecord]:
        """One pass: hold (renew or take) the lease; when leader, handle every schedule's due fires."""
        if not self._hold_lease():
            return []
        now = self._now()
        states = self.store.load([schedule.name for schedule in self._schedules])
        paused = set(self.pauses.paused())
        records: list[FireRecord] = []
        for schedule in self._schedules:
            if self._note_pause(schedule.name, schedule.name in paused):
                self._advance(schedule, now, None)
            else:
                records += self._tick_schedule(schedule, states[schedule.name], now)
            if not self.is_leader:
                break
        upcoming = (next(schedule.timetable.fires_after(now), None) for schedule in self._schedules)
        self._next_fire = min((fire for fire in upcoming if fire is not None), default=None)
        return records

    def run(self, stop_event: threading.Event) -> None:
        """Tick until ``stop_event`` is set (waking early for an imminent fire), then release the lease."""
        logger.info(
            "scheduler.running", instance=self.instance_id, schedules=[schedule.name for schedule in self._schedules]
        )
        try:
            while not stop_event.is_set():
                try:
                    self.tick()
                except RedisError as exc:
                    logger.warning("scheduler.redis_error", instance=self.instance_id, error=str(exc))
                stop_event.wait(self._pause())
        finally:
            self.release()

    def release(self) -> None:
        """Give the lease up (when held) so a standby takes over at once; the lease expires anyway if this fails."""
        was_leader, self.is_leader = self.is_leader, False
        try:
            released = self.lease.release()
        except RedisError as exc:
            logger.warning("scheduler.release_failed", instance=self.instance_id, error=str(exc))
            return
        if released or was_leader:
            logger.info("scheduler.lease_released", instance=self.instance_id)

    def _prepare(self, name: str, config: ScheduleConfig, now: datetime) -> _Schedule:
        try:
            timetable = Timetable(config.cron, config.timezone)
        except ValueError as exc:
            raise ValueError(f"schedules.{name}.cron: {exc}") from None
        schedule = _Schedule(name, config, timetable, timetable.interval_s(now))
        if schedule.interval_s is None:
            logger.warning("schedule.fires_at_most_once", schedule=name, cron=config.cron)
        else:
            metrics.schedule_interval.labels(schedule=name).set(schedule.interval_s)
        return schedule

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the scheduler's clock must return aware datetimes")
        return now.astimezone(UTC)

    def _pause(self) -> float:
        if not self.is_leader or self._next_fire is None:
            return self.tick_s
        until_next = (self._next_fire - self._now()).total_seconds()
        return min(self.tick_s, max(until_next, 0.0) + _WAKE_MARGIN_S)

    def _hold_lease(self) -> bool:
        held = self.lease.hold()
        if held and not self.is_leader:
            logger.info("scheduler.lease_acquired", instance=self.instance_id)
            self.is_leader = True
            self._failing_since.clear()
            self._restore_last_fire_gauges()
        elif self.is_leader and not held:
            logger.warning("scheduler.lease_lost", instance=self.instance_id)
            self.is_leader = False
        return held

    def _note_pause(self, name: str, paused: bool) -> bool:
        """Report a schedule's pause in the metrics and the log (once per change); returns ``paused``. A paused
        schedule's cursor follows the clock, so resuming it neither runs nor counts the fires it skipped."""
        metrics.schedule_paused.labels(schedule=name).set(1 if paused else 0)
        if paused != (name in self._paused):
            logger.info("schedule.paused" if paused else "schedule.resumed", schedule=name)
            (self._paused.add if paused else self._paused.discard)(name)
        return paused

    def _restore_last_fire_gauges(self) -> None:
        """A new leader reports the schedules' last fires at once, not only after its own next fire."""
        states = self.store.load([schedule.name for schedule in self._schedules])
        for name, state in states.items():
            if state.last_fire is not None:
                metrics.schedule_last_fire.labels(schedule=name).set(state.last_fire.timestamp())

    def _tick_schedule(self, schedule: _Schedule, state: ScheduleState, now: datetime) -> list[FireRecord]:
        if state.cursor is None or state.spec != schedule.spec:
            logger.info(
                "schedule.started",
                schedule=schedule.name,
                cron=schedule.config.cron,
                timezone=schedule.config.timezone,
                replaces=state.spec,
            )
            self._advance(schedule, now, None)
            return []
        plan = self._plan(schedule, state.cursor, now)
        records: list[FireRecord] = []
        handled: datetime | None = None
        last_fired: datetime | None = None
        if plan.missed is not None:
            records.append(self._skip(schedule, plan.missed))
            handled = plan.skipped_until
        for fire in plan.fires:
            record, done = self._fire(schedule, fire, now)
            if record is not None:
                records.append(record)
            if not done:
                break
            handled = fire
            if record is not None and record.outcome == "fired":
                last_fired = fire
        else:
            if handled is not None:
                handled = now
        if handled is not None and self.is_leader:
            self._advance(schedule, handled, last_fired)
        return records

    def _plan(self, schedule: _Schedule, cursor: datetime, now: datetime) -> _Plan:
        """Split the fires in ``(cursor, now]`` into missed ones to skip and ones to submit, by ``catch_up``."""
        late_until = now - self.misfire_grace
        on_time = list(takewhile(lambda fire: fire <= now, schedule.timetable.fires_after(max(cursor, late_until))))
        missed = _missed_fires(schedule.timetable, cursor, late_until) if cursor < late_until else None
        if missed is None:
            return _Plan(None, cursor, on_time)
        if schedule.config.catch_up == "latest" and not on_time:
            latest = missed.last
            before = schedule.timetable.latest_between(cursor, latest - _MS)
            skipped = _Missed(missed.count - 1, missed.capped, missed.first, before) if before else None
            return _Plan(skipped, latest - _MS, [latest])
        return _Plan(missed, late_until, on_time)

    def _skip(self, schedule: _Schedule, missed: _Missed) -> FireRecord:
        zone = schedule.timetable.zone
        logger.warning(
            "schedule.missed_fires",
            schedule=schedule.name,
            catch_up=schedule.config.catch_up,
            count=missed.count,
            count_is_lower_bound=missed.capped,
            first_missed=missed.first.astimezone(zone).isoformat(),
            last_missed=missed.last.astimezone(zone).isoformat(),
        )
        return self._record(schedule, missed.last, "skipped_missed", missed.count)

    def _fire(self, schedule: _Schedule, fire: datetime, now: datetime) -> tuple[FireRecord | None, bool]:
        """Submit one fire unless another replica did; returns its record and whether the fire is handled (False
        stops this schedule's pass: the fire is retried next tick).

        A failed submit is retried on every tick for up to the misfire grace, then given up: a job store hiccup
        costs nothing, a submission that can never succeed does not fail every tick for ever."""
        name = schedule.name
        local = fire.astimezone(schedule.timetable.zone)
        log = logger.bind(schedule=name, fire_time=local.isoformat(), idempotency_key=fire_idempotency_key(name, fire))
        try:
            rendered = render_fire(name, schedule.config, local)
        except Exception as exc:  # templates are user code: whatever they raise fails this fire, for good
            log.error("schedule.render_failed", error=f"{type(exc).__name__}: {exc}")
            return self._record(schedule, fire, "error"), True
        claim = self.store.claim(name, fire, self._pending_ttl_s)
        if claim is Claim.NOT_LEADER:
            log.warning("scheduler.lease_lost", instance=self.instance_id)
            self.is_leader = False
            return None, False
        if claim is Claim.PENDING:
            log.info("schedule.fire_pending")
            return None, False
        if claim is Claim.FIRED:
            log.info("schedule.duplicate")
            return self._record(schedule, fire, "duplicate"), True
        try:
            self.submit_fire(name, schedule.config, local, rendered)
        except Exception:  # the injected submit (job store, broker) failed: count it, retry or give up
            self.store.abandon(name, fire)
            failing_since = self._failing_since.setdefault((name, fire), now)
            give_up = now - failing_since >= self.misfire_grace
            if give_up:
                del self._failing_since[(name, fire)]
            log.exception("schedule.submit_failed", retry=not give_up)
            return self._record(schedule, fire, "error"), give_up
        self._failing_since.pop((name, fire), None)
        self.store.confirm(name, fire, schedule.fired_ttl_s)
        metrics.schedule_last_fire.labels(schedule=name).set(fire.timestamp())
        log.info("schedule.fired")
        return self._record(schedule, fire, "fired"), True

    def _record(self, schedule: _Schedule, fire: datetime, outcome: Outcome, count: int = 1) -> FireRecord:
        metrics.schedule_fires.labels(schedule=schedule.name, outcome=outcome).inc(count)
        local = fire.astimezone(schedule.timetable.zone)
        return FireRecord(schedule.name, local, outcome, fire_idempotency_key(schedule.name, fire), count)

    def _advance(self, schedule: _Schedule, cursor: datetime, last_fire: datetime | None) -> None:
        if not self.store.advance(schedule.name, schedule.spec, cursor, last_fire, schedule.state_ttl_s):
            logger.warning("scheduler.lease_lost", instance=self.instance_id)
            self.is_leader = False


def _missed_fires(timetable: Timetable, after: datetime, until: datetime) -> _Missed | None:
    """The fires in ``(after, until]``, counted up to MISSED_COUNT_LIMIT."""
    fires: Iterator[datetime] = takewhile(lambda fire: fire <= until, timetable.fires_after(after))
    first = next(fires, None)
    if first is None:
        return None
    count, last = 1, first
    for fire in fires:
        count, last = count + 1, fire
        if count >= MISSED_COUNT_LIMIT:
            return _Missed(count, True, first, timetable.latest_between(after, until) or last)
    return _Missed(count, False, first, last)


def lease_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """The leader lease in seconds: ``DIFYQ_SCHEDULER_LEASE`` (a duration of at least two ticks), else 15 s."""
    lease_s = duration_from_env(LEASE_ENV, DEFAULT_LEASE_S, environ)
    if lease_s < 2 * DEFAULT_TICK_S:
        raise ValueError(f"{LEASE_ENV} must be at least {2 * DEFAULT_TICK_S:g}s, twice the scheduler's tick "
                         f"(got {environ[LEASE_ENV]!r})")
    return lease_s


def run_scheduler(config: Config, connector: RedisConnector, stop_event: threading.Event,
                  submit_fire: SubmitFire, lease_s: float = DEFAULT_LEASE_S) -> None:
    """The ``difyq scheduler`` process body: schedule ``config.schedules`` against Redis until ``stop_event``."""
    client = connector.client(socket_connect_timeout=2, socket_timeout=5, health_check_interval=30)
    try:
        Scheduler(config.schedules, client, config.redis.namespace, submit_fire, lease_ttl_s=lease_s).run(stop_event)
    finally:
        client.close()
