"""Raw HTTP captures (`curl -i` output) as data: status, headers and body bytes, plus the INDEX.md that says
which request produced each one.

A capture file is the status line, header lines (CRLF), a blank line and the body bytes exactly as received
(curl has already undone chunked transfer coding, so a `Transfer-Encoding: chunked` capture holds the plain
body). Interim `1xx` responses that curl prints before the final one are skipped. Nothing here knows about Dify:
the Dify client tests and the emulator tests both read the fixtures through it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DIFY_0_15_8 = FIXTURES / "dify-0.15.8"
DIFY_1_14_2 = FIXTURES / "dify-1.14.2"

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(r"(HTTP/[\d.]+) (\d{3})(?: (.*))?")
_INDEX_ROW = re.compile(r"^\| (?P<file>\S+) \| (?P<request>.+?) \| (?P<key>\S+) \| `(?P<body>.*)` \|$")
_INDEX_REQUEST = re.compile(r"(?P<method>[A-Z]+) (?P<path>\S+)(?: → (?P<status>\d{3}))?(?: (?P<note>.*))?")


@dataclass(frozen=True)
class Capture:
    """One recorded HTTP response."""

    name: str
    http_version: str
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def status_line(self) -> str:
        return f"{self.http_version} {self.status} {self.reason}".rstrip()

    def header(self, name: str) -> str | None:
        """The first header of that name (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    @property
    def content_type(self) -> str:
        return self.header("Content-Type") or ""

    @property
    def is_chunked(self) -> bool:
        return "chunked" in (self.header("Transfer-Encoding") or "").lower()

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class CaptureRequest:
    """What INDEX.md says produced a capture: method, path, the app whose key was used, the JSON body sent."""

    file: str
    method: str
    path: str
    expected_status: int | None
    key: str
    body: str
    note: str

    def json_body(self) -> Any:
        return json.loads(self.body) if self.body else None


def parse_capture(raw: bytes, name: str = "") -> Capture:
    """Split `curl -i` output into status, headers and body (the body is everything after the blank line)."""
    rest = raw
    while True:
        split = _HEADER_END.search(rest)
        if split is None:
            raise ValueError(f"{name or 'capture'}: no blank line after the headers")
        head, rest = rest[: split.start()].decode("iso-8859-1"), rest[split.end() :]
        status_line, *header_lines = head.splitlines()
        match = _STATUS_LINE.fullmatch(status_line.strip())
        if match is None:
            raise ValueError(f"{name or 'capture'}: not an HTTP status line: {status_line!r}")
        if not match.group(2).startswith("1"):
            break
    headers = tuple(
        (key.strip(), value.strip()) for key, _, value in (line.partition(":") for line in header_lines if line)
    )
    return Capture(
        name=name,
        http_version=match.group(1),
        status=int(match.group(2)),
        reason=match.group(3) or "",
        headers=headers,
        body=rest,
    )


def load_capture(path: Path) -> Capture:
    return parse_capture(path.read_bytes(), name=path.name)


def load_wire_capture(path: Path) -> Capture:
    """A `*.raw` capture: the exact bytes a server sent, its chunked framing undone (the body as the client
    reads it; `Transfer-Encoding: chunked` stays, so a replay frames it again)."""
    capture = parse_capture(path.read_bytes(), name=path.name)
    if not capture.is_chunked:
        return capture
    body, rest = bytearray(), capture.body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return dataclasses.replace(capture, body=bytes(body))


def iter_captures(directory: Path = DIFY_0_15_8) -> Iterator[Capture]:
    """Every `*.txt` capture of a fixture directory, in file-name order."""
    for path in sorted(directory.glob("*.txt")):
        yield load_capture(path)


def load_index(directory: Path = DIFY_0_15_8) -> dict[str, CaptureRequest]:
    """The request table of a fixture directory's INDEX.md, by capture file name."""
    requests: dict[str, CaptureRequest] = {}
    for line in (directory / "INDEX.md").read_text(encoding="utf-8").splitlines():
        row = _INDEX_ROW.match(line)
        if row is None or row["file"] == "file":
            continue
        request = _INDEX_REQUEST.fullmatch(row["request"])
        if request is None:
            raise ValueError(f"INDEX.md: cannot read the request of {row['file']}: {row['request']!r}")
        requests[row["file"]] = CaptureRequest(
            file=row["file"],
            method=request["method"],
            path=request["path"],
            expected_status=int(request["status"]) if request["status"] else None,
            key=row["key"],
            body=row["body"],
            note=request["note"] or "",
        )
    return requests
