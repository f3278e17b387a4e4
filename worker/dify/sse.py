"""Incremental Server-Sent Events parser: byte chunks in, whole events out.

Network reads split a stream anywhere: inside a line, between the CR and LF of a line end, inside a UTF-8
multibyte character. The parser keeps the bytes of an unfinished line and decodes only complete lines (line
ends are ASCII, so they never fall inside a multibyte character). Lines end in LF, CRLF or CR; a CR that ends one
chunk ends its line at once, and an LF opening the next chunk is then skipped.

Fields follow the WHATWG event-stream rules: `data` lines join with "\n", `event` names the event (default
"message"), lines starting with ":" are comments, other fields are ignored, and a blank line dispatches. An event
without data is never dispatched, so Dify's keep-alive `event: ping` (no `data:` line) yields nothing, and an
event not closed by a blank line before the stream ends is dropped, as the standard says.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_LINE_END = re.compile(rb"\r\n?|\n")


class SSEEvent(NamedTuple):
    """One dispatched event: its `event` name and its `data` text."""

    event: str
    data: str


class SSEParser:
    """Feed it the stream's byte chunks in order; each `feed` returns the events those bytes completed."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._skip_lf and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._skip_lf = False
        self._pending += chunk
        if b"\r" in self._pending:
            return self._take_lines_any_end()
        # LF-only line ends (what Dify sends): the complete lines decode and split in one go.
        last = self._pending.rfind(b"\n")
        if last < 0:
            return []
        lines = self._pending[:last].decode("utf-8", errors="replace").split("\n")
        del self._pending[: last + 1]
        return [event for line in lines if (event := self._take_line(line)) is not None]

    def _take_lines_any_end(self) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        start = 0
        for line_end in _LINE_END.finditer(self._pending):
            event = self._take_line(self._pending[start : line_end.start()].decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            start = line_end.end()
            self._skip_lf = line_end.group() == b"\r" and start == len(self._pending)
        del self._pending[:start]
        return events

    def _take_line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        return SSEEvent(event=event, data="\n".join(data)) if data else None
