"""Dify's file upload as the emulator serves it: `POST /files/upload` (multipart, one `file` and the `user`), its
limits and refusals, and the check a run makes of its `local_file` references (an uploaded file of the same user).
"""

from __future__ import annotations

import mimetypes
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from difyq.worker.dify.emulator import wire
from difyq.worker.dify.emulator.apps import EmulatedApp
from difyq.worker.dify.emulator.state import CallRecord, EmulatorState, UploadedFile

MB = 1024 * 1024
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "svg"})
AUDIO_EXTENSIONS = frozenset({"mp3", "m4a", "wav", "amr", "mpga"})
VIDEO_EXTENSIONS = frozenset({"mp4", "mov", "mpeg", "webm"})
# What `system_parameters` of `/parameters` tells (MB), and what an upload is held to.
SIZE_LIMITS_MB = {"image_file_size_limit": 10, "video_file_size_limit": 100, "audio_file_size_limit": 50,
                  "file_size_limit": 15}
BLOCKED_EXTENSIONS = frozenset({"exe", "bat", "cmd", "sh", "dll", "msi"})  # UPLOAD_FILE_EXTENSION_BLACKLIST
FILE_TOO_LARGE = "File size exceeded. {size:.2f} MB > {limit} MB"
INVALID_UPLOAD_FILE = "Invalid upload file"


def _limit_mb(extension: str) -> int:
    if extension in IMAGE_EXTENSIONS:
        return SIZE_LIMITS_MB["image_file_size_limit"]
    if extension in AUDIO_EXTENSIONS:
        return SIZE_LIMITS_MB["audio_file_size_limit"]
    if extension in VIDEO_EXTENSIONS:
        return SIZE_LIMITS_MB["video_file_size_limit"]
    return SIZE_LIMITS_MB["file_size_limit"]


async def upload(request: Request, record: CallRecord, app: EmulatedApp, state: EmulatorState) -> dict[str, Any]:
    """Check and keep one upload; Dify's 201 body. Raises `wire.ApiError` as Dify refuses one."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise wire.error(400, "no_file_uploaded", "Please upload your file.")
    form = await request.form()
    files = [value for value in form.getlist("file") if isinstance(value, UploadFile)]
    user = form.get("user")
    record.body = {"user": user, "files": [{"name": file.filename, "content_type": file.content_type}
                                           for file in files]}
    if not files:
        raise wire.error(400, "no_file_uploaded", "Please upload your file.")
    if len(files) > 1 or len(form.getlist("file")) > 1:
        raise wire.error(400, "too_many_files", "Only one file is allowed.")
    file = files[0]
    if not file.filename:
        raise wire.error(400, "filename_not_exists_error", "The specified filename does not exist.")
    if not isinstance(user, str) or not user:
        raise wire.error(400, "invalid_param", wire.USER_REQUIRED)
    content = await file.read()
    extension = file.filename.rpartition(".")[2].lower() if "." in file.filename else ""
    if extension in BLOCKED_EXTENSIONS:
        raise wire.error(415, "unsupported_file_type", "File type not allowed.")
    limit = _limit_mb(extension)
    if len(content) > limit * MB:
        raise wire.error(413, "file_too_large", FILE_TOO_LARGE.format(size=len(content) / MB, limit=limit))
    mime_type = file.content_type or mimetypes.guess_type(file.filename)[0] or "application/octet-stream"
    uploaded = UploadedFile(id=str(uuid.uuid4()), app=app.name, user=user, name=file.filename, size=len(content),
                            extension=extension, mime_type=mime_type, created_at=int(time.time()))
    state.remember_upload(uploaded)
    record.body["files"][0]["size"] = len(content)
    return {"id": uploaded.id, "name": uploaded.name, "size": uploaded.size, "extension": uploaded.extension,
            "mime_type": uploaded.mime_type, "created_by": str(uuid.uuid5(uuid.NAMESPACE_URL, user)),
            "created_at": uploaded.created_at}


def _file_objects(body: Mapping[str, Any], inputs: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for file in body.get("files") or []:
        if isinstance(file, Mapping):
            yield file
    for value in inputs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Mapping) and "transfer_method" in item:
                yield item


def check_local_files(state: EmulatorState, body: Mapping[str, Any], inputs: Mapping[str, Any], user: str) -> None:
    """Every `local_file` of a run (in `files` or a file-typed input) must name an upload of the run's user."""
    for file in _file_objects(body, inputs):
        if file.get("transfer_method") != "local_file":
            continue
        upload_file_id = file.get("upload_file_id")
        if not isinstance(upload_file_id, str) or state.upload(upload_file_id, user) is None:
            raise wire.error(400, "invalid_param", INVALID_UPLOAD_FILE)


def described_file(state: EmulatorState, file: Mapping[str, Any], user: str) -> dict[str, Any]:
    """What a workflow's output tells of a file input: an upload's name, size and mime type, else its URL."""
    upload_file_id = file.get("upload_file_id")
    uploaded = state.upload(upload_file_id, user) if isinstance(upload_file_id, str) else None
    if uploaded is None:
        return {"transfer_method": file.get("transfer_method"), "url": file.get("url")}
    return {"transfer_method": "local_file", "name": uploaded.name, "size": uploaded.size,
            "mime_type": uploaded.mime_type}
