"""Worker deaths with real ``difyq worker`` processes ("pods": a Dramatiq master and its children, killed or stopped
as a whole, as Kubernetes does): SIGKILL one of two pods mid-stream, SIGTERM one mid-call, and a poison job that
kills every pod that runs it. The lease is 2 s here (``DIFYQ_JOB_LEASE``; 1.5 s for the poison job, 4 s for the
stopped pod) so recovery takes seconds; the figures printed scale with it (30 s in production: see
test_reliability_recovery)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker.config import parse_config
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.jobs.schema import FINAL_STATUSES
from difyq.worker.leases import LEASE_ENV, MAX_WORKER_LOSSES
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime
from tests.support.processes import DifyqProcesses, difyq_processes, terminate_together, wait_for_port
from tests.support.receiver import CallbackReceiver
from tests.support.stack import CLIENT_TOKEN, SIGNING_SECRET
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

LEASE = "2s"
EMULATED = [
    EmulatedApp(name="stream", key="app-stream-key-0001", mode="chat", tokens_per_second=20, answer_tokens=10),
    EmulatedApp(name="slow", key="app-slow-key-000001", mode="chat", tokens_per_second=2, answer_tokens=16),
    EmulatedApp(name="poison", key="app-poison-key-0001", mode="chat", tokens_per_second=1, answer_tokens=120),
    EmulatedApp(name="brief", key="app-brief-key-00001", mode="chat", tokens_per_second=2, answer_tokens=6),
]


@pytest.fixture(scope="module")
def emulator() -> Iterator:
    with start_emulator(EMULATED) as running:
        yield running


def config_for(namespace: str, emulator_url: str) -> dict[str, Any]:
    return {
        "apps": {app.name: {"api_key": app.key, "mode": "chat", "base_url": emulator_url} for app in EMULATED},
        "clients": {"full": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8"],
                      "retry_schedule": ["0.2s", "0.5s", "1s", "2s"]},
        "jobs": {"retry_min_backoff": "0.1s", "retry_max_backoff": "0.5s"},
        "redis": {"namespace": namespace},
    }


class Pods:
    """Worker pods of one test: ``difyq worker`` masters, each in its own process group."""

    def __init__(self, difyq: DifyqProcesses, threads: int):
        self.difyq = difyq
        self.threads = threads
        self.started = 0
        difyq.env[LEASE_ENV] = LEASE

    def start(self) -> subprocess.Popen[bytes]:
        """A new pod, once its worker process is up."""
        self.started += 1
        process, _ = self.difyq.start_worker(processes=1, threads=self.threads, name=f"pod-{self.started}")
        return process

    def start_together(self, count: int) -> list[subprocess.Popen[bytes]]:
        """``count`` new pods started side by side, once the worker process of each is up."""
        started = [self.replace_with_metrics() for _ in range(count)]
        for process, metrics_port in started:
            wait_for_port(metrics_port, process=process)
        return [process for process, _ in started]

    def replace_with_metrics(self) -> tuple[subprocess.Popen[bytes], int]:
        """A new pod, without waiting for it, and the port its metrics will be served on."""
        self.started += 1
        return self.difyq.launch_worker(processes=1, threads=self.threads, name=f"pod-{self.started}")

    def replace(self) -> subprocess.Popen[bytes]:
        """A new pod, without waiting for it (as a restarted Kubernetes pod comes up on its own)."""
        return self.replace_with_metrics()[0]

    @staticmethod
    def worker_ids(pod: subprocess.Popen[bytes]) -> set[str]:
        """The processes of this pod, as ``process_of`` names them."""
        host = os.uname().nodename
        try:
            return {f"{host}:{child.pid}" for child in psutil.Process(pod.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    @staticmethod
    def stop_together(pods: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
        """One SIGTERM to each live pod at once (as a rollout would): the pods' shutdowns overlap instead of
        following each other."""
        terminate_together(pods, timeout)

    @staticmethod
    def kill(pod: subprocess.Popen[bytes]) -> None:
        """SIGKILL the whole pod (master and children) at once."""
        os.killpg(pod.pid, signal.SIGKILL)
        pod.wait()


def process_of(record: dict[str, str]) -> str | None:
    """The process (host:pid) of the ``worker`` field of a job record (host:pid:token), if it has one."""
    worker = record.get("worker")
    return worker.rsplit(":", 1)[0] if worker else None


def enqueue(runtime: Runtime, app: str, marker: str, callback_url: str | None = None) -> str:
    return submit(runtime, JobSubmission(app=app, query=marker, callback_url=callback_url), source="api",
                  scope="test").job["id"]


def unique_queries(prefix: str, count: int) -> list[str]:
    """Unique queries, so the emulator's call log tells the jobs apart."""
    return [f"{prefix}-{n}-{time.time_ns()}" for n in range(count)]


def records(runtime: Runtime, job_ids: list[str]) -> dict[str, dict[str, str]]:
    pipe = runtime.redis.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hgetall(runtime.store.job_key(job_id))
    return dict(zip(job_ids, pipe.execute(), strict=True))


def wait_until_settled(runtime: Runtime, job_ids: list[str], timeout: float) -> dict[str, dict[str, str]]:
    """Poll until every job is final and its callback (if any) is no longer pending."""
    deadline = time.monotonic() + timeout
    while True:
        found = records(runtime, job_ids)
        if all(r.get("status") in FINAL_STATUSES and '"pending"' not in r.get("callback", "") for r in found.values()):
            return found
        if time.monotonic() > deadline:
            stuck = {job_id: r.get("status") for job_id, r in found.items() if r.get("status") not in FINAL_STATUSES}
            raise AssertionError(f"{len(stuck)} jobs did not settle in {timeout} s: {list(stuck.items())[:5]}")
        time.sleep(0.1)


def dify_calls(emulator, queries: dict[str, str]) -> dict[str, int]:
    """Dify calls per job id, counted at the emulator by each job's unique query."""
    jobs_by_query = {query: job_id for job_id, query in queries.items()}
    counts = dict.fromkeys(queries, 0)
    for call in emulator.calls():
        body = call.get("body")
        query = body.get("query") if isinstance(body, dict) else None
        if query in jobs_by_query:
            counts[jobs_by_query[query]] += 1
    return counts


def dead_consumer_jobs(runtime: Runtime, killed_at_ms: int) -> set[str]:
    """The jobs whose messages sit in the ack sets of consumers silent since the kill."""
    client, ns = runtime.raw_redis, runtime.namespace
    silent = [member.decode() for member in client.zrangebyscore(f"{ns}:__heartbeats__", "-inf", killed_at_ms)]
    held = set()
    for broker in silent:
        for message_id in client.smembers(f"{ns}:__acks__.{broker}.{JOBS_QUEUE}"):
            body = client.hget(f"{ns}:{JOBS_QUEUE}.msgs", message_id)
            if body:
                held.add(json.loads(body)["args"][0])
    return held


@pytest.mark.slow
def test_sigkill_one_of_two_worker_pods_while_200_jobs_stream(
    tmp_path: Path, redis_url: str, namespace: str, emulator
) -> None:
    """200 half-second jobs stream into two pods of 8 threads; one pod is SIGKILLed with its threads busy. Its
    running jobs come back through their expired leases, its prefetched ones through the reaper's hand-back of
    the dead consumer's messages; every job succeeds with one delivered callback, and the only duplicate Dify
    calls are the ones the dead pod had in flight."""
    config = config_for(namespace, emulator.base_url)
    runtime = Runtime(parse_config(config), redis_url)
    with difyq_processes(tmp_path, redis_url, config) as difyq, CallbackReceiver() as receiver:
        pods = Pods(difyq, threads=8)
        victim, survivor = pods.start_together(2)
        queries: dict[str, str] = {}

        def stream_jobs() -> None:
            for n in range(200):
                query = f"sigkill-{n}-{time.time_ns()}"
                queries[enqueue(runtime, "stream", query, receiver.url)] = query
                time.sleep(0.02)

        started = time.monotonic()
        producer = threading.Thread(target=stream_jobs)
        producer.start()
        victim_ids = pods.worker_ids(victim)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snapshot = records(runtime, list(queries))
            running = [r for r in snapshot.values() if r.get("status") == "running" and process_of(r) in victim_ids]
            done = [r for r in snapshot.values() if r.get("status") in FINAL_STATUSES]
            if len(running) >= 6 and len(done) >= 20:
                break
            time.sleep(0.05)
        killed_at, killed_at_ms = time.monotonic(), int(time.time() * 1000)
        Pods.kill(victim)
        at_kill = records(runtime, list(queries))
        in_flight = {job_id for job_id, r in at_kill.items()
                     if r.get("status") == "running" and process_of(r) in victim_ids}
        # A consumer silent since the kill is the dead pod's once the survivor has beaten after it.
        wait_for(lambda: runtime.raw_redis.zcount(f"{namespace}:__heartbeats__", killed_at_ms + 1, "+inf") > 0)
        held = {job_id for job_id in dead_consumer_jobs(runtime, killed_at_ms)
                if at_kill.get(job_id, {}).get("status") not in FINAL_STATUSES} | in_flight
        recovered_at: dict[str, float] = {}
        while set(recovered_at) != held and time.monotonic() < killed_at + 30:
            for job_id, record in records(runtime, sorted(held - set(recovered_at))).items():
                if record.get("status") in FINAL_STATUSES or process_of(record) not in victim_ids | {None}:
                    recovered_at[job_id] = time.monotonic() - killed_at
            time.sleep(0.05)
        producer.join()
        settled = wait_until_settled(runtime, list(queries), timeout=90)
        total_s = time.monotonic() - started
        assert survivor.poll() is None

    calls = dify_calls(emulator, queries)
    duplicates = sum(count - 1 for count in calls.values() if count > 1)
    prefetched = held - in_flight
    lease_path = max((recovered_at[j] for j in in_flight if j in recovered_at), default=0.0)
    prefetch_path = max((recovered_at[j] for j in prefetched if j in recovered_at), default=0.0)
    print(f"\nSIGKILL of pod-1 with {len(in_flight)} jobs running and {len(prefetched)} prefetched "
          f"({len(queries)} jobs in all, lease {LEASE}): running jobs started again elsewhere within "
          f"{lease_path:.1f} s (lease path), prefetched ones within {prefetch_path:.1f} s (dead-consumer path); "
          f"{duplicates} duplicate Dify calls (bound: {len(in_flight)} in flight); all settled in {total_s:.1f} s")
    assert len(queries) == 200 and in_flight
    assert set(recovered_at) == held, f"not recovered within 30 s: {sorted(held - set(recovered_at))}"
    assert {r["status"] for r in settled.values()} == {"succeeded"}
    assert runtime.raw_redis.zcard(RedisKeys(namespace).pending_of_app("stream")) == 0  # max_pending's count
    assert sorted(receiver.delivered_ids()) == sorted(queries)
    assert all(count >= 1 for count in calls.values())
    assert duplicates <= len(in_flight)


def test_a_pod_whose_threads_are_busy_leaves_new_jobs_to_a_pod_with_free_ones(
    tmp_path: Path, redis_url: str, namespace: str, emulator
) -> None:
    """A pod fetches no more jobs than it has threads: with both threads of pod 1 on 8 s calls, the next jobs stay
    in Redis, and pod 2 runs them while pod 1's calls go on (they do not wait behind them)."""
    config = config_for(namespace, emulator.base_url)
    runtime = Runtime(parse_config(config), redis_url)
    with difyq_processes(tmp_path, redis_url, config) as difyq:
        pods = Pods(difyq, threads=2)
        busy = pods.start()
        running = {enqueue(runtime, "slow", marker): marker for marker in unique_queries("busy-running", 2)}
        wait_for(lambda: all(r.get("status") == "running" for r in records(runtime, sorted(running)).values()))
        # Had pod 1 fetched them (it is woken by the enqueue, long before pod 2 is up), pod 1 would run them once
        # its calls end, and the check of who ran them below would fail.
        waiting = {enqueue(runtime, "stream", marker): marker for marker in unique_queries("busy-waiting", 2)}
        free = pods.start()
        settled = wait_until_settled(runtime, sorted(waiting), timeout=20)
        still_running = records(runtime, sorted(running))
        free_ids = pods.worker_ids(free)
        busy_ids = pods.worker_ids(busy)
    assert {r["status"] for r in settled.values()} == {"succeeded"}
    assert all(process_of(record) in free_ids for record in settled.values())
    assert all(r["status"] == "running" and process_of(r) in busy_ids for r in still_running.values())


@pytest.mark.slow
def test_sigterm_finishes_running_jobs_and_hands_back_the_rest_without_a_duplicate_call(
    tmp_path: Path, redis_url: str, namespace: str, emulator
) -> None:
    """Pod 1 runs two 8 s calls and holds two prefetched jobs when it gets SIGTERM; pod 2 is up. Pod 1 finishes
    its calls (its leases stay renewed meanwhile, so pod 2's reaper leaves them alone) and hands the prefetched
    jobs back to pod 2; every job is one Dify call. (A pod prefetches beyond its threads only when
    ``dramatiq_queue_prefetch`` says so, as here.)"""
    config = config_for(namespace, emulator.base_url)
    runtime = Runtime(parse_config(config), redis_url)
    with difyq_processes(tmp_path, redis_url, config) as difyq:
        difyq.env["dramatiq_queue_prefetch"] = "4"
        pods = Pods(difyq, threads=2)
        stopping = pods.start()
        stopping_ids = pods.worker_ids(stopping)
        running = {enqueue(runtime, "slow", marker): marker for marker in unique_queries("sigterm-running", 2)}
        wait_for(lambda: all(r.get("status") == "running" for r in records(runtime, sorted(running)).values()))
        prefetched = {enqueue(runtime, "stream", marker): marker for marker in unique_queries("sigterm-prefetched", 2)}
        wait_for(lambda: runtime.raw_redis.llen(f"{namespace}:{JOBS_QUEUE}") == 0)
        pods.start()
        stop_started = time.monotonic()
        exit_code = difyq.stop(stopping, timeout=30)
        stop_s = time.monotonic() - stop_started
        settled = wait_until_settled(runtime, sorted(running | prefetched), timeout=30)

    calls = dify_calls(emulator, running | prefetched)
    print(f"\nSIGTERM with {len(running)} calls in flight and {len(prefetched)} jobs prefetched: the pod stopped in "
          f"{stop_s:.1f} s (exit {exit_code}); Dify calls per job {sorted(calls.values())}")
    assert exit_code == 0
    assert {r["status"] for r in settled.values()} == {"succeeded"}
    assert set(calls.values()) == {1}
    assert all(process_of(settled[job_id]) in stopping_ids for job_id in running)
    assert all(process_of(settled[job_id]) not in stopping_ids for job_id in prefetched)
    assert not any("worker_losses" in r for r in settled.values())


@pytest.mark.slow
def test_a_stopped_pod_keeps_its_job_past_its_lease_and_a_killed_one_loses_it(
    tmp_path: Path, redis_url: str, namespace: str, emulator
) -> None:
    """A live process starved of CPU (here SIGSTOPped, the extreme case) past its job's lease keeps the job: the
    other pod's reaper sees the process's heartbeat and renews the lease instead of running the job again, and
    after SIGCONT the job ends with one Dify call. A SIGKILLed pod's job is run again by the other pod. The jobs
    are 3 s calls: the stopped one's call is still open when the pod stops, and goes on after SIGCONT."""
    config = config_for(namespace, emulator.base_url)
    runtime = Runtime(parse_config(config), redis_url)
    leases = RedisKeys(namespace).leases
    with difyq_processes(tmp_path, redis_url, config) as difyq:
        pods = Pods(difyq, threads=1)
        difyq.env[LEASE_ENV] = "4s"  # the heartbeat outlives a round by 8 s: room for this test's polling
        both = tuple(pods.start_together(2))

        def pod_calling(job_id: str, queries: dict[str, str]) -> subprocess.Popen[bytes] | None:
            """The pod running the job, once its Dify call is open at the emulator (a pod stopped or killed before
            that would not have called Dify yet)."""
            record = runtime.store.fields(job_id) or {}
            running = record.get("status") == "running" and dify_calls(emulator, queries)[job_id] == 1
            return next((pod for pod in both if running and process_of(record) in pods.worker_ids(pod)), None)

        kept = {enqueue(runtime, "brief", marker): marker for marker in unique_queries("stopped", 1)}
        kept_id = next(iter(kept))
        stopped = wait_for(lambda: pod_calling(kept_id, kept), timeout=30)
        stopped_ids = pods.worker_ids(stopped)
        os.killpg(stopped.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: (runtime.raw_redis.zscore(leases, kept_id) or float("inf")) < time.time() * 1000,
                     timeout=20)
            # Only the other pod's reaper can push it forward now: it found the lease expired and kept it.
            wait_for(lambda: (runtime.raw_redis.zscore(leases, kept_id) or 0) > time.time() * 1000, timeout=20)
            record_while_stopped = runtime.store.fields(kept_id) or {}
        finally:
            os.killpg(stopped.pid, signal.SIGCONT)
        kept_settled = wait_until_settled(runtime, [kept_id], timeout=60)

        lost = {enqueue(runtime, "brief", marker): marker for marker in unique_queries("killed", 1)}
        lost_id = next(iter(lost))
        Pods.kill(wait_for(lambda: pod_calling(lost_id, lost), timeout=30))
        lost_settled = wait_until_settled(runtime, [lost_id], timeout=60)

    assert record_while_stopped["status"] == "running"
    assert process_of(kept_settled[kept_id]) in stopped_ids
    assert kept_settled[kept_id]["status"] == "succeeded" and "worker_losses" not in kept_settled[kept_id]
    assert dify_calls(emulator, kept) == {kept_id: 1}
    assert lost_settled[lost_id]["status"] == "succeeded" and lost_settled[lost_id]["worker_losses"] == "1"
    assert dify_calls(emulator, lost)[lost_id] == 2


@pytest.mark.slow
def test_a_job_that_kills_every_worker_running_it_fails_after_a_bounded_number_of_crashes(
    tmp_path: Path, redis_url: str, namespace: str, emulator
) -> None:
    """Whichever pod starts the poison job dies (SIGKILLed from outside, as an OOM kill would) and is replaced;
    the job ends failed ``worker_lost`` after MAX_WORKER_LOSSES + 1 crashes, its failure callback is delivered,
    and the other jobs are not held up. The lease is 1.5 s here: each crash is noticed once the dead pod's
    heartbeat (two leases) has lapsed."""
    config = config_for(namespace, emulator.base_url)
    runtime = Runtime(parse_config(config), redis_url)
    lease = "1.5s"
    with difyq_processes(tmp_path, redis_url, config) as difyq, CallbackReceiver() as receiver:
        pods = Pods(difyq, threads=2)
        difyq.env[LEASE_ENV] = lease
        live = pods.start_together(2)
        started = time.monotonic()
        poison = enqueue(runtime, "poison", f"poison-{time.time_ns()}", receiver.url)
        crashes = 0
        healthy: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = runtime.store.fields(poison) or {}
            if record.get("status") in FINAL_STATUSES:
                break
            if record.get("status") == "running":
                host = next((pod for pod in live if process_of(record) in pods.worker_ids(pod)), None)
                if host is not None:
                    Pods.kill(host)
                    crashes += 1
                    healthy.append(enqueue(runtime, "stream", f"healthy-{crashes}-{time.time_ns()}"))
                    live[live.index(host)] = pods.replace()
            time.sleep(0.05)
        failed_after_s = time.monotonic() - started
        settled = wait_until_settled(runtime, [poison, *healthy], timeout=60)
        receiver.wait_for(1, timeout=20)
        Pods.stop_together(live)

    poisoned = runtime.store.get(poison)
    print(f"\npoison job: {crashes} worker crashes, failed {poisoned['error']['code']} after {failed_after_s:.1f} s "
          f"(lease {lease}); attempts {poisoned['attempts']}")
    assert poisoned["status"] == "failed" and poisoned["error"]["code"] == "worker_lost"
    assert crashes == MAX_WORKER_LOSSES + 1
    assert settled[poison]["worker_losses"] == str(MAX_WORKER_LOSSES + 1)
    assert poisoned["callback"]["status"] == "delivered" and receiver.delivered_ids() == [poison]
    keys = RedisKeys(namespace)
    assert runtime.raw_redis.zcard(keys.pending_of_app("poison")) == 0  # max_pending's count, after 4 crashes
    assert runtime.raw_redis.zcard(keys.pending_of_app("stream")) == 0
    assert all(settled[job_id]["status"] == "succeeded" for job_id in healthy)
