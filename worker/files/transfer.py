"""FileUploads: before a job's Dify call, the files of an app with ``files.transfer: upload`` are fetched by the
worker (``FileFetcher``) and uploaded to Dify (``POST /files/upload``, as the job's ``user``); the call then names
each by its ``upload_file_id`` (``transfer_method: local_file``).

Each upload is kept with the job record (``JobField.FILES``) as soon as Dify answers, so a retry of the job, or an
attempt after a lost worker, references it instead of uploading again. The size limit of a file is the app's
``files.max_bytes``, else the instance's limit for its type from ``GET /parameters`` (``system_parameters``),
else Dify's default. A failure is a ``DifyError`` the runner treats like Dify's own: retried while it may pass,
else the job fails with ``file_fetch_failed``, ``file_too_large`` or ``file_type_unsupported`` and Dify is not
called to run it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import structlog

from difyq.worker import metrics
from difyq.worker.config import AppConfig, Config
from difyq.worker.dify.client import DifyClient, DifyRequest
from difyq.worker.dify.errors import DifyError
from difyq.worker.dify.parameters import AppParameters
from difyq.worker.files.fetch import FileFailure, FileFetcher
from difyq.worker.files.references import FileReference, file_references
from difyq.worker.jobs.schema import JobField
from difyq.worker.jobs.store import JobStore
from difyq.worker.json_codec import loads

log = structlog.get_logger("difyq.worker")

MB = 1024 * 1024
# `system_parameters` names the limit of each file type (in MB); Dify's defaults when it names none.
_LIMIT_KEYS = {"image": "image_file_size_limit", "audio": "audio_file_size_limit",
               "video": "video_file_size_limit"}
_DOCUMENT_LIMIT_KEY = "file_size_limit"
_DEFAULT_LIMITS_MB = {"image_file_size_limit": 10, "audio_file_size_limit": 50, "video_file_size_limit": 100,
                      _DOCUMENT_LIMIT_KEY: 15}
# Dify's refusals of an upload, as the job's error codes.
_UPLOAD_REFUSALS = {"file_too_large": "file_too_large", "unsupported_file_type": "file_type_unsupported"}


def uploaded_file(source: str, file_type: str, answer: dict[str, Any]) -> dict[str, Any]:
    """A file the worker uploaded, as the job keeps and shows it: where the request names it, its Dify type, and
    Dify's ``name``, ``size``, ``mime_type`` and ``id`` (``upload_file_id``)."""
    return {"source": source, "type": file_type, "name": answer.get("name"), "size": answer.get("size"),
            "mime_type": answer.get("mime_type"), "upload_file_id": answer["id"]}


def as_local_file(file: dict[str, Any], upload_file_id: str) -> dict[str, Any]:
    return {"type": file["type"], "transfer_method": "local_file", "upload_file_id": upload_file_id}


class FileUploads:
    """One per worker process; thread-safe."""

    def __init__(self, config: Config, store: JobStore, fetcher: FileFetcher | None = None) -> None:
        self._config = config
        self._store = store
        self._parameters = AppParameters(config)
        self._fetcher = fetcher or FileFetcher()

    def prepare(self, job_id: str, fields: dict[str, str], app_name: str, app: AppConfig, client: DifyClient,
                request: DifyRequest) -> DifyRequest:
        """``request`` with every ``remote_url`` file uploaded and named by its ``upload_file_id`` (the request
        as it is for an app with ``files.transfer: remote_url``, or without such files). Raises DifyError."""
        pending = [reference for reference in file_references({"files": request.files, "inputs": request.inputs})
                   if reference.file.get("transfer_method") == "remote_url"]
        if app.files.transfer != "upload" or not pending:
            if pending:
                metrics.files_transferred.labels(app=app_name, transfer="remote_url", outcome="ok").inc(len(pending))
            return request
        uploaded = loads(fields[JobField.FILES]) if fields.get(JobField.FILES) else []
        ids = {entry["source"]: entry["upload_file_id"] for entry in uploaded}
        for reference in pending:
            if reference.path not in ids:
                entry = self._upload(app_name, app, client, request, reference)
                uploaded.append(entry)
                ids[reference.path] = entry["upload_file_id"]
                self._store.record_files(job_id, uploaded)
        return _referencing(request, ids)

    def _upload(self, app_name: str, app: AppConfig, client: DifyClient, request: DifyRequest,
                reference: FileReference) -> dict[str, Any]:
        file_type = reference.file["type"]
        own = app.files.allow_hosts is not None
        try:
            fetched = self._fetcher.fetch(
                reference.file["url"], file_type, allow_hosts=self._config.file_allow_hosts(app_name),
                setting=f"apps.{app_name}.files.allow_hosts" if own else "callbacks.allow_hosts",
                max_bytes=self._max_bytes(app_name, app, file_type), timeout=app.files.fetch_timeout_s)
        except FileFailure as failure:
            metrics.files_transferred.labels(app=app_name, transfer="upload", outcome=failure.code).inc()
            raise DifyError(failure.code, f"{reference.path}: {failure.message}", failure.status,
                            retryable=failure.retryable) from None
        try:
            answer = client.upload_file(fetched.name, fetched.content, fetched.mime_type, request.user,
                                        trace_id=request.trace_id)
        except DifyError as error:
            code = _UPLOAD_REFUSALS.get(error.code)
            metrics.files_transferred.labels(app=app_name, transfer="upload", outcome=code or error.code).inc()
            if code is None:
                raise
            raise DifyError(code, f"{reference.path}: Dify refused the upload: {error.message}", error.status,
                            retryable=False) from None
        log.info("file_uploaded", source=reference.path, size=len(fetched.content), mime_type=fetched.mime_type)
        metrics.files_transferred.labels(app=app_name, transfer="upload", outcome="ok").inc()
        metrics.file_bytes.labels(app=app_name, transfer="upload").inc(len(fetched.content))
        return uploaded_file(reference.path, file_type, dict(answer))

    def _max_bytes(self, app_name: str, app: AppConfig, file_type: str) -> int:
        if app.files.max_bytes is not None:
            return app.files.max_bytes
        key = _LIMIT_KEYS.get(file_type, _DOCUMENT_LIMIT_KEY)
        limits = (self._parameters.current(app_name) or {}).get("system_parameters") or {}
        limit = limits.get(key)
        return int((limit if isinstance(limit, int | float) and limit > 0 else _DEFAULT_LIMITS_MB[key]) * MB)


def _referencing(request: DifyRequest, ids: dict[str, str]) -> DifyRequest:
    """``request`` with each uploaded file (by its place, ``ids``) named by its ``upload_file_id``."""
    files = [as_local_file(file, ids[f"files[{index}]"]) if f"files[{index}]" in ids else file
             for index, file in enumerate(request.files or [])] if request.files is not None else None
    inputs: dict[str, Any] = {}
    for name, value in request.inputs.items():
        if f"inputs.{name}" in ids:
            inputs[name] = as_local_file(value, ids[f"inputs.{name}"])
        elif isinstance(value, list):
            inputs[name] = [as_local_file(item, ids[f"inputs.{name}[{index}]"])
                            if f"inputs.{name}[{index}]" in ids else item for index, item in enumerate(value)]
        else:
            inputs[name] = value
    return replace(request, files=files, inputs=inputs)
