"""Three real ``difyq scheduler`` processes on one Redis: one job per fire, and a killed leader is replaced
within the lease time without a doubled or lost fire."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.processes import difyq_processes
from tests.support.stack import make_runtime

pytestmark = pytest.mark.e2e

LEASE_S = 15.0


def schedule_jobs(runtime) -> list[dict]:
    jobs, _ = runtime.store.list(allowed_apps=None, source="schedule", limit=200)
    return jobs


def test_three_schedulers_fire_each_second_once(tmp_path: Path, redis_url: str, namespace: str) -> None:
    apps = {"support": {"api_key": "app-unused", "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}}
    config = {"apps": apps, "redis": {"namespace": namespace},
              "schedules": {"tick": {"cron": "* * * * * *", "app": "support",
                                     "query": "fire {{ fire_time.isoformat() }}"}}}
    runtime = make_runtime(redis_url, namespace, apps)
    with difyq_processes(tmp_path, redis_url, config) as difyq:
        schedulers = [difyq.start(f"scheduler-{i}", "scheduler", env={"DIFYQ_METRICS_PORT": "0"}) for i in range(3)]
        time.sleep(6)
        leader_key = f"{namespace}:scheduler:leader"
        holder = runtime.raw_redis.get(leader_key)
        assert holder, "no scheduler took the lease"
        before = schedule_jobs(runtime)
        fires = Counter(job["idempotency_key"] for job in before)
        assert len(fires) >= 3 and set(fires.values()) == {1}

        leader = next(p for p in schedulers if str(p.pid) in holder.decode())
        killed_at = time.monotonic()
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        deadline = killed_at + LEASE_S + 10
        while time.monotonic() < deadline:
            current = runtime.raw_redis.get(leader_key)
            if current and current != holder:
                break
            time.sleep(0.2)
        takeover_s = time.monotonic() - killed_at
        print(f"scheduler takeover after SIGKILL of the leader: {takeover_s:.1f} s (lease {LEASE_S:.0f} s)")
        assert runtime.raw_redis.get(leader_key) not in (None, holder)
        time.sleep(3)
        after = schedule_jobs(runtime)
    keys = Counter(job["idempotency_key"] for job in after)
    assert set(keys.values()) == {1}, "a fire was enqueued twice"
    fire_times = sorted(datetime.fromisoformat(key.removeprefix("schedule:tick:").replace("Z", "+00:00"))
                        for key in keys)
    expected = int((fire_times[-1] - fire_times[0]).total_seconds()) + 1
    assert len(fire_times) == expected, "a fire was lost during the handover"
    assert len(after) > len(before)
