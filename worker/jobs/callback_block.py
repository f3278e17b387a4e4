"""The callback block of a job: one model for what the record stores, what the job resource shows and what each
delivery attempt changes.

The record keeps the block as JSON in its ``callback`` field (without the URL, which is the record's
``callback_url``); a job without a callback URL has no block and shows ``status: none``. Its last attempts
(``CallbackAttempt``, the newest ``MAX_CALLBACK_ATTEMPTS``) are a JSON list in its ``callback_attempts`` field.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, replace

from difyq.worker.jobs.schema import CallbackStatus, JobField
from difyq.worker.json_codec import dumps, loads


@dataclass(frozen=True)
class CallbackAttempt:
    """One callback attempt as the job keeps it: when it was made (Unix seconds), the event it announced
    (``job.succeeded``, ``job.paused``, …), the receiver's HTTP status (None without an answer), the error (a short
    secret-free text, None once delivered), how long it took and its outcome (``delivery.AttemptOutcome``; ``failed``
    also for a ``retry`` that the retry schedule had no step left for)."""

    at: float
    event: str
    status_code: int | None
    error: str | None
    duration_s: float
    outcome: str

    def stored(self) -> str:
        return dumps(asdict(self)).decode()


@dataclass(frozen=True)
class CallbackLock:
    """The job's callback lock as one attempt takes it (``RedisKeys.callback_lock``): held for ``ttl_s``, with
    ``holder`` (a random token) as its value, so that the attempt frees it only while it is still its own. An attempt
    that outlived its lock, or one made for a run a rerun has since replaced, leaves the next attempt's lock alone."""

    ttl_s: float
    holder: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def ttl_ms(self) -> int:
        return int(self.ttl_s * 1000)


@dataclass(frozen=True)
class CallbackBlock:
    """``pending`` until delivered (2xx) or given up (``failed``: 410, blocked, or the schedule ran out);
    ``next_attempt_at`` (Unix seconds) is set while a retry waits."""

    status: CallbackStatus
    attempts: int = 0
    last_status_code: int | None = None
    next_attempt_at: float | None = None

    @classmethod
    def pending(cls) -> CallbackBlock:
        """The block of a job with a callback URL that just ended (or is sent again from the start)."""
        return cls("pending")

    @classmethod
    def of(cls, fields: dict[str, str]) -> CallbackBlock:
        """The block stored in a job record (``none`` without a callback URL, ``pending`` before it ends)."""
        if not fields.get(JobField.CALLBACK_URL):
            return cls("none")
        stored = loads(fields[JobField.CALLBACK]) if fields.get(JobField.CALLBACK) else {}
        return cls(status=stored.get("status", "pending"), attempts=int(stored.get("attempts") or 0),
                   last_status_code=stored.get("last_status_code"), next_attempt_at=stored.get("next_attempt_at"))

    @property
    def settled(self) -> bool:
        """Nothing is left to send: delivered, given up, or no callback at all."""
        return self.status != "pending"

    def attempted(self, status_code: int | None, retry_in_s: float | None, delivered: bool) -> CallbackBlock:
        """The block after one more attempt: delivered, waiting ``retry_in_s`` for the next one, or failed."""
        status: CallbackStatus = "delivered" if delivered else "pending" if retry_in_s is not None else "failed"
        return replace(self, status=status, attempts=self.attempts + 1, last_status_code=status_code,
                       next_attempt_at=time.time() + retry_in_s if status == "pending" and retry_in_s is not None
                       else None)

    def stored(self) -> str:
        """The JSON kept in the record's ``callback`` field."""
        return dumps(asdict(self)).decode()
