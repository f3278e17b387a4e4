"""An idle worker's consumer of the jobs queue is woken by the token a new job leaves (``worker/wakeup.py``):
one token at most waits, a consumer takes it only when it could take a job, and every message still goes through
Dramatiq's own fetch and ack."""

from __future__ import annotations

import threading
import time

import pytest
from dramatiq import Message
from dramatiq.common import dq_name
from dramatiq.errors import ConnectionClosed

from difyq.worker.app import build_broker
from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.jobs.model import JobRequest, NewJob
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.leases import lease_from_env
from difyq.worker.redis_keys import RedisKeys
from difyq.worker.runtime import Runtime
from difyq.worker.wakeup import DelayConsumer, WakingConsumer
from tests.support.stack import make_runtime
from tests.support.waiting import wait_for

APPS = {"support": {"api_key": "app-x", "mode": "chat"}}


@pytest.fixture
def runtime(redis_url: str, namespace: str) -> Runtime:
    return make_runtime(redis_url, namespace, APPS)


def submit(runtime: Runtime) -> str:
    return runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query="q"),
                                       scope="client:t")).job["id"]


def tokens(runtime: Runtime) -> int:
    return int(runtime.raw_redis.llen(RedisKeys(runtime.namespace).wake(JOBS_QUEUE)))


def test_submits_leave_one_token_at_most(runtime: Runtime) -> None:
    submit(runtime)
    submit(runtime)
    assert tokens(runtime) == 1


def test_a_rerun_leaves_a_token(runtime: Runtime) -> None:
    """An operator's rerun puts the job's new message on the queue: an idle worker takes it at once, not at the end
    of its wait."""
    job_id = submit(runtime)
    runtime.store.start_attempt(job_id, lease_s=30)
    assert runtime.store.finish(job_id, JobStatus.FAILED, error={"code": "bad_request", "message": "no"}) == "failed"
    runtime.raw_redis.delete(RedisKeys(runtime.namespace).wake(JOBS_QUEUE))
    assert runtime.store.rerun(job_id) == "queued"
    assert tokens(runtime) == 1


def test_only_the_jobs_queue_has_a_waking_consumer(runtime: Runtime) -> None:
    broker = build_broker(runtime, lease_from_env())
    assert isinstance(broker.consume(JOBS_QUEUE, prefetch=1, timeout=50), WakingConsumer)
    assert isinstance(broker.consume(dq_name(JOBS_QUEUE), prefetch=1, timeout=50), DelayConsumer)
    for queue in (CALLBACKS_QUEUE, dq_name(CALLBACKS_QUEUE)):
        assert not isinstance(broker.consume(queue, prefetch=1, timeout=50), WakingConsumer | DelayConsumer)


def test_an_idle_consumer_waits_on_the_token_and_a_submit_wakes_it(runtime: Runtime) -> None:
    consumer = build_broker(runtime, lease_from_env()).consume(JOBS_QUEUE, prefetch=4, timeout=1000)
    job_id = submit(runtime)
    message = wait_for(lambda: next(consumer), timeout=10, what="the submitted job's message")
    assert message.args == (job_id,)
    consumer.ack(message)
    wait_for(lambda: next(consumer) is None and tokens(runtime) == 0, timeout=10,
             what="the empty queue's consumer takes the token")
    woken = threading.Event()

    def wait_once() -> None:
        assert next(consumer) is None  # the token woke it; the job comes with the next fetch
        woken.set()

    waiter = threading.Thread(target=wait_once)
    waiter.start()
    second = submit(runtime)
    waiter.join(timeout=10)
    assert woken.is_set()
    assert tokens(runtime) == 0
    message = wait_for(lambda: next(consumer), timeout=10, what="the second job's message")
    assert message.args == (second,)
    consumer.ack(message)


def test_a_consumer_holding_its_prefetch_leaves_the_token_to_others(runtime: Runtime) -> None:
    consumer = build_broker(runtime, lease_from_env()).consume(JOBS_QUEUE, prefetch=1, timeout=50)
    submit(runtime)
    held = wait_for(lambda: next(consumer), timeout=10, what="the first job's message")
    submit(runtime)
    assert next(consumer) is None
    assert tokens(runtime) == 1
    consumer.ack(held)
    assert wait_for(lambda: next(consumer), timeout=10, what="the second job after the ack") is not None


def test_after_a_fetch_that_took_the_queue_s_last_message_a_consumer_waits_on_the_token(runtime: Runtime) -> None:
    """A fetch that took fewer messages than it asked for found the queue empty, and whatever came since left a
    token: the consumer waits on the token at once instead of fetching again. A message put on the queue without
    one (Dramatiq's recovery of a dead worker's messages) is fetched when that wait ends."""
    consumer = build_broker(runtime, lease_from_env()).consume(JOBS_QUEUE, prefetch=4, timeout=200)
    first = submit(runtime)
    message = wait_for(lambda: next(consumer), timeout=10, what="the first job's message")
    assert message.args == (first,)
    second = submit(runtime)
    runtime.raw_redis.delete(RedisKeys(runtime.namespace).wake(JOBS_QUEUE))
    assert next(consumer) is None
    assert runtime.raw_redis.llen(RedisKeys(runtime.namespace).queue(JOBS_QUEUE)) == 1, "it fetched again"
    following = wait_for(lambda: next(consumer), timeout=10, what="the second job once the wait ended")
    assert following.args == (second,)
    for held in (message, following):
        consumer.ack(held)


def test_a_delayed_message_whose_time_came_leaves_a_token(runtime: Runtime) -> None:
    broker = build_broker(runtime, lease_from_env())
    broker.enqueue(Message(queue_name=JOBS_QUEUE, actor_name="run_job", args=("job_x",), kwargs={}, options={}))
    assert tokens(runtime) == 1


def test_a_lost_connection_is_dramatiqs_connection_closed(runtime: Runtime) -> None:
    dead = make_runtime("redis://127.0.0.1:1", runtime.namespace, APPS)
    consumer = WakingConsumer(build_broker(runtime, lease_from_env()).consume(JOBS_QUEUE, prefetch=1, timeout=0),
                              dead.raw_redis, RedisKeys(runtime.namespace), JOBS_QUEUE, 1, 50)
    with pytest.raises(ConnectionClosed):
        while True:
            next(consumer)


def test_an_idle_consumer_moves_low_jobs_onto_the_queue_for_its_free_threads_only(runtime: Runtime) -> None:
    """Low jobs wait in the low lane; a consumer finding the queue empty moves as many onto it as its threads are
    free (2 of 3), fetches them next, and leaves the token for another idle worker while the lane holds more."""
    keys = RedisKeys(runtime.namespace)
    low = [runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query="q"),
                                       scope="client:t", priority=-1)).job["id"] for _ in range(3)]
    runtime.raw_redis.delete(keys.wake(JOBS_QUEUE))
    lane = keys.low_lane(JOBS_QUEUE)
    assert runtime.raw_redis.llen(keys.queue(JOBS_QUEUE)) == 0 and runtime.raw_redis.llen(lane) == 3
    consumer = build_broker(runtime, lease_from_env()).consume(JOBS_QUEUE, prefetch=2, timeout=50)
    held = [message.args[0] for message in [wait_for(lambda: next(consumer), timeout=10, what="a low job")
                                            for _ in range(2)]]
    assert held == low[:2]
    assert runtime.raw_redis.lrange(lane, 0, -1) == [runtime.store.fields(low[2])[JobField.MESSAGE].encode()]
    assert tokens(runtime) == 1


def test_a_consumer_looks_at_the_low_lane_only_once_woken(runtime: Runtime) -> None:
    """The empty fetch right after a fetched message goes straight to the token (no look at the lane: no extra
    round trip per job); once that wait ends the lane is looked at, and its job fetched."""
    keys = RedisKeys(runtime.namespace)
    low = runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query="q"),
                                      scope="client:t", priority=-1)).job["id"]
    lane = keys.low_lane(JOBS_QUEUE)
    consumer = build_broker(runtime, lease_from_env()).consume(JOBS_QUEUE, prefetch=4, timeout=50)
    normal = submit(runtime)
    runtime.raw_redis.delete(keys.wake(JOBS_QUEUE))
    first = next(consumer)
    assert first is not None and first.args == (normal,)
    assert next(consumer) is None  # the queue is empty: it waited on the token, the lane untouched
    assert runtime.raw_redis.llen(lane) == 1
    message = wait_for(lambda: next(consumer), timeout=10, what="the low job, moved once the wait ended")
    assert message.args == (low,)
    assert runtime.raw_redis.llen(lane) == 0
    consumer.ack(first)
    consumer.ack(message)


def delay_tokens(runtime: Runtime) -> int:
    return int(runtime.raw_redis.llen(RedisKeys(runtime.namespace).wake(dq_name(JOBS_QUEUE))))


def test_a_deferred_job_wakes_the_delay_queues_consumer_and_comes_back_at_its_time(runtime: Runtime) -> None:
    """A job a limit deferred for 0.3 s came back up to a worker timeout (1 s) late: the delay queue's idle consumer
    slept through its back-off. Now the deferral leaves the delay queue's token, and the consumer that took the
    message returns to Dramatiq's loop (which moves due messages) once the message is due, not before."""
    consumer = build_broker(runtime, lease_from_env()).consume(dq_name(JOBS_QUEUE), prefetch=100, timeout=1000)
    job_id = submit(runtime)
    assert runtime.store.defer(job_id, "support", delay_s=0.3, waiting_since=time.time()).startswith("queued:")
    assert delay_tokens(runtime) == 1
    message = wait_for(lambda: next(consumer), timeout=10, what="the deferred job's message")
    assert message.args == (job_id,)
    due_s = message.options["eta"] / 1000
    assert next(consumer) is None  # the token was taken, or the wait ended at the message's time
    wait_for(lambda: next(consumer) is None and time.time() >= due_s, timeout=10, what="the message's time")
    consumer.ack(message)


def test_an_idle_delay_consumer_waits_until_the_earliest_message_it_handed_over_is_due(runtime: Runtime) -> None:
    consumer = build_broker(runtime, lease_from_env()).consume(dq_name(JOBS_QUEUE), prefetch=100, timeout=1000)
    assert isinstance(consumer, DelayConsumer)
    assert consumer.wait_s(now_ms=0) == 1.0, "nothing handed over: the worker timeout"
    first, second = submit(runtime), submit(runtime)
    for job_id, delay_s in ((first, 30.0), (second, 0.5)):
        runtime.store.defer(job_id, "support", delay_s=delay_s, waiting_since=time.time())
    messages = [wait_for(lambda: next(consumer), timeout=10, what="a deferred message") for _ in range(2)]
    soonest = min(message.options["eta"] for message in messages)
    assert consumer.wait_s(now_ms=soonest - 200) == pytest.approx(0.2)
    assert consumer.wait_s(now_ms=soonest) == 1.0, "the due one was moved: the other is 30 s away"
    for message in messages:
        consumer.ack(message)
