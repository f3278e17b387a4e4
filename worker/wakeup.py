"""Wake idle consumers when a message arrives instead of letting them poll with back-off.

Dramatiq's Redis consumer polls: an empty fetch sleeps 5 ms doubling up to the worker timeout, so a job that
arrives at an idle worker waits for the next poll. Our Lua scripts PUBLISH on a queue's key when they push a
ready message (and so does this broker's ``enqueue``, which Dramatiq uses to move due delayed messages); an idle
consumer waits on that channel instead of sleeping, and fetches within a round trip of the enqueue. A fetch that
returns fewer messages than asked for emptied the queue, so the consumer waits for news before it asks again (a
message pushed meanwhile has published its wake-up on the channel the consumer stays subscribed to). The worker
timeout (``dramatiq_worker_timeout``) then only bounds how long an idle consumer waits without news.
"""

from __future__ import annotations

import time

import redis
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

FULL_PREFETCH_PAUSE_S = 0.005
MAX_DRAINED_WAKEUPS = 256


class WakingRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker whose ready-queue consumers wait for a wake-up instead of polling."""

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        if queue_name.endswith((".DQ", ".XQ")):
            return super().consume(queue_name, prefetch, timeout)
        return _WakingConsumer(self, queue_name, prefetch, timeout)

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        enqueued = super().enqueue(message, delay=delay)
        if delay is None:
            self.client.publish(f"{self.namespace}:{enqueued.queue_name}", "1")
        return enqueued


class _WakingConsumer(_RedisConsumer):
    def __init__(self, broker: RedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._wakeups = broker.client.pubsub(ignore_subscribe_messages=True)
        self._wakeups.subscribe(f"{broker.namespace}:{queue_name}")
        self._drained = False

    def __next__(self) -> MessageProxy | None:
        try:
            if not self.message_cache:
                free = self.prefetch - self.outstanding_message_count
                if free <= 0:
                    time.sleep(FULL_PREFETCH_PAUSE_S)
                    return None
                if self._drained:
                    self._drained = False
                    self._wait_for_wakeup()
                    return None
                self.message_cache = self.broker.do_fetch(self.queue_name, free)
                self._drained = len(self.message_cache) < free
                if not self.message_cache:
                    return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        return super().__next__()

    def _wait_for_wakeup(self) -> None:
        """Block until something is published on the queue (or the worker timeout), then drain the wake-ups
        already waiting so a burst of enqueues costs one fetch. The drain is bounded: under a steady stream of
        enqueues on a busy machine, wake-ups can arrive as fast as they are read, and the fetch must come first."""
        if self._wakeups.get_message(timeout=self.timeout / 1000) is not None:
            for _ in range(MAX_DRAINED_WAKEUPS):
                if self._wakeups.get_message(timeout=0) is None:
                    break

    def close(self) -> None:
        self._wakeups.close()
        super().close()
