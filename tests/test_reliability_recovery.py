"""Recovery building blocks on a real Redis: submit is atomic even when Redis dies mid-stream, the reaper requeues
the jobs of expired leases, a stale redelivery never starts a job behind the reaper's back, and the message
Dramatiq hands back from a dead process and the re-enqueued one of the same job call Dify once."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.middleware import Middleware

from difyq.worker.app import build_broker
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.callback_block import CallbackAttempt, CallbackBlock, CallbackLock
from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.jobs.model import JobRequest, NewJob
from difyq.worker.jobs.schema import JobStatus
from difyq.worker.leases import LEASE_ENV, LeaseKeeper, lease_from_env
from difyq.worker.queue_metrics import QueueCollector
from difyq.worker.runtime import Runtime
from tests.support.stack import make_runtime, running_worker, wait_for_final
from tests.support.waiting import wait_for

APPS = {"support": {"api_key": "app-x", "mode": "chat"}}


def new_job(query: str = "hello") -> NewJob:
    return NewJob(app="support", source="api", request=JobRequest(query=query), scope="client:t")


@pytest.fixture
def runtime(redis_url: str, namespace: str) -> Runtime:
    return make_runtime(redis_url, namespace, APPS)


def wait_for_lapse(runtime: Runtime, job_id: str) -> None:
    """Until the job's lease has expired (by the clock the store judges leases with) and so has the heartbeat of
    the process that started it: that process is dead."""
    heartbeat = runtime.store.keys.worker_alive(runtime.store.fields(job_id)["worker"])
    wait_for(lambda: job_id in runtime.store.expired_leases() and not runtime.raw_redis.exists(heartbeat),
             timeout=10, what=f"the lease of {job_id} and its worker's heartbeat to lapse")


def queued_job_ids(runtime: Runtime, queue: str = JOBS_QUEUE) -> list[str]:
    """The job ids of the messages waiting on ``queue``, front first."""
    client, ns = runtime.raw_redis, runtime.namespace
    ids = []
    for message_id in client.lrange(f"{ns}:{queue}", 0, -1):
        body = client.hget(f"{ns}:{queue}.msgs", message_id)
        ids.append(json.loads(body)["args"][0])
    return ids


def test_the_job_lease_comes_from_the_environment() -> None:
    assert lease_from_env({}) == 30.0
    assert lease_from_env({LEASE_ENV: "2s"}) == 2.0
    for wrong in ("0s", "soon"):
        with pytest.raises(ValueError, match=LEASE_ENV):
            lease_from_env({LEASE_ENV: wrong})


def test_submit_is_atomic_even_when_redis_is_killed_mid_stream(namespace: str) -> None:
    """There is no "record without its message" gap for the reaper to repair: submit.lua writes both in one step.
    Four threads submit while Redis is SIGKILLed; after an AOF restart every job acknowledged to a producer exists,
    and every job record has its message in the queue, and no message lacks its record."""
    server = EmbeddedRedis(appendonly=True, appendfsync="always").start()  # everysec may drop the last second
    runtime = make_runtime(server.url, namespace, APPS)
    acknowledged: list[str] = []
    lock = threading.Lock()

    def submit_until_redis_dies(worker: int) -> None:
        for n in range(100_000):
            try:
                job_id = runtime.store.submit(new_job(f"atomic {worker}-{n}")).job["id"]
            except redis.RedisError:
                return
            with lock:
                acknowledged.append(job_id)

    threads = [threading.Thread(target=submit_until_redis_dies, args=(n,)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) > 50, what="50 submits acknowledged")
        server.process.kill()
        server.process.wait()
        for thread in threads:
            thread.join(timeout=30)
        server.start()
        client, ns = runtime.raw_redis, runtime.namespace
        records = {member.decode() for member in client.zrange(f"{ns}:index:all", 0, -1)}
        statuses = {client.hget(runtime.store.job_key(job_id), "status") for job_id in records}
        queued = queued_job_ids(runtime)
        print(f"\n{len(acknowledged)} submits acknowledged before the SIGKILL, {len(records)} job records after "
              f"the AOF restart, {len(queued)} messages queued")
        assert len(acknowledged) > 50
        assert set(acknowledged) <= records
        assert statuses == {b"queued"}
        assert sorted(queued) == sorted(records)
        assert client.hlen(f"{ns}:{JOBS_QUEUE}.msgs") == len(records)
    finally:
        server.close()


def test_a_stale_redelivery_never_restarts_a_job_behind_the_reapers_back(runtime: Runtime) -> None:
    """A worker died while running the job; its message comes back (Dramatiq's own maintenance, or the reaper)
    before the reaper has seen the expired lease. Starting the job from that message would skip the worker-loss
    count, and a poison message could crash worker after worker without ever reaching the bound."""
    job_id = runtime.store.submit(new_job()).job["id"]
    assert runtime.store.start_attempt(job_id, lease_s=0.05).state == "started"
    wait_for_lapse(runtime, job_id)
    assert runtime.store.start_attempt(job_id, lease_s=30).state == "busy"
    keeper = LeaseKeeper(runtime.store, lease_s=0.05, sweep_s=0.01)
    assert keeper.sweep() == [job_id]
    assert runtime.store.fields(job_id)["worker_losses"] == "1"
    assert runtime.store.start_attempt(job_id, lease_s=30).state == "started"


def test_a_worker_lost_during_the_first_callback_attempt_hands_the_callback_to_the_queue(runtime: Runtime) -> None:
    """The job's worker stores the outcome and sends the first callback attempt itself, under the job's lease; if
    it dies before recording the attempt, the reaper finds the finished job's lease and enqueues the callback."""
    new = NewJob(app="support", source="api", request=JobRequest(query="cb"), scope="client:t",
                 callback_url="http://127.0.0.1:9/hook")
    job_id = runtime.store.submit(new).job["id"]
    assert runtime.store.start_attempt(job_id, lease_s=0.05).state == "started"
    status, record = runtime.store.finish_keeping_callback(
        job_id, JobStatus.SUCCEEDED, lease_s=0.05, lock=CallbackLock(30), result={"answer": "hi"})
    assert status == "succeeded" and record is not None
    assert record["status"] == "succeeded" and json.loads(record["result"]) == {"answer": "hi"}
    assert json.loads(record["callback"])["status"] == "pending"
    running = next(family for family in QueueCollector(runtime.raw_redis, runtime.namespace, ["support"]).collect()
                   if family.name == "difyq_jobs_running")
    assert [sample.value for sample in running.samples] == [0.0], "a job sending its callback is not running"
    assert queued_job_ids(runtime, CALLBACKS_QUEUE) == []
    wait_for_lapse(runtime, job_id)

    keeper = LeaseKeeper(runtime.store, lease_s=0.05, sweep_s=0.01)
    assert keeper.sweep() == [job_id]
    assert queued_job_ids(runtime, CALLBACKS_QUEUE) == [job_id]
    assert runtime.raw_redis.zscore(runtime.store.leases_key, job_id) is None
    assert runtime.store.get(job_id)["status"] == "succeeded", "the outcome is kept"
    runtime.raw_redis.delete(runtime.store.callback_lock_key(job_id))
    runtime.store.callback_attempted(job_id, "succeeded", CallbackBlock("delivered", attempts=1),
                                     CallbackAttempt(time.time(), "job.succeeded", 200, None, 0.01, "delivered"),
                                     retry_in_s=None, lease_of_run=None, lock=None)
    assert runtime.store.start_attempt(job_id, lease_s=0.05).state != "started"
    assert runtime.raw_redis.zscore(runtime.store.leases_key, job_id) is None, "a finished job takes no lease"
    keeper.sweep()
    assert queued_job_ids(runtime, CALLBACKS_QUEUE) == [job_id], "a settled callback is not enqueued again"


def test_after_a_redis_outage_the_reaper_gives_live_workers_a_lease_to_renew(
    runtime: Runtime, redis_url: str, namespace: str
) -> None:
    """While Redis was away no worker could renew, so every lease may have lapsed; sweeping at once would hand
    jobs that are still running to a second worker. The reaper sweeps after one lease of answers from Redis."""
    keeper = LeaseKeeper(make_runtime(redis_url, namespace, APPS).store, lease_s=0.3)
    job_id = runtime.store.submit(new_job()).job["id"]
    runtime.store.start_attempt(job_id, lease_s=0.05)
    wait_for_lapse(runtime, job_id)
    keeper.upkeep()
    assert runtime.store.get(job_id)["status"] == "running", "the first answer from Redis starts the wait"

    def swept() -> bool:
        keeper.upkeep()
        return runtime.store.get(job_id)["status"] == "queued"

    wait_for(swept, timeout=10, what="a sweep once Redis has answered for a lease")
    assert runtime.store.fields(job_id)["worker_losses"] == "1"


def test_the_reaper_leaves_a_live_workers_expired_lease_but_not_a_job_it_no_longer_runs(
    runtime: Runtime, redis_url: str, namespace: str
) -> None:
    """A worker process whose renewals fell behind (starved of CPU) still has its heartbeat, and its last round
    renewed the job's lease: the reaper renews the lease for it instead of running the job again. A job the live
    process no longer runs (Redis lost the write that ended it) is not renewed by its rounds, and is taken back."""
    live = LeaseKeeper(runtime.store, lease_s=1.0)
    reaper = LeaseKeeper(make_runtime(redis_url, namespace, APPS).store, lease_s=1.0, sweep_s=0.01)
    heartbeat = runtime.store.keys.worker_alive(runtime.store.worker_id)
    job_id = runtime.store.submit(new_job()).job["id"]
    runtime.store.start_attempt(job_id, lease_s=0.05)
    live.track(job_id)
    live.upkeep()  # its last round before the starvation
    wait_for(lambda: job_id in runtime.store.expired_leases(), timeout=10, what="the lease to lapse")
    runtime.raw_redis.delete(runtime.store.keys.reaper)
    assert reaper.sweep() == [job_id]
    assert runtime.store.get(job_id)["status"] == "running" and "worker_losses" not in runtime.store.fields(job_id)
    renewed_ms = runtime.raw_redis.zscore(runtime.store.leases_key, job_id)
    assert renewed_ms > time.time() * 1000, "renewed for it"

    # The live process's next round (which no longer renews the job) comes after the reaper's renewal: a round in
    # the same millisecond would still count the renewal as its own.
    wait_for(lambda: time.time() * 1000 > renewed_ms - reaper.lease_s * 1000 + 1, timeout=10,
             what="a millisecond after the renewal")
    live.untrack(job_id)
    live.upkeep()
    wait_for(lambda: job_id in runtime.store.expired_leases(), timeout=10, what="the lease to lapse")
    runtime.raw_redis.delete(runtime.store.keys.reaper)
    assert runtime.raw_redis.exists(heartbeat), "the process is alive"
    assert reaper.sweep() == [job_id]
    assert runtime.store.get(job_id)["status"] == "queued"
    assert runtime.store.fields(job_id)["worker_losses"] == "1"


@pytest.fixture
def emulator() -> Iterator:
    with start_emulator([EmulatedApp(name="chat", key="app-chat-key-0001", mode="chat")]) as running:
        yield running


class Deliveries(Middleware):
    """Counts the ``run_job`` messages a worker processed, per job id."""

    def __init__(self) -> None:
        self.per_job: Counter[str] = Counter()

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if message.actor_name == "run_job":
            self.per_job[str(message.args[0])] += 1


def test_the_redelivered_and_the_reenqueued_message_call_dify_once(
    redis_url: str, namespace: str, emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process fetched the job, started it and died. The reaper requeues the job (expired lease), and
    Dramatiq's recovery hands the dead process's message back too once its heartbeat is two leases old: two
    deliveries, one Dify call, and the job record says who ran it."""
    monkeypatch.setenv(LEASE_ENV, "1s")
    apps = {"chat": {"api_key": "app-chat-key-0001", "mode": "chat", "base_url": emulator.base_url}}
    runtime = make_runtime(redis_url, namespace, apps)
    marker = f"twice-{time.time_ns()}"
    job_id = runtime.store.submit(NewJob(app="chat", source="api", request=JobRequest(query=marker),
                                         scope="client:t")).job["id"]
    dead = build_broker(runtime, lease_from_env())
    consumer = dead.consume(JOBS_QUEUE, prefetch=1, timeout=50)
    fetched = None
    while fetched is None:
        fetched = next(consumer)
    assert fetched.args[0] == job_id
    make_runtime(redis_url, namespace, apps).store.start_attempt(job_id, lease_s=0.2)  # the dead process's store
    deliveries = Deliveries()
    started = time.monotonic()
    with running_worker(runtime, middleware=[deliveries]):
        job = wait_for_final(runtime, job_id, timeout=20)
        recovered_after = time.monotonic() - started
        deadline = time.monotonic() + 20
        while deliveries.per_job[job_id] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        handed_back_after = time.monotonic() - started
    calls = [call for call in emulator.calls() if marker in str(call.get("body"))]
    print(f"\nrecovered and finished {recovered_after:.1f} s after the worker started, the dead process's message "
          f"handed back after {handed_back_after:.1f} s (lease 1 s)")
    assert job["status"] == "succeeded"
    assert deliveries.per_job[job_id] == 2
    assert len(calls) == 1
    assert job["attempts"] == 2 and runtime.store.fields(job_id)["worker_losses"] == "1"
