"""RequestContext: a pure ASGI middleware (no BaseHTTPMiddleware task hop per request) that gives every request
an id (``X-Request-ID`` in and out, bound to every log line), hands its ``traceparent`` to the jobs it submits,
records the HTTP metrics by route template, and turns an unexpected exception into the API's 500 error body."""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from prometheus_client.metrics import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from difyq.producers.api.errors import error_response
from difyq.worker import metrics, tracing

log = structlog.get_logger("difyq.api")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContext:
    def __init__(self, app: ASGIApp):
        self.app = app
        # The labelled metric children, looked up once per (method, route[, status]) rather than per request.
        self._counters: dict[tuple[str, str, int], Counter] = {}
        self._durations: dict[tuple[str, str], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = (_header(scope, b"x-request-id") or uuid.uuid4().hex)[:128]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = {"code": 500, "sent": False}
        id_header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            with tracing.IncomingTrace(_header(scope, b"traceparent")):
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request_failed", path=scope.get("path"))
            if not status["sent"]:
                await error_response(500, "internal_error", "unexpected error; see the API logs")(
                    scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
        self._record(scope.get("method", ""), _route_template(scope), status["code"], time.perf_counter() - started)

    def _record(self, method: str, route: str, status: int, seconds: float) -> None:
        counter = self._counters.get((method, route, status))
        if counter is None:
            counter = self._counters[method, route, status] = metrics.http_requests.labels(
                method=method, route=route, status=str(status))
        duration = self._durations.get((method, route))
        if duration is None:
            duration = self._durations[method, route] = metrics.http_request_duration.labels(
                method=method, route=route)
        counter.inc()
        duration.observe(seconds)


def _route_template(scope: dict[str, Any]) -> str:
    """The matched route's path template (``/v1/jobs/{job_id}``), never the raw path: labels stay bounded."""
    route = scope.get("route")
    return getattr(route, "path", "unmatched") if route is not None else "unmatched"
