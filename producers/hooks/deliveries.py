"""HookDeliveries: which job each webhook delivery created, so a redelivery answers with that job; and each hook's
recent deliveries with their outcome, for the console.

One Redis string per (hook, delivery id), ``{namespace}:hookdelivery:{hook}:{delivery id}`` → job id, written
with ``SET NX EX``. The TTL (three days by default) outlasts every sender's redelivery window: GitHub lets a
delivery be redelivered for three days, Stripe retries an event for up to three days, and a Standard Webhooks
sender retries a message over about that long. It is far longer than the signatures' five-minute tolerance,
which a retry passes with a fresh timestamp.

``{namespace}:hookrecent:{hook}`` is a list of the hook's last ``RECENT_KEPT`` deliveries, newest first, each a
JSON object: ``at``, ``outcome`` (the ``difyq_hook_requests_total`` outcome), ``status`` (the HTTP answer),
``job_id`` and the error ``code``.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from difyq.worker.json_codec import dumps, loads
from difyq.worker.redis_keys import RedisKeys

DEFAULT_DELIVERY_TTL_SECONDS = 3 * 86_400
RECENT_KEPT = 50


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

    def recent_key(self, hook: str) -> str:
        return RedisKeys(self.namespace).hook_recent(hook)

    def note(self, hook: str, outcome: str, status: int, job_id: str | None, code: str | None) -> None:
        """Add a delivery to the hook's recent ones (the oldest beyond ``RECENT_KEPT`` drop off)."""
        entry = dumps({"at": time.time(), "outcome": outcome, "status": status, "job_id": job_id, "code": code})
        pipe = self.client.pipeline()
        pipe.lpush(self.recent_key(hook), entry)
        pipe.ltrim(self.recent_key(hook), 0, RECENT_KEPT - 1)
        pipe.execute()

    def recent(self, hook: str) -> list[dict[str, Any]]:
        """The hook's recent deliveries, newest first."""
        return [loads(entry) for entry in self.client.lrange(self.recent_key(hook), 0, RECENT_KEPT - 1)]


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
