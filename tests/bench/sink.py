"""The callback sink: a minimal HTTP/1.1 server that records when each callback arrives, run as its own process.

It must cost next to nothing per request, so it is a bare asyncio protocol (no framework, keep-alive, bodies by
``Content-Length``). Every request other than the control routes counts as a callback: its ``webhook-id`` header
(difyq's job id; the baselines send one too) and its arrival time (``time.time()``, comparable across processes
on one machine) are kept, first arrival per id.

A request to a path under ``/fail`` is a receiver that is down: it answers 500, and its ``webhook-id`` is kept
apart (first attempt per id), so a job whose callbacks all fail still shows that it ended.

Control routes: ``GET /_sink/arrivals?from=N`` answers ``{"arrivals": [[id, t], ...], "next": M}`` (arrivals N..M-1
in arrival order); ``GET /_sink/failures?from=N`` the same for the attempts the ``/fail`` path refused;
``GET /_sink/health`` answers ``ok``.

    python -m tests.bench.sink --port 8999
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_FAILED = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
FAILING_PATH = "/fail"
_MAX_HEAD = 64 * 1024


class Arrivals:
    """First arrival time per webhook id, and the order they came in."""

    def __init__(self) -> None:
        self.order: list[tuple[str, float]] = []
        self.seen: set[str] = set()
        self.duplicates = 0

    def record(self, webhook_id: str, at: float) -> None:
        if webhook_id in self.seen:
            self.duplicates += 1
            return
        self.seen.add(webhook_id)
        self.order.append((webhook_id, at))

    def page(self, start: int) -> bytes:
        chunk = self.order[start:]
        return json.dumps({"arrivals": chunk, "next": start + len(chunk), "duplicates": self.duplicates}).encode()


def _response(body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class SinkProtocol(asyncio.Protocol):
    """One connection: parse pipelined requests out of the buffer and answer each at once."""

    def __init__(self, arrivals: Arrivals, failures: Arrivals) -> None:
        self.arrivals = arrivals
        self.failures = failures
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self._fail()
                return
            head = bytes(self.buffer[:head_end]).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                self._fail()
                return
            length = int(headers.get("content-length") or 0)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            del self.buffer[:end]
            self.transport.write(self._handle(request_line, headers))

    def _handle(self, request_line: str, headers: dict[str, str]) -> bytes:
        parts = request_line.split(" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "/")
        if target.startswith("/_sink/"):
            url = urlsplit(target)
            if url.path in ("/_sink/arrivals", "/_sink/failures") and method == "GET":
                start = int(parse_qs(url.query).get("from", ["0"])[0])
                kept = self.arrivals if url.path == "/_sink/arrivals" else self.failures
                return _response(kept.page(start))
            if url.path == "/_sink/health":
                return _response(b"ok", "text/plain")
            return _BAD
        webhook_id = headers.get("webhook-id")
        if target.startswith(FAILING_PATH):
            if webhook_id:
                self.failures.record(webhook_id, time.time())
            return _FAILED
        if webhook_id:
            self.arrivals.record(webhook_id, time.time())
        return _OK

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.write(_BAD)
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int) -> None:
    arrivals, failures = Arrivals(), Arrivals()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(arrivals, failures), host, port, backlog=4096,
                                      reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
