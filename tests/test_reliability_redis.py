"""Redis as difyq needs it and when it goes away: an evicting Redis is refused at start (exit 3, unless
overridden), settings are read through INFO where CONFIG is forbidden, and a Redis SIGKILLed and restarted from its
AOF mid-run loses no accepted job while the API answers 503 and the workers and schedulers reconnect on their own."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from difyq.worker.config import parse_config
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import EmbeddedRedis, free_port
from difyq.worker.jobs.model import iso_time
from difyq.worker.jobs.schema import FINAL_STATUSES
from difyq.worker.leases import LEASE_ENV
from difyq.worker.redis_check import (
    ALLOW_EVICTION_ENV,
    EXIT_UNUSABLE_REDIS,
    RedisSettings,
    problems_and_warnings,
    read_settings,
)
from difyq.worker.runtime import Runtime
from tests.support.processes import difyq_processes, wait_for_port
from tests.support.stack import CLIENT_TOKEN, SIGNING_SECRET, auth, make_runtime, serving_api
from tests.support.waiting import wait_for

SUPPORT = EmulatedApp(name="support", key="app-support-key-001", mode="chat", tokens_per_second=20, answer_tokens=6)


@pytest.fixture(scope="module")
def emulator() -> Iterator:
    with start_emulator([SUPPORT]) as running:
        yield running


def config_for(namespace: str, emulator_url: str, schedules: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apps": {"support": {"api_key": SUPPORT.key, "mode": "chat", "base_url": emulator_url}},
        "clients": {"full": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "schedules": schedules or {},
        "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8"]},
        "jobs": {"retry_min_backoff": "0.2s", "retry_max_backoff": "1s"},
        "redis": {"namespace": namespace},
    }


class ForbiddenConfig:
    """A client as hosted Redis offers it: CONFIG is refused, INFO answers (or is refused as well)."""

    def __init__(self, info: dict[str, dict[str, Any]] | None):
        self._info = info

    def config_get(self, pattern: str) -> dict[str, str]:
        raise redis.ResponseError("unknown command 'CONFIG'")

    def info(self, section: str) -> dict[str, Any]:
        if self._info is None:
            raise redis.ResponseError("unknown command 'INFO'")
        return self._info[section]


def test_settings_come_from_info_where_config_is_forbidden() -> None:
    evicting = read_settings(ForbiddenConfig({"memory": {"maxmemory_policy": "allkeys-lru"},
                                              "persistence": {"aof_enabled": 0}}))
    assert (evicting.eviction_policy, evicting.appendonly) == ("allkeys-lru", "no")
    problems, warnings = problems_and_warnings(evicting)
    assert len(problems) == 1 and "noeviction" in problems[0] and ALLOW_EVICTION_ENV in problems[0]
    assert len(warnings) == 1 and "appendonly" in warnings[0]
    silent = read_settings(ForbiddenConfig(None))
    assert problems_and_warnings(silent) == ([], [
        "could not read Redis' maxmemory-policy; make sure it is set as the README says",
        "could not read Redis' appendonly; make sure it is set as the README says",
    ])
    assert problems_and_warnings(RedisSettings("noeviction", "yes", "everysec")) == ([], [])
    assert problems_and_warnings(RedisSettings("noeviction", "yes", "no"))[1]


@pytest.mark.e2e
def test_an_evicting_redis_is_refused_at_start_unless_overridden(tmp_path: Path, namespace: str) -> None:
    with EmbeddedRedis() as server, difyq_processes(tmp_path, server.url, config_for(namespace, "http://x")) as difyq:
        redis.Redis.from_url(server.url).config_set("maxmemory-policy", "allkeys-lru")
        refused = {
            "api": difyq.start("api", "api", "--port", str(free_port())),
            "worker": difyq.start("worker", "worker", "--processes", "1", "--threads", "1"),
            "scheduler": difyq.start("scheduler", "scheduler", env={"DIFYQ_METRICS_PORT": str(free_port())}),
        }
        codes = {name: process.wait(timeout=60) for name, process in refused.items()}
        port = free_port()
        overridden = difyq.start("api-overridden", "api", "--port", str(port), env={ALLOW_EVICTION_ENV: "1"})
        wait_for_port(port, process=overridden)
        logs = {name: difyq.logs(name) for name in [*refused, "api-overridden"]}
    assert codes == dict.fromkeys(refused, EXIT_UNUSABLE_REDIS)
    for name in refused:
        assert "refusing to start: Redis maxmemory-policy is 'allkeys-lru'" in logs[name], logs[name]
        assert "redis_settings_unsafe" in logs[name] and "appendonly is off" in logs[name]
    assert "redis_settings_unsafe_overridden" in logs["api-overridden"]


@pytest.mark.e2e
def test_commands_on_an_unreachable_redis_exit_3_with_one_clear_line(tmp_path: Path, namespace: str) -> None:
    """One-shot commands; the services (api, worker, scheduler) start anyway and wait for Redis to come back."""
    unreachable = f"redis://:s3cret-password@127.0.0.1:{free_port()}/0"
    with difyq_processes(tmp_path, unreachable, config_for(namespace, "http://x")) as difyq:
        commands = {"enqueue": ["enqueue", "--app", "support", "--query", "hi"], "jobs": ["jobs", "list"]}
        codes = {name: difyq.start(name, *argv).wait(timeout=60) for name, argv in commands.items()}
        logs = {name: difyq.logs(name) for name in commands}
    assert codes == dict.fromkeys(commands, EXIT_UNUSABLE_REDIS), logs
    for name, log in logs.items():
        assert f"difyq {name}: Redis is unreachable" in log, log
        assert "Traceback" not in log and "s3cret-password" not in log, log


def unread_by_the_server(port: int) -> int:
    """Bytes sent to the IPv4 TCP server on ``port`` that it has not read yet (Linux /proc/net/tcp)."""
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == "01":  # an established connection to the server
            unread += int(fields[4].split(":")[1], 16)
    return unread


def test_the_api_keeps_answering_health_checks_while_redis_hangs(namespace: str) -> None:
    server = EmbeddedRedis().start()
    runtime = make_runtime(server.url, namespace, {"support": {"api_key": "x", "mode": "chat"}})
    try:
        with serving_api(runtime) as base, ThreadPoolExecutor(1) as pool:
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                pending = pool.submit(requests.post, f"{base}/v1/jobs", json={"app": "support", "query": "q"},
                                      headers=auth(), timeout=60)
                wait_for(lambda: unread_by_the_server(server.port) > 0, timeout=10,
                         what="the submit's command waiting at the stopped Redis")
                health = requests.get(f"{base}/healthz", timeout=1.5)
                submit_was_waiting = not pending.done()
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            assert pending.result().status_code == 202
        assert health.status_code == 200 and submit_was_waiting
    finally:
        server.close()


class Submitter:
    """POSTs a job every 50 ms from a thread and records every answer (or the client error) with its latency."""

    def __init__(self, base: str):
        self.base = base
        self.answers: list[tuple[float, int | str, float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Submitter:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.05):
            n += 1
            sent = time.monotonic()
            try:
                response = requests.post(f"{self.base}/v1/jobs", json={"app": "support", "query": f"redis-{n}"},
                                         headers=auth(), timeout=15)
            except requests.RequestException as exc:
                self.answers.append((sent, type(exc).__name__, time.monotonic() - sent, {}))
                continue
            body = response.json() if response.headers.get("content-type") == "application/json" else {}
            self.answers.append((sent, response.status_code, time.monotonic() - sent,
                                 {"id": body.get("id"), "retry_after": response.headers.get("Retry-After")}))

    def accepted(self) -> list[str]:
        return [detail["id"] for _, status, _, detail in self.answers if status == 202]

    def count(self, status: int, since: float) -> int:
        """Answers with ``status`` to requests sent at or after ``since`` (time.monotonic())."""
        return sum(1 for sent, answered, _, _ in list(self.answers) if answered == status and sent >= since)


@pytest.mark.slow
@pytest.mark.e2e
def test_redis_sigkilled_and_restarted_from_its_aof_mid_run_loses_no_accepted_job(
    tmp_path: Path, namespace: str, emulator
) -> None:
    """The API, a worker pod of two processes and two scheduler replicas run on a Redis with AOF while a client
    submits a job every 50 ms; Redis is SIGKILLed and restarted from its AOF once the API has answered 503 forty
    times. The API answers 503 with Retry-After meanwhile (each answer within the client's 15 s timeout), every
    job it accepted succeeds, no process restarts, and the schedulers resume firing (one job per fire, a leader
    lease held) without a restart."""
    schedules = {"every-second": {"app": "support", "cron": "* * * * * *", "query": "tick {{ fire_time }}"}}
    config = config_for(namespace, emulator.base_url, schedules)
    server = EmbeddedRedis(appendonly=True).start()
    runtime = Runtime(parse_config(config), server.url)
    try:
        with difyq_processes(tmp_path, server.url, config) as difyq:
            difyq.env[LEASE_ENV] = "2s"
            # The worker, the schedulers and the API start side by side.
            worker, metrics_port = difyq.launch_worker(processes=2, threads=4)
            schedulers = [difyq.start(f"scheduler-{n}", "scheduler", env={"DIFYQ_METRICS_PORT": str(free_port())})
                          for n in range(2)]
            base = difyq.start_api()
            api = difyq.processes[-1][1]
            wait_for_port(metrics_port, process=worker)
            with Submitter(base) as submitter:
                began = time.monotonic()
                wait_for(lambda: submitter.count(202, began) >= 20, timeout=30, what="20 jobs accepted")
                wait_for(lambda: runtime.store.list(allowed_apps=None, source="schedule", limit=1)[0], timeout=30,
                         what="a schedule fire")
                down_at = time.monotonic()
                server.process.kill()
                server.process.wait()
                # Down for some seconds: workers and schedulers meet the outage too, not only the API.
                wait_for(lambda: submitter.count(503, down_at) >= 40, timeout=60, what="503s while Redis is down")
                server.start()
                up_at, up_wall = time.monotonic(), time.time()
                wait_for(lambda: submitter.count(202, up_at) >= 20, timeout=30, what="20 jobs accepted after")
                wait_for(lambda: any(fire["created_at"] > iso_time(up_wall) for fire in runtime.store.list(
                    allowed_apps=None, source="schedule", limit=5)[0]), timeout=30, what="a fire after the restart")
            accepted = submitter.accepted()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = [runtime.store.get(job_id) for job_id in accepted]
                if all(job and job["status"] in FINAL_STATUSES for job in jobs):
                    break
                time.sleep(0.2)
            settled_s = time.monotonic() - up_at
            alive = [process.poll() is None for process in [api, worker, *schedulers]]
            fires, _ = runtime.store.list(allowed_apps=None, source="schedule", limit=200)
            leader = runtime.redis.get(f"{namespace}:scheduler:leader")
            difyq.stop_all()
    finally:
        server.close()

    statuses = [status for _, status, _, _ in submitter.answers]
    unavailable = [(latency, detail) for _, status, latency, detail in submitter.answers if status == 503]
    queries = [fire["request"]["query"] for fire in fires]
    fires_after = [fire for fire in fires if fire["created_at"] > iso_time(up_wall)]
    calls = [call for call in emulator.calls() if str((call.get("body") or {}).get("query", "")).startswith("redis-")]
    slowest = max((latency for latency, _ in unavailable), default=0.0)
    print(f"\nRedis down {up_at - down_at:.1f} s (SIGKILL, AOF restart): {len(accepted)} jobs accepted, "
          f"{len(unavailable)} answered 503 (slowest {slowest:.2f} s), every accepted job "
          f"final {settled_s:.1f} s after Redis was back; {len(calls) - len(accepted)} extra Dify calls; "
          f"{len(fires)} schedule fires, {len(fires_after)} after the restart")
    assert set(statuses) <= {202, 503}, sorted(set(map(str, statuses)))
    assert unavailable and all(detail["retry_after"] == "5" for _, detail in unavailable)  # each within 15 s
    assert {job["status"] for job in jobs} == {"succeeded"}
    assert all(alive), "a process died or restarted instead of reconnecting"
    assert fires_after and len(queries) == len(set(queries)) and leader is not None



def test_hundreds_of_threads_talking_to_redis_at_once_never_run_out_of_connections(redis_url: str,
                                                                                   namespace: str) -> None:
    """A gevent worker has 1000 greenlets; each may hold a Redis connection at the same moment. redis-py 8 caps a
    pool at 100 connections by default and raises beyond that, which would fail jobs under load."""
    runtime = make_runtime(redis_url, namespace, {"support": {"api_key": "app-x", "mode": "chat"}})
    key = f"{namespace}:nothing-comes"
    with ThreadPoolExecutor(max_workers=300) as pool:
        replies = list(pool.map(lambda _: runtime.raw_redis.blpop([key], timeout=0.5), range(300)))
    assert replies == [None] * 300
    runtime.raw_redis.delete(key)
