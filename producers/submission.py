"""JobSubmission: a job as every producer states it (the ``POST /v1/jobs`` body, a hook's or a schedule's mapping
rendered for one delivery or fire, a ``difyq enqueue`` call), validated by one model, and the ``NewJob`` that
``submit()`` stores, built from it in one place."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from difyq.worker.config import Priority, priority_level
from difyq.worker.files.references import FILE_TYPES, complete_file, is_file_object
from difyq.worker.jobs.model import TENANT_MAX_CHARS, JobRequest, NewJob, default_tenant
from difyq.worker.jobs.threads import MAX_THREAD_NAME

THREAD_NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
"""A thread name: any text without control characters (``github:acme/app#123``, ``slack:T01/C02:1700000000.1``)."""

# What may follow the host: anything but control characters and white space, spelt out rather than as ``\S``, which
# Python's regexes and the ECMAScript ones that OpenAPI patterns follow define differently (\x1c-\x1f, \x85).
_URL_REST = r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]*"
_HTTP_URL = r"^https?://[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?([/?#]" + _URL_REST + r")?(?![\s\S])"
r"""An http(s) URL with a host name or IPv4 address (what a ``remote_url`` file's ``url`` must be). It ends with
``(?![\s\S])`` rather than ``$``, which in Python's regexes also matches before a final newline: the OpenAPI
pattern and the validator then accept the same strings."""


def _one_of_the_two_sources(schema: dict[str, Any]) -> None:
    """The OpenAPI schema says what the validators require: a ``remote_url`` file (the default with a ``url``)
    with its http(s) ``url``, or a ``local_file`` (the default without one) with its ``upload_file_id``."""
    properties = schema["properties"]
    schema["anyOf"] = [
        {"properties": {"transfer_method": {"const": "remote_url"},
                        "url": {"type": "string", "maxLength": 2048, "pattern": _HTTP_URL}},
         "required": ["url"]},
        {"properties": {"transfer_method": {"const": "local_file"},
                        "upload_file_id": {"type": "string", "minLength": 1, "maxLength": 64}},
         "required": ["upload_file_id"],
         "anyOf": [{"required": ["transfer_method"]}, {"not": {"required": ["url"]}}]},
    ]
    properties["transfer_method"] = {"type": "string", "enum": ["remote_url", "local_file"]}
    properties["type"] = {"type": "string", "enum": list(FILE_TYPES)}
    schema.pop("required", None)


class DifyFile(BaseModel):
    """A Dify file object: a ``remote_url`` file is at its http(s) ``url`` (fetched by the worker and uploaded,
    or by Dify, as the app's ``files.transfer`` says), a ``local_file`` is one uploaded to Dify before, named by its
    ``upload_file_id``. ``transfer_method`` and ``type`` may be left out (``references.complete_file``)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_of_the_two_sources)

    type: Literal["image", "document", "audio", "video", "custom"]
    transfer_method: Literal["remote_url", "local_file"]
    url: str | None = Field(default=None, max_length=2048, validate_default=True)
    upload_file_id: str | None = Field(default=None, max_length=64, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _completed(cls, value: Any) -> Any:
        return complete_file(value) if isinstance(value, Mapping) else value

    @field_validator("url")
    @classmethod
    def _remote_files_have_a_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("transfer_method") == "remote_url" and (url is None or not re.fullmatch(_HTTP_URL, url)):
            raise PydanticCustomError("file_url", "a remote_url file needs the http(s) URL it is fetched from")
        return url

    @field_validator("upload_file_id")
    @classmethod
    def _uploaded_files_have_an_id(cls, upload_file_id: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("transfer_method") == "local_file" and not upload_file_id:
            raise PydanticCustomError("file_upload_id", "a local_file file needs the upload_file_id Dify gave it")
        return upload_file_id


def _file_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with each file-typed value (a file object, or a list holding some) validated and completed as a
    ``DifyFile``; a wrong one is reported at ``inputs.<name>``."""

    def checked(value: Any) -> Any:
        return DifyFile.model_validate(value).model_dump(exclude_none=True) if is_file_object(value) else value

    return {name: [checked(item) for item in value] if isinstance(value, list) else checked(value)
            for name, value in inputs.items()}


class JobSubmission(BaseModel):
    """The fields of a job submission; ``files`` are Dify file objects (``{"type": "image", "transfer_method":
    "remote_url", "url": …}``)."""

    model_config = ConfigDict(extra="forbid")

    app: str = Field(min_length=1, max_length=200)
    query: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    user: str | None = Field(default=None, min_length=1, max_length=256)
    conversation_id: str | None = Field(default=None, max_length=64)
    thread: str | None = Field(default=None, min_length=1, max_length=MAX_THREAD_NAME, pattern=THREAD_NAME_PATTERN)
    files: list[DifyFile] | None = None
    callback_url: str | None = Field(default=None, max_length=2048, json_schema_extra={"format": "uri"})
    metadata: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=512)
    workflow_id: str | None = Field(default=None, min_length=1, max_length=64)
    priority: Priority = 0
    tenant: str | None = Field(default=None, min_length=1, max_length=TENANT_MAX_CHARS)

    @field_validator("inputs")
    @classmethod
    def _inputs_files_completed(cls, inputs: dict[str, Any]) -> dict[str, Any]:
        return _file_inputs(inputs)

    def new_job(self, *, source: str, scope: str, request_id: str | None = None) -> NewJob:
        """The job to store for this submission from ``source`` (``api``, ``hook``, ``schedule``, ``cli``)."""
        request = JobRequest(query=self.query, inputs=self.inputs, user=self.user,
                             conversation_id=self.conversation_id, metadata=self.metadata,
                             files=None if self.files is None else [file.model_dump(exclude_none=True)
                                                                    for file in self.files],
                             workflow_id=self.workflow_id)
        return NewJob(app=self.app, source=source, request=request, callback_url=self.callback_url,
                      idempotency_key=self.idempotency_key, scope=scope, request_id=request_id,
                      priority=priority_level(self.priority), tenant=self.tenant or default_tenant(scope),
                      thread=self.thread)
