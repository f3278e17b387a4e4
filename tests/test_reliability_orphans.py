"""No queued job is left without a message: a delivery cut off by Redis dying between its fetch and its first call
is run again once Redis is back (its retry waits for Redis instead of being dropped), and the orphan sweep queues
again a queued job whose message was lost anyway (none at all, or a delayed one that its consumer dropped). No
pending callback is left without one either: the sweep gives it a new message."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.middleware import Middleware

from difyq.worker import metrics
from difyq.worker.app import MAX_DELIVERY_RETRIES, build_broker, build_worker_broker, retry_delivery
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.callback_block import CallbackAttempt, CallbackBlock
from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.jobs.model import JobRequest, NewJob
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.leases import LeaseKeeper
from difyq.worker.orphans import OrphanSweep
from difyq.worker.runtime import Runtime
from tests.support.stack import make_runtime, running_worker, wait_for_final
from tests.support.waiting import wait_for

CHAT = EmulatedApp(name="chat", key="app-chat-key-0001", mode="chat", tokens_per_second=0, answer_tokens=3)


def _fetch(consumer: Any, count: int) -> list[Any]:
    """``count`` messages from a Dramatiq consumer (it answers None while it polls)."""
    fetched: list[Any] = []

    def more() -> bool:
        message = next(consumer)
        if message is not None:
            fetched.append(message)
        return len(fetched) >= count

    wait_for(more, 10, what=f"{count} messages fetched")
    return fetched


def new_job(app: str = "chat", thread: str | None = None) -> NewJob:
    return NewJob(app=app, source="api", request=JobRequest(query="hello"), scope="client:t", thread=thread)


@pytest.fixture
def emulator() -> Iterator[Any]:
    with start_emulator([CHAT]) as running:
        yield running


class RedisDiesOnFetch(Middleware):
    """SIGKILLs the Redis server as the first ``run_job`` message is about to run (it was fetched just before),
    keeps the error that delivery ended with, and tells when the worker has tried and failed to hand it back: the
    retry's enqueue tried a second time, or the message about to be acknowledged (the retry given up)."""

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server
        self.killed = False
        self.cut_off: BaseException | None = None
        self.ended = threading.Event()
        self.enqueue_tries = 0
        self.handing_back_failed = threading.Event()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        if message.actor_name == "run_job" and not self.killed:
            self.killed = True
            assert self.server.process is not None
            self.server.process.kill()
            self.server.process.wait()

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message, *, result: Any = None,
                              exception: BaseException | None = None) -> None:
        if self.killed and not self.ended.is_set():
            self.cut_off = exception
            self.ended.set()

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message, delay: int | None) -> None:
        if self.ended.is_set() and message.actor_name == "run_job":
            self.enqueue_tries += 1
            if self.enqueue_tries >= 2:
                self.handing_back_failed.set()

    def before_ack(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        if self.ended.is_set():
            self.handing_back_failed.set()


def test_a_delivery_cut_off_by_redis_dying_before_its_first_call_runs_once_redis_is_back(
    tmp_path, namespace: str, emulator
) -> None:
    """The worker fetched the message, then Redis died: the job's first Redis call fails, before any attempt (no
    lease). Redis comes back only once the worker's first try to enqueue Dramatiq's retry of that delivery has
    failed: the retry is enqueued once Redis answers (it used to be logged and dropped, and the message was then
    acknowledged: the job stayed queued for ever)."""
    server = EmbeddedRedis(appendonly=True, appendfsync="always", directory=str(tmp_path)).start()
    restarted = EmbeddedRedis(port=server.port, appendonly=True, appendfsync="always", directory=str(tmp_path))
    try:
        apps = {"chat": {"api_key": CHAT.key, "mode": "chat", "base_url": emulator.base_url}}
        runtime = make_runtime(server.url, namespace, apps)
        job_id = runtime.store.submit(new_job()).job["id"]
        cutter = RedisDiesOnFetch(server)
        with running_worker(runtime, middleware=[cutter]):
            wait_for(cutter.ended.is_set, 30, what="the cut-off delivery ending")
            assert cutter.cut_off is not None, "the delivery ran although Redis was gone"
            wait_for(cutter.handing_back_failed.is_set, 30, what="a first try to hand the delivery back failing")
            restarted.start()
            job = wait_for_final(runtime, job_id, timeout=60)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1, "the cut-off delivery started no attempt"
    finally:
        server.stop()
        restarted.stop()


def test_a_delivery_cut_off_by_redis_is_retried_however_often_and_any_other_failure_three_times() -> None:
    """Dramatiq's retries of a delivery (not the job's attempts at Dify, which are its own): Redis going away
    under a delivery never uses them up, so it never dead-letters (and fails) a job."""
    for cut_off in (redis.ConnectionError("gone"), redis.TimeoutError("no answer")):
        assert retry_delivery(MAX_DELIVERY_RETRIES + 10, cut_off)
    assert [retry_delivery(retries, ValueError("a bug")) for retries in range(MAX_DELIVERY_RETRIES + 1)] == \
        [True] * MAX_DELIVERY_RETRIES + [False]


# ------------------------------------------------------------------------------------------------ the orphan sweep


@pytest.fixture
def runtime(redis_url: str, namespace: str) -> Runtime:
    return make_runtime(redis_url, namespace, {"chat": {"api_key": CHAT.key, "mode": "chat"}})


def _requeued(app: str) -> float:
    return metrics.orphaned_jobs_requeued.labels(app=app)._value.get()


def _messages_of(runtime: Runtime, queue: str, job_id: str) -> int:
    bodies = runtime.raw_redis.hgetall(runtime.store.keys.queue_bodies(queue))
    return sum(1 for body in bodies.values() if dramatiq.Message.decode(body).args[0] == job_id)


def test_the_orphan_sweep_requeues_a_queued_job_whose_message_is_gone(runtime: Runtime) -> None:
    store = runtime.store
    orphan = store.submit(new_job()).job["id"]
    waiting = store.submit(new_job()).job["id"]
    first_of_thread = store.submit(new_job(thread="t1")).job["id"]
    held = store.submit(new_job(thread="t1")).job["id"]  # its message waits in its record for the first one's end
    keys = store.keys
    orphan_message = next(message_id for message_id, body in runtime.raw_redis.hgetall(
        keys.queue_bodies(JOBS_QUEUE)).items() if dramatiq.Message.decode(body).args[0] == orphan)
    runtime.raw_redis.hdel(keys.queue_bodies(JOBS_QUEUE), orphan_message)
    runtime.raw_redis.lrem(keys.queue(JOBS_QUEUE), 0, orphan_message)
    sweep = OrphanSweep(store, ["chat"], overdue_s=0.2)

    assert sweep.sweep() == [], "not overdue yet: nothing is judged before the bound"
    before = _requeued("chat")
    found = wait_for(lambda: sweep.sweep(), 10, what="the orphan overdue")
    assert found == [orphan], "the jobs whose message waits (on the queue, or held by the thread) are left alone"
    assert _messages_of(runtime, JOBS_QUEUE, orphan) == 1 and _messages_of(runtime, JOBS_QUEUE, waiting) == 1
    assert _messages_of(runtime, JOBS_QUEUE, first_of_thread) == 1 and _messages_of(runtime, JOBS_QUEUE, held) == 0
    assert runtime.raw_redis.lindex(keys.queue(JOBS_QUEUE), 0) != orphan_message
    assert store.get(orphan)["status"] == "queued"
    assert _requeued("chat") == before + 1
    assert sweep.sweep() == [], "an orphan is queued again once"
    assert store.requeue(orphan, delay_s=0.0, expected="queued", message_was=orphan_message.decode()) == "changed", \
        "the sweep's requeue does nothing to a job given another message since it was judged"


def test_the_orphan_sweep_leaves_a_low_job_waiting_in_the_low_lane(runtime: Runtime) -> None:
    """A job below normal priority waits in the queue's low lane, off the queue list: its message is live there,
    and the sweep leaves it in place however long it waits, while it does queue again a job whose message is gone."""
    store, keys = runtime.store, runtime.store.keys
    low = store.submit(NewJob(app="chat", source="api", request=JobRequest(query="later"), scope="client:t",
                              priority=-1)).job["id"]
    orphan = store.submit(new_job()).job["id"]
    low_message = store.fields(low)[JobField.MESSAGE]
    orphan_message = store.fields(orphan)[JobField.MESSAGE]
    runtime.raw_redis.hdel(keys.queue_bodies(JOBS_QUEUE), orphan_message)
    runtime.raw_redis.lrem(keys.queue(JOBS_QUEUE), 0, orphan_message)
    assert runtime.raw_redis.lrange(keys.low_lane(JOBS_QUEUE), 0, -1) == [low_message.encode()]
    assert runtime.raw_redis.lrange(keys.queue(JOBS_QUEUE), 0, -1) == []
    sweep = OrphanSweep(store, ["chat"], overdue_s=0.2)
    assert wait_for(lambda: sweep.sweep(), 10, what="the orphan overdue") == [orphan]
    assert runtime.raw_redis.lrange(keys.low_lane(JOBS_QUEUE), 0, -1) == [low_message.encode()]
    assert _messages_of(runtime, JOBS_QUEUE, low) == 1 and store.fields(low)[JobField.MESSAGE] == low_message
    assert sweep.sweep() == []


def test_the_orphan_sweep_requeues_a_delayed_message_its_consumer_dropped(runtime: Runtime) -> None:
    """A consumer that loses its Redis connection forgets the delayed messages it fetched, while their ids stay
    in its live process's acknowledgement set: Dramatiq never hands them back. A delayed message still held past
    its time by more than the bound counts as lost; one not yet due does not, nor one that the worker moved to
    the queue when due (Dramatiq enqueues a copy, which the job record then names)."""
    store = runtime.store
    dropped, later, moved = (store.submit(new_job()).job["id"] for _ in range(3))
    consumer = build_broker(runtime, 30.0).consume(JOBS_QUEUE, prefetch=3, timeout=50)
    for message in _fetch(consumer, 3):  # each runs, and ends with a retry in a while
        job_id = message.args[0]
        assert store.start_attempt(job_id, lease_s=30).state == "started"
        assert store.requeue(job_id, delay_s=3600 if job_id == later else 0.1).startswith("queued:")
        consumer.ack(message)
    delayed = build_broker(runtime, 30.0).consume(f"{JOBS_QUEUE}.DQ", prefetch=3, timeout=50)
    held = {message.args[0]: message for message in _fetch(delayed, 3)}
    assert set(held) == {dropped, later, moved}  # fetched into memory; only one is moved when due, as Dramatiq does
    due = held[moved].copy(queue_name=JOBS_QUEUE)
    del due.options["eta"]
    worker_broker = build_worker_broker(runtime)
    copy = worker_broker.enqueue(due)
    delayed.ack(held[moved])
    assert store.fields(moved)[JobField.MESSAGE] == copy.options["redis_message_id"]
    keeper = LeaseKeeper(store, lease_s=0.1, orphans=OrphanSweep(store, ["chat"], overdue_s=0.3))

    def handed_back() -> bool:  # the worker's upkeep rounds run the sweep, once Redis answered for a lease
        keeper.upkeep()
        return _messages_of(runtime, JOBS_QUEUE, dropped) == 1

    wait_for(handed_back, 10, what="the dropped delayed message queued again")
    assert _messages_of(runtime, JOBS_QUEUE, later) == 0 and _messages_of(runtime, JOBS_QUEUE, moved) == 1
    assert store.fields(later)[JobField.STATUS] == "queued"
    worker_broker.close()


def test_the_orphan_sweep_queues_a_paused_job_whose_check_in_its_consumer_dropped(runtime: Runtime) -> None:
    """A paused job waits for its forms' expiry with a delayed message that then checks its run. One that a
    consumer dropped is queued to follow its run (as a submitted form does); one not yet due is left paused."""
    store = runtime.store
    dropped, later = (store.submit(new_job()).job["id"] for _ in range(2))
    consumer = build_broker(runtime, 30.0).consume(JOBS_QUEUE, prefetch=2, timeout=50)
    for message in _fetch(consumer, 2):  # each runs, and pauses until its forms expire
        job_id = message.args[0]
        assert store.start_attempt(job_id, lease_s=30).state == "started"
        block = {"workflow_run_id": f"run-{job_id}", "forms": [], "price": None, "currency": None, "task_id": "t"}
        assert store.pause(job_id, "chat", block, check_in_s=0.1 if job_id == dropped else 3600) == "paused"
        consumer.ack(message)
    sweep = OrphanSweep(store, ["chat"], overdue_s=0.2)
    before = _requeued("chat")
    assert wait_for(lambda: sweep.sweep(), 10, what="the dropped check-in overdue") == [dropped]
    assert store.get(dropped)["status"] == "queued" and _messages_of(runtime, JOBS_QUEUE, dropped) == 1
    assert f"run-{dropped}" in store.fields(dropped)[JobField.PAUSE], "the job keeps the paused run it follows"
    assert store.get(later)["status"] == "paused"
    assert _requeued("chat") == before + 1


# ------------------------------------------------------------------------------------ callbacks without a message

def _finished_with_callback(runtime: Runtime) -> str:
    """A job with a callback URL that succeeded: its callback message waits on the callbacks queue."""
    store = runtime.store
    job_id = store.submit(NewJob(app="chat", source="api", request=JobRequest(query="hello"), scope="client:t",
                                 callback_url="http://127.0.0.1:9/hook")).job["id"]
    assert store.start_attempt(job_id, lease_s=30).state == "started"
    assert store.finish(job_id, JobStatus.SUCCEEDED, result={"answer": "hi"}) == JobStatus.SUCCEEDED
    return job_id


def _callbacks_requeued(app: str) -> float:
    return metrics.orphaned_callbacks_requeued.labels(app=app)._value.get()


def _due(runtime: Runtime) -> set[str]:
    return {member.decode() for member in runtime.raw_redis.zrange(runtime.store.keys.callbacks_due, 0, -1)}


def test_the_orphan_sweep_gives_a_callback_whose_message_is_gone_a_new_one(runtime: Runtime) -> None:
    """A callback's message lost (a consumer that dropped what it had fetched): the sweep gives it a new one, once;
    a waiting message is left alone, and the index forgets a delivered callback and a job that is gone."""
    store, keys = runtime.store, runtime.store.keys
    lost, waiting, delivered, gone = (_finished_with_callback(runtime) for _ in range(4))
    assert _due(runtime) == {lost, waiting, delivered, gone}
    lost_message = store.fields(lost)[JobField.CALLBACK_MESSAGE]
    runtime.raw_redis.hdel(keys.queue_bodies(CALLBACKS_QUEUE), lost_message)
    runtime.raw_redis.lrem(keys.queue(CALLBACKS_QUEUE), 0, lost_message)
    store.callback_attempted(delivered, JobStatus.SUCCEEDED, CallbackBlock("delivered", 1, 200),
                             CallbackAttempt(time.time(), "job.succeeded", 200, None, 0.01, "delivered"),
                             retry_in_s=None, lease_of_run=None, lock=None)
    runtime.raw_redis.delete(store.job_key(gone))
    assert _due(runtime) == {lost, waiting, gone}, "a delivered callback leaves the index"
    sweep = OrphanSweep(store, ["chat"], overdue_s=0.2)

    assert sweep.sweep_callbacks() == [], "not overdue yet: nothing is judged before the bound"
    before = _callbacks_requeued("chat")
    assert wait_for(lambda: sweep.sweep_callbacks(), 10, what="the lost callback overdue") == [lost]
    assert _messages_of(runtime, CALLBACKS_QUEUE, lost) == 1 and _messages_of(runtime, CALLBACKS_QUEUE, waiting) == 1
    assert store.fields(lost)[JobField.CALLBACK_MESSAGE] != lost_message
    assert _callbacks_requeued("chat") == before + 1
    assert _due(runtime) == {lost, waiting}, "a job that is gone leaves the index"
    assert sweep.sweep_callbacks() == [], "a lost callback gets a new message once"
    assert not store.enqueue_callback(lost, 0.0, message_was=lost_message), \
        "the sweep's new message is not written for a callback given another since it was judged"


def test_the_orphan_sweep_gives_a_dropped_callback_retry_a_new_message(runtime: Runtime) -> None:
    """A callback retry waits as a delayed message; a consumer that loses its connection forgets the ones it
    fetched. The worker's upkeep gives a new message to the one held past its time, not to one not yet due."""
    store = runtime.store
    dropped, later = _finished_with_callback(runtime), _finished_with_callback(runtime)
    first_attempts = build_broker(runtime, 30.0).consume(CALLBACKS_QUEUE, prefetch=2, timeout=50)
    for message in _fetch(first_attempts, 2):  # each fails, and its retry waits a while
        retry_in_s = 0.1 if message.args[0] == dropped else 3600
        store.callback_attempted(message.args[0], JobStatus.SUCCEEDED,
                                 CallbackBlock("pending", 1, 503, time.time() + retry_in_s),
                                 CallbackAttempt(time.time(), "job.succeeded", 503, "HTTP 503", 0.01, "retry"),
                                 retry_in_s=retry_in_s, lease_of_run=None, lock=None)
        first_attempts.ack(message)
    assert _messages_of(runtime, CALLBACKS_QUEUE, dropped) == 0
    held = _fetch(build_broker(runtime, 30.0).consume(f"{CALLBACKS_QUEUE}.DQ", prefetch=2, timeout=50), 2)
    assert {message.args[0] for message in held} == {dropped, later}  # in memory, never moved: dropped
    keeper = LeaseKeeper(store, lease_s=0.1, orphans=OrphanSweep(store, ["chat"], overdue_s=0.3))

    def handed_back() -> bool:
        keeper.upkeep()
        return _messages_of(runtime, CALLBACKS_QUEUE, dropped) == 1

    wait_for(handed_back, 10, what="the dropped callback retry given a new message")
    assert _messages_of(runtime, CALLBACKS_QUEUE, later) == 0
    held_ids = {message.args[0]: message.options["redis_message_id"] for message in held}
    assert store.fields(dropped)[JobField.CALLBACK_MESSAGE] != held_ids[dropped]
    assert store.fields(later)[JobField.CALLBACK_MESSAGE] == held_ids[later]
