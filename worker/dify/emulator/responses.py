"""ASGI responses for what Starlette's stock ones cannot do: an SSE stream with pings that notices a client
leaving at once, a call that hangs, and a connection dropped halfway through an answer.

Each one watches the client side (`http.disconnect`) while it runs, so an abandoned stream frees its app's
concurrency slot immediately, and each reports how it ended through `on_close` exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from difyq.worker.dify.emulator import wire

OnClose = Callable[[bool], None]


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_done(*awaitables: Any) -> set[asyncio.Future[Any]]:
    """Run the awaitables until one finishes, cancel the others and return the finished ones."""
    tasks = {asyncio.ensure_future(awaitable) for awaitable in awaitables}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    return done


def _raw_headers(content_type: str, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    headers = {"content-type": content_type, **extra}
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


class EventStreamResponse:
    """`data: <json>\\n\\n` per event, `event: ping\\n\\n` whenever the events fall silent for `ping_interval_s`.
    `on_close(disconnected)` runs when the stream ends or the client goes away. `ping_first`: a ping opens the
    stream (Dify 1.x)."""

    def __init__(self, events: AsyncGenerator[dict[str, Any], None], ping_interval_s: float, on_close: OnClose,
                 *, ping_first: bool = False) -> None:
        self._events = events
        self._ping_interval_s = ping_interval_s
        self._on_close = on_close
        self._ping_first = ping_first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = True
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": _raw_headers(wire.SSE_CONTENT_TYPE, wire.DIFY_HEADERS),
                }
            )
            pump = asyncio.ensure_future(self._pump(send))
            done = await _first_done(_wait_for_disconnect(receive), pump)
            disconnected = pump not in done  # a finished response also reads as a disconnect: the pump decides
            for task in done:
                task.result()
        finally:
            self._on_close(disconnected)

    async def _next_event(self) -> dict[str, Any] | None:
        return await anext(self._events, None)

    async def _pump(self, send: Send) -> None:
        pending: asyncio.Future[dict[str, Any] | None] | None = None
        try:
            if self._ping_first:
                await send({"type": "http.response.body", "body": wire.PING_FRAME, "more_body": True})
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(self._next_event())
                done, _ = await asyncio.wait({pending}, timeout=self._ping_interval_s)
                if not done:
                    await send({"type": "http.response.body", "body": wire.PING_FRAME, "more_body": True})
                    continue
                event, pending = pending.result(), None
                if event is None:
                    break
                await send({"type": "http.response.body", "body": wire.sse_frame(event), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.wait({pending})
            await self._events.aclose()


class HangResponse:
    """Never answers. Ends when the client gives up, or, when the server shuts down (`released`), by dropping
    the connection after the status line."""

    def __init__(self, released: asyncio.Event, on_close: OnClose) -> None:
        self._released = released
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = True
        try:
            listener = asyncio.ensure_future(_wait_for_disconnect(receive))
            done = await _first_done(listener, self._released.wait())
            disconnected = listener in done
            if not disconnected:
                await _drop(send, b"")
        finally:
            self._on_close(disconnected)


class SilentStreamResponse:
    """Dify 1.x's silent failure of a streaming call (a missing required input, an unknown conversation): 200, one
    ping, then nothing until the server gives up after `close_after_s` (300 s in Dify) and ends the stream, or
    the client leaves, or the server shuts down (`released`)."""

    def __init__(self, released: asyncio.Event, close_after_s: float, on_close: OnClose) -> None:
        self._released = released
        self._close_after_s = close_after_s
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = True
        try:
            headers = _raw_headers(wire.SSE_CONTENT_TYPE, wire.DIFY_HEADERS)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": wire.PING_FRAME, "more_body": True})
            listener = asyncio.ensure_future(_wait_for_disconnect(receive))
            done = await _first_done(listener, self._released.wait(), asyncio.sleep(self._close_after_s))
            disconnected = listener in done
            if not disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._on_close(disconnected)


class CutResponse:
    """A blocking answer whose connection drops halfway through the body: the status line and headers
    promise the whole body, half of it is sent, and the server closes the connection."""

    def __init__(self, body: bytes, on_close: OnClose) -> None:
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await _drop(send, self._body)
        finally:
            self._on_close(False)


async def _drop(send: Send, body: bytes) -> None:
    """Start a response that promises `body` and return after half of it: uvicorn then closes the connection."""
    headers = _raw_headers("application/json", {**wire.DIFY_HEADERS, "content-length": str(len(body) + 1)})
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
