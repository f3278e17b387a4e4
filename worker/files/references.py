"""Where a job request names files: its ``files`` list (``files[0]``) and its file-typed workflow inputs
(``inputs.contract``, one file object; ``inputs.pages[1]``, one of a list). A file object is a mapping with a
``url`` or an ``upload_file_id``; ``complete_file`` gives it the ``transfer_method`` and ``type`` Dify needs."""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

FILE_TYPES = ("image", "document", "audio", "video", "custom")
_SOURCE_KEYS = ("url", "upload_file_id")


@dataclass(frozen=True)
class FileReference:
    """One file object of a request and where it sits (``files[0]``, ``inputs.contract``)."""

    path: str
    file: dict[str, Any]


def is_file_object(value: Any) -> bool:
    """Whether an input value is a file object (a mapping with a ``url`` or an ``upload_file_id``)."""
    return isinstance(value, Mapping) and any(key in value for key in _SOURCE_KEYS)


def type_of_name(name: str) -> str:
    """The Dify file type of a file name or URL path: ``image``, ``audio``, ``video`` by its extension, else
    ``document``."""
    media_type, _ = mimetypes.guess_type(name)
    kind = (media_type or "").partition("/")[0]
    return kind if kind in ("image", "audio", "video") else "document"


def name_of_url(url: str) -> str:
    """The file name a URL's path ends in (``report.pdf``), or ``file`` when it ends in none."""
    return unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2]) or "file"


def complete_file(file: Mapping[str, Any]) -> dict[str, Any]:
    """``file`` with its ``transfer_method`` (``remote_url`` when it has a URL, else ``local_file``) and its
    ``type`` (from the URL's extension, else ``document``) filled in when absent."""
    completed = dict(file)
    if "transfer_method" not in completed:
        completed["transfer_method"] = "remote_url" if completed.get("url") is not None else "local_file"
    if "type" not in completed:
        url = completed.get("url")
        completed["type"] = type_of_name(urlsplit(url).path) if isinstance(url, str) else "document"
    return completed


def file_references(request: Mapping[str, Any]) -> Iterator[FileReference]:
    """Every file object of a job request, in order: ``files`` first, then file-typed inputs."""
    for index, file in enumerate(request.get("files") or []):
        yield FileReference(f"files[{index}]", file)
    for name, value in (request.get("inputs") or {}).items():
        if is_file_object(value):
            yield FileReference(f"inputs.{name}", value)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if is_file_object(item):
                    yield FileReference(f"inputs.{name}[{index}]", item)


def job_files(request: Mapping[str, Any] | None, uploaded: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The job resource's ``files``: each file of the request, where it sits (``source``), its ``type``,
    ``name``, ``size``, ``mime_type`` and ``upload_file_id`` (as Dify answered the worker's upload; a file not
    uploaded by the worker has its URL's name and no size). Never the file's content."""
    by_source = {entry["source"]: entry for entry in uploaded or []}
    shown = []
    for reference in file_references(request or {}):
        url = reference.file.get("url")
        shown.append(by_source.get(reference.path) or {
            "source": reference.path, "type": reference.file.get("type"),
            "name": name_of_url(url) if isinstance(url, str) else None, "size": None, "mime_type": None,
            "upload_file_id": reference.file.get("upload_file_id")})
    return shown
