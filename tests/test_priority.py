"""Priority at a saturated Dify key, on real Redis with the emulator over HTTP and an in-process worker: jobs
submitted after a backlog of low-priority ones reach Dify before that backlog."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker.dify.emulator import EmulatedApp, RunningEmulator, start_emulator
from difyq.worker.jobs.messages import JOBS_QUEUE, RunHints
from difyq.worker.jobs.schema import JobField
from difyq.worker.json_codec import loads
from difyq.worker.queue_metrics import QueueCollector
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime
from tests.support.processes import difyq_processes
from tests.support.stack import make_runtime, wait_for_final
from tests.support.waiting import wait_for

SLOW = EmulatedApp(name="slow", key="app-priority-key-01", mode="chat", tokens_per_second=40, answer_tokens=8)
BACKLOG = 200


def enqueue(runtime: Runtime, query: str, priority: str) -> str:
    submission = JobSubmission(app="slow", query=query, priority=priority)
    return submit(runtime, submission, source="cli", scope="cli").job["id"]


def called_queries(emulator: RunningEmulator) -> list[str]:
    """The queries of the emulator's chat calls, in the order they reached it."""
    return [str((call.get("body") or {}).get("query")) for call in sorted(
        emulator.calls(), key=lambda call: call["started_at"]) if call["method"] == "POST"]


def behind_busy_threads(tmp_path: Path, redis_url: str, namespace: str, backlog: str, later: str,
                        ) -> tuple[list[dict[str, Any]], list[str]]:
    """A worker with 2 threads on a key without limits: 12 jobs of priority ``backlog`` submitted, then 3 of
    priority ``later`` once both threads are busy with slow calls. Every job's final record, and the queries in
    the order they reached Dify."""
    pace = EmulatedApp(name="slow", key=SLOW.key, mode="chat", tokens_per_second=8, answer_tokens=8)
    with start_emulator([pace]) as emulator:
        apps = {"slow": {"api_key": pace.key, "mode": "chat", "base_url": emulator.base_url}}
        runtime = make_runtime(redis_url, namespace, apps)
        with difyq_processes(tmp_path, redis_url, {"apps": apps, "redis": {"namespace": namespace}}) as difyq:
            difyq.start_worker(processes=1, threads=2)
            first = [enqueue(runtime, f"{backlog}-{n}", backlog) for n in range(12)]
            wait_for(lambda: len(emulator.calls()) >= 2, timeout=60, what="both threads busy")
            then = [enqueue(runtime, f"{later}-{n}", later) for n in range(3)]
            finished = [wait_for_final(runtime, job_id, timeout=90) for job_id in [*then, *first]]
            return finished, called_queries(emulator)


@pytest.mark.e2e
def test_high_priority_jobs_submitted_after_200_low_ones_reach_dify_first(tmp_path: Path, redis_url: str,
                                                                         namespace: str) -> None:
    """A worker process on a saturated key (max_concurrency 1): 3 high jobs submitted after 200 low ones are all
    called before most of the backlog; the low share is off here, so only the calls admitted before the high jobs'
    first look at the line are low ones."""
    with start_emulator([SLOW]) as emulator:
        apps = {"slow": {"api_key": SLOW.key, "mode": "chat", "base_url": emulator.base_url,
                         "limits": {"max_concurrency": 1}}}
        jobs = {"low_priority_min_share": 0}
        runtime = make_runtime(redis_url, namespace, apps, jobs=jobs)
        for n in range(BACKLOG):
            enqueue(runtime, f"low-{n}", "low")
        with difyq_processes(tmp_path, redis_url, {"apps": apps, "jobs": jobs,
                                                   "redis": {"namespace": namespace}}) as difyq:
            difyq.start_worker(processes=1, threads=8)
            wait_for(lambda: len(emulator.calls()) >= 1, timeout=60, what="the backlog's first call")
            started = time.monotonic()
            high = [enqueue(runtime, f"high-{n}", "high") for n in range(3)]
            finished = [wait_for_final(runtime, job_id, timeout=60) for job_id in high]
            waited_s = time.monotonic() - started
            queries = called_queries(emulator)
            order = [query for query in queries if query.startswith(("low-", "high-"))]
    assert [job["status"] for job in finished] == ["succeeded"] * 3 and finished[0]["priority"] == 1
    highs = [index for index, query in enumerate(order) if query.startswith("high-")]
    lows_before = [query for query in order[:highs[-1]] if query.startswith("low-")]
    print(f"\n3 high jobs after {BACKLOG} low ones at max_concurrency 1: done in {waited_s:.1f} s, "
          f"{len(lows_before)} low calls before the last high one")
    # The low jobs a free slot took while the high ones' messages were still behind the backlog in the queue (one
    # or two on an idle machine, more on a loaded one); first come first served would make them wait for all 200.
    assert len(lows_before) <= BACKLOG // 4, order[:highs[-1] + 1]


@pytest.mark.e2e
def test_high_priority_jobs_take_the_next_free_worker_threads(tmp_path: Path, redis_url: str, namespace: str) -> None:
    """No limit on the key, the worker's 2 threads busy with slow calls and 12 normal jobs waiting for them: 3 high
    jobs submitted then take the next free threads, passed only by the normal jobs the worker had already fetched
    (its prefetch: one per thread); first come first served would make them wait for all 10."""
    finished, queries = behind_busy_threads(tmp_path, redis_url, namespace, "normal", "high")
    assert {job["status"] for job in finished} == {"succeeded"}
    assert sorted(query for query in queries if query.startswith("high-")) == ["high-0", "high-1", "high-2"]
    highs = [index for index, query in enumerate(queries) if query.startswith("high-")]
    # The two threads take high-0 and high-1 together (either may reach Dify first); high-2 waits for one of them.
    assert queries[highs[-1]] == "high-2", queries
    normal_before = [query for query in queries[2:highs[-1]] if query.startswith("normal-")]
    print(f"\nnormal calls between the high jobs' submit and the last high call: {len(normal_before)} of 10")
    assert len(normal_before) <= 4, queries


@pytest.mark.e2e
def test_normal_jobs_pass_waiting_low_ones_at_the_worker_threads(tmp_path: Path, redis_url: str,
                                                                 namespace: str) -> None:
    """No limit on the key, 12 low jobs submitted to an idle worker with 2 threads: 3 normal jobs submitted once
    both threads are busy are called before any low job but the two running (or one more a thread took meanwhile):
    low messages wait in the low lane, and a worker moves only as many onto the queue as it has free threads."""
    finished, queries = behind_busy_threads(tmp_path, redis_url, namespace, "low", "normal")
    assert {job["status"] for job in finished} == {"succeeded"}
    last_normal = max(index for index, query in enumerate(queries) if query.startswith("normal-"))
    low_before = [query for query in queries[:last_normal] if query.startswith("low-")]
    print(f"\nlow calls before the last of 3 normal jobs submitted after 12 low ones: {len(low_before)} of 12")
    assert len(low_before) <= 3, queries


@pytest.mark.e2e
def test_low_jobs_keep_their_minimum_share_of_the_worker_threads(tmp_path: Path, redis_url: str,
                                                                 namespace: str) -> None:
    """No limit on the key, 3 low jobs then 40 normal ones waiting for the worker's 2 threads: at the default
    jobs.low_priority_min_share (0.1) the worker moves a low job to the head of the queue once per 10 messages it
    fetched, so each low job is called after about 10 more normal ones (never, while normal ones waited, without
    the share; first, in submit order, without the low lane)."""
    quick = EmulatedApp(name="slow", key=SLOW.key, mode="chat", tokens_per_second=0, answer_tokens=3)
    with start_emulator([quick]) as emulator:
        apps = {"slow": {"api_key": quick.key, "mode": "chat", "base_url": emulator.base_url}}
        runtime = make_runtime(redis_url, namespace, apps)
        jobs = [*(enqueue(runtime, f"low-{n}", "low") for n in range(3)),
                *(enqueue(runtime, f"normal-{n}", "normal") for n in range(40))]
        with difyq_processes(tmp_path, redis_url, {"apps": apps, "redis": {"namespace": namespace}}) as difyq:
            difyq.start_worker(processes=1, threads=2)
            finished = [wait_for_final(runtime, job_id, timeout=90) for job_id in jobs]
            queries = called_queries(emulator)
    assert {job["status"] for job in finished} == {"succeeded"}
    lows = [index for index, query in enumerate(queries) if query.startswith("low-")]
    print(f"\nthe low jobs' places among 43 calls with 40 normal jobs waiting (share 0.1): {lows}")
    # About the 11th, 21st and 31st calls; submitted first, they would have been the first three calls.
    assert len(lows) == 3 and lows[0] >= 8 and lows[-1] < 34, queries


def test_every_message_of_a_job_carries_its_priority(redis_url: str, namespace: str) -> None:
    """The submit's, a pause's and a resume's messages name the priority; a message without hints (the reaper's)
    has the worker read it from the record with the app."""
    runtime = make_runtime(redis_url, namespace, {"slow": {"api_key": SLOW.key, "mode": "chat"}})
    store, keys = runtime.store, RedisKeys(namespace)
    job_id = enqueue(runtime, "q", "high")
    assert store.hints_of(job_id) == RunHints("slow", 1, "cli") and store.hints_of("job_missing").app is None

    def hints(bodies_key: str) -> list[object]:
        return [loads(body)["kwargs"].get("priority") for body in runtime.raw_redis.hvals(bodies_key)]

    assert hints(keys.queue_bodies(JOBS_QUEUE)) == [1]
    runtime.raw_redis.delete(keys.queue(JOBS_QUEUE), keys.queue_bodies(JOBS_QUEUE))
    assert store.start_attempt(job_id, lease_s=30).state == "started"
    assert store.pause(job_id, "slow", {"workflow_run_id": "run-1"}, check_in_s=60, priority=1) == "paused"
    assert hints(keys.delayed_bodies(JOBS_QUEUE)) == [1]
    assert store.resume(job_id, "slow", 1).startswith("queued")
    assert hints(keys.queue_bodies(JOBS_QUEUE)) == [1]


@pytest.mark.e2e
def test_low_priority_keeps_its_minimum_share_under_a_flood_of_high(tmp_path: Path, redis_url: str,
                                                                     namespace: str) -> None:
    """A worker process on a key at max_concurrency 1, 30 low jobs waiting and 120 high ones arriving after them:
    with jobs.low_priority_min_share 0.2, about one call in five after the flood began is a low job's. The calls
    take 0.1 s here (0.2 s in the other tests), the 50 counted ones 5 s."""
    share = 0.2
    with start_emulator([replace(SLOW, tokens_per_second=80)]) as emulator:
        apps = {"slow": {"api_key": SLOW.key, "mode": "chat", "base_url": emulator.base_url,
                         "limits": {"max_concurrency": 1}}}
        jobs = {"low_priority_min_share": share}
        runtime = make_runtime(redis_url, namespace, apps, jobs=jobs)
        with difyq_processes(tmp_path, redis_url, {"apps": apps, "jobs": jobs,
                                                   "redis": {"namespace": namespace}}) as difyq:
            difyq.start_worker(processes=1, threads=8)
            for n in range(30):
                enqueue(runtime, f"low-{n}", "low")
            for n in range(120):
                enqueue(runtime, f"high-{n}", "high")

            def flood_calls() -> list[str]:
                queries = called_queries(emulator)
                first_high = next((index for index, query in enumerate(queries) if query.startswith("high-")), None)
                return queries[first_high:] if first_high is not None else []

            calls = wait_for(lambda: (found if len(found := flood_calls()) >= 50 else None), timeout=120,
                             what="50 calls since the first high job's")[:50]
    lows = [query for query in calls if query.startswith("low-")]
    print(f"\n{len(lows)} of the first 50 calls after a flood of high jobs began were low jobs' (share {share})")
    assert int(share * 50) - 2 <= len(lows) <= int(share * 50) + 2, calls


def test_the_queue_depth_counts_the_low_lane(redis_url: str, namespace: str) -> None:
    """difyq_queue_messages{queue="jobs"} counts the jobs waiting in the low lane with the others, and the oldest
    waiting job's age is the low lane's first job's when it is older than the queue's first."""
    runtime = make_runtime(redis_url, namespace, {"slow": {"api_key": SLOW.key, "mode": "chat"}})
    first = enqueue(runtime, "first", "low")
    enqueue(runtime, "second", "low")
    enqueue(runtime, "third", "normal")
    assert runtime.raw_redis.llen(RedisKeys(namespace).low_lane(JOBS_QUEUE)) == 2
    waited_at_least = time.time() - float(runtime.store.fields(first)[JobField.CREATED_AT])
    families = {family.name: family for family in QueueCollector(runtime.raw_redis, namespace).collect()}
    depth, age = ({sample.labels["queue"]: sample.value for sample in families[name].samples}["jobs"]
                  for name in ("difyq_queue_messages", "difyq_oldest_queued_job_age_seconds"))
    assert depth == 3 and age >= waited_at_least - 0.01
