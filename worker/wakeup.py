"""Wake-ups of idle consumers: a job put on the ``jobs`` queue wakes one idle worker process at once, instead of
waiting for the next poll of Dramatiq's consumer (an idle one backs off up to ``dramatiq_worker_timeout``, 1 s,
so a job arriving at an idle worker waited up to that long).

A producer that enqueues a job also leaves a token in ``{ns}:wake:{queue}`` (at most one waits there; submit.lua,
and ``WakingRedisBroker.enqueue`` for what Dramatiq itself moves from the delay queue). ``WakingConsumer`` wraps
the consumer Dramatiq's ``RedisBroker.consume`` returns, through its public interface only: it fetches without
back-off, and when the queue is empty it blocks on the token (``BLPOP``, up to the worker timeout) instead of
sleeping, so an idle worker costs Redis one command per worker timeout, as Dramatiq's own back-off does, and a
busy one no empty polls at all. A consumer holding as many messages as it may prefetch waits for an ack instead
(it could not take another message). Messages are still fetched and acked by Dramatiq: its delivery, ack and
recovery guarantees are unchanged; a token only says when to look.

A fetch that took fewer messages than it asked for found the queue empty, and whatever came since left a token, so
once the consumer has handed over what that fetch took it waits on the token at once instead of fetching again:
at a light load that is one round trip and one Dramatiq fetch less per job. What Dramatiq's consumer holds fetched
and not yet handed over is read through ``worker.dramatiq_prefetch``, the one read of it beyond its interface
(pinned by ``tests/test_dramatiq_contract.py``; without it the consumer fetches as before). A message put on the
queue without a token (Dramatiq's recovery of a dead worker's messages) is fetched when the wait ends, as it is by
a consumer already waiting.

Jobs below normal priority wait in the queue's low lane (``RedisKeys.low_lane``; submit.lua puts their message
ids there, their bodies in the queue's bodies hash as any other's), so normal jobs pass them at the worker threads.
A consumer that finds the queue empty moves low messages onto it, as many as its process has free worker threads
(its threads less the messages it holds), and fetches them next: they never wait in Dramatiq's prefetch buffer
ahead of a normal job arriving later. It looks at the lane when it was woken (by a token, or by its wait's end)
and has fetched nothing since, so an empty fetch right after the messages a token announced costs no extra round
trip; a lane that still holds messages keeps a token waiting, so some idle worker looks. It blocks on the token
only when the lane is empty too (or its threads are all taken). And once per ``1 / jobs.low_priority_min_share``
messages it fetched it moves one low message to the queue's head (after the jobs above normal priority still
waiting), so a backlog of normal jobs slows low ones down but never stops them. Each move is one script
(``low_lane.lua``): a message is on one list or the other.

The queue's delay queue (Dramatiq's ``jobs.DQ``: deferred jobs and retries) has a token of its own, left by
whatever writes a delayed message (requeue.lua, ``WakingRedisBroker.enqueue``). Dramatiq's consumer thread holds
the delayed messages it fetched until their time and moves those that are due each time its consumer returns,
which an idle one did only after its back-off (up to the worker timeout): a job deferred for 0.2 s came back up
to a second late. ``DelayConsumer`` fetches when woken and otherwise waits on the token only until the earliest
time among the messages it handed over, so each comes back on time. Redis ends a blocked wait on its server cron
(every 0.1 s by default), so the last tenth of a second before that time (the last two, when no more is left) is
slept instead: a delayed message written then, due even sooner, is fetched by another process's consumer, or by
this one when it wakes.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Iterable

import redis
from dramatiq import Broker, Message, Middleware, Worker
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name
from dramatiq.errors import ConnectionClosed

from difyq.worker.dramatiq_prefetch import prefetched
from difyq.worker.jobs.scripts import job_script
from difyq.worker.redis_keys import RedisKeys

# The longest a consumer blocks on its token: under the Redis clients' 2 s socket timeout (``worker.runtime``).
MAX_BLOCK_S = 1.0
# How late a BLPOP may return after its timeout: Redis times blocked clients out on its server cron, 10 times a
# second by default (``hz``). A wait shorter than this is slept, not blocked on (Redis 6.2, ``difyq dev``'s embedded
# one, even keeps a BLPOP of 1 ms blocked for good).
BLOCK_SLACK_S = 0.1


def wait_for_token(client: redis.Redis, key: str, wait_s: float) -> bool:
    """Wait about ``wait_s`` (up to ``BLOCK_SLACK_S`` more) for the token at ``key``; whether one was taken."""
    if wait_s < BLOCK_SLACK_S:
        time.sleep(max(wait_s, 0.0))
        return False
    return client.blpop([key], timeout=wait_s) is not None


def wake(client: redis.Redis, key: str) -> None:
    """Leave the token (one at most) that wakes an idle consumer of the queue whose wake key is ``key``."""
    with client.pipeline(transaction=True) as pipe:
        pipe.rpush(key, 1).ltrim(key, 0, 0).execute()


class _Wrapping(Consumer):
    """A consumer that hands Dramatiq's own (``inner``) its acks, nacks, requeues and close."""

    inner: Consumer

    def ack(self, message: MessageProxy) -> None:
        self.inner.ack(message)

    def nack(self, message: MessageProxy) -> None:
        self.inner.nack(message)

    def requeue(self, messages: Iterable[MessageProxy]) -> None:
        self.inner.requeue(messages)

    def close(self) -> None:
        self.inner.close()


class WakingConsumer(_Wrapping):
    """Dramatiq's consumer of one queue (``inner``, made with no back-off), woken by the queue's token, which also
    feeds the queue from its low lane; ``threads`` is its process's worker threads (None: ``prefetch``),
    ``low_share`` is ``jobs.low_priority_min_share``."""

    def __init__(self, inner: Consumer, client: redis.Redis, keys: RedisKeys, queue_name: str, prefetch: int,
                 timeout_ms: int, threads: int | None = None, low_share: float = 0.0):
        self.inner = inner
        self.client = client
        self.wake_key = keys.wake(queue_name)
        self.lane_keys = [keys.low_lane(queue_name), keys.queue(queue_name), keys.express_tail(queue_name),
                          self.wake_key]
        self._move_low = client.register_script(job_script("low_lane"))
        self.prefetch = prefetch
        self.threads = threads or prefetch
        self.share_round = max(round(1 / low_share), 1) if low_share > 0 else 0
        self.block_s = min(max(timeout_ms, 1) / 1000, MAX_BLOCK_S)
        self._fetched = 0
        self._woken = True  # its last wait ended (or it never waited) and it has fetched nothing since
        self._drained = False  # its last fetch took fewer messages than it asked for: the queue was empty then
        self._outstanding = 0
        self._lock = threading.Lock()
        self._freed = threading.Event()

    def __next__(self) -> MessageProxy | None:
        try:
            if self.share_round and self._fetched >= self.share_round:
                self._move_low(keys=self.lane_keys, args=["share", 1])
                self._fetched = 0
                self._drained = False
            message = self._next_unless_drained()
            if message is not None:
                with self._lock:
                    self._outstanding += 1
                self._fetched += 1
                self._woken = False
                return message
            if self._outstanding >= self.prefetch:
                self._freed.wait(self.block_s)
                self._freed.clear()
                return None
            free = self.threads - self._outstanding
            if self._woken and free > 0 and self._move_low(keys=self.lane_keys, args=["fill", free]) != 0:
                return None  # the next fetch takes what it moved, or what was already on the queue
            wait_for_token(self.client, self.wake_key, self.block_s)
            self._woken = True
            self._drained = False
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        return None

    def _next_unless_drained(self) -> MessageProxy | None:
        """Dramatiq's next message. With none prefetched it would fetch: nothing then, when its last fetch took the
        queue's last message (the token announces what came since); else it fetches as many as it may hold, and
        whether fewer came than it asked for is noted."""
        if prefetched(self.inner) != 0:
            return next(self.inner)
        if self._drained:
            return None
        asked = self.prefetch - self._outstanding  # at most what Dramatiq asks: its count of held messages drops
        message = next(self.inner)                  # at each ack before ours does
        if message is not None:
            self._drained = (prefetched(self.inner) or 0) + 1 < asked
        return message

    def _settled(self) -> None:
        with self._lock:
            self._outstanding = max(self._outstanding - 1, 0)
        self._freed.set()

    def ack(self, message: MessageProxy) -> None:
        try:
            super().ack(message)
        finally:
            self._settled()

    def nack(self, message: MessageProxy) -> None:
        try:
            super().nack(message)
        finally:
            self._settled()


class DelayConsumer(_Wrapping):
    """Dramatiq's consumer of a delay queue (``inner``, made with no back-off), woken by the queue's token (a
    delayed message was written) and back in Dramatiq's loop when the earliest message it handed over is due."""

    def __init__(self, inner: Consumer, client: redis.Redis, wake_key: str, timeout_ms: int):
        self.inner = inner
        self.client = client
        self.wake_key = wake_key
        self.block_s = min(max(timeout_ms, 1) / 1000, MAX_BLOCK_S)
        self._etas: list[float] = []  # when each message handed over is due (ms since the epoch)

    def __next__(self) -> MessageProxy | None:
        try:
            message = next(self.inner)
            if message is not None:
                eta = message.options.get("eta")
                if isinstance(eta, int | float):
                    heapq.heappush(self._etas, eta)
                return message
            wait_s = self.wait_s(time.time() * 1000)
            # Blocked on until the slack before the message's time (a token ends it at once), the rest slept: the
            # message is due then, not up to a server cron later.
            ends = time.monotonic() + wait_s
            if wait_s <= 2 * BLOCK_SLACK_S or not wait_for_token(self.client, self.wake_key, wait_s - BLOCK_SLACK_S):
                time.sleep(max(ends - time.monotonic(), 0.0))
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        return None

    def wait_s(self, now_ms: float) -> float:
        """How long an idle wait may last at ``now_ms``: until the earliest message handed over that is not due yet
        (those due were moved by Dramatiq when this consumer last returned), at most the block time."""
        while self._etas and self._etas[0] <= now_ms:
            heapq.heappop(self._etas)
        return min(self.block_s, (self._etas[0] - now_ms) / 1000) if self._etas else self.block_s


class _WorkerThreads(Middleware):
    """Tells its ``WakingRedisBroker`` how many threads the worker booting on it runs."""

    def __init__(self, broker: WakingRedisBroker):
        self.broker = broker

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self.broker.worker_threads = worker.worker_threads


class WakingRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker whose consumers of ``woken_queues`` are ``WakingConsumer``s and of their delay queues
    ``DelayConsumer``s, and whose enqueues to them (a delayed message whose time came, a delayed retry) leave the
    queue's wake token; ``low_share`` is ``jobs.low_priority_min_share``."""

    def __init__(self, *, client: redis.Redis, namespace: str, woken_queues: Iterable[str], low_share: float = 0.0,
                 **options: object):
        super().__init__(client=client, namespace=namespace, **options)  # type: ignore[arg-type]
        self.wake_client = client
        self.keys = RedisKeys(namespace)
        self.woken_queues = frozenset(woken_queues)
        self._woken_delay_queues = frozenset(dq_name(queue) for queue in self.woken_queues)
        self._waking = self.woken_queues | self._woken_delay_queues
        self.low_share = low_share
        self.worker_threads: int | None = None
        self.add_middleware(_WorkerThreads(self))

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        if queue_name in self._woken_delay_queues:
            return DelayConsumer(super().consume(queue_name, prefetch, timeout=0), self.wake_client,
                                 self.keys.wake(queue_name), timeout)
        if queue_name not in self.woken_queues:
            return super().consume(queue_name, prefetch, timeout)
        inner = super().consume(queue_name, prefetch, timeout=0)
        return WakingConsumer(inner, self.wake_client, self.keys, queue_name, prefetch, timeout,
                              threads=self.worker_threads, low_share=self.low_share)

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        enqueued = super().enqueue(message, delay=delay)
        if enqueued.queue_name in self._waking:
            wake(self.wake_client, self.keys.wake(enqueued.queue_name))
        return enqueued
