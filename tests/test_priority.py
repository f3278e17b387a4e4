"""Priority at a saturated Dify key, on real Redis with the emulator over HTTP and an in-process worker: jobs
submitted after a backlog of low-priority ones reach Dify before that backlog."""

from __future__ import annotations

import time

from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.jobs.messages import JOBS_QUEUE, RunHints
from difyq.worker.json_codec import loads
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime
from tests.support.stack import make_runtime, running_worker, wait_for_final

SLOW = EmulatedApp(name="slow", key="app-priority-key-01", mode="chat", tokens_per_second=40, answer_tokens=8)
BACKLOG = 200


def enqueue(runtime: Runtime, query: str, priority: str) -> str:
    submission = JobSubmission(app="slow", query=query, priority=priority)
    return submit(runtime, submission, source="cli", scope="cli").job["id"]


def test_high_priority_jobs_submitted_after_200_low_ones_reach_dify_first(redis_url: str, namespace: str) -> None:
    with start_emulator([SLOW]) as emulator:
        runtime = make_runtime(redis_url, namespace, {"slow": {
            "api_key": SLOW.key, "mode": "chat", "base_url": emulator.base_url, "limits": {"max_concurrency": 1}}})
        for n in range(BACKLOG):
            enqueue(runtime, f"low-{n}", "low")
        with running_worker(runtime, threads=8):
            started = time.monotonic()
            high = [enqueue(runtime, f"high-{n}", "high") for n in range(3)]
            finished = [wait_for_final(runtime, job_id, timeout=30) for job_id in high]
            waited_s = time.monotonic() - started
            queries = [str((call.get("body") or {}).get("query")) for call in emulator.calls()]
            order = [query for query in queries if query.startswith(("low-", "high-"))]
    assert [job["status"] for job in finished] == ["succeeded"] * 3 and finished[0]["priority"] == 1
    highs = [index for index, query in enumerate(order) if query.startswith("high-")]
    lows_before = [query for query in order[:highs[-1]] if query.startswith("low-")]
    print(f"\n3 high jobs after {BACKLOG} low ones at max_concurrency 1: done in {waited_s:.1f} s, "
          f"{len(lows_before)} low calls before the last high one")
    # The low jobs a free slot took while the high ones' messages were still behind the backlog in the queue (one
    # or two on an idle machine, more on a loaded one); first come first served would make them wait for all 200.
    assert len(lows_before) <= BACKLOG // 4, order[:highs[-1] + 1]


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
