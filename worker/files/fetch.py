"""FileFetcher: a job's file fetched from its URL through the SSRF guard, for the worker to upload to Dify.

Every hop is checked by ``check_destination`` (public addresses only, unless the app's allow list names the host)
and sent through the callbacks' ``PinnedTransport`` (no second DNS answer, no proxy); redirects are followed by
hand, up to ``MAX_REDIRECTS``, each target checked like the first URL, so a redirect into the cluster is refused.
The body is read up to ``max_bytes`` (a ``Content-Length`` over it refuses before reading) and its content type
must suit the file's Dify type. Failures are ``FileFailure``: ``file_fetch_failed`` (retryable for a 5xx, a 408
or 429, or a transport failure; permanent for other answers and blocked URLs), ``file_too_large``,
``file_type_unsupported``.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from email.message import Message
from urllib.parse import urljoin

from urllib3 import HTTPResponse
from urllib3.exceptions import HTTPError as TransportError

from difyq.worker.callbacks.ssrf import BlockedDestination, UnresolvableDestination, check_destination
from difyq.worker.callbacks.transport import PinnedTransport
from difyq.worker.files.references import name_of_url

MAX_REDIRECTS = 5
_READ_SIZE = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRY_STATUSES = frozenset({408, 429})
# Content types of Dify's document extensions (pdf, txt, md, html, csv, xml, eml, msg, epub, Office files).
_DOCUMENT_TYPES = frozenset({
    "application/pdf", "application/msword", "application/vnd.ms-excel", "application/vnd.ms-powerpoint",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    "application/xml", "application/epub+zip", "application/vnd.ms-outlook", "message/rfc822",
})
_UNTYPED = frozenset({"", "application/octet-stream", "binary/octet-stream"})


class FileFailure(Exception):
    """A file that could not be fetched (or uploaded); ``code`` is the job's error code, ``retryable`` whether a
    later attempt may succeed."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, status: int | None = None):
        super().__init__(message)
        self.code, self.message, self.retryable, self.status = code, message, retryable, status


@dataclass(frozen=True)
class FetchedFile:
    name: str
    mime_type: str
    content: bytes


def suits(file_type: str, mime_type: str) -> bool:
    """Whether a body of ``mime_type`` may be sent to Dify as a file of ``file_type``."""
    if file_type == "custom":
        return True
    if file_type in ("image", "audio", "video"):
        return mime_type.startswith(f"{file_type}/")
    return mime_type in _DOCUMENT_TYPES or mime_type.startswith("text/")


def _disposition_name(header: str | None) -> str | None:
    if not header:
        return None
    message = Message()
    message["Content-Disposition"] = header
    name = message.get_filename()
    return name.replace("/", "_").replace("\\", "_") if name else None


class FileFetcher:
    """Fetches files for one worker process; thread-safe (one ``PinnedTransport``)."""

    def __init__(self, transport: PinnedTransport | None = None) -> None:
        self._transport = transport or PinnedTransport()

    def fetch(self, url: str, file_type: str, *, allow_hosts: tuple[str, ...], setting: str, max_bytes: int,
              timeout: float) -> FetchedFile:
        """The file at ``url`` (following checked redirects); ``FileFailure`` when it cannot be had."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                destination = check_destination(url, allow_hosts, subject="file", setting=setting)
            except UnresolvableDestination as exc:
                raise FileFailure("file_fetch_failed", exc.reason, retryable=True) from None
            except BlockedDestination as exc:
                raise FileFailure("file_fetch_failed", exc.reason) from None
            try:
                response = self._transport.get(destination, {"Accept": "*/*", "User-Agent": "difyq"}, timeout)
            except TransportError as exc:
                raise FileFailure("file_fetch_failed", f"cannot fetch the file from {destination.host!r}: "
                                  f"{type(exc).__name__}", retryable=True) from None
            try:
                if response.status in _REDIRECTS and response.headers.get("Location"):
                    url = urljoin(url, response.headers["Location"])
                    continue
                return self._read(response, url, destination.host, file_type, max_bytes)
            finally:
                response.close()
                response.release_conn()
        raise FileFailure("file_fetch_failed", f"more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _read(response: HTTPResponse, url: str, host: str, file_type: str, max_bytes: int) -> FetchedFile:
        status = response.status
        if status != 200:
            raise FileFailure("file_fetch_failed", f"{host!r} answered HTTP {status} for the file",
                              retryable=status >= 500 or status in _RETRY_STATUSES, status=status)
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FileFailure("file_too_large", f"the file has {int(length)} bytes, over the limit of {max_bytes}")
        name = _disposition_name(response.headers.get("Content-Disposition")) or name_of_url(url)
        mime_type = (response.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
        if mime_type in _UNTYPED:
            mime_type = mimetypes.guess_type(name)[0] or mime_type
        if not suits(file_type, mime_type):
            raise FileFailure("file_type_unsupported",
                              f"a {mime_type or 'untyped'} body is not a {file_type} file Dify takes")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.stream(_READ_SIZE):
                size += len(chunk)
                if size > max_bytes:
                    raise FileFailure("file_too_large", f"the file is over the limit of {max_bytes} bytes")
                chunks.append(chunk)
        except TransportError as exc:
            raise FileFailure("file_fetch_failed", f"the file's download from {host!r} broke off: "
                              f"{type(exc).__name__}", retryable=True) from None
        return FetchedFile(name, mime_type or "application/octet-stream", b"".join(chunks))
