"""JobStore on a real Redis: atomic submit and idempotency, state transitions, cancel, listing, leases."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import redis

from difyq.worker.config import parse_config
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.jobs.callback_block import CallbackAttempt, CallbackBlock, CallbackLock
from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.jobs.model import JobRequest, NewJob, iso_time
from difyq.worker.jobs.schema import JobStatus
from difyq.worker.jobs.store import CancelOutcome, IdempotencyConflict, JobStore
from difyq.worker.leases import LEASE_ENV, MAX_WORKER_LOSSES, LeaseKeeper
from difyq.worker.limits import Admission, KeyLimiter, deferral_delay
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime
from tests.support.job_path import first_attempt_delivered
from tests.support.processes import difyq_processes
from tests.support.stack import make_runtime
from tests.support.waiting import wait_for

APPS = {"support": {"api_key": "app-x", "mode": "chat"}, "other": {"api_key": "app-y", "mode": "workflow"}}


def new_job(query: str = "hello", key: str | None = None, app: str = "support", callback: str | None = None) -> NewJob:
    return NewJob(app=app, source="api", request=JobRequest(query=query), idempotency_key=key, scope="client:t",
                  callback_url=callback)


@pytest.fixture
def runtime(redis_url: str, namespace: str):
    return make_runtime(redis_url, namespace, APPS)


def queue_length(runtime, queue: str = "jobs") -> int:
    return runtime.raw_redis.llen(f"{runtime.namespace}:{queue}")


def test_submit_writes_record_and_message_together(runtime) -> None:
    outcome = runtime.store.submit(new_job())
    job = outcome.job
    assert outcome.created and job["status"] == "queued" and job["id"].startswith("job_")
    assert job["callback"]["status"] == "none" and job["attempts"] == 0
    assert runtime.store.get(job["id"]) == job
    assert queue_length(runtime) == 1


def test_same_key_twenty_times_concurrently_makes_one_job(runtime) -> None:
    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(lambda _: runtime.store.submit(new_job(key="order-42")), range(20)))
    assert sum(o.created for o in outcomes) == 1
    assert len({o.job["id"] for o in outcomes}) == 1
    assert queue_length(runtime) == 1


def test_reused_key_with_a_different_body_is_a_conflict(runtime) -> None:
    first = runtime.store.submit(new_job(key="k1"))
    with pytest.raises(IdempotencyConflict) as caught:
        runtime.store.submit(new_job(query="something else", key="k1"))
    assert caught.value.job_id == first.job["id"]
    other_scope = NewJob(app="support", source="hook", request=JobRequest(query="hello"), idempotency_key="k1",
                         scope="hook:github")
    assert runtime.store.submit(other_scope).created


def stored(runtime, job_id: str) -> dict[str, str]:
    """A job hash without what differs between two submits of one request (id, time, key, message id)."""
    fields = runtime.store.fields(job_id) or {}
    return {k: v for k, v in fields.items() if k not in ("id", "created_at", "idempotency_key", "message")}


def queued_messages(runtime) -> list[dict]:
    """The jobs queue's messages in order, as Dramatiq reads them (ids and timestamps dropped)."""
    queue = f"{runtime.namespace}:jobs"
    ids = runtime.raw_redis.lrange(queue, 0, -1)
    bodies = [runtime.raw_redis.hget(f"{queue}.msgs", message_id) for message_id in ids]
    return [{k: v for k, v in json.loads(body).items() if k in ("queue_name", "actor_name", "args", "kwargs")}
            for body in bodies]


def test_async_submit_is_the_same_submit(runtime) -> None:
    """submit_async (the API's event loop) and submit build one script call: the same record, message, replay
    and conflict, whichever of the two made the job."""
    callback = "https://example.com/cb"

    async def scenario() -> tuple:
        client = runtime.async_redis()
        try:
            created = await runtime.store.submit_async(client, new_job(key="a1", callback=callback))
            replay = await runtime.store.submit_async(client, new_job(key="a1", callback=callback))
            with pytest.raises(IdempotencyConflict) as conflict:
                await runtime.store.submit_async(client, new_job(query="other", key="a1", callback=callback))
            plain = await runtime.store.submit_async(client, new_job(query="no key"))
            return created, replay, conflict.value, plain
        finally:
            await client.aclose()

    created, replay, conflict, plain = asyncio.run(scenario())
    job_id = created.job["id"]
    assert created.created and not replay.created and conflict.job_id == job_id
    assert created.job == replay.job == runtime.store.get(job_id)
    assert plain.created and plain.job["idempotency_key"] is None
    sync = runtime.store.submit(new_job(key="s1", callback=callback))
    assert stored(runtime, job_id) == stored(runtime, sync.job["id"])
    assert runtime.store.submit(new_job(key="a1", callback=callback)).job == created.job
    assert queued_messages(runtime) == [{"queue_name": "jobs", "actor_name": "run_job", "args": [job_id],
                                         "kwargs": {"app": "support", "tenant": "t"}},
                                        {"queue_name": "jobs", "actor_name": "run_job", "args": [plain.job["id"]],
                                         "kwargs": {"app": "support", "tenant": "t"}},
                                        {"queue_name": "jobs", "actor_name": "run_job", "args": [sync.job["id"]],
                                         "kwargs": {"app": "support", "tenant": "t"}}]


def test_a_submit_call_run_again_answers_like_its_first_run(runtime) -> None:
    """A retry after a lost reply (redis-py retries a command once) neither enqueues the job twice nor rewrites a
    job that a worker has started meanwhile."""
    for key in (None, "k-again"):
        call = runtime.store.submit_call(new_job(key=key))
        first = runtime.store.run_submit(call)
        job_id = first.job["id"]
        assert runtime.store.start_attempt(job_id, lease_s=30).state == "started"
        again = runtime.store.run_submit(call)
        assert first.created and again.created and again.job == first.job
        assert runtime.store.get(job_id)["status"] == "running"
    assert len(queued_messages(runtime)) == 2


def test_index_entries_past_the_result_ttl_are_trimmed_a_bounded_batch_at_a_time(runtime, monkeypatch) -> None:
    """submit.lua drops expired index entries on one submit in 8 (by created ms), at most 100 per index each."""
    index, app_index = f"{runtime.namespace}:index:all", f"{runtime.namespace}:index:app:support"
    now_ms = (int(time.time() * 1000) // 8) * 8
    old_ms = now_ms - int(runtime.config.jobs.result_ttl * 1000) - 1
    for key in (index, app_index):
        runtime.raw_redis.zadd(key, {f"job_old{n}": old_ms - n for n in range(250)})
    sizes = []
    for created_ms in (now_ms + 1, now_ms, now_ms + 8, now_ms + 16):
        clock = SimpleNamespace(time=lambda at=created_ms: (at + 0.5) / 1000)
        monkeypatch.setattr("difyq.worker.jobs.store.time", clock)
        runtime.store.submit(new_job())
        sizes.append((runtime.raw_redis.zcard(index), runtime.raw_redis.zcard(app_index)))
    assert sizes == [(251, 251), (152, 152), (53, 53), (4, 4)]


def test_the_upkeep_trims_expired_index_entries_a_bounded_batch_per_index(runtime) -> None:
    """trim_indexes drops up to its limit of entries older than jobs.result_ttl from the index of every job, from
    each app's and from the callbacks' dead letters (whose jobs are gone then), and leaves the newer ones."""
    index, app_index = runtime.store.index_key(None), runtime.store.index_key("support")
    fresh = runtime.store.submit(new_job()).job["id"]  # first: its submit may trim too (one in 8)
    old_ms = int((time.time() - runtime.config.jobs.result_ttl) * 1000) - 1000
    for key in (index, app_index):
        runtime.raw_redis.zadd(key, {f"job_old{n}": old_ms - n for n in range(5)})
    dead_letters = runtime.store.callback_dead_letters_key
    old_s = time.time() - runtime.config.jobs.result_ttl - 1
    runtime.raw_redis.zadd(dead_letters, {**{f"job_old{n}": old_s - n for n in range(4)}, fresh: time.time()})
    assert runtime.store.trim_indexes(["support", "other"], limit=3) == 9
    assert runtime.store.trim_indexes(["support", "other"], limit=3) == 5
    assert runtime.store.trim_indexes(["support", "other"], limit=3) == 0
    for key in (index, app_index, dead_letters):
        assert [member.decode() for member in runtime.raw_redis.zrange(key, 0, -1)] == [fresh]


def test_the_upkeep_trims_the_index_of_an_app_removed_from_the_config(runtime) -> None:
    """An app's index outlives the app's removal from the config; the upkeep's walk of the keyspace finds it and
    trims it like any other, so it goes once its last job has expired."""
    removed = runtime.store.index_key("retired")
    old_ms = int((time.time() - runtime.config.jobs.result_ttl) * 1000) - 1000
    runtime.raw_redis.zadd(removed, {f"job_old{n}": old_ms - n for n in range(4)})
    runtime.raw_redis.zadd(removed, {"job_fresh": int(time.time() * 1000)})
    wait_for(lambda: (runtime.store.trim_indexes(["support", "other"]), runtime.raw_redis.zcard(removed) == 1)[1],
             30, interval=0, what="the removed app's expired entries trimmed")
    assert runtime.raw_redis.zrange(removed, 0, -1) == [b"job_fresh"]
    runtime.raw_redis.zadd(removed, {"job_fresh": old_ms})
    wait_for(lambda: (runtime.store.trim_indexes(["support", "other"]), not runtime.raw_redis.exists(removed))[1],
             30, interval=0, what="the removed app's index gone with its last entry")


def test_the_walk_for_removed_apps_indexes_matches_the_namespace_literally(redis_url: str) -> None:
    """A namespace with glob characters in it is matched as written: the walk finds its own app indexes and not
    those of a namespace its characters would match as a pattern."""
    client = redis.Redis.from_url(redis_url)
    letters = uuid.uuid4().hex[:8]
    keys = RedisKeys(f"odd*[{letters}]?")
    lookalike = RedisKeys(f"odd-any-{letters[0]}!")  # what the namespace matches when read as a pattern
    mine, other = keys.index("app1"), lookalike.index("app1")
    try:
        client.zadd(mine, {"job": 1})
        client.zadd(other, {"job": 1})
        found = {key.decode() for key in client.scan_iter(match=keys.app_indexes(), count=1000, _type="zset")}
        assert mine in found and other not in found
    finally:
        client.delete(mine, other)
        client.close()


def test_a_quiet_service_s_indexes_empty_once_the_result_ttl_passes(tmp_path, redis_url: str, namespace: str) -> None:
    """With no submits after them, the jobs' index entries go once jobs.result_ttl (3 s here) has passed: the
    worker's upkeep trims them (lease 1 s, so its rounds come every third of a second)."""
    with start_emulator([EmulatedApp(name="support", key="app-trim-001", mode="chat")]) as emulator:
        config = {"apps": {"support": {"api_key": "app-trim-001", "mode": "chat", "base_url": emulator.base_url}},
                  "jobs": {"result_ttl": "3s"}, "redis": {"namespace": namespace}}
        runtime = Runtime(parse_config(config), redis_url)
        index, app_index = runtime.store.index_key(None), runtime.store.index_key("support")
        with difyq_processes(tmp_path, redis_url, config) as difyq:
            difyq.env.update({LEASE_ENV: "1s"})
            difyq.start_worker(processes=1, threads=4)
            for n in range(12):
                runtime.store.submit(new_job(query=f"q{n}"))
            assert (runtime.raw_redis.zcard(index), runtime.raw_redis.zcard(app_index)) == (12, 12)
            wait_for(lambda: runtime.raw_redis.zcard(index) + runtime.raw_redis.zcard(app_index) == 0, 60,
                     interval=0.2, what="both job indexes empty after the result TTL")


def test_attempt_lifecycle_and_finish_once(runtime) -> None:
    job_id = runtime.store.submit(new_job(callback="https://example.com/cb")).job["id"]
    start = runtime.store.start_attempt(job_id, lease_s=30)
    assert (start.state, start.attempt, start.first) == ("started", 1, True)
    assert runtime.store.start_attempt(job_id, lease_s=30).state == "busy"
    assert runtime.store.finish(job_id, JobStatus.SUCCEEDED, result={"answer": "hi"}) == "succeeded"
    assert runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "x"}) == "already:succeeded"
    job = runtime.store.get(job_id)
    assert job["status"] == "succeeded" and job["result"] == {"answer": "hi"} and job["error"] is None
    assert job["callback"]["status"] == "pending"
    assert queue_length(runtime, "callbacks") == 1
    assert runtime.store.start_attempt(job_id, lease_s=30).state == "final"
    assert runtime.raw_redis.ttl(runtime.store.job_key(job_id)) > 0


def test_requeue_then_second_attempt(runtime) -> None:
    job_id = runtime.store.submit(new_job()).job["id"]
    runtime.store.start_attempt(job_id, lease_s=30)
    assert runtime.store.requeue(job_id, delay_s=5, error={"code": "http_500"}) == "queued:0"
    job = runtime.store.get(job_id)
    assert job["status"] == "queued" and job["error"]["code"] == "http_500"
    assert runtime.raw_redis.hlen(f"{runtime.namespace}:jobs.DQ.msgs") == 1
    second = runtime.store.start_attempt(job_id, lease_s=30)
    assert (second.attempt, second.first) == (2, False)
    assert runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "http_502"}) == "failed"
    fields = runtime.store.fields(job_id)
    first_error, second_error = runtime.store.get(job_id)["attempt_errors"]
    assert (first_error["attempt"], second_error["attempt"]) == (1, 2)
    assert float(fields["attempt_started_at"]) > float(fields["started_at"]), "each attempt keeps its own start"
    assert second_error["started_at"] == iso_time(fields["attempt_started_at"])
    assert 0 <= second_error["duration_s"] <= float(fields["finished_at"]) - float(fields["attempt_started_at"]) + 0.001
    assert first_error["started_at"] == iso_time(fields["started_at"]) and first_error["duration_s"] >= 0


def test_failed_attempts_are_counted_by_app_and_code_for_the_last_hour(runtime) -> None:
    job_id = runtime.store.submit(new_job()).job["id"]
    for code in ("http_500", "http_500"):
        runtime.store.start_attempt(job_id, lease_s=30)
        assert runtime.store.requeue(job_id, delay_s=0, error={"code": code}).startswith("queued")
    assert runtime.store.requeue(job_id, delay_s=0, error={"code": "not_running"}) == "queued", "not recorded"
    runtime.store.start_attempt(job_id, lease_s=30)
    runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "invalid_api_key"})
    runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "already_final"})
    assert runtime.store.error_counts.last_hour("support") == {"http_500": 2, "invalid_api_key": 1}
    assert runtime.store.error_counts.last_hour("other") == {}


def test_an_error_before_any_attempt_ran_has_no_timing(runtime) -> None:
    job_id = runtime.store.submit(new_job()).job["id"]
    assert runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "rate_limit_wait_exceeded"}) == "failed"
    assert runtime.store.get(job_id)["attempt_errors"] == [{"code": "rate_limit_wait_exceeded", "attempt": 0}]


def test_a_started_attempt_returns_the_record(runtime) -> None:
    job_id = runtime.store.submit(new_job(callback="https://example.com/cb")).job["id"]
    start = runtime.store.start_attempt(job_id, lease_s=30)
    assert (start.state, start.attempt) == ("started", 1)
    assert start.fields == runtime.store.fields(job_id)
    assert start.fields["status"] == "running" and start.fields["callback_url"] == "https://example.com/cb"
    busy = runtime.store.start_attempt(job_id, lease_s=30)
    assert (busy.state, busy.fields) == ("busy", None)


def test_a_start_that_checks_the_key_s_cooldown_starts_nothing_while_it_lasts(runtime) -> None:
    """An app without limits has no admission script: its start reads the key's upstream cooldown, on the
    limiter's clock (a fake one here), as the admission of a key with limits would."""
    now = 1_900_000_000.0
    limiter = KeyLimiter(runtime.limits_redis, runtime.namespace, cooldown_base_s=2.0, clock=lambda: now)
    kid = limiter.key_id("app-x")
    job_id = runtime.store.submit(new_job()).job["id"]
    calm = runtime.store.start_attempt(job_id, lease_s=30, upstream=take(limiter, kid).upstream_check)
    assert (calm.state, calm.attempt, calm.upstream_streak) == ("started", 1, False)
    runtime.store.requeue(job_id, delay_s=0, error={"code": "http_429"})
    limiter.report_upstream_limited(kid)
    now += 0.5
    cooling = runtime.store.start_attempt(job_id, lease_s=30, upstream=take(limiter, kid).upstream_check)
    assert (cooling.state, cooling.wait_s, cooling.fields) == ("cooling", 1.5, None)
    assert deferral_delay(Admission.cooling(cooling.wait_s)) >= 1.5
    record = runtime.store.fields(job_id)
    assert (record["status"], record["attempts"]) == ("queued", "1"), "nothing started, no attempt counted"
    assert runtime.raw_redis.zscore(runtime.store.leases_key, job_id) is None
    now += 1.5
    after = runtime.store.start_attempt(job_id, lease_s=30, upstream=take(limiter, kid).upstream_check)
    assert (after.state, after.attempt, after.upstream_streak) == ("started", 2, True), "its success ends the streak"
    runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "x"})
    assert runtime.store.start_attempt(job_id, lease_s=30, upstream=take(limiter, kid).upstream_check).state == \
        "final"


def take(limiter: KeyLimiter, kid: str) -> Admission:
    """The admission of a job on a key without limits (admitted at once, the cooldown left to the start)."""
    return limiter.acquire(kid, None, estimated_tokens=0, lease_s=30, ticket="job")


def test_a_deferred_job_s_message_names_its_app_and_first_wait(runtime) -> None:
    job_id = runtime.store.submit(new_job()).job["id"]
    runtime.raw_redis.delete(f"{runtime.namespace}:jobs", f"{runtime.namespace}:jobs.msgs")
    assert runtime.store.defer(job_id, "support", delay_s=5, waiting_since=1234.5) == "queued:1"
    runtime.store.defer(job_id, "support", delay_s=5, waiting_since=2000.0)
    bodies = runtime.raw_redis.hvals(f"{runtime.namespace}:jobs.DQ.msgs")
    hints = sorted((json.loads(body)["kwargs"] for body in bodies), key=lambda kwargs: kwargs["waiting_since"])
    assert hints == [{"app": "support", "waiting_since": 1234.5}, {"app": "support", "waiting_since": 2000.0}]
    assert runtime.store.fields(job_id)["waiting_since"] == "1234.5"


def test_cancel_queued_and_running(runtime) -> None:
    queued = runtime.store.submit(new_job(query="a", callback="https://example.com/cb")).job["id"]
    assert runtime.store.cancel(queued).state == "canceled"
    assert runtime.store.get(queued)["status"] == "canceled"
    assert runtime.store.start_attempt(queued, lease_s=30).state == "final"
    assert queue_length(runtime, "callbacks") == 1

    running = runtime.store.submit(new_job(query="b")).job["id"]
    runtime.store.start_attempt(running, lease_s=30)
    assert runtime.store.record_task_ids({running: ("task-1", "run-1"), queued: ("task-0", None)}) == []
    assert "task_id" not in runtime.store.fields(queued)
    outcome = runtime.store.cancel(running)
    assert (outcome.state, outcome.task_id) == ("running", "task-1")
    assert runtime.store.record_task_ids({running: ("task-2", None)}) == [running], "the cancel came first: stop it"
    assert runtime.store.finish(running, JobStatus.SUCCEEDED, result={"answer": "partial"}) == "canceled"


def test_a_paused_job_s_callback_and_its_way_out(runtime) -> None:
    """Pausing enqueues job.paused with a pending block and joins the paused jobs; a job.paused given up is no
    dead letter, an attempt recorded after the job left paused stores nothing, and the cancel of a paused job
    names its run's task id and leaves the paused jobs."""
    job_id = runtime.store.submit(new_job(callback="https://example.com/cb")).job["id"]
    runtime.store.start_attempt(job_id, lease_s=30)
    block = {"workflow_run_id": "run-1", "forms": [], "price": None, "currency": None, "task_id": "task-1"}
    assert runtime.store.pause(job_id, "support", block, check_in_s=60) == "paused"
    assert queue_length(runtime, "callbacks") == 1 and runtime.store.get(job_id)["callback"]["status"] == "pending"
    paused_key = runtime.store.keys.paused
    assert runtime.raw_redis.zscore(paused_key, job_id) is not None
    gone = CallbackAttempt(time.time(), "job.paused", 410, "HTTP 410: the receiver asked to stop", 0.0123, "gone")
    runtime.store.callback_attempted(job_id, "paused", CallbackBlock("failed", attempts=1, last_status_code=410),
                                     gone, retry_in_s=None, lease_of_run=None, lock=None)
    assert runtime.store.get(job_id)["callback"]["status"] == "failed"
    assert runtime.raw_redis.zscore(runtime.store.callback_dead_letters_key, job_id) is None
    outcome = runtime.store.cancel(job_id)
    assert (outcome.state, outcome.task_id) == ("canceled", "task-1")
    assert runtime.raw_redis.zscore(paused_key, job_id) is None
    late = CallbackAttempt(time.time(), "job.paused", 200, None, 0.002, "delivered")
    runtime.store.callback_attempted(job_id, "paused", CallbackBlock("delivered", attempts=2), late, retry_in_s=None,
                                     lease_of_run=None, lock=None)
    callback = runtime.store.get(job_id)["callback"]
    assert callback["status"] == "pending"  # job.canceled's block, left alone
    assert [(entry["event"], entry["status_code"], entry["outcome"], entry["duration_s"])
            for entry in callback["history"]] == [("job.paused", 410, "gone", 0.012), ("job.paused", 200, "delivered",
                                                                                       0.002)]
    assert callback["history"][0]["error"] == "HTTP 410: the receiver asked to stop"

    resumed = runtime.store.submit(new_job(query="resumed")).job["id"]
    runtime.store.start_attempt(resumed, lease_s=30)
    runtime.store.pause(resumed, "support", block, check_in_s=60)
    assert runtime.store.resume(resumed, "support").startswith("queued")
    assert runtime.raw_redis.zscore(paused_key, resumed) is None
    runtime.store.start_attempt(resumed, lease_s=30)
    assert runtime.store.cancel(resumed) == CancelOutcome("running", "task-1")  # the resumed run's task


def test_list_newest_first_with_filters_and_cursor(runtime) -> None:
    ids = []
    for index in range(7):
        ids.append(runtime.store.submit(new_job(query=f"q{index}", app="support" if index % 2 else "other")).job["id"])
        created_ms = runtime.raw_redis.zscore(runtime.store.index_key(None), ids[-1])
        wait_for(lambda created_ms=created_ms: time.time_ns() // 1_000_000 > created_ms, interval=0.001,
                 what="the millisecond after the job's creation (the index orders by it)")
    page, cursor = runtime.store.list(allowed_apps=None, limit=3)
    assert [j["id"] for j in page] == ids[::-1][:3] and cursor
    rest, end = runtime.store.list(allowed_apps=None, limit=10, cursor=cursor)
    assert [j["id"] for j in rest] == ids[::-1][3:] and end is None
    only_support, _ = runtime.store.list(allowed_apps={"support"}, limit=10)
    assert {j["app"] for j in only_support} == {"support"} and len(only_support) == 3
    by_app, _ = runtime.store.list(allowed_apps=None, app="other", limit=10)
    assert len(by_app) == 4
    none_failed, _ = runtime.store.list(allowed_apps=None, status="failed", limit=10)
    assert none_failed == []


def test_pages_split_inside_one_millisecond_lose_and_repeat_no_job(runtime, monkeypatch) -> None:
    """Jobs created in the same millisecond are ordered by id; a page that ends among them resumes after its last
    job, so every job is listed exactly once."""
    frozen_ms = time.time_ns() // 1_000_000
    monkeypatch.setattr("difyq.worker.jobs.store.time", SimpleNamespace(time=lambda: (frozen_ms + 0.5) / 1000))
    ids = {runtime.store.submit(new_job(query=f"q{index}")).job["id"] for index in range(5)}
    listed, cursor = [], None
    while True:
        page, cursor = runtime.store.list(allowed_apps=None, limit=2, cursor=cursor)
        listed += [job["id"] for job in page]
        if cursor is None:
            break
    assert sorted(listed) == sorted(ids) and listed == sorted(ids, reverse=True)


def test_rerun_failed_job(runtime) -> None:
    job_id = runtime.store.submit(new_job()).job["id"]
    runtime.store.start_attempt(job_id, lease_s=30)
    runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "x"})
    assert runtime.store.rerun(job_id) == "queued"
    assert runtime.store.get(job_id)["status"] == "queued"
    assert runtime.raw_redis.ttl(runtime.store.job_key(job_id)) == -1
    assert runtime.store.rerun(job_id) == "queued", "only failed or canceled jobs run again"


def lapsed(runtime, job_id: str) -> bool:
    """The job's lease expired and the heartbeat of the process that started it too (that process is dead)."""
    heartbeat = runtime.store.keys.worker_alive(runtime.store.fields(job_id)["worker"])
    return job_id in runtime.store.expired_leases() and not runtime.raw_redis.exists(heartbeat)


def test_expired_lease_is_swept_back_and_gives_up_after_repeated_losses(runtime) -> None:
    keeper = LeaseKeeper(runtime.store, lease_s=0.05, sweep_s=0.01)
    job_id = runtime.store.submit(new_job()).job["id"]
    for _ in range(MAX_WORKER_LOSSES):
        assert runtime.store.start_attempt(job_id, lease_s=0.05).state == "started"
        wait_for(lambda: lapsed(runtime, job_id), what="the lease and the heartbeat to lapse")
        runtime.raw_redis.delete(f"{runtime.namespace}:reaper")
        assert keeper.sweep() == [job_id]
        assert runtime.store.get(job_id)["status"] == "queued"
    runtime.store.start_attempt(job_id, lease_s=0.05)
    wait_for(lambda: lapsed(runtime, job_id), what="the lease and the heartbeat to lapse")
    runtime.raw_redis.delete(f"{runtime.namespace}:reaper")
    keeper.sweep()
    job = runtime.store.get(job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost"
    fields = runtime.store.fields(job_id)
    assert int(fields["worker_losses"]) == MAX_WORKER_LOSSES + 1
    # The last loss wrote no message (the submit's and the requeues' are queued, nothing more): no worker could
    # start the job before it failed. The failed job's record no longer names a message.
    queued = runtime.raw_redis.lrange(runtime.store.keys.queue(JOBS_QUEUE), 0, -1)
    assert len(queued) == 1 + MAX_WORKER_LOSSES
    assert runtime.raw_redis.hlen(runtime.store.keys.queue_bodies(JOBS_QUEUE)) == len(queued)
    assert "message" not in fields


def test_a_requeue_past_its_count_limit_leaves_the_job_queued_without_a_message(runtime) -> None:
    """The reaper's last requeue of a poison job: the job is queued under a message id that was never written, so
    no worker starts it, and were the reaper to die before failing it, the orphan sweep would find it."""
    job_id = runtime.store.submit(new_job()).job["id"]
    consumed = runtime.raw_redis.lpop(runtime.store.keys.queue(JOBS_QUEUE))
    runtime.store.start_attempt(job_id, lease_s=30)
    runtime.raw_redis.hset(runtime.store.job_key(job_id), "worker_losses", MAX_WORKER_LOSSES)
    state = runtime.store.requeue(job_id, delay_s=0.0, count_field="worker_losses", front=True,
                                  count_limit=MAX_WORKER_LOSSES)
    assert state == f"exhausted:{MAX_WORKER_LOSSES + 1}"
    fields = runtime.store.fields(job_id)
    assert fields["status"] == "queued" and fields["message"].encode() != consumed
    assert runtime.raw_redis.llen(runtime.store.keys.queue(JOBS_QUEUE)) == 0
    assert not runtime.raw_redis.hexists(runtime.store.keys.queue_bodies(JOBS_QUEUE), fields["message"])
    assert runtime.raw_redis.zscore(runtime.store.leases_key, job_id) is None


def test_one_callback_attempt_at_a_time(runtime) -> None:
    """The callback lock is taken once; a second taker learns when the first one's lock lapses."""
    job_id = runtime.store.submit(new_job(callback="https://example.com/cb")).job["id"]
    assert runtime.store.lock_callback(job_id, CallbackLock(5)) is None
    wait_s = runtime.store.lock_callback(job_id, CallbackLock(5))
    assert wait_s is not None and 4 < wait_s <= 5
    runtime.raw_redis.delete(runtime.store.callback_lock_key(job_id))


def test_a_dead_lettered_callback_keeps_the_dead_letters_key_alive_for_the_result_ttl(runtime) -> None:
    """A final job's callback that ends failed is a dead letter, and the dead letters' key expires jobs.result_ttl
    after its newest entry: it never outlives the jobs it names."""
    job_id = runtime.store.submit(new_job(callback="https://example.com/cb")).job["id"]
    runtime.store.start_attempt(job_id, lease_s=30)
    assert runtime.store.finish(job_id, JobStatus.SUCCEEDED, result={"answer": "ok"}) == "succeeded"
    down = CallbackAttempt(time.time(), "job.succeeded", 503, "HTTP 503", 0.01, "failed")
    runtime.store.callback_attempted(job_id, "succeeded", CallbackBlock("failed", attempts=1, last_status_code=503),
                                     down, retry_in_s=None, lease_of_run=None, lock=None)
    dead_letters = runtime.store.callback_dead_letters_key
    assert runtime.raw_redis.zscore(dead_letters, job_id) is not None
    ttl_ms = runtime.raw_redis.pttl(dead_letters)
    assert 0 < ttl_ms <= runtime.config.jobs.result_ttl * 1000


def _failed_with_its_first_callback_attempt_out(store: JobStore) -> tuple[str, str, dict[str, str], CallbackLock]:
    """A job with a callback URL that failed, its worker holding the job's lease and the callback lock for the
    callback's first attempt: the job id, the stored status and record, and the lock."""
    job_id = store.submit(new_job(callback="https://example.com/cb")).job["id"]
    store.start_attempt(job_id, lease_s=30)
    lock = CallbackLock(15)
    final, record = store.finish_keeping_callback(job_id, JobStatus.FAILED, lease_s=30, lock=lock,
                                                  error={"code": "bad_request", "status": 400, "message": "no"})
    assert final == "failed" and record is not None
    return job_id, final, record, lock


def test_a_first_callback_attempt_recorded_after_a_rerun_started_leaves_the_rerun_s_lease(runtime) -> None:
    """A failed job's worker sends the callback's first attempt under the job's lease; an operator reruns the job
    meanwhile and another worker starts it. Recording the late attempt must not drop the lease of the new run
    (nothing would renew it or recover the job if its worker died), nor the new run's worker or message."""
    store = runtime.store
    job_id, final, record, lock = _failed_with_its_first_callback_attempt_out(store)
    assert store.rerun(job_id) == "queued"
    rerun = store.start_attempt(job_id, lease_s=30)
    assert rerun.state == "started"
    running = store.fields(job_id)

    first_attempt_delivered(store, job_id, final, record, lock)
    assert runtime.raw_redis.zscore(store.leases_key, job_id) is not None, "the rerun's lease was dropped"
    after = store.fields(job_id)
    assert after["status"] == "running"
    assert (after["worker"], after["message"]) == (running["worker"], running["message"])


def test_a_first_callback_attempt_recorded_after_a_rerun_ended_leaves_the_rerun_s_callback_lock(runtime) -> None:
    """The same late first attempt, recorded once the rerun has ended too and its worker holds the callback lock
    for the rerun's own first attempt: that lock stays the rerun's, so no other attempt of the rerun's callback
    (a message the orphan sweep gave it) can overlap the one under way."""
    store, lock_key = runtime.store, runtime.store.callback_lock_key
    job_id, final, record, first = _failed_with_its_first_callback_attempt_out(store)
    assert runtime.raw_redis.get(lock_key(job_id)) == first.holder.encode()
    assert store.rerun(job_id) == "queued"
    store.start_attempt(job_id, lease_s=30)
    again = CallbackLock(15)
    rerun_final, rerun_record = store.finish_keeping_callback(job_id, JobStatus.SUCCEEDED, lease_s=30, lock=again,
                                                              result={"answer": "hi"})
    assert rerun_final == "succeeded" and rerun_record is not None

    first_attempt_delivered(store, job_id, final, record, first)
    assert runtime.raw_redis.get(lock_key(job_id)) == again.holder.encode(), "the rerun's callback lock was freed"
    assert store.lock_callback(job_id, CallbackLock(15)) is not None
    first_attempt_delivered(store, job_id, rerun_final, rerun_record, again)
    assert not runtime.raw_redis.exists(lock_key(job_id))
    assert runtime.raw_redis.zscore(store.leases_key, job_id) is None


def test_a_callback_attempt_that_outlived_its_lock_leaves_the_next_attempt_s_lock(runtime) -> None:
    """An attempt whose POST took longer than its lock (the request timeout and a margin) finds the lock taken by
    the next attempt; recording it frees nothing but its own, so the next attempt keeps the job to itself."""
    store = runtime.store
    job_id = store.submit(new_job(callback="https://example.com/cb")).job["id"]
    lock_key = store.callback_lock_key(job_id)
    store.start_attempt(job_id, lease_s=30)
    assert store.finish(job_id, JobStatus.SUCCEEDED, result={"answer": "ok"}) == "succeeded"
    slow = CallbackLock(0.05)
    assert store.lock_callback(job_id, slow) is None
    wait_for(lambda: not runtime.raw_redis.exists(lock_key), 5, what="the slow attempt's lock lapsed")
    following = CallbackLock(15)
    assert store.lock_callback(job_id, following) is None
    late = CallbackAttempt(time.time(), "job.succeeded", 200, None, 0.01, "delivered")
    store.callback_attempted(job_id, "succeeded", CallbackBlock("delivered", attempts=1), late, retry_in_s=None,
                             lease_of_run=None, lock=slow)
    assert runtime.raw_redis.get(lock_key) == following.holder.encode()
    store.callback_attempted(job_id, "succeeded", CallbackBlock("delivered", attempts=2), late, retry_in_s=None,
                             lease_of_run=None, lock=following)
    assert not runtime.raw_redis.exists(lock_key)


def test_a_finished_job_keeps_no_run_state_once_its_lease_is_given_up(runtime) -> None:
    """Once a job is final and its lease given up (by finish, or by the first callback attempt its worker made),
    its record no longer names its last run_job message, which served the orphan sweep of unfinished jobs and
    would only take memory for the result's retention; it still names the worker process that ran it."""
    store = runtime.store
    quiet = store.submit(new_job()).job["id"]
    store.start_attempt(quiet, lease_s=30)
    assert store.finish_keeping_callback(quiet, JobStatus.SUCCEEDED, lease_s=30, lock=CallbackLock(15),
                                         result={"answer": "hi"}) == ("succeeded", None)
    assert "message" not in store.fields(quiet) and store.fields(quiet)["worker"] == store.worker_id

    called = store.submit(new_job(callback="https://example.com/cb")).job["id"]
    store.start_attempt(called, lease_s=30)
    lock = CallbackLock(15)
    final, record = store.finish_keeping_callback(called, JobStatus.SUCCEEDED, lease_s=30, lock=lock,
                                                  result={"answer": "hi"})
    assert record is not None and "message" in store.fields(called)
    first_attempt_delivered(store, called, final, record, lock)
    assert "message" not in store.fields(called) and store.fields(called)["worker"] == store.worker_id
    assert runtime.raw_redis.zscore(store.leases_key, called) is None
