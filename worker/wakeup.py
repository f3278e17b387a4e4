"""Wake one idle consumer when a message arrives instead of letting every consumer poll with back-off.

Dramatiq's Redis consumer polls: an empty fetch sleeps 5 ms doubling up to the worker timeout, so a job that
arrives at an idle worker waits for the next poll. Our Lua scripts push a token on the queue's wake list
(``{ns}:{queue}.wake``, see ``worker/jobs/lua/_wake.lua``) when they push a ready message, and so does this broker's
``enqueue`` (which Dramatiq uses to move due delayed messages). An idle consumer waits for a token with BLPOP, so
one enqueue wakes one consumer however many worker processes and hosts there are (a PUBLISH would wake all of
them, and each would fetch), and a burst of N messages wakes up to N consumers. A fetch that returns fewer
messages than asked for emptied the queue, so the consumer waits for a token before it asks again (a message
pushed meanwhile left one). The wait and the next fetch are one round trip: the BLPOP and the fetch go out
pipelined, and Redis runs the fetch as soon as the BLPOP returns, with a token or at its timeout. The worker
timeout (``dramatiq_worker_timeout``, at most ``MAX_WAIT_S``) only bounds how long an idle consumer waits without
news.
"""

from __future__ import annotations

import time

import redis
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from difyq.worker.lua_scripts import script_source
from difyq.worker.redis_scripts import register_script

FULL_PREFETCH_PAUSE_S = 0.005
# Well below the Redis clients' 2 s socket timeout: the fetch's answer comes after the wait, and an answer that
# came too late would leave its messages claimed by this consumer but never received.
MAX_WAIT_S = 0.5


def wake_list(namespace: str, queue_name: str) -> str:
    """The list of wake-up tokens of a ready queue."""
    return f"{namespace}:{queue_name}.wake"


class WakingRedisBroker(RedisBroker):
    """Dramatiq's RedisBroker whose ready-queue consumers wait for a wake-up token instead of polling."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._wake = register_script(self.client, script_source("difyq.worker.jobs", "_wake", "wake"))

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> Consumer:
        if queue_name.endswith((".DQ", ".XQ")):
            return super().consume(queue_name, prefetch, timeout)
        return _WakingConsumer(self, queue_name, prefetch, timeout)

    def enqueue(self, message: Message, *, delay: int | None = None) -> Message:
        enqueued = super().enqueue(message, delay=delay)
        if delay is None:
            self._wake(keys=[f"{self.namespace}:{enqueued.queue_name}"])
        return enqueued

    def fetch_when_woken(self, queue_name: str, prefetch: int, wait_s: float) -> list[bytes]:
        """Wait up to ``wait_s`` for a wake-up token of ``queue_name``, then fetch up to ``prefetch`` of its
        messages (``do_fetch``), in one round trip. Nothing when Redis answers too late (the token is gone)."""
        dispatch = self.scripts["dispatch"]
        pipe = self.client.pipeline(transaction=False)
        pipe.blpop([wake_list(self.namespace, queue_name)], timeout=wait_s)
        # Dramatiq's own dispatch arguments (RedisBroker._dispatch); an older timestamp only makes the heartbeat
        # and the dead-worker check it carries more conservative.
        pipe.evalsha(dispatch.sha, 1, self.namespace, "fetch", current_millis(), queue_name, self.broker_id,
                     self.heartbeat_timeout, self.dead_message_ttl, self._should_do_maintenance("fetch"),
                     self._max_unpack_size(), prefetch)
        try:
            _, messages = pipe.execute()
        except redis.exceptions.NoScriptError:
            return self.do_fetch(queue_name, prefetch)
        except redis.TimeoutError:
            return []
        return messages


class _WakingConsumer(_RedisConsumer):
    broker: WakingRedisBroker

    def __init__(self, broker: WakingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)
        self._wait_s = min(timeout / 1000, MAX_WAIT_S)
        self._drained = False

    def __next__(self) -> MessageProxy | None:
        try:
            if not self.message_cache:
                free = self.prefetch - self.outstanding_message_count
                if free <= 0:
                    time.sleep(FULL_PREFETCH_PAUSE_S)
                    return None
                if self._drained:
                    self.message_cache = self.broker.fetch_when_woken(self.queue_name, free, self._wait_s)
                else:
                    self.message_cache = self.broker.do_fetch(self.queue_name, free)
                self._drained = len(self.message_cache) < free
                if not self.message_cache:
                    return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None
        return super().__next__()
