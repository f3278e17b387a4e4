"""The scheduler across daylight-saving transitions, with an injected clock, in Europe/Berlin and America/New_York.

Rules under test (producers.schedules.timetable): a fixed-hour schedule (daily 02:30) fires exactly once on a
spring-forward day, at the instant of the jump (03:00 new time), and exactly once on a fall-back day, the first
time the clock shows it; an every-hour schedule follows real time (23 fires on a spring-forward day, 25 on a
fall-back day, one hour apart, never two at one instant).
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from redis import Redis

from difyq.producers.scheduler import Scheduler
from difyq.producers.schedules.timetable import Timetable
from difyq.worker.config import ScheduleConfig

BERLIN, NEW_YORK, LORD_HOWE = "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"
DAYS = {
    (BERLIN, "spring"): date(2024, 3, 31),  # 02:00 CET -> 03:00 CEST
    (BERLIN, "fall"): date(2024, 10, 27),  # 03:00 CEST -> 02:00 CET: 02:xx twice
    (NEW_YORK, "spring"): date(2024, 3, 10),  # 02:00 EST -> 03:00 EDT
    (NEW_YORK, "fall"): date(2024, 11, 3),  # 02:00 EDT -> 01:00 EST: 01:xx twice
}


class SteppedClock:
    """An injected clock the test moves by hand."""

    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def run_through(redis_client: Redis, namespace: str, zone: str, cron: str, day: date) -> list[tuple[datetime, dict]]:
    """Tick one scheduler every 7 minutes from 21:00 the evening before ``day`` to 03:00 the morning after (local
    time); return what it submitted."""
    name = f"dst-{uuid.uuid4().hex[:8]}"
    query = "run {{ fire_time.isoformat() }} {{ schedule }}"
    config = ScheduleConfig(app="demo", cron=cron, timezone=zone, query=query)
    tz = ZoneInfo(zone)
    # Step in UTC: adding a timedelta to a zoned datetime is wall-clock arithmetic and would skip a repeated hour.
    clock = SteppedClock(datetime.combine(day - timedelta(days=1), time(21, 0), tz).astimezone(UTC))
    end = datetime.combine(day + timedelta(days=1), time(3, 0), tz).astimezone(UTC)
    submitted: list[tuple[datetime, dict]] = []
    scheduler = Scheduler(
        {name: config},
        redis_client,
        namespace,
        lambda _name, _schedule, fire_time, rendered: submitted.append((fire_time, rendered)),
        clock=clock,
        misfire_grace_s=3600,
    )
    while clock.now <= end:
        scheduler.tick()
        clock.now += timedelta(minutes=7)
    clock.now = end
    scheduler.tick()
    for fire_time, rendered in submitted:
        assert fire_time.tzinfo == tz
        assert rendered["query"] == f"run {fire_time.isoformat()} {name}"
    keys = [rendered["idempotency_key"] for _, rendered in submitted]
    assert len(keys) == len(set(keys))
    return submitted


def local_iso(submitted: list[tuple[datetime, dict]]) -> list[str]:
    return [fire_time.isoformat() for fire_time, _ in submitted]


@pytest.mark.parametrize(
    ("zone", "cron", "season", "expected"),
    [
        (BERLIN, "30 2 * * *", "spring", ["2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"]),
        (BERLIN, "30 2 * * *", "fall", ["2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"]),
        (NEW_YORK, "30 2 * * *", "spring", ["2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"]),
        (NEW_YORK, "30 2 * * *", "fall", ["2024-11-03T02:30:00-05:00", "2024-11-04T02:30:00-05:00"]),
        (NEW_YORK, "30 1 * * *", "fall", ["2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00"]),
        (BERLIN, "@daily", "fall", ["2024-10-27T00:00:00+02:00", "2024-10-28T00:00:00+01:00"]),
    ],
)
def test_daily_schedule_fires_once_on_transition_days(redis_client, namespace, zone, cron, season, expected):
    assert local_iso(run_through(redis_client, namespace, zone, cron, DAYS[(zone, season)])) == expected


@pytest.mark.parametrize("cron", ["0 * * * *", "@hourly"])
@pytest.mark.parametrize(
    ("zone", "season", "hours"),
    [
        (BERLIN, "spring", [0, 1, *range(3, 24)]),
        (BERLIN, "fall", [0, 1, 2, 2, *range(3, 24)]),
        (NEW_YORK, "spring", [0, 1, *range(3, 24)]),
        (NEW_YORK, "fall", [0, 1, 1, *range(2, 24)]),
    ],
)
def test_hourly_schedule_follows_real_time(redis_client, namespace, cron, zone, season, hours):
    day = DAYS[(zone, season)]
    submitted = run_through(redis_client, namespace, zone, cron, day)
    on_day = [fire_time for fire_time, _ in submitted if fire_time.date() == day]
    assert [fire_time.hour for fire_time in on_day] == hours
    assert len(on_day) == (23 if season == "spring" else 25)
    instants = [fire_time.astimezone(UTC) for fire_time, _ in submitted]
    assert all(later - earlier == timedelta(hours=1) for earlier, later in pairwise(instants))
    assert instants[0] == datetime.combine(day - timedelta(days=1), time(22, 0), ZoneInfo(zone))
    assert instants[-1] == datetime.combine(day + timedelta(days=1), time(3, 0), ZoneInfo(zone))


def test_fall_back_hour_fires_have_distinct_idempotency_keys(redis_client, namespace):
    submitted = run_through(redis_client, namespace, BERLIN, "@hourly", DAYS[(BERLIN, "fall")])
    twice = [
        rendered["idempotency_key"].split(":", 2)[2]
        for fire_time, rendered in submitted
        if fire_time.date() == DAYS[(BERLIN, "fall")] and fire_time.hour == 2
    ]
    assert twice == ["2024-10-27T00:00:00Z", "2024-10-27T01:00:00Z"]


def fires_on(cron: str, zone: str, start: datetime, count: int) -> list[str]:
    fires = Timetable(cron, zone).fires_after(start)
    return [next(fires).astimezone(ZoneInfo(zone)).isoformat() for _ in range(count)]


def test_fixed_hour_schedule_collapses_a_skipped_hour_into_one_fire_at_the_jump():
    start = datetime(2024, 3, 31, 0, 0, tzinfo=ZoneInfo(BERLIN))
    assert fires_on("*/15 2 * * *", BERLIN, start, 2) == ["2024-03-31T03:00:00+02:00", "2024-04-01T02:00:00+02:00"]


def test_every_hour_schedule_skips_wall_times_the_clock_jumps_over():
    start = datetime(2024, 3, 10, 1, 0, tzinfo=ZoneInfo(NEW_YORK))
    assert fires_on("30 * * * *", NEW_YORK, start, 3) == [
        "2024-03-10T01:30:00-05:00",
        "2024-03-10T03:30:00-04:00",
        "2024-03-10T04:30:00-04:00",
    ]


@pytest.mark.parametrize(
    ("fold", "expected"),
    [
        (0, ["2024-10-27T02:30:00+02:00", "2024-10-27T02:00:00+01:00", "2024-10-27T02:30:00+01:00"]),
        (1, ["2024-10-27T02:30:00+01:00", "2024-10-27T03:00:00+01:00", "2024-10-27T03:30:00+01:00"]),
    ],
)
def test_every_hour_schedule_resumes_inside_a_repeated_hour(fold, expected):
    start = datetime(2024, 10, 27, 2, 10, tzinfo=ZoneInfo(BERLIN), fold=fold)
    assert fires_on("*/30 * * * *", BERLIN, start, 3) == expected


def test_half_hour_transition_fires_at_the_jump():
    start = datetime(2024, 10, 6, 0, 0, tzinfo=ZoneInfo(LORD_HOWE))  # 02:00 +10:30 -> 02:30 +11:00
    assert fires_on("15 2 * * *", LORD_HOWE, start, 2) == ["2024-10-06T02:30:00+11:00", "2024-10-07T02:15:00+11:00"]
