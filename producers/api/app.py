"""The FastAPI application: request ids, HTTP metrics, health, /metrics, the jobs API and the webhook routes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match

from producers.api.errors import error_response, error_responses, install_error_handlers
from producers.api.jobs import build_jobs_router
from producers.hooks import HookDeliveries, build_hooks_router
from producers.submit import submit
from worker import metrics
from worker.jobs.model import JobRequest
from worker.queue_metrics import QueueCollector
from worker.runtime import Runtime

log = structlog.get_logger("difyq.api")


def _route_template(app: FastAPI, request: Request) -> str:
    """The matched route's path template (``/v1/jobs/{job_id}``), never the raw path: labels stay bounded."""
    matched = request.scope.get("route")
    if matched is not None:
        return getattr(matched, "path", "unmatched")
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="difyq", version="0.1.0",
                  description="Queue-driven background workers for Dify apps.")
    install_error_handlers(app)
    queue_registry = CollectorRegistry()
    queue_registry.register(QueueCollector(runtime.raw_redis, runtime.namespace, runtime.config.apps))

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = request_id[:128]
        started = time.perf_counter()
        with structlog.contextvars.bound_contextvars(request_id=request.state.request_id):
            try:
                response = await call_next(request)
            except Exception:
                log.exception("request_failed", path=request.url.path)
                response = error_response(500, "internal_error", "unexpected error; see the API logs",)
        route = _route_template(app, request)
        metrics.http_requests.labels(method=request.method, route=route, status=str(response.status_code)).inc()
        metrics.http_request_duration.labels(method=request.method, route=route).observe(
            time.perf_counter() - started)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses=error_responses(503))
    async def readyz() -> JSONResponse:
        try:
            await run_in_threadpool(runtime.redis.ping)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "redis": type(exc).__name__}, status_code=503,
                                headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics_endpoint() -> Response:
        return Response(generate_latest(REGISTRY) + generate_latest(queue_registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(build_jobs_router(runtime))

    def submit_hook(name: str, job: Any) -> Any:
        return submit(
            runtime, app=job.app, source="hook",
            request=JobRequest(query=job.query, inputs=job.inputs, user=job.user,
                               conversation_id=job.conversation_id, metadata=job.metadata),
            callback_url=job.callback_url, idempotency_key=job.idempotency_key, scope=f"hook:{name}",
        )

    app.include_router(build_hooks_router(lambda: runtime.config, submit_hook,
                                          HookDeliveries(runtime.redis, runtime.namespace)))
    return app
