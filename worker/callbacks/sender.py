"""CallbackSender: one ``deliver_callback`` message — sign and POST the finished job, then record the outcome and
schedule the next attempt as a delayed message (no worker thread waits, no job retry budget is spent)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from typing import Any

import redis
import requests
import structlog

from worker import metrics
from worker.callbacks.delivery import deliver
from worker.callbacks.schedule import next_delay
from worker.callbacks.transport import pinned_session
from worker.jobs.messages import CALLBACKS_QUEUE
from worker.jobs.model import FINAL_STATUSES, job_resource
from worker.logs import job_log_context
from worker.runtime import Runtime

log = structlog.get_logger("difyq.callbacks")


def callback_body(job: dict[str, Any]) -> bytes:
    """The POST body of DESIGN §7."""
    document = {
        "type": f"job.{job['status']}",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": job,
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class CallbackSender:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.store = runtime.store
        self.config = runtime.config.callbacks
        self._sessions = threading.local()

    def _session(self) -> requests.Session:
        """One connection-pooling, address-pinning session per worker thread."""
        if not hasattr(self._sessions, "session"):
            self._sessions.session = pinned_session()
        return self._sessions.session

    def deliver(self, job_id: str) -> None:
        fields = self.store.fields(job_id)
        if fields is None or fields.get("status") not in FINAL_STATUSES or not fields.get("callback_url"):
            return
        state = json.loads(fields.get("callback") or "{}")
        if state.get("status") in ("delivered", "failed"):
            return
        lock = f"{self.store.namespace}:callback-lock:{job_id}"
        if not self.store.redis.set(lock, "1", nx=True, px=int((self.config.timeout + 5) * 1000)):
            # Another attempt is under way, or its worker died holding the lock: look again once the lock has
            # lapsed rather than drop this message (it may be the only one left for this callback).
            wait_s = max(self.store.redis.pttl(lock), 100) / 1000
            log.info("callback_already_in_progress", job_id=job_id, retry_in_s=round(wait_s, 3))
            self._enqueue(job_id, wait_s)
            return
        try:
            self._attempt(job_id, fields, state)
        finally:
            self.store.redis.delete(lock)

    def _attempt(self, job_id: str, fields: dict[str, str], state: dict[str, Any]) -> None:
        job = job_resource(fields)
        with structlog.contextvars.bound_contextvars(**job_log_context(job_id, fields)):
            attempt = deliver(fields["callback_url"], callback_body(job), job_id, self.config, session=self._session())
            attempts = int(state.get("attempts") or 0) + 1
            state.update(url=fields["callback_url"], attempts=attempts, last_status_code=attempt.status_code)
            delay = None
            if attempt.outcome == "retry":
                delay = next_delay(attempts, list(self.config.retry_schedule), attempt.retry_after_s)
            if attempt.outcome == "delivered":
                state.update(status="delivered", next_attempt_at=None)
                outcome = "delivered"
            elif delay is not None:
                state.update(status="pending", next_attempt_at=time.time() + delay)
                outcome = "retried"
            else:
                state.update(status="failed", next_attempt_at=None)
                outcome = "blocked" if attempt.outcome == "blocked" else "failed"
            self._record(job_id, state, delay)
            metrics.callback_deliveries.labels(outcome=outcome).inc()
            log.info("callback_attempt", outcome=outcome, attempt=attempts, status_code=attempt.status_code,
                     error=attempt.error, next_delay_s=round(delay, 3) if delay is not None else None)

    def _record(self, job_id: str, state: dict[str, Any], delay: float | None) -> None:
        """Store the callback block, and in the same transaction the next attempt or the dead letter."""
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.hset(self.store.job_key(job_id), "callback", json.dumps(state))
        if delay is not None:
            self._enqueue(job_id, delay, pipe)
        elif state["status"] == "failed":
            pipe.zadd(self.store.callback_dead_letters_key, {job_id: time.time()})
        pipe.execute()

    def _enqueue(self, job_id: str, delay_s: float, pipe: redis.client.Pipeline | None = None) -> None:
        """A delayed ``deliver_callback`` message, in ``pipe`` when given."""
        message = self.store.message(CALLBACKS_QUEUE, job_id, delay_s)
        target = pipe if pipe is not None else self.store.redis.pipeline(transaction=True)
        target.hset(message.bodies_key, message.redis_message_id, message.body)
        target.rpush(message.queue_key, message.redis_message_id)
        if pipe is None:
            target.execute()
