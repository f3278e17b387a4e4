"""The job resource (docs/http-api.md): statuses, the submitted request, and the conversion from the stored hash."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from difyq.worker.json_codec import loads


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
SOURCES = ("api", "hook", "schedule", "cli")


class JobRequest(BaseModel):
    """What a producer asks Dify to do; validated at submit, stored as given."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    user: str | None = Field(default=None, min_length=1, max_length=256)
    conversation_id: str | None = Field(default=None, max_length=64)
    files: list[dict[str, Any]] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class NewJob(BaseModel):
    """A job as a producer hands it to ``submit()``."""

    app: str
    source: str
    request: JobRequest
    callback_url: str | None = None
    idempotency_key: str | None = None
    scope: str = "anonymous"
    request_id: str | None = None

    def request_hash(self) -> str:
        """A digest of everything that defines the job, to tell a replay from a reused key."""
        canonical = json.dumps(
            {"app": self.app, "request": self.request.model_dump(), "callback_url": self.callback_url},
            sort_keys=True,
            separators=(",", ":"),
            default=str,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def iso_time(epoch: str | float | None) -> str | None:
    """Unix seconds as an ISO 8601 UTC string with milliseconds, or None."""
    if epoch in (None, ""):
        return None
    return datetime.fromtimestamp(float(epoch), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_field(fields: dict[str, str], name: str) -> Any:
    raw = fields.get(name)
    return loads(raw) if raw else None


def job_resource(fields: dict[str, str]) -> dict[str, Any]:
    """The public job resource (docs/http-api.md) from a stored job hash."""
    callback = _json_field(fields, "callback") or {
        "url": None, "status": "none", "attempts": 0, "last_status_code": None, "next_attempt_at": None,
    }
    if callback.get("next_attempt_at") is not None:
        callback = {**callback, "next_attempt_at": iso_time(callback["next_attempt_at"])}
    return {
        "id": fields["id"],
        "app": fields["app"],
        "source": fields["source"],
        "status": fields["status"],
        "idempotency_key": fields.get("idempotency_key") or None,
        "created_at": iso_time(fields.get("created_at")),
        "started_at": iso_time(fields.get("started_at")),
        "finished_at": iso_time(fields.get("finished_at")),
        "attempts": int(fields.get("attempts") or 0),
        "request": _json_field(fields, "request"),
        "result": _json_field(fields, "result"),
        "error": _json_field(fields, "error"),
        "callback": callback,
    }
