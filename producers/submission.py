"""JobSubmission: a job as every producer states it (the ``POST /v1/jobs`` body, a hook's or a schedule's mapping
rendered for one delivery or fire, a ``difyq enqueue`` call), validated by one model, and the ``NewJob`` that
``submit()`` stores, built from it in one place."""

from __future__ import annotations

import mimetypes
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from difyq.worker.jobs.model import JobRequest, NewJob


class JobSubmission(BaseModel):
    """The fields of a job submission; ``files`` are Dify file objects (``{"type": "image", "transfer_method":
    "remote_url", "url": …}``)."""

    model_config = ConfigDict(extra="forbid")

    app: str = Field(min_length=1, max_length=200)
    query: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    user: str | None = Field(default=None, min_length=1, max_length=256)
    conversation_id: str | None = Field(default=None, max_length=64)
    files: list[dict[str, Any]] | None = None
    callback_url: str | None = Field(default=None, max_length=2048, json_schema_extra={"format": "uri"})
    metadata: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=512)
    workflow_id: str | None = Field(default=None, min_length=1, max_length=64)

    def new_job(self, *, source: str, scope: str, request_id: str | None = None) -> NewJob:
        """The job to store for this submission from ``source`` (``api``, ``hook``, ``schedule``, ``cli``)."""
        request = JobRequest(query=self.query, inputs=self.inputs, user=self.user,
                             conversation_id=self.conversation_id, files=self.files, metadata=self.metadata,
                             workflow_id=self.workflow_id)
        return NewJob(app=self.app, source=source, request=request, callback_url=self.callback_url,
                      idempotency_key=self.idempotency_key, scope=scope, request_id=request_id)


def remote_file(url: str) -> dict[str, str]:
    """The Dify file object of a file at ``url`` (``difyq enqueue --file``): its type from the name's extension
    (``image``, ``audio``, ``video``, else ``document``), passed to Dify as ``remote_url``."""
    media_type, _ = mimetypes.guess_type(urlsplit(url).path)
    kind = (media_type or "").partition("/")[0]
    return {"type": kind if kind in ("image", "audio", "video") else "document", "transfer_method": "remote_url",
            "url": url}
