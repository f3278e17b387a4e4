"""CallbackSender: sign and POST a finished (or paused) job, record the outcome and schedule the next attempt as a
delayed ``deliver_callback`` message (no worker thread waits, no job retry budget is spent).

The first attempt is made by the job's own worker right after the outcome is stored (``deliver_first``: no
message, no second fetch; the job's lease covers it, so the reaper enqueues the callback if that worker dies);
later attempts, replays and the first attempt when ``callbacks.first_attempt_inline`` is off arrive as messages
(``deliver``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import structlog

from difyq.worker import tracing
from difyq.worker.callbacks.delivery import DeliveryAttempt, deliver, record_outcome
from difyq.worker.callbacks.schedule import next_delay
from difyq.worker.callbacks.transport import PinnedTransport
from difyq.worker.jobs.callback_block import CallbackAttempt, CallbackBlock, CallbackLock
from difyq.worker.jobs.model import job_resource
from difyq.worker.jobs.schema import FINAL_STATUSES, JobField, JobStatus
from difyq.worker.json_codec import dumps
from difyq.worker.logs import job_log_context
from difyq.worker.runtime import Runtime

log = structlog.get_logger("difyq.callbacks")

# The statuses a callback announces: every final one, and ``paused`` (the job waits for human input).
ANNOUNCED_STATUSES = FINAL_STATUSES | {JobStatus.PAUSED}


def webhook_id(job: dict[str, Any]) -> str:
    """The callback's ``webhook-id``, the same on every attempt of one event: the job id for the job's final event
    (``job.succeeded``, ``job.failed``, ``job.canceled``), and ``{job id}_paused_{form id}`` for a ``job.paused``
    (one per pause: a run that pauses at two forms sends two), so a receiver that drops repeated ids drops only
    retries, never the final event after a pause."""
    if job["status"] == JobStatus.PAUSED:
        form = job.get("form") or {}
        return f"{job['id']}_paused_{form.get('form_id') or form.get('token') or ''}"
    return str(job["id"])


def event_type(job: dict[str, Any]) -> str:
    """The callback's ``type``: ``job.`` and the status it announces."""
    return f"job.{job['status']}"


def callback_body(job: dict[str, Any]) -> bytes:
    """The POST body of a callback (docs/http-api.md)."""
    document = {
        "type": event_type(job),
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": job,
    }
    return dumps(document)


class CallbackSender:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.store = runtime.store
        self.config = runtime.config.callbacks
        # One address-pinning transport for every worker thread or greenlet: urllib3's pools are thread-safe and
        # keep connections alive across callbacks (no sockets or TLS context exist until the first callback).
        self._transport = PinnedTransport()

    def new_lock(self) -> CallbackLock:
        """The callback lock one attempt takes, held for the request timeout and a margin."""
        return CallbackLock(self.config.timeout + 5)

    def deliver(self, job_id: str) -> None:
        """One ``deliver_callback`` message: an attempt unless the callback is settled or another is under way. A
        paused job's is its ``job.paused``; one that arrives once the job has resumed (and not yet ended) is
        dropped: the form it announced is answered, and the job's final event follows."""
        fields = self.store.fields(job_id)
        if fields is None or fields[JobField.STATUS] not in ANNOUNCED_STATUSES:
            return
        block = CallbackBlock.of(fields)
        if block.settled:
            return
        lock = self.new_lock()
        wait_s = self.store.lock_callback(job_id, lock)
        if wait_s is not None:
            # Another attempt is under way, or its worker died holding the lock: look again once the lock has
            # lapsed rather than drop this message (it may be the only one left for this callback).
            log.info("callback_already_in_progress", job_id=job_id, retry_in_s=round(wait_s, 3))
            self.store.enqueue_callback(job_id, wait_s)
            return
        with structlog.contextvars.bound_contextvars(**job_log_context(job_id, fields)):
            self._attempt(job_id, fields, block, lock, release_lease=False)

    def deliver_first(self, job_id: str, record: dict[str, str], lock: CallbackLock) -> str:
        """The first attempt, by the job's worker, holding the lease and the ``lock`` that
        ``finish_keeping_callback`` took; ``record`` is the stored job. Returns the outcome label."""
        return self._attempt(job_id, record, CallbackBlock.of(record), lock, release_lease=True)

    def _attempt(self, job_id: str, fields: dict[str, str], block: CallbackBlock, lock: CallbackLock, *,
                 release_lease: bool) -> str:
        with tracing.callback_attempt(job_id, fields, block.attempts + 1) as span:
            job = job_resource(fields)
            sent_at = time.time()
            attempt = deliver(fields[JobField.CALLBACK_URL], callback_body(job), webhook_id(job), self.config,
                              session=self._transport)
            span.set("http.response.status_code", attempt.status_code)
            if attempt.outcome != "delivered":
                span.fail(attempt.outcome)
        delay = None
        if attempt.outcome == "retry":
            delay = next_delay(block.attempts + 1, list(self.config.retry_schedule), attempt.retry_after_s)
        block = block.attempted(attempt.status_code, delay, delivered=attempt.outcome == "delivered")
        given_up = attempt.outcome == "retry" and delay is None  # the retry schedule ran out
        kept = CallbackAttempt(at=sent_at, event=event_type(job), status_code=attempt.status_code,
                               error=attempt.error, duration_s=attempt.duration_s,
                               outcome="failed" if given_up else attempt.outcome)
        run = fields.get(JobField.ATTEMPT_STARTED_AT, "") if release_lease else None
        self.store.callback_attempted(job_id, fields[JobField.STATUS], block, kept, retry_in_s=delay,
                                      lease_of_run=run, lock=lock)
        outcome = record_outcome(attempt, retries_remain=delay is not None)
        self._log(attempt, outcome, block.attempts, delay, first_inline=release_lease)
        return outcome

    @staticmethod
    def _log(attempt: DeliveryAttempt, outcome: str, attempts: int, delay: float | None, *, first_inline: bool) -> None:
        """A first attempt delivered by the job's worker is part of the job's own log line (``job_finished``);
        anything else gets a line of its own."""
        fields = {"outcome": outcome, "attempt": attempts, "status_code": attempt.status_code,
                  "error": attempt.error, "next_delay_s": round(delay, 3) if delay is not None else None}
        if outcome == "delivered" and first_inline:
            log.debug("callback_attempt", **fields)
        else:
            log.info("callback_attempt", **fields)
