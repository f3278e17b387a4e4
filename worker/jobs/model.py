"""The job resource (docs/http-api.md): the submitted request, what a producer hands to ``submit()``, and the
public view of a stored job record."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from difyq.worker.files.references import job_files
from difyq.worker.jobs.callback_block import CallbackBlock
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.json_codec import loads
from difyq.worker.tracing import trace_id_of


class JobRequest(BaseModel):
    """What a producer asks Dify to do; validated at submit, stored as given."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    user: str | None = Field(default=None, min_length=1, max_length=256)
    conversation_id: str | None = Field(default=None, max_length=64)
    files: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    workflow_id: str | None = Field(default=None, min_length=1, max_length=64)


CLIENT_SCOPE_PREFIX = "client:"
TENANT_MAX_CHARS = 128


def client_scope(client: str) -> str:
    """The idempotency scope of the jobs an API client submits (other producers have ``hook:<name>``,
    ``schedule``, ``cli``)."""
    return CLIENT_SCOPE_PREFIX + client


def client_of_scope(scope: str) -> str | None:
    """The API client whose scope ``scope`` is, or None for another producer's."""
    return scope.removeprefix(CLIENT_SCOPE_PREFIX) if scope.startswith(CLIENT_SCOPE_PREFIX) else None


def default_tenant(scope: str) -> str:
    """The tenant of a job submitted without one: its API client's name, else its producer's scope
    (``hook:<name>``, ``schedule``, ``cli``)."""
    return client_of_scope(scope) or scope


class NewJob(BaseModel):
    """A job as a producer hands it to ``submit()``."""

    app: str
    source: str
    request: JobRequest
    callback_url: str | None = None
    idempotency_key: str | None = None
    scope: str = "anonymous"
    request_id: str | None = None
    priority: int = 0  # higher first, where jobs compete for a key's admission (``config.Priority``)
    tenant: str = ""  # whose job it is (fair shares, tenant limits); empty: ``default_tenant(scope)``
    thread: str | None = None  # the conversation thread: its jobs run one at a time, in submit order
    thread_user: str | None = None  # the Dify user a new thread's conversation belongs to (the job's, or the app's)
    traceparent: str | None = None  # the job's trace context, made by the submit span (``difyq.worker.tracing``)
    id: str | None = None  # the job id to store it under (a trace difyq started names it), else a new one

    def request_hash(self) -> str:
        """A digest of everything that defines the job, to tell a replay from a reused key."""
        canonical = json.dumps(
            {"app": self.app, "request": self.request.model_dump(), "callback_url": self.callback_url,
             **({"thread": self.thread} if self.thread else {})},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # the base32 digits of job ids (ULIDs)
_CROCKFORD_VALUES = {char: value for value, char in enumerate(CROCKFORD)}


def trace_id_for(job_id: str) -> str:
    """The 128 bits of a job id (its ULID) as a W3C trace id (32 hex digits): the trace id of every job whose
    trace difyq started (``difyq.worker.tracing``), so the trace is known wherever the job id is."""
    value = 0
    for char in job_id.removeprefix("job_").upper():
        value = value * 32 + _CROCKFORD_VALUES.get(char, 0)
    return format(value & (2**128 - 1), "032x")


def pending_form(pause: dict[str, Any] | None) -> dict[str, Any] | None:
    """The form a paused job waits on, as the job resource shows it (the first, when a run waits on several):
    what to ask (``content``, ``fields``), how to answer (``actions``, ``token``) and until when."""
    forms = (pause or {}).get("forms") or []
    if not forms:
        return None
    form = forms[0]
    expiry = form.get("expiration_time")
    return {"token": form.get("form_token"), "form_id": form.get("form_id"), "node_id": form.get("node_id"),
            "node_title": form.get("node_title"), "content": form.get("form_content"),
            "fields": form.get("inputs") or [], "actions": form.get("actions") or [],
            "expires_at": iso_time(expiry) if isinstance(expiry, int | float) else None}


def job_id_of_trace(trace_id: str) -> str:
    """The job id whose 128 bits are ``trace_id`` (the inverse of ``trace_id_for``)."""
    value, chars = int(trace_id, 16), []
    for _ in range(26):
        chars.append(CROCKFORD[value & 31])
        value >>= 5
    return "job_" + "".join(reversed(chars))


def job_trace_id(fields: dict[str, str]) -> str:
    """The job's W3C trace id: its stored trace context's (a caller's trace, or one difyq started, whose id is
    the job id's bits), else, for a record stored without one, the job id's bits."""
    return trace_id_of(fields.get(JobField.TRACEPARENT)) or trace_id_for(fields[JobField.ID])


def iso_time(epoch: str | float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC string with milliseconds, or None."""
    if epoch in (None, ""):
        return None
    return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_field(fields: dict[str, str], name: str) -> Any:
    raw = fields.get(name)
    return loads(raw) if raw else None


def job_priority(fields: dict[str, str]) -> int:
    """The priority level of a stored job (0 for a job stored without one)."""
    return int(fields.get(JobField.PRIORITY) or 0)


def attempt_errors(fields: dict[str, str]) -> list[dict[str, Any]]:
    """The record's failed attempts, oldest first: each error with its ``attempt`` number and, for an attempt that
    ran, its ``started_at`` (ISO) and ``duration_s``."""
    entries = _json_field(fields, JobField.ATTEMPT_ERRORS) or []
    return [{**entry, "started_at": iso_time(entry["started_at"]), "duration_s": round(entry["duration_s"], 3)}
            if entry.get("started_at") is not None else entry for entry in entries]


def callback_attempts(fields: dict[str, str]) -> list[dict[str, Any]]:
    """The job's last callback attempts, oldest first (``callback_block.CallbackAttempt``, ``at`` in ISO)."""
    entries = _json_field(fields, JobField.CALLBACK_ATTEMPTS) or []
    return [{**entry, "at": iso_time(entry["at"]), "duration_s": round(entry["duration_s"], 3)} for entry in entries]


def job_tenant(fields: Mapping[str, str | None]) -> str:
    """The tenant of a stored job (its scope's default for a job stored without one)."""
    return fields.get(JobField.TENANT) or default_tenant(fields.get(JobField.SCOPE) or "anonymous")


def job_resource(fields: dict[str, str]) -> dict[str, Any]:
    """The public job resource (docs/http-api.md) from a stored job hash. ``error`` is the last attempt's (null
    once the job succeeded); ``attempt_errors`` keeps every failed attempt's error, oldest first, with its attempt
    number and timing (``attempt_errors``)."""
    callback = CallbackBlock.of(fields)
    request = _json_field(fields, JobField.REQUEST)
    return {
        "id": fields[JobField.ID],
        "app": fields[JobField.APP],
        "source": fields[JobField.SOURCE],
        "status": fields[JobField.STATUS],
        "idempotency_key": fields.get(JobField.IDEMPOTENCY_KEY) or None,
        "created_at": iso_time(fields.get(JobField.CREATED_AT)),
        "started_at": iso_time(fields.get(JobField.STARTED_AT)),
        "finished_at": iso_time(fields.get(JobField.FINISHED_AT)),
        "attempts": int(fields.get(JobField.ATTEMPTS) or 0),
        "priority": job_priority(fields),
        "tenant": job_tenant(fields),
        "thread": fields.get(JobField.THREAD) or None,
        "conversation_restarted": _json_field(fields, JobField.CONVERSATION_RESTARTED),
        "request": request,
        "files": job_files(request, _json_field(fields, JobField.FILES)),
        "result": _json_field(fields, JobField.RESULT),
        "error": _json_field(fields, JobField.ERROR),
        "attempt_errors": attempt_errors(fields),
        "callback": {"url": fields.get(JobField.CALLBACK_URL) or None, "status": callback.status,
                     "attempts": callback.attempts, "last_status_code": callback.last_status_code,
                     "next_attempt_at": iso_time(callback.next_attempt_at),
                     "history": callback_attempts(fields)},
        "trace_id": job_trace_id(fields),
        "form": (pending_form(_json_field(fields, JobField.PAUSE)) if fields[JobField.STATUS] == JobStatus.PAUSED
                 else None),
    }
