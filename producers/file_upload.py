"""Files a producer holds itself (``difyq enqueue --file PATH``) go to Dify before the job exists: uploaded with
``POST /files/upload`` as the job's ``user``, the job then names each by its ``upload_file_id`` (``local_file``),
so nothing large is stored in Redis."""

from __future__ import annotations

import mimetypes

from difyq.worker import metrics
from difyq.worker.dify.client import DifyClient
from difyq.worker.dify.errors import DifyError
from difyq.worker.files.references import type_of_name
from difyq.worker.runtime import Runtime

UPLOAD_TIMEOUT_S = 60.0


def uploader(runtime: Runtime, app_name: str, user: str | None, thread: str | None) -> str | None:
    """The Dify user a job's files are uploaded as: the job's ``user``, but for a job of a known thread the
    thread's, whom its Dify calls run as (Dify lets only the uploading user reference a file)."""
    return (runtime.threads.user(app_name, thread) if thread else None) or user


def upload_to_dify(runtime: Runtime, app_name: str, user: str | None, name: str, content: bytes) -> dict[str, str]:
    """Upload ``content`` (a file called ``name``) to the app's Dify for ``user`` (the app's ``user`` when None);
    the file object a job names it by. Raises KeyError for an app that is not configured, DifyError when Dify
    refuses the file or cannot be reached."""
    app = runtime.config.apps[app_name]
    client = DifyClient(runtime.config.app_base_url(app_name), app.api_key.get_secret_value(),
                        connect_timeout=runtime.config.dify.connect_timeout_s, total_timeout=UPLOAD_TIMEOUT_S)
    mime_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    try:
        answer = client.upload_file(name, content, mime_type, user or app.user)
    except DifyError as error:
        metrics.files_transferred.labels(app=app_name, transfer="submit", outcome=error.code).inc()
        raise
    metrics.files_transferred.labels(app=app_name, transfer="submit", outcome="ok").inc()
    metrics.file_bytes.labels(app=app_name, transfer="submit").inc(len(content))
    return {"type": type_of_name(name), "transfer_method": "local_file", "upload_file_id": str(answer["id"])}
