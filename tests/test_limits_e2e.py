"""Per-key limits with the worker as four real processes against the emulator: requests/min and concurrency
hold across processes, keys do not slow each other, a Dify 429 cools the key down for the whole fleet."""

from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path

import pytest
import redis
import requests

from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker.config import AppLimits
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.limits import KeyLimiter, key_id
from tests.support.processes import difyq_processes, wait_for_port
from tests.support.stack import CLIENT_TOKEN, auth, make_runtime, running_worker, wait_for_final
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

RPM = 60  # one admission a second after the burst: the three paced calls the test waits for take 3 s
BURST = RPM // 6  # the default burst
BURSTY_RPM = 20
CONCURRENCY = 2


def submit_many(base: str, app: str, count: int, prefix: str) -> list[str]:
    ids = []
    for index in range(count):
        response = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                                 json={"app": app, "query": f"{prefix} {index}"})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def statuses(base: str, ids: list[str]) -> list[dict]:
    return [requests.get(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10).json() for job_id in ids]


def wait_all_final(base: str, ids: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = statuses(base, ids)
        if all(job["status"] in ("succeeded", "failed") for job in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


def call_times(emulator, app: str) -> list[float]:
    """When the app's generation calls began (the API's `GET /parameters` lookups are not calls the limits pace)."""
    return sorted(call["started_at"] for call in emulator.calls() if call["app"] == app and call["method"] == "POST")


def test_limits_hold_across_four_worker_processes(tmp_path: Path, redis_url: str, namespace: str) -> None:
    apps = [EmulatedApp(name="limited", key="app-limited-key-01", mode="chat"),
            EmulatedApp(name="bursty", key="app-bursty-key-001", mode="chat"),
            EmulatedApp(name="narrow", key="app-narrow-key-001", mode="chat", time_to_first_token_s=0.4),
            EmulatedApp(name="free", key="app-free-key-00001", mode="chat")]
    with start_emulator(apps) as emulator:
        config = {
            "apps": {
                "limited": {"api_key": "app-limited-key-01", "mode": "chat", "base_url": emulator.base_url,
                            "limits": {"requests_per_minute": RPM}},
                "bursty": {"api_key": "app-bursty-key-001", "mode": "chat", "base_url": emulator.base_url,
                           "limits": {"requests_per_minute": BURSTY_RPM, "burst": BURSTY_RPM}},
                "narrow": {"api_key": "app-narrow-key-001", "mode": "chat", "base_url": emulator.base_url,
                           "limits": {"max_concurrency": CONCURRENCY}},
                "free": {"api_key": "app-free-key-00001", "mode": "chat", "base_url": emulator.base_url},
            },
            "clients": {"all": {"token": CLIENT_TOKEN, "apps": ["*"]}},
            "redis": {"namespace": namespace},
        }
        with difyq_processes(tmp_path, redis_url, config) as difyq:
            worker, metrics_port = difyq.launch_worker(processes=4, threads=4)  # beside the API's start
            base = difyq.start_api()
            wait_for_port(metrics_port, process=worker)
            limited = submit_many(base, "limited", 2 * RPM, "limited")
            bursty = submit_many(base, "bursty", BURSTY_RPM + 1, "bursty")
            narrow = submit_many(base, "narrow", 10, "narrow")
            free = submit_many(base, "free", 20, "free")
            free_jobs = wait_all_final(base, free, timeout=30)
            narrow_jobs = wait_all_final(base, narrow, timeout=60)
            # Paced one per 60/BURSTY_RPM s after a default burst, these would take 50 s; with burst: all at once.
            wait_for(lambda: len(call_times(emulator, "bursty")) >= BURSTY_RPM, timeout=40,
                     what=f"{BURSTY_RPM} calls of a key whose burst is its whole limit")
            wait_for(lambda: len(call_times(emulator, "limited")) >= BURST + 3, timeout=40,
                     what="three paced calls after the burst")
            limited_jobs = statuses(base, limited)
            bursty_jobs = statuses(base, bursty)
            request_log = KeyLimiter(redis.Redis.from_url(redis_url), namespace).keys(key_id("app-limited-key-01")).req
            admitted_us = sorted(score for _, score in redis.Redis.from_url(redis_url).zrange(request_log, 0, -1,
                                                                                             withscores=True))
            difyq.stop_all()
        stats = emulator.stats()
        times = call_times(emulator, "limited")
        bursty_times = call_times(emulator, "bursty")

    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in free_jobs)
    assert all(job["status"] == "succeeded" for job in narrow_jobs)
    print(f"narrow key: max {stats['narrow']['max_concurrent']} concurrent streams (limit {CONCURRENCY})")
    assert stats["narrow"]["max_concurrent"] <= CONCURRENCY
    spacing = [round((b - a) / 1e6, 3) for a, b in itertools.pairwise(admitted_us)]
    print(f"limited key: {len(times)} calls (limit {RPM}/min, burst {BURST}), admitted {spacing} s apart")
    # After the burst, one admission per 60/RPM s (the limiter's own log, in Redis TIME microseconds).
    interval_us = 60 / RPM * 1e6
    assert len(admitted_us) >= BURST + 3
    for k in range(BURST, len(admitted_us)):
        assert admitted_us[k] - admitted_us[0] >= (k - BURST + 1) * interval_us - 1, (k, spacing)
    for index, start in enumerate(times):
        assert sum(1 for t in times[index:] if t - start < 60) <= RPM
    waiting = [job for job in limited_jobs if job["status"] == "queued"]
    assert waiting and all(job["attempts"] == 0 for job in waiting), "deferred jobs spent no attempt"
    print(f"bursty key: {len(bursty_times)} calls over {bursty_times[-1] - bursty_times[0]:.1f} s")
    assert len(bursty_times) == BURSTY_RPM, "the sliding window still holds: one more waits for a full minute"
    assert [job["attempts"] for job in bursty_jobs if job["status"] == "queued"] == [0]


def test_upstream_429_cools_the_key_down_for_the_fleet(redis_url: str, namespace: str) -> None:

    apps = [EmulatedApp(name="hot", key="app-hot-key-000001", mode="chat", fault="http429"),
            EmulatedApp(name="cool", key="app-cool-key-00001", mode="chat")]
    with start_emulator(apps) as emulator:
        runtime = make_runtime(redis_url, namespace, {
            "hot": {"api_key": "app-hot-key-000001", "mode": "chat", "base_url": emulator.base_url},
            "cool": {"api_key": "app-cool-key-00001", "mode": "chat", "base_url": emulator.base_url},
        }, jobs={"max_attempts": 20, "retry_min_backoff": "0.01s", "retry_max_backoff": "0.05s"})

        def enqueue(app: str, index: int) -> str:
            return submit(runtime, JobSubmission(app=app, query=f"{app} {index}"), source="cli",
                          scope="test").job["id"]

        cooling = KeyLimiter(runtime.raw_redis, namespace).keys(key_id("app-hot-key-000001")).cool

        def cooldowns() -> int:
            """Cooldowns the key has gone through so far (1 s, 2 s, 4 s...: one per 429 after the last ended)."""
            return int(runtime.raw_redis.hget(cooling, "streak") or 0)

        with running_worker(runtime, threads=8):
            hot = [enqueue("hot", index) for index in range(8)]
            started = time.monotonic()
            cool = [wait_for_final(runtime, enqueue("cool", index)) for index in range(5)]
            wait_for(lambda: cooldowns() >= 3, timeout=30, what="a third cooldown (after 1 s and 2 s ones)")
            hot_calls = call_times(emulator, "hot")
            rounds = 1 + cooldowns()  # read after the calls: each round is one call per job at most
            window_s = time.monotonic() - started
    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in cool)
    print(f"429 key: {len(hot_calls)} calls in {window_s:.1f}s from 8 jobs whose retry backoff alone "
          f"would allow {int(window_s / 0.05) * 8}; bound {rounds * 8} ({rounds} rounds)")
    assert len(hot_calls) <= rounds * len(hot)
    assert runtime.store.get(hot[0])["status"] in ("queued", "running", "failed")


def test_a_job_of_an_app_without_limits_waits_out_the_key_s_cooldown_unstarted(redis_url: str, namespace: str,
                                                                              ) -> None:
    """An app without limits has no admission script: the job's start checks the key's cooldown after a Dify 429,
    and a job on a cooling key is deferred without an attempt or a call, then runs once the cooldown is over."""
    key = "app-plain-key-0001"
    with start_emulator([EmulatedApp(name="plain", key=key, mode="chat")]) as emulator:
        runtime = make_runtime(redis_url, namespace, {
            "plain": {"api_key": key, "mode": "chat", "base_url": emulator.base_url},
        }, jobs={"max_attempts": 1})
        cooling = KeyLimiter(runtime.raw_redis, namespace).keys(key_id(key)).cool
        with running_worker(runtime, threads=4):
            limited = wait_for_final(runtime, submit(runtime, JobSubmission(app="plain", query="FAIL429"),
                                                     source="cli", scope="test").job["id"])
            assert runtime.raw_redis.exists(cooling), "the 429 cooled the key down"
            waiting = submit(runtime, JobSubmission(app="plain", query="after the 429"), source="cli",
                             scope="test").job["id"]
            wait_for(lambda: runtime.store.fields(waiting).get("deferred_by") == "upstream", timeout=10,
                     what="the job deferred by the key's cooldown")
            deferred = runtime.store.fields(waiting)
            done = wait_for_final(runtime, waiting)
        calls = call_times(emulator, "plain")
    assert limited["status"] == "failed" and limited["error"]["code"] != "rate_limit_wait_exceeded"
    assert (deferred["status"], deferred.get("attempts", "0"), deferred.get("started_at")) == ("queued", "0", None)
    assert (done["status"], done["attempts"]) == ("succeeded", 1)
    assert len(calls) == 2, "the deferred job called Dify once, after the cooldown"
    assert calls[1] - calls[0] >= 1.0, "no call while the key cooled down (1 s after the first 429)"


def test_slots_of_a_killed_worker_come_back_within_the_lease(tmp_path: Path, redis_url: str, namespace: str) -> None:

    key = "app-hanging-key-01"
    with start_emulator([EmulatedApp(name="hanging", key=key, mode="chat", fault="hang")]) as emulator:
        config = {
            "apps": {"hanging": {"api_key": key, "mode": "chat", "base_url": emulator.base_url,
                                 "limits": {"max_concurrency": 2}}},
            "clients": {"all": {"token": CLIENT_TOKEN, "apps": ["*"]}},
            "redis": {"namespace": namespace},
        }
        limiter = KeyLimiter(redis.Redis.from_url(redis_url), namespace)
        limits = AppLimits(max_concurrency=2)
        with difyq_processes(tmp_path, redis_url, config) as difyq:
            difyq.env["DIFYQ_JOB_LEASE"] = "1s"
            base = difyq.start_api()
            worker, _ = difyq.start_worker(processes=1, threads=4)
            submit_many(base, "hanging", 3, "hang")
            wait_for(lambda: limiter.remaining(limiter.key_id(key), limits)["concurrency"] == 0, timeout=20,
                     what="both slots taken")
            leases = limiter.keys(limiter.key_id(key)).lease
            taken = dict(limiter.redis.zrange(leases, 0, -1, withscores=True))
            # Renewed: the same two reservations, each expiring later than either did when first seen.
            wait_for(lambda: (now := dict(limiter.redis.zrange(leases, 0, -1, withscores=True))).keys() == taken.keys()
                     and min(now.values()) > max(taken.values()), timeout=20, what="both slot leases renewed")
            assert limiter.remaining(limiter.key_id(key), limits)["concurrency"] == 0, "held slots are renewed"
            killed = time.monotonic()
            os.killpg(worker.pid, signal.SIGKILL)
            wait_for(lambda: limiter.remaining(limiter.key_id(key), limits)["concurrency"] == 2, timeout=20,
                     what="the killed worker's slots free again")
            back_s = time.monotonic() - killed
    print(f"slots of the SIGKILLed worker free again after {back_s:.1f}s (slot lease 2s)")
    assert limiter.remaining(limiter.key_id(key), limits)["concurrency"] == 2
