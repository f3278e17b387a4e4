"""The FastAPI application: request ids, HTTP metrics, health, /metrics, the jobs API, the webhook routes and the
operator console."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict

import structlog
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from difyq.producers.api.budgets import build_budgets_router
from difyq.producers.api.errors import error_responses, install_error_handlers
from difyq.producers.api.jobs import build_jobs_router
from difyq.producers.api.middleware import RequestContext
from difyq.producers.api.openapi import install_openapi
from difyq.producers.api.threads import build_threads_router
from difyq.producers.console import install_console
from difyq.producers.hooks import HookDeliveries, MappedJob, build_hooks_router
from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker import otel
from difyq.worker.budgets import BudgetCollector, BudgetLedger, configured_budgets
from difyq.worker.jobs.store import SubmitOutcome
from difyq.worker.queue_metrics import QueueCollector
from difyq.worker.runtime import Runtime

log = structlog.get_logger("difyq.api")


def _native_telemetry() -> dict[str, bool]:
    """FastAPI's native OpenTelemetry (FastAPI >= 0.16x; older versions ignore the setting) makes the request's
    server span, the parent of a job's submit span, when difyq records traces (``difyq.worker.otel``); its
    metrics and logs stay off (difyq has its own), as does all of it when traces are off."""
    if otel.recorder() is None:
        return {"tracing": False, "metrics": False, "logs": False}
    return {"metrics": False, "logs": False, "operation_spans": False}


def create_app(runtime: Runtime) -> FastAPI:
    async_redis = runtime.async_redis()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await async_redis.aclose()

    app = FastAPI(title="difyq", version="0.1.0", description="Queue-driven background workers for Dify apps.",
                  lifespan=lifespan, telemetry=_native_telemetry())
    install_error_handlers(app)
    app.add_middleware(RequestContext)
    queue_registry = CollectorRegistry()
    queue_registry.register(QueueCollector(runtime.raw_redis, runtime.namespace, runtime.config.apps))
    queue_registry.register(BudgetCollector(BudgetLedger(runtime.redis, runtime.namespace),
                                            configured_budgets(runtime.config)))

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

    app.include_router(build_jobs_router(runtime, async_redis))
    app.include_router(build_threads_router(runtime))
    app.include_router(build_budgets_router(runtime))

    def submit_hook(name: str, job: MappedJob) -> SubmitOutcome:
        return submit(runtime, JobSubmission.model_validate(asdict(job)), source="hook", scope=f"hook:{name}")

    app.include_router(build_hooks_router(lambda: runtime.config, submit_hook,
                                          HookDeliveries(runtime.redis, runtime.namespace)))
    install_console(app, runtime)
    install_openapi(app)
    return app
