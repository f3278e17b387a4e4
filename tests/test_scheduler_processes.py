"""Three real ``difyq scheduler`` processes on one Redis: one job per fire, and a killed leader is replaced
within the lease time without a doubled or lost fire."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.processes import difyq_processes
from tests.support.stack import make_runtime
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE_S = 3.0


def schedule_jobs(runtime) -> list[dict]:
    jobs, _ = runtime.store.list(allowed_apps=None, source="schedule", limit=200)
    return jobs


def fire_time(job: dict) -> datetime:
    return datetime.fromisoformat(job["idempotency_key"].removeprefix("schedule:tick:").replace("Z", "+00:00"))


def test_three_schedulers_fire_each_second_once(tmp_path: Path, redis_url: str, namespace: str) -> None:
    apps = {"support": {"api_key": "app-unused", "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}}
    config = {"apps": apps, "redis": {"namespace": namespace},
              "schedules": {"tick": {"cron": "* * * * * *", "app": "support",
                                     "query": "fire {{ fire_time.isoformat() }}"}}}
    runtime = make_runtime(redis_url, namespace, apps)
    with difyq_processes(tmp_path, redis_url, config) as difyq:
        schedulers = [difyq.start(f"scheduler-{i}", "scheduler",
                                  env={"DIFYQ_METRICS_PORT": "0", "DIFYQ_SCHEDULER_LEASE": f"{LEASE_S:g}s"})
                      for i in range(3)]
        leader_key = f"{namespace}:scheduler:leader"
        holder = wait_for(lambda: runtime.raw_redis.get(leader_key), timeout=30, what="a scheduler taking the lease")
        wait_for(lambda: len(schedule_jobs(runtime)) >= 3, timeout=30, what="three fires")
        before = schedule_jobs(runtime)
        fires = Counter(job["idempotency_key"] for job in before)
        assert len(fires) >= 3 and set(fires.values()) == {1}

        leader = next(p for p in schedulers if str(p.pid) in holder.decode())
        killed_at = time.monotonic()
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        wait_for(lambda: runtime.raw_redis.get(leader_key) not in (None, holder), timeout=LEASE_S + 10,
                 interval=0.2, what="another scheduler taking the lease")
        takeover_s = time.monotonic() - killed_at
        # Within the lease and a standby's tick (1 s), with room for a busy machine.
        assert takeover_s < LEASE_S + 4, f"takeover took {takeover_s:.1f} s with a {LEASE_S:g} s lease"
        print(f"scheduler takeover after SIGKILL of the leader: {takeover_s:.1f} s (lease {LEASE_S:.0f} s)")
        taken_over_at = datetime.now(UTC)
        wait_for(lambda: sum(fire_time(job) > taken_over_at for job in schedule_jobs(runtime)) >= 2, timeout=30,
                 what="two fires after the takeover")
        after = schedule_jobs(runtime)
    keys = Counter(job["idempotency_key"] for job in after)
    assert set(keys.values()) == {1}, "a fire was enqueued twice"
    fire_times = sorted(fire_time(job) for job in after)
    expected = int((fire_times[-1] - fire_times[0]).total_seconds()) + 1
    assert len(fire_times) == expected, "a fire was lost during the handover"
    assert len(after) > len(before)


def test_a_scheduler_whose_metrics_port_is_taken_says_so_and_exits(tmp_path: Path, redis_url: str,
                                                                   namespace: str) -> None:
    apps = {"support": {"api_key": "app-unused", "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}}
    with difyq_processes(tmp_path, redis_url, {"apps": apps, "redis": {"namespace": namespace}}) as difyq, \
            socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        scheduler = difyq.start("scheduler", "scheduler", env={"DIFYQ_METRICS_PORT": str(port)})
        assert scheduler.wait(timeout=60) == 2
        assert f"cannot serve /metrics on port {port} (DIFYQ_METRICS_PORT)" in difyq.logs("scheduler")


@pytest.mark.parametrize("lease", ["soon", "0s", "1s"])
def test_a_scheduler_given_a_bad_lease_says_so_and_exits(tmp_path: Path, redis_url: str, namespace: str,
                                                         lease: str) -> None:
    apps = {"support": {"api_key": "app-unused", "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}}
    with difyq_processes(tmp_path, redis_url, {"apps": apps, "redis": {"namespace": namespace}}) as difyq:
        scheduler = difyq.start("scheduler", "scheduler", env={"DIFYQ_METRICS_PORT": "0",
                                                               "DIFYQ_SCHEDULER_LEASE": lease})
        assert scheduler.wait(timeout=60) == 2
        assert "difyq scheduler: DIFYQ_SCHEDULER_LEASE must be" in difyq.logs("scheduler")
        assert repr(lease) in difyq.logs("scheduler")
