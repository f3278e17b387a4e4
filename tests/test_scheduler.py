"""The cron scheduler against a real Redis: one job per fire across replicas (threads and processes), leader
handover, misfire policies after downtime, config changes, rendering, fire guards and metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import REGISTRY
from redis import Redis

from difyq.producers.scheduler import FireRecord, Scheduler, run_scheduler
from difyq.producers.schedules.pauses import SchedulePauses
from difyq.producers.schedules.timetable import Timetable
from difyq.worker.config import ConfigError, ScheduleConfig, parse_config
from difyq.worker.redis_connect import RedisConnector
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)


class SteppedClock:
    """An injected clock the test moves by hand."""

    def __init__(self, start: datetime = T0):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Recorder:
    """A submit_fire that remembers every call (thread-safe), optionally failing the first ``failures`` calls."""

    def __init__(self, failures: int = 0):
        self.calls: list[tuple[str, datetime, dict[str, Any]]] = []
        self.failures = failures
        self.lock = threading.Lock()

    def __call__(self, name: str, schedule: ScheduleConfig, fire_time: datetime, rendered: dict[str, Any]) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("job store unavailable")
            self.calls.append((name, fire_time, rendered))

    def fire_times(self, name: str | None = None) -> list[datetime]:
        with self.lock:
            return [fire_time.astimezone(UTC) for called, fire_time, _ in self.calls if name in (None, called)]


def unique(prefix: str) -> str:
    """A schedule name of this test's own, so metric samples are not shared between tests."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def every(cron: str = "* * * * * *", **fields: Any) -> ScheduleConfig:
    return ScheduleConfig(app="demo", cron=cron, query="tick {{ fire_time.isoformat() }}", **fields)


def fires_metric(name: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("difyq_schedule_fires_total", {"schedule": name, "outcome": outcome}) or 0.0


def outcomes(records: list[FireRecord]) -> list[tuple[str, str, int]]:
    return [(record.outcome, record.fire_time.astimezone(UTC).strftime("%H:%M:%S"), record.count) for record in records]


def wait_until(condition: Callable[[], object], timeout_s: float) -> float:
    """``wait_for`` ``condition``; the seconds it took."""
    started = time.monotonic()
    wait_for(condition, timeout_s, interval=0.02)
    return time.monotonic() - started


def assert_each_second_once(fires: list[datetime]) -> None:
    """Every fire exactly once, and no second skipped between the first and the last."""
    assert len(fires) == len(set(fires)), f"a fire was doubled: {sorted(fires)}"
    ordered = sorted(fires)
    gaps = [later - earlier for earlier, later in pairwise(ordered)]
    assert all(gap == timedelta(seconds=1) for gap in gaps), f"a fire was lost: {ordered}"


# --- many replicas ------------------------------------------------------------------------------------------------


def test_three_replicas_in_threads_submit_each_fire_once(redis_url, namespace):
    name, recorder, stop = unique("every-second"), Recorder(), threading.Event()
    replicas = [
        Scheduler({name: every()}, Redis.from_url(redis_url), namespace, recorder, lease_ttl_s=1.0, tick_s=0.1,
                  instance_id=f"replica-{index}")
        for index in range(3)
    ]
    threads = [threading.Thread(target=replica.run, args=(stop,)) for replica in replicas]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(recorder.fire_times()) >= 4, timeout_s=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    fires = recorder.fire_times()
    assert_each_second_once(fires)
    assert fires_metric(name, "fired") == len(fires)
    assert not any(replica.is_leader for replica in replicas)
    assert Redis.from_url(redis_url).get(f"{namespace}:scheduler:leader") is None  # released on shutdown


def test_standby_takes_over_from_a_killed_leader_within_the_lease(redis_url, namespace):
    name, recorder, lease_ttl_s = unique("handover"), Recorder(), 1.0
    replicas = [
        Scheduler({name: every()}, Redis.from_url(redis_url), namespace, recorder, lease_ttl_s=lease_ttl_s,
                  tick_s=0.1, instance_id=f"replica-{index}")
        for index in range(3)
    ]
    killed = [threading.Event() for _ in replicas]
    stop = threading.Event()

    def tick_until_killed(index: int) -> None:  # a kill: the loop just stops, nothing is released
        while not (killed[index].is_set() or stop.is_set()):
            replicas[index].tick()
            time.sleep(0.05)

    threads = [threading.Thread(target=tick_until_killed, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(recorder.fire_times()) >= 2, timeout_s=10)
        leader = next(index for index, replica in enumerate(replicas) if replica.is_leader)
        killed[leader].set()
        threads[leader].join(timeout=5)
        fired_before_kill = len(recorder.fire_times())
        takeover_s = wait_until(
            lambda: any(replica.is_leader for index, replica in enumerate(replicas) if index != leader),
            timeout_s=lease_ttl_s + 2.0,
        )
        wait_until(lambda: len(recorder.fire_times()) >= fired_before_kill + 3, timeout_s=10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
    print(f"takeover after {takeover_s:.2f} s (lease TTL {lease_ttl_s} s)")
    assert_each_second_once(recorder.fire_times())


PROCESS_SCRIPT = """
import signal, sys, threading
from redis import Redis
from difyq.producers.scheduler import Scheduler
from difyq.worker.config import ScheduleConfig

url, namespace, name, instance = sys.argv[1:5]
client = Redis.from_url(url)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())

def submit(name, schedule, fire_time, rendered):
    client.rpush(namespace + ":test:submits", rendered["idempotency_key"])

schedule = ScheduleConfig(app="demo", cron="* * * * * *", query="{{ fire_time }}")
Scheduler({name: schedule}, client, namespace, submit, lease_ttl_s=1.5, tick_s=0.1, instance_id=instance).run(stop)
"""


@pytest.mark.e2e
def test_three_scheduler_processes_and_a_sigkilled_leader(redis_url, namespace, redis_client, tmp_path):
    name, lease_ttl_s = unique("processes"), 1.5
    submits_key, lease_key = f"{namespace}:test:submits", f"{namespace}:scheduler:leader"

    def submitted() -> list[datetime]:
        keys = [key.decode() for key in redis_client.lrange(submits_key, 0, -1)]
        return [datetime.strptime(key.split(":", 2)[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) for key in keys]

    processes = {}
    for index in range(3):
        instance = f"process-{index}"
        with open(tmp_path / f"{instance}.log", "wb") as log:
            processes[instance] = subprocess.Popen(
                [sys.executable, "-c", PROCESS_SCRIPT, redis_url, namespace, name, instance],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)},
            )
    try:
        wait_until(lambda: len(submitted()) >= 2, timeout_s=20)
        leader = redis_client.get(lease_key).decode()
        processes[leader].send_signal(signal.SIGKILL)
        processes[leader].wait(timeout=5)
        fired_before_kill = len(submitted())
        takeover_s = wait_until(
            lambda: redis_client.get(lease_key) not in (None, leader.encode()), timeout_s=lease_ttl_s + 3.0
        )
        wait_until(lambda: len(submitted()) >= fired_before_kill + 3, timeout_s=10)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            process.wait(timeout=10)
    print(f"takeover after {takeover_s:.2f} s (lease TTL {lease_ttl_s} s)")
    assert_each_second_once(submitted())
    assert redis_client.get(lease_key) is None  # the survivors released the lease when they stopped


# --- the lease ----------------------------------------------------------------------------------------------------


def test_release_hands_the_lease_over_at_once(redis_client, namespace):
    first = Scheduler({}, redis_client, namespace, Recorder(), lease_ttl_s=60, instance_id="first")
    second = Scheduler({}, redis_client, namespace, Recorder(), lease_ttl_s=60, instance_id="second")
    first.tick()
    second.tick()
    assert (first.is_leader, second.is_leader) == (True, False)
    first.release()
    second.tick()
    assert (first.is_leader, second.is_leader) == (False, True)
    first.release()  # releasing a lease one does not hold leaves it alone
    assert redis_client.get(f"{namespace}:scheduler:leader") == b"second"


def test_a_leader_whose_lease_was_taken_fires_nothing(redis_client, namespace, monkeypatch):
    name, recorder, clock = unique("fenced"), Recorder(), SteppedClock()
    stale = Scheduler({name: every()}, redis_client, namespace, recorder, clock=clock, instance_id="stale")
    stale.tick()
    redis_client.set(f"{namespace}:scheduler:leader", "successor")  # its lease ran out; another replica took it
    monkeypatch.setattr(stale.lease, "hold", lambda: True)  # ... while it stalled right after renewing
    clock.advance(seconds=3)
    assert stale.tick() == []
    assert not stale.is_leader
    assert recorder.calls == []


def test_two_leaders_at_once_make_one_job(redis_client, namespace, monkeypatch):
    """The first leader fires and dies before recording its progress; the next one finds the fire guard."""
    name, recorder, clock = unique("split"), Recorder(), SteppedClock()
    first = Scheduler({name: every()}, redis_client, namespace, recorder, clock=clock, instance_id="first")
    second = Scheduler({name: every()}, redis_client, namespace, recorder, clock=clock, instance_id="second")
    first.tick()
    clock.advance(seconds=1)
    monkeypatch.setattr(first.store, "advance", lambda *args: True)
    assert outcomes(first.tick()) == [("fired", "12:00:01", 1)]
    first.release()
    assert outcomes(second.tick()) == [("duplicate", "12:00:01", 1)]
    assert len(recorder.calls) == 1
    assert (fires_metric(name, "fired"), fires_metric(name, "duplicate")) == (1, 1)


def test_a_paused_schedule_fires_on_no_replica_and_resumes_without_catching_up(redis_client, namespace):
    name, other, recorder, clock = unique("paused"), unique("running"), Recorder(), SteppedClock()
    schedules = {name: every(), other: every()}
    first = Scheduler(schedules, redis_client, namespace, recorder, clock=clock, instance_id="first")
    second = Scheduler(schedules, redis_client, namespace, recorder, clock=clock, instance_id="second")
    first.tick()
    SchedulePauses(redis_client, namespace).pause(name, by="alice")
    for _ in range(3):
        clock.advance(seconds=1)
        first.tick()
    assert recorder.fire_times(name) == [] and len(recorder.fire_times(other)) == 3
    assert REGISTRY.get_sample_value("difyq_schedule_paused", {"schedule": name}) == 1
    assert REGISTRY.get_sample_value("difyq_schedule_paused", {"schedule": other}) == 0
    first.release()  # the other replica leads now, and reads the same pause
    clock.advance(seconds=1)
    second.tick()
    assert recorder.fire_times(name) == []
    SchedulePauses(redis_client, namespace).resume(name)
    clock.advance(seconds=1)
    assert [record.outcome for record in second.tick() if record.schedule == name] == ["fired"]
    assert recorder.fire_times(name) == [(T0 + timedelta(seconds=5)).replace(microsecond=0)]
    assert REGISTRY.get_sample_value("difyq_schedule_paused", {"schedule": name}) == 0


def test_a_fire_claimed_by_a_replica_that_died_mid_submit_is_retried_once_the_claim_expires(redis_client, namespace):
    name, recorder, clock = unique("pending"), Recorder(), SteppedClock()
    scheduler = Scheduler({name: every()}, redis_client, namespace, recorder, clock=clock, instance_id="survivor")
    scheduler.tick()
    clock.advance(seconds=1)
    redis_client.set(f"{namespace}:schedule:fired:{name}:2024-01-01T12:00:01Z", "pending:dead", px=300)
    assert scheduler.tick() == []
    wait_until(lambda: not redis_client.exists(f"{namespace}:schedule:fired:{name}:2024-01-01T12:00:01Z"), 5)
    assert outcomes(scheduler.tick()) == [("fired", "12:00:01", 1)]
    assert recorder.fire_times() == [datetime(2024, 1, 1, 12, 0, 1, tzinfo=UTC)]


def test_a_failed_submit_counts_an_error_and_is_retried(redis_client, namespace):
    name, recorder, clock = unique("flaky"), Recorder(failures=1), SteppedClock()
    scheduler = Scheduler({name: every()}, redis_client, namespace, recorder, clock=clock)
    scheduler.tick()
    clock.advance(seconds=1)
    assert outcomes(scheduler.tick()) == [("error", "12:00:01", 1)]
    assert outcomes(scheduler.tick()) == [("fired", "12:00:01", 1)]
    assert scheduler.tick() == []
    assert (fires_metric(name, "error"), fires_metric(name, "fired")) == (1, 1)


@pytest.mark.parametrize(("catch_up", "last"), [("none", "skipped_missed"), ("latest", "error")])
def test_a_submit_that_keeps_failing_is_given_up_after_the_misfire_grace(redis_client, namespace, catch_up, last):
    name, recorder, clock = unique("rejected"), Recorder(failures=100), SteppedClock()
    config = {name: every("@hourly", catch_up=catch_up)}
    scheduler = Scheduler(config, redis_client, namespace, recorder, clock=clock, misfire_grace_s=2)
    scheduler.tick()
    clock.advance(hours=1)
    for outcome in ["error", "error", last]:  # the third pass finds the fire late: missed, or retried a last time
        assert outcomes(scheduler.tick()) == [(outcome, "13:00:00", 1)]
        clock.advance(seconds=1)
    assert scheduler.tick() == []
    assert recorder.calls == []


# --- misfires after downtime --------------------------------------------------------------------------------------


def downtime(redis_client: Redis, namespace: str, catch_up: str, restart_at: datetime) -> tuple[str, Recorder, list]:
    """A ten-minute schedule that fired at 12:10, then no replica ran until ``restart_at``; returns the records of
    the first pass after the restart."""
    name, recorder = unique(f"catch-up-{catch_up}"), Recorder()
    clock = SteppedClock(datetime(2024, 1, 1, 12, 0, 30, tzinfo=UTC))
    config = {name: every("*/10 * * * *", catch_up=catch_up)}
    before = Scheduler(config, redis_client, namespace, recorder, clock=clock)
    before.tick()
    clock.now = datetime(2024, 1, 1, 12, 10, 1, tzinfo=UTC)
    assert outcomes(before.tick()) == [("fired", "12:10:00", 1)]
    before.release()  # or it died: its lease ran out long before the restart
    clock.now = restart_at
    after = Scheduler(config, redis_client, namespace, recorder, clock=clock)
    return name, recorder, after.tick()


def test_catch_up_none_skips_missed_fires_and_counts_them(redis_client, namespace):
    name, recorder, records = downtime(redis_client, namespace, "none", datetime(2024, 1, 1, 15, 5, tzinfo=UTC))
    assert outcomes(records) == [("skipped_missed", "15:00:00", 17)]  # 12:20 ... 15:00
    assert len(recorder.calls) == 1
    assert fires_metric(name, "skipped_missed") == 17


def test_catch_up_latest_runs_the_most_recent_missed_fire_once(redis_client, namespace):
    _, recorder, records = downtime(redis_client, namespace, "latest", datetime(2024, 1, 1, 15, 5, tzinfo=UTC))
    assert outcomes(records) == [("skipped_missed", "14:50:00", 16), ("fired", "15:00:00", 1)]
    assert [fire.strftime("%H:%M") for fire in recorder.fire_times()] == ["12:10", "15:00"]


def test_catch_up_latest_lets_a_fire_due_on_time_stand_for_the_missed_ones(redis_client, namespace):
    _, recorder, records = downtime(redis_client, namespace, "latest", datetime(2024, 1, 1, 15, 10, 5, tzinfo=UTC))
    assert outcomes(records) == [("skipped_missed", "15:00:00", 17), ("fired", "15:10:00", 1)]
    assert len(recorder.calls) == 2


def test_a_handover_within_the_misfire_grace_is_not_a_misfire(redis_client, namespace):
    name, recorder, clock = unique("grace"), Recorder(), SteppedClock()
    first = Scheduler({name: every()}, redis_client, namespace, recorder, clock=clock, lease_ttl_s=5, tick_s=1)
    first.tick()
    clock.advance(seconds=11)  # the leader died; its lease ran out; a standby ticks (grace 2 * 5 + 2 * 1 = 12 s)
    first.release()
    second = Scheduler({name: every()}, redis_client, namespace, recorder, clock=clock, lease_ttl_s=5, tick_s=1)
    assert [outcome for outcome, _, _ in outcomes(second.tick())] == ["fired"] * 11
    assert_each_second_once(recorder.fire_times())


def test_missed_fires_of_a_long_downtime_are_counted_to_a_limit(redis_client, namespace, monkeypatch):
    monkeypatch.setattr("difyq.producers.scheduler.MISSED_COUNT_LIMIT", 50)
    name, recorder, clock = unique("long-downtime"), Recorder(), SteppedClock()
    config = {name: every(catch_up="latest")}
    before = Scheduler(config, redis_client, namespace, recorder, clock=clock)
    before.tick()
    before.release()
    clock.advance(hours=1)
    records = Scheduler(config, redis_client, namespace, recorder, clock=clock, misfire_grace_s=0).tick()
    assert outcomes(records) == [("skipped_missed", "12:59:59", 49), ("fired", "13:00:00", 1)]


# --- config changes -----------------------------------------------------------------------------------------------


def test_a_removed_schedule_stops_and_its_state_expires(redis_client, namespace):
    kept, removed, recorder, clock = unique("kept"), unique("removed"), Recorder(), SteppedClock()
    before = Scheduler({kept: every(), removed: every()}, redis_client, namespace, recorder, clock=clock)
    before.tick()
    clock.advance(seconds=1)
    assert len(before.tick()) == 2
    before.release()
    after = Scheduler({kept: every()}, redis_client, namespace, recorder, clock=clock)
    for _ in range(3):
        clock.advance(seconds=1)
        after.tick()
    assert len(recorder.fire_times(kept)) == 4
    assert len(recorder.fire_times(removed)) == 1
    assert 0 < redis_client.ttl(f"{namespace}:schedule:state:{removed}") <= 30 * 86400


def test_a_changed_cron_starts_afresh_without_catching_up(redis_client, namespace):
    name, recorder, clock = unique("changed"), Recorder(), SteppedClock()
    before = Scheduler({name: every("*/10 * * * *", catch_up="latest")}, redis_client, namespace, recorder, clock=clock)
    before.tick()
    before.release()
    clock.advance(hours=3)
    changed = Scheduler({name: every("*/5 * * * *", catch_up="latest")}, redis_client, namespace, recorder,
                        clock=clock)
    assert changed.tick() == []
    clock.advance(minutes=5)
    assert outcomes(changed.tick()) == [("fired", "15:05:00", 1)]


# --- what a fire submits ------------------------------------------------------------------------------------------


def test_submit_receives_the_mapping_rendered_for_the_fire(redis_client, namespace):
    name, recorder, clock = unique("digest"), Recorder(), SteppedClock(datetime(2024, 7, 1, 6, 59, 30, tzinfo=UTC))
    config = ScheduleConfig(
        app="demo",
        cron="0 9 * * 1-5",
        timezone="Europe/Berlin",
        query="Write the digest for {{ fire_time.date() }}",
        inputs={"hour": "{{ fire_time.hour }}", "limit": 5},
        user="{{ schedule }}-bot",
        conversation_id=None,
        callback_url="https://example.com/digest/{{ fire_time.strftime('%Y%m%d') }}",
        metadata={"zone": "{{ fire_time.tzname() }}"},
    )
    scheduler = Scheduler({name: config}, redis_client, namespace, recorder, clock=clock)
    scheduler.tick()
    clock.advance(seconds=31)
    scheduler.tick()
    [(called, fire_time, rendered)] = recorder.calls
    assert (called, fire_time) == (name, datetime(2024, 7, 1, 9, 0, tzinfo=ZoneInfo("Europe/Berlin")))
    assert fire_time.tzinfo == ZoneInfo("Europe/Berlin")
    assert rendered == {
        "app": "demo",
        "query": "Write the digest for 2024-07-01",
        "inputs": {"hour": "9", "limit": 5},
        "user": f"{name}-bot",
        "conversation_id": None,
        "files": None,
        "callback_url": "https://example.com/digest/20240701",
        "metadata": {"zone": "CEST"},
        "schedule": name,
        "idempotency_key": f"schedule:{name}:2024-07-01T07:00:00Z",
        "priority": 0,
        "tenant": None,
        "thread": None,
    }
    assert REGISTRY.get_sample_value("difyq_schedule_last_fire_timestamp_seconds", {"schedule": name}) == (
        datetime(2024, 7, 1, 7, 0, tzinfo=UTC).timestamp()
    )


def test_a_template_that_cannot_render_fails_its_fire_for_good(redis_client, namespace):
    name, recorder, clock = unique("broken"), Recorder(), SteppedClock()
    config = ScheduleConfig(app="demo", cron="* * * * * *", query="{{ body.title }}")
    scheduler = Scheduler({name: config}, redis_client, namespace, recorder, clock=clock)
    scheduler.tick()
    clock.advance(seconds=1)
    assert outcomes(scheduler.tick()) == [("error", "12:00:01", 1)]
    assert scheduler.tick() == []
    assert recorder.calls == []


def test_works_with_a_client_that_decodes_responses(redis_url, namespace):
    client = Redis.from_url(redis_url, decode_responses=True)
    name, recorder, clock = unique("decoded"), Recorder(), SteppedClock()
    first = Scheduler({name: every()}, client, namespace, recorder, clock=clock)
    first.tick()
    clock.advance(seconds=2)
    assert len(first.tick()) == 2
    first.release()
    clock.advance(seconds=1)
    second = Scheduler({name: every()}, client, namespace, recorder, clock=clock)
    assert outcomes(second.tick()) == [("fired", "12:00:03", 1)]
    assert REGISTRY.get_sample_value("difyq_schedule_last_fire_timestamp_seconds", {"schedule": name}) == (
        datetime(2024, 1, 1, 12, 0, 3, tzinfo=UTC).timestamp()
    )


# --- cron expressions, metrics, construction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("@hourly", ["13:00:00", "14:00:00"]),
        ("@daily", ["00:00:00", "00:00:00"]),
        ("*/20 * * * *", ["12:20:00", "12:40:00"]),
        ("* * * * * */15", ["12:00:15", "12:00:30"]),  # croniter's seconds field comes last
    ],
)
def test_cron_aliases_and_the_seconds_field(cron, expected):
    fires = Timetable(cron, "UTC").fires_after(T0)
    assert [next(fires).strftime("%H:%M:%S") for _ in expected] == expected


@pytest.mark.parametrize(("cron", "interval_s"), [("* * * * * *", 1), ("@hourly", 3600), ("0 9 * * 1-5", 3 * 86400)])
def test_interval_metric_is_the_longest_gap_between_fires(redis_client, namespace, cron, interval_s):
    name = unique("interval")
    Scheduler({name: every(cron)}, redis_client, namespace, Recorder())
    assert REGISTRY.get_sample_value("difyq_schedule_interval_seconds", {"schedule": name}) == interval_s


@pytest.mark.parametrize("cron", ["R * * * *", "0 R(1-5) * * *"])
def test_random_cron_fields_are_refused_by_the_config(cron):
    with pytest.raises(ConfigError) as caught:
        parse_config({"apps": {"demo": {"api_key": "k", "mode": "chat"}},
                      "schedules": {"lottery": {"cron": cron, "app": "demo"}}})
    assert caught.value.problems[0].startswith("schedules.lottery.cron: random (R) fields are not allowed")


def test_the_lease_must_outlast_two_ticks(redis_client, namespace):
    with pytest.raises(ValueError, match="lease_ttl_s"):
        Scheduler({}, redis_client, namespace, Recorder(), lease_ttl_s=1, tick_s=1)


def test_run_scheduler_runs_the_configured_schedules_until_stopped(redis_url, namespace, redis_client):
    name = unique("configured")
    config = parse_config({
        "apps": {"demo": {"api_key": "app-test", "mode": "chat"}},
        "schedules": {name: {"app": "demo", "cron": "* * * * * *", "query": "{{ fire_time }}"}},
        "redis": {"namespace": namespace},
    })
    recorder, stop = Recorder(), threading.Event()
    thread = threading.Thread(target=run_scheduler, args=(config, RedisConnector(redis_url), stop, recorder))
    thread.start()
    try:
        wait_until(lambda: len(recorder.calls) >= 1, timeout_s=10)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert recorder.calls[0][0] == name
    assert redis_client.get(f"{namespace}:scheduler:leader") is None
