"""A light Dify stream source for the in-flight scenario: tens of thousands of paced chat streams from one process.

``difyq emulator`` (uvicorn, Starlette, a task and a timer per event) spends about 2.4 ms of CPU on a 10-token
stream, so at 10,000 concurrent 10 s streams it alone would need 2.4 cores and become the limit being measured.
This server sends the same bytes for a chat app's streaming ``POST /v1/chat-messages`` (Dify 0.15.8's
``message`` events, the closing empty ``message``, ``message_end`` with usage, chunked, ``event: ping`` when the
stream falls silent for 10 s) from a bare asyncio protocol: one pending timer per open stream, each event one
``json.dumps`` and one write. Connections are kept alive, as Dify's behind nginx are.

The answer's pace comes from the command line (time to first token, tokens per second, answer length); several
``--key`` may be served at once. Every call is recorded: its key, its query, when it started and ended, and the
``total_tokens`` its usage reports. Control routes: ``GET /_source/calls`` answers the calls since the last
``DELETE /_source/calls``, with the fields of the emulator's ``/_emulator/calls`` (``path``, ``body`` with the
query, ``started_at``, ``ended_at``, null for a stream the client cut); ``DELETE`` answers the calls it forgets, so
one request takes them (a ``GET`` then a ``DELETE`` would lose a call that ended between the two); ``GET
/_source/stats`` answers ``{"open": N, "max_open": M, "calls": K}``. Anything else is a 404.

    python -m tests.bench.stream_source --port 8998 --key app-... --ttft 1 --tokens-per-second 1 --answer-tokens 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from difyq.worker.dify.emulator import wire

_MAX_HEAD = 64 * 1024
_PING_AFTER_S = 10.0
_CHAT_PATH = "/v1/chat-messages"
# A timer may fire up to the loop's clock resolution early: a token that close to due is sent, not pinged over.
_EARLY_S = 0.005
_STREAM_HEAD = (
    "HTTP/1.1 200 OK\r\n"
    f"Content-Type: {wire.SSE_CONTENT_TYPE}\r\n"
    + "".join(f"{name}: {value}\r\n" for name, value in wire.DIFY_HEADERS.items())
    + "Transfer-Encoding: chunked\r\n\r\n"
).encode()


@dataclass(frozen=True)
class Pace:
    """How every answer is paced: first token after ``ttft_s``, then ``tokens_per_second`` (0: all at once)."""

    keys: frozenset[str]
    ttft_s: float
    tokens_per_second: float
    answer_tokens: int

    def due(self, index: int) -> float:
        """Seconds from the call's start to token ``index``."""
        spacing = 1.0 / self.tokens_per_second if self.tokens_per_second else 0.0
        return self.ttft_s + index * spacing


class Calls:
    """Every call served since the last reset, and how many streams are open."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.open = 0
        self.max_open = 0
        self.total = 0

    def opened(self) -> None:
        self.open += 1
        self.total += 1
        self.max_open = max(self.max_open, self.open)

    def closed(self, stream: Stream, ended_at: float | None) -> None:
        self.open -= 1
        self.records.append({"path": _CHAT_PATH, "body": {"query": stream.query}, "key": stream.key,
                             "started_at": stream.started_at, "ended_at": ended_at,
                             "total_tokens": stream.total_tokens})


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


class Stream:
    """One answer in progress on a connection: its envelope, its next event's timer."""

    def __init__(self, protocol: SourceProtocol, key: str, query: str) -> None:
        self.protocol = protocol
        self.key = key
        self.query = query
        self.total_tokens = len(query.split()) + 5 + protocol.pace.answer_tokens
        self.started_at = time.time()
        self.started = protocol.loop.time()
        self.index = 0
        self.silent_since = self.started
        message_id = str(uuid.uuid4())
        self.envelope = {"conversation_id": str(uuid.uuid4()), "message_id": message_id,
                         "created_at": int(self.started_at), "task_id": str(uuid.uuid4()), "id": message_id}
        self.handle: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        """Wake at the next token, or at the ping a silence of 10 s calls for, whichever comes first."""
        due = self.started + self.protocol.pace.due(self.index)
        self.handle = self.protocol.loop.call_at(min(due, self.silent_since + _PING_AFTER_S), self.step)

    def step(self) -> None:
        pace, protocol = self.protocol.pace, self.protocol
        now = protocol.loop.time()
        if now + _EARLY_S < self.started + pace.due(self.index):
            protocol.send(_chunk(wire.PING_FRAME))
            self.silent_since = now
            self.schedule()
            return
        protocol.send(_chunk(self.frame("message", answer=f" word{self.index}", from_variable_selector=None)))
        self.index += 1
        self.silent_since = now
        if self.index < pace.answer_tokens:
            self.schedule()
            return
        usage = wire.usage(len(self.query.split()) + 5, pace.answer_tokens, now - self.started)
        protocol.send(_chunk(self.frame("message", answer="", from_variable_selector=None))
                      + _chunk(self.frame("message_end", metadata={"usage": usage}, files=None)) + b"0\r\n\r\n")
        protocol.finish(time.time())

    def frame(self, event: str, **fields: Any) -> bytes:
        return wire.sse_frame({"event": event, **self.envelope, **fields})

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class SourceProtocol(asyncio.Protocol):
    """One keep-alive connection: requests one at a time, a stream answered by timers."""

    def __init__(self, pace: Pace, calls: Calls) -> None:
        self.pace = pace
        self.calls = calls
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self.stream is None:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self.transport.close()
                return
            request_line, *header_lines = bytes(self.buffer[:head_end]).decode("latin-1").split("\r\n")
            headers = {name.strip().lower(): value.strip()
                       for name, _, value in (line.partition(":") for line in header_lines)}
            end = head_end + 4 + int(headers.get("content-length") or 0)
            if len(self.buffer) < end:
                return
            body = bytes(self.buffer[head_end + 4:end])
            del self.buffer[:end]
            self.handle(request_line, headers, body)

    def handle(self, request_line: str, headers: dict[str, str], body: bytes) -> None:
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path == "/_source/calls":
            records = self.calls.records
            if method == "DELETE":
                self.calls.records = []
            self.send(_response("200 OK", json.dumps(records).encode()))
        elif path == "/_source/stats":
            stats = {"open": self.calls.open, "max_open": self.calls.max_open, "calls": self.calls.total}
            self.send(_response("200 OK", json.dumps(stats).encode()))
        elif method == "POST" and path == _CHAT_PATH:
            key = headers.get("authorization", "").removeprefix("Bearer ")
            if key not in self.pace.keys:
                self.send(_response("401 UNAUTHORIZED", json.dumps(
                    {"code": "unauthorized", "message": wire.AUTH_INVALID, "status": 401}).encode()))
                return
            query = str(json.loads(body or b"{}").get("query") or "")
            self.stream = Stream(self, key, query)
            self.calls.opened()
            self.send(_STREAM_HEAD)
            self.stream.schedule()
        else:
            self.send(_response("404 NOT FOUND", b'{"code": "not_found", "status": 404}'))

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def finish(self, ended_at: float | None) -> None:
        """The stream ended (``ended_at``) or was cut by the client (None): record it, take the next request."""
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()
            self.calls.closed(stream, ended_at)
        if ended_at is not None and self.buffer:
            self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.finish(None)


async def serve(host: str, port: int, pace: Pace) -> None:
    calls = Calls()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SourceProtocol(pace, calls), host, port, backlog=8192,
                                      reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", action="append", required=True, help="an app key a call may bear (repeatable)")
    parser.add_argument("--ttft", type=float, default=1.0, help="seconds to the first token")
    parser.add_argument("--tokens-per-second", type=float, default=1.0, help="0: every token at once")
    parser.add_argument("--answer-tokens", type=int, default=10)
    args = parser.parse_args()
    pace = Pace(frozenset(args.key), args.ttft, args.tokens_per_second, args.answer_tokens)
    asyncio.run(serve(args.host, args.port, pace))


if __name__ == "__main__":
    main()
