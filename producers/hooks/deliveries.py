"""HookDeliveries: which job each webhook delivery created, so a redelivery answers with that job.

One Redis string per (hook, delivery id), ``{namespace}:hookdelivery:{hook}:{delivery id}`` → job id, written
with ``SET NX EX``. The TTL (three days by default) outlasts every sender's redelivery window: GitHub lets a
delivery be redelivered for three days, Stripe retries an event for up to three days, and a Standard Webhooks
sender retries a message over about that long. It is far longer than the signatures' five-minute tolerance,
which a retry passes with a fresh timestamp.
"""

from __future__ import annotations

import redis

from difyq.worker.redis_keys import RedisKeys

DEFAULT_DELIVERY_TTL_SECONDS = 3 * 86_400


class HookDeliveries:
    """(hook, delivery id) → job id in Redis, kept for ``ttl_seconds``."""

    def __init__(self, client: redis.Redis, namespace: str, ttl_seconds: int = DEFAULT_DELIVERY_TTL_SECONDS):
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.client = client
        self.namespace = namespace
        self.ttl_seconds = ttl_seconds

    def key(self, hook: str, delivery_id: str) -> str:
        return RedisKeys(self.namespace).hook_delivery(hook, delivery_id)

    def recall(self, hook: str, delivery_id: str) -> str | None:
        """The job id an earlier delivery with this id created, or None."""
        return _text(self.client.get(self.key(hook, delivery_id)))

    def remember(self, hook: str, delivery_id: str, job_id: str) -> str:
        """Record ``job_id`` for this delivery unless one is recorded already; return the recorded job id."""
        key = self.key(hook, delivery_id)
        if self.client.set(key, job_id, nx=True, ex=self.ttl_seconds):
            return job_id
        return _text(self.client.get(key)) or job_id


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
