"""JobSubmission: a job as every producer states it (the ``POST /v1/jobs`` body, a hook's or a schedule's mapping
rendered for one delivery or fire, a ``difyq enqueue`` call), validated by one model, and the ``NewJob`` that
``submit()`` stores, built from it in one place."""

from __future__ import annotations

import mimetypes
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from difyq.worker.jobs.model import JobRequest, NewJob

_HTTP_URL = r"^https?://[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?([/?#]\S*)?$"
"""An http(s) URL with a host name or IPv4 address (what a ``remote_url`` file's ``url`` must be)."""


def _one_of_the_two_sources(schema: dict[str, Any]) -> None:
    """The OpenAPI schema says what the validators require: a ``remote_url`` file with its http(s) ``url``, or a
    ``local_file`` with its ``upload_file_id``."""
    properties = schema["properties"]
    schema["oneOf"] = [
        {"properties": {"transfer_method": {"const": "remote_url"},
                        "url": {"type": "string", "maxLength": 2048, "pattern": _HTTP_URL}},
         "required": ["type", "transfer_method", "url"]},
        {"properties": {"transfer_method": {"const": "local_file"},
                        "upload_file_id": {"type": "string", "minLength": 1, "maxLength": 64}},
         "required": ["type", "transfer_method", "upload_file_id"]},
    ]
    properties["transfer_method"] = {"type": "string", "enum": ["remote_url", "local_file"]}


class DifyFile(BaseModel):
    """A Dify file object: a ``remote_url`` file is fetched by Dify from its http(s) ``url``, a ``local_file`` is
    one uploaded to Dify before, named by its ``upload_file_id``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_the_two_sources)

    type: Literal["image", "document", "audio", "video", "custom"]
    transfer_method: Literal["remote_url", "local_file"]
    url: str | None = Field(default=None, max_length=2048, validate_default=True)
    upload_file_id: str | None = Field(default=None, max_length=64, validate_default=True)

    @field_validator("url")
    @classmethod
    def _remote_files_have_a_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("transfer_method") == "remote_url" and (url is None or not re.fullmatch(_HTTP_URL, url)):
            raise PydanticCustomError("file_url", "a remote_url file needs the http(s) URL Dify fetches it from")
        return url

    @field_validator("upload_file_id")
    @classmethod
    def _uploaded_files_have_an_id(cls, upload_file_id: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("transfer_method") == "local_file" and not upload_file_id:
            raise PydanticCustomError("file_upload_id", "a local_file file needs the upload_file_id Dify gave it")
        return upload_file_id


class JobSubmission(BaseModel):
    """The fields of a job submission; ``files`` are Dify file objects (``{"type": "image", "transfer_method":
    "remote_url", "url": …}``)."""

    model_config = ConfigDict(extra="forbid")

    app: str = Field(min_length=1, max_length=200)
    query: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    user: str | None = Field(default=None, min_length=1, max_length=256)
    conversation_id: str | None = Field(default=None, max_length=64)
    files: list[DifyFile] | None = None
    callback_url: str | None = Field(default=None, max_length=2048, json_schema_extra={"format": "uri"})
    metadata: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=512)
    workflow_id: str | None = Field(default=None, min_length=1, max_length=64)

    def new_job(self, *, source: str, scope: str, request_id: str | None = None) -> NewJob:
        """The job to store for this submission from ``source`` (``api``, ``hook``, ``schedule``, ``cli``)."""
        request = JobRequest(query=self.query, inputs=self.inputs, user=self.user,
                             conversation_id=self.conversation_id, metadata=self.metadata,
                             files=None if self.files is None else [file.model_dump(exclude_none=True)
                                                                    for file in self.files],
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
