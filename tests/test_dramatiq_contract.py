"""The two places difyq depends on Dramatiq beyond its public API.

The job scripts write Dramatiq's Redis layout (``worker/jobs/messages.py``), so a state change and its message land
in one step. Read back through Dramatiq's public consumer, each kind of message difyq writes must arrive as written;
if a Dramatiq release changes the layout of its queues, these tests fail before any job is lost.

The jobs queue's consumer (``worker/wakeup.py``) reads, through ``worker/dramatiq_prefetch.py``, how many messages
Dramatiq's Redis consumer holds fetched and not yet handed over (its ``message_cache``), to tell a fetch that took
the queue's last message and wait on the wake token instead of fetching again. If a release changes what that list
holds, the test below fails; if it drops the list, the consumer fetches as before."""

from __future__ import annotations

import time

import pytest
from dramatiq.broker import MessageProxy
from dramatiq.common import dq_name

from difyq.worker.app import build_broker
from difyq.worker.dramatiq_prefetch import prefetched
from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.jobs.model import JobRequest, NewJob
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.leases import lease_from_env
from difyq.worker.runtime import Runtime
from tests.support.stack import make_runtime

APPS = {"support": {"api_key": "app-x", "mode": "chat"}}


@pytest.fixture
def runtime(redis_url: str, namespace: str) -> Runtime:
    return make_runtime(redis_url, namespace, APPS)


def consume_one(runtime: Runtime, queue: str, timeout_s: float = 5.0) -> MessageProxy:
    """The next message of ``queue``, as a Dramatiq worker's consumer gets it."""
    consumer = build_broker(runtime, lease_from_env()).consume(queue, prefetch=1, timeout=50)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            consumer.ack(message)
            return message
    raise AssertionError(f"no message on {queue} in {timeout_s} s")


def test_a_submitted_job_is_a_run_job_message_dramatiq_consumes(runtime: Runtime) -> None:
    job_id = runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query="q"),
                                         scope="client:t")).job["id"]
    message = consume_one(runtime, JOBS_QUEUE)
    assert (message.queue_name, message.actor_name, message.args, message.kwargs) == (
        JOBS_QUEUE, "run_job", (job_id,), {"app": "support", "tenant": "t"})


def test_a_retry_is_a_delayed_message_with_its_eta(runtime: Runtime) -> None:
    job_id = runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query="q"),
                                         scope="client:t")).job["id"]
    consume_one(runtime, JOBS_QUEUE)
    runtime.store.start_attempt(job_id, lease_s=30)
    before_ms = int(time.time() * 1000)
    assert runtime.store.requeue(job_id, delay_s=30).startswith("queued")
    message = consume_one(runtime, dq_name(JOBS_QUEUE))
    assert (message.actor_name, message.args) == ("run_job", (job_id,))
    assert before_ms + 29_000 <= message.options["eta"] <= before_ms + 31_000


def test_a_callback_is_a_deliver_callback_message_dramatiq_consumes(runtime: Runtime) -> None:
    job_id = runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query="q"),
                                         scope="client:t", callback_url="http://127.0.0.1:9/hook")).job["id"]
    consume_one(runtime, JOBS_QUEUE)
    runtime.store.start_attempt(job_id, lease_s=30)
    assert runtime.store.finish(job_id, JobStatus.SUCCEEDED, result={"answer": "a"}) == JobStatus.SUCCEEDED
    for _ in range(2):  # the callback finish enqueued, then one enqueued again
        message = consume_one(runtime, CALLBACKS_QUEUE)
        assert (message.queue_name, message.actor_name, message.args) == (
            CALLBACKS_QUEUE, "deliver_callback", (job_id,))
        assert runtime.store.fields(job_id)[JobField.CALLBACK_MESSAGE] == message.options["redis_message_id"]
        assert runtime.store.enqueue_callback(job_id, delay_s=0)


def test_the_redis_consumer_holds_what_a_fetch_took_beyond_the_message_it_hands_over(runtime: Runtime) -> None:
    """A fetch takes as many messages as the consumer may still hold (its prefetch less the messages it handed over
    and has not had acked); ``message_cache`` holds those not handed over yet, and the consumer fetches only once it
    is empty."""
    job_ids = [runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query=str(n)),
                                           scope="client:t")).job["id"] for n in range(4)]
    inner = build_broker(runtime, lease_from_env()).consume(JOBS_QUEUE, prefetch=3, timeout=50).inner
    queue = runtime.store.keys.queue(JOBS_QUEUE)
    first = next(inner)
    assert first is not None and prefetched(inner) == 2 and runtime.raw_redis.llen(queue) == 1
    handed = [first, next(inner), next(inner)]
    assert prefetched(inner) == 0 and runtime.raw_redis.llen(queue) == 1
    assert next(inner) is None, "holding its prefetch, it fetches nothing"
    inner.ack(handed[0])
    last = next(inner)
    assert last is not None and prefetched(inner) == 0 and runtime.raw_redis.llen(queue) == 0
    assert [message.args[0] for message in [*handed, last]] == job_ids
    for message in [*handed[1:], last]:
        inner.ack(message)
