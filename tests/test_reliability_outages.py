"""Outages of what difyq depends on, each followed by recovery: Dify answers 500 for 9 s (about eight calls of each job,
its retries backing off from 0.2 s to 2 s), the callback receiver refuses connections until every callback has
failed twice, Redis hangs (SIGSTOP) under the API. The three run at once in one test, as threads, so the Dify outage
or the Redis hang sets the test's length; each scenario returns its figures and is checked on its own."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from difyq.worker.embedded_redis import EmbeddedRedis, free_port
from difyq.worker.runtime import Runtime
from tests.support.receiver import CallbackReceiver, _Handler, _Server
from tests.support.stack import auth, make_runtime, running_worker, serving_api, wait_for_final
from tests.support.waiting import wait_for

DIFY_OUTAGE_S = 9.0  # with the backoff below (0.2 s doubling to 2 s) each job makes about eight calls, within
# max_attempts (12); a capped gap is ten times the first, so "the retries back off" (3x) holds however late a busy
# machine makes the first retry
FAILED_CALLBACK_ATTEMPTS = 2  # the callback receiver stays down until every callback has failed this often
ANSWER_BOUND_S = 45.0  # the client's timeout, generous: the API's own Redis timeouts answer a POST in about 2 s and
# /readyz in about 8 s while Redis hangs
FLAKY = EmulatedApp(name="flaky", key="app-flaky-key-00001", mode="chat")
STEADY = EmulatedApp(name="steady", key="app-steady-key-0001", mode="chat")


class CallbackReceiverAt(CallbackReceiver):
    """The test receiver on a port chosen beforehand, so callbacks can be aimed at it while it is still down."""

    def __init__(self, port: int):
        super().__init__()
        self.fixed_port = port

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.fixed_port), _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()


def calls_by_query(emulator: RunningEmulator, app: str) -> dict[str, list[float]]:
    """Start times of the emulator's calls for ``app``, per query."""
    found: dict[str, list[float]] = {}
    for call in emulator.calls():
        if call.get("app") == app and isinstance(call.get("body"), dict):
            found.setdefault(call["body"].get("query"), []).append(call["started_at"])
    return found


def enqueue(runtime: Runtime, app: str, query: str, callback_url: str | None = None) -> str:
    return submit(runtime, JobSubmission(app=app, query=query, callback_url=callback_url), source="api",
                  scope="test").job["id"]


def dify_returns_500_for_a_while(runtime: Runtime, emulator: RunningEmulator) -> dict[str, Any]:
    """Ten jobs meet DIFY_OUTAGE_S of 500s; the job's own retries back off (0.2 s doubling to 2 s) until Dify is
    back."""
    emulator.set_app("flaky", fault="http500", until=time.time() + DIFY_OUTAGE_S)
    began = time.monotonic()
    job_ids = [enqueue(runtime, "flaky", f"outage-{n}-{time.time_ns()}") for n in range(10)]
    jobs = {job_id: wait_for_final(runtime, job_id, timeout=DIFY_OUTAGE_S + 40) for job_id in job_ids}
    return {"jobs": jobs, "calls": calls_by_query(emulator, "flaky"), "took_s": time.monotonic() - began}


def callback_receiver_down_then_up(runtime: Runtime, emulator: RunningEmulator) -> dict[str, Any]:
    """Ten jobs finish while their callback URL refuses connections; the receiver comes up after a while."""
    receiver = CallbackReceiverAt(free_port())
    url = f"http://127.0.0.1:{receiver.fixed_port}/callback"
    began = time.monotonic()
    job_ids = [enqueue(runtime, "steady", f"callback-{n}-{time.time_ns()}", url) for n in range(10)]
    wait_for(lambda: all(runtime.store.get(job_id)["callback"]["attempts"] >= FAILED_CALLBACK_ATTEMPTS
                         for job_id in job_ids), timeout=30, what="every callback refused twice")
    down_s = time.monotonic() - began
    with receiver:
        wait_for(lambda: len(receiver.delivered_ids()) >= len(job_ids), timeout=30, what="every callback delivered")
        delivered_after_s = time.monotonic() - began
        wait_for(lambda: all(runtime.store.get(job_id)["callback"]["status"] == "delivered" for job_id in job_ids),
                 timeout=30, what="every callback recorded as delivered")
        jobs = {job_id: runtime.store.get(job_id) for job_id in job_ids}
        return {"jobs": jobs, "delivered": receiver.delivered_ids(), "duplicates": receiver.duplicate_ids(),
                "requests": len(receiver.requests), "delivered_after_s": delivered_after_s, "down_s": down_s}


def redis_hangs(namespace: str) -> dict[str, Any]:
    """Redis stops answering (SIGSTOP: connections open, no replies, as in a network partition): the API answers
    POST /v1/jobs and /readyz with 503 within the client's timeout, /healthz too; it accepts jobs again after."""
    server = EmbeddedRedis().start()
    runtime = make_runtime(server.url, namespace, {"steady": {"api_key": "x", "mode": "chat"}})
    try:
        with serving_api(runtime) as base:
            def post() -> requests.Response:
                return requests.post(f"{base}/v1/jobs", json={"app": "steady", "query": "hang"}, headers=auth(),
                                     timeout=ANSWER_BOUND_S)

            assert post().status_code == 202
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(3) as pool:
                    submitted = pool.submit(post)
                    ready = pool.submit(lambda: requests.get(f"{base}/readyz", timeout=ANSWER_BOUND_S))
                    healthy = pool.submit(lambda: requests.get(f"{base}/healthz", timeout=ANSWER_BOUND_S))
                    outcome = {"post": submitted.result(), "readyz": ready.result(), "healthz": healthy.result()}
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            outcome["after"] = post()
            return outcome
    finally:
        server.close()


def test_dify_callback_receiver_and_redis_outages_each_recover(redis_url: str, namespace: str) -> None:
    with start_emulator([FLAKY, STEADY]) as emulator:
        apps = {app.name: {"api_key": app.key, "mode": "chat", "base_url": emulator.base_url}
                for app in (FLAKY, STEADY)}
        runtime = make_runtime(
            redis_url, namespace, apps,
            jobs={"retry_min_backoff": "0.2s", "retry_max_backoff": "2s", "max_attempts": 12},
            callbacks={"signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "allow_hosts": ["127.0.0.0/8"],
                       "retry_schedule": ["0.5s", "1s", "2s", "3s", "3s", "3s", "3s"], "timeout": "2s"},
        )
        with running_worker(runtime), ThreadPoolExecutor(3) as pool:
            dify = pool.submit(dify_returns_500_for_a_while, runtime, emulator)
            callbacks = pool.submit(callback_receiver_down_then_up, runtime, emulator)
            hang = pool.submit(redis_hangs, f"{namespace}-hang")
            check_dify_outage(dify.result())
            check_callback_outage(callbacks.result())
            check_redis_hang(hang.result())


def check_dify_outage(outcome: dict[str, Any]) -> None:
    jobs, calls = outcome["jobs"], outcome["calls"]
    per_job = {job_id: calls[job["request"]["query"]] for job_id, job in jobs.items()}
    gaps = [[b - a for a, b in itertools.pairwise(times)] for times in per_job.values()]
    total = sum(len(times) for times in per_job.values())
    print(f"\nDify 500 for {DIFY_OUTAGE_S:.0f} s: {len(jobs)} jobs succeeded after {outcome['took_s']:.1f} s with "
          f"{total} Dify calls ({sorted(len(t) for t in per_job.values())} per job); gaps between one job's calls "
          f"grew from {min(g[0] for g in gaps):.1f} s to {max(max(g) for g in gaps):.1f} s")
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    assert all(job["attempts"] == len(per_job[job_id]) for job_id, job in jobs.items())
    assert all(3 <= len(times) <= 12 for times in per_job.values())
    assert all(max(g) >= 3 * g[0] for g in gaps), "the retries back off"


def check_callback_outage(outcome: dict[str, Any]) -> None:
    jobs = outcome["jobs"]
    attempts = sorted(job["callback"]["attempts"] for job in jobs.values())
    print(f"\ncallback receiver down {outcome['down_s']:.1f} s: {len(outcome['delivered'])} callbacks delivered "
          f"{outcome['delivered_after_s']:.1f} s after the jobs were submitted, attempts per callback {attempts}, "
          f"{outcome['requests']} requests reached the receiver, duplicates {outcome['duplicates']}")
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    assert sorted(outcome["delivered"]) == sorted(jobs) and outcome["duplicates"] == []
    assert all(job["callback"]["status"] == "delivered" and job["callback"]["attempts"] > 1 for job in jobs.values())


def check_redis_hang(outcome: dict[str, Any]) -> None:
    post, ready, health = outcome["post"], outcome["readyz"], outcome["healthz"]
    print(f"\nRedis hung (SIGSTOP): POST /v1/jobs {post.status_code} after {post.elapsed.total_seconds():.1f} s, "
          f"/readyz {ready.status_code} after {ready.elapsed.total_seconds():.1f} s, /healthz {health.status_code} "
          f"after {health.elapsed.total_seconds():.2f} s")
    assert post.status_code == 503 and post.headers["Retry-After"] == "5"
    assert ready.status_code == 503 and ready.headers["Retry-After"] == "5"
    assert health.status_code == 200
    assert outcome["after"].status_code == 202

