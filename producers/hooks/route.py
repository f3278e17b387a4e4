"""``POST /hooks/{name}``: read the raw body (capped), verify it, dedupe the delivery, map it, submit the job.

Answers (docs/http-api.md): 202 ``{"id", "status": "accepted"}`` and ``Location: /v1/jobs/{id}`` for a new job; 200 with
the same body shape (``"status": "duplicate"``) for a delivery id seen before, or when the job store answers
with the job the idempotency key already names; 204 when ``when`` is false or names a missing field; 401 for a
failed verification; 404 for an unknown hook; 413 over the body limit; 415 for a content type other than JSON
or form fields; 422 ``{"error": {"code", "message", "field"}}`` for a body or a template that fails on it; 429
with ``Retry-After`` when the app has ``max_pending`` unfinished jobs; 503 with ``Retry-After`` when Redis is
unreachable or nearly out of memory (``redis.memory_guard``). The ``status`` word is what happened to this
delivery; the job's own state is at ``Location``.

The route owns no job storage: ``submit_hook(hook_name, mapped_job)`` creates the job (and claims its
idempotency key: the hook's ``idempotency_key`` template, else the delivery id), ``deliveries`` remembers which
job each delivery created. Every request counts once in ``difyq_hook_requests_total{hook, outcome}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis import RedisError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from difyq.producers.api.body import read_body
from difyq.producers.api.errors import WHOLE_BODY, ApiError, error_response, invalid
from difyq.producers.hooks.mapping import (
    FORM_MEDIA_TYPE,
    JSON_MEDIA_TYPE,
    BodyError,
    MappedJob,
    MappingError,
    collect_fields,
    parse_body,
    render_hook,
)
from difyq.producers.hooks.verify import SignatureError, verify_delivery
from difyq.producers.submit import SubmitRejected
from difyq.worker import metrics
from difyq.worker.config import Config, HookConfig
from difyq.worker.jobs.store import IdempotencyConflict
from difyq.worker.json_codec import loads

log = structlog.get_logger("difyq.hooks")

UNKNOWN_HOOK_LABEL = "_unknown"
"""The ``hook`` label of requests for hooks that do not exist: one series, whatever names strangers try."""


class SubmitOutcome(Protocol):
    """What ``submit_hook`` returns (``difyq.worker.jobs.store.SubmitOutcome`` fits): the job, and whether it is new."""

    @property
    def job(self) -> Mapping[str, Any]: ...

    @property
    def created(self) -> bool: ...


class DeliveryLog(Protocol):
    """Which job each delivery created (``HookDeliveries`` in Redis)."""

    def recall(self, hook: str, delivery_id: str) -> str | None: ...

    def remember(self, hook: str, delivery_id: str, job_id: str) -> str: ...

    def note(self, hook: str, outcome: str, status: int, job_id: str | None, code: str | None) -> None: ...


HookSubmit = Callable[[str, MappedJob], SubmitOutcome]
"""``submit_hook(hook_name, job)``: create the job, or return the one its idempotency key names.

May raise ``SubmitRejected`` (answered with its status), ``IdempotencyConflict`` or a pydantic
``ValidationError`` of the job built from the mapping (both answered 422); Redis errors are answered 503.
"""


@dataclass(frozen=True)
class Delivery:
    """One request to ``/hooks/{name}``, read in full and detached from the ASGI request."""

    hook_name: str
    hook: HookConfig
    headers: dict[str, str]
    query: dict[str, Any]
    content_type: str | None
    body: bytes


class HookReceiver:
    """Everything after the body is read: runs in a worker thread, since Redis and ``submit_hook`` block."""

    def __init__(self, submit_hook: HookSubmit, deliveries: DeliveryLog, clock: Callable[[], float] = time.time):
        self.submit_hook = submit_hook
        self.deliveries = deliveries
        self.clock = clock

    def handle(self, delivery: Delivery) -> tuple[str, Response]:
        """The metrics outcome and the response for ``delivery``, noted among the hook's recent deliveries."""
        outcome, response, job_id = self._handle(delivery)
        code = None
        if response.status_code >= 400 and isinstance(response, JSONResponse):
            code = loads(bytes(response.body)).get("error", {}).get("code")
        try:
            self.deliveries.note(delivery.hook_name, outcome, response.status_code, job_id, code)
        except RedisError as exc:
            log.warning("hook_note_failed", hook=delivery.hook_name, error=type(exc).__name__)
        return outcome, response

    def _handle(self, delivery: Delivery) -> tuple[str, Response, str | None]:
        name = delivery.hook_name
        try:
            delivery_id = verify_delivery(name, delivery.hook.verify, delivery.headers, delivery.body, self.clock())
        except SignatureError as exc:
            log.info("hook_unauthorized", hook=name, reason=exc.reason)
            return "unauthorized", error_response(401, "invalid_signature", exc.reason), None
        try:
            return self._accept(delivery, delivery_id)
        except RedisError as exc:
            log.warning("hook_redis_unavailable", hook=name, error=type(exc).__name__)
            return "unavailable", error_response(
                503, "unavailable", "the job store is unreachable; retry shortly", headers={"Retry-After": "5"}
            ), None

    def _accept(self, delivery: Delivery, delivery_id: str | None) -> tuple[str, Response, str | None]:
        name = delivery.hook_name
        if delivery_id is not None and (seen := self.deliveries.recall(name, delivery_id)) is not None:
            return "duplicate", _job_response(seen, duplicate=True), seen
        try:
            payload = parse_body(delivery.content_type, delivery.body)
            job = render_hook(delivery.hook, payload, delivery.headers, delivery.query)
        except BodyError as exc:
            field = WHOLE_BODY if exc.status == 422 else None
            return "invalid", error_response(exc.status, exc.code, exc.message, field), None
        except MappingError as exc:
            log.info("hook_mapping_failed", hook=name, field=exc.field, error=exc.message)
            return "invalid", error_response(422, "mapping_failed", str(exc), exc.field), None
        if job is None:
            return "skipped", Response(status_code=204), None
        keyed_by_delivery = job.idempotency_key is None and delivery_id is not None
        if keyed_by_delivery:
            job = replace(job, idempotency_key=delivery_id)
        try:
            outcome = self.submit_hook(name, job)
            job_id, created = str(outcome.job["id"]), outcome.created
        except SubmitRejected as exc:
            outcome = _REFUSED_OUTCOMES.get(exc.status, "invalid")
            return outcome, error_response(exc.status, exc.code, exc.message, exc.field, exc.headers()), None
        except ValidationError as exc:
            error = invalid(exc.errors(), "invalid_job")
            return "invalid", error_response(error.status, error.code, error.message, error.field), None
        except IdempotencyConflict as exc:
            if not keyed_by_delivery:
                message = "the idempotency key was used before for a different job"
                return "invalid", error_response(422, "idempotency_key_reused", message, "idempotency_key"), None
            job_id, created = exc.job_id, False
        if delivery_id is not None:
            job_id = self.deliveries.remember(name, delivery_id, job_id)
        if created:
            return "accepted", _job_response(job_id, duplicate=False), job_id
        return "duplicate", _job_response(job_id, duplicate=True), job_id


_REFUSED_OUTCOMES = {429: "throttled", 503: "unavailable"}
"""The outcome of a delivery the job store refused for backpressure (``max_pending``, the memory guard): the
sender is told to redeliver after ``Retry-After``."""


def build_hooks_router(
    get_config: Callable[[], Config],
    submit_hook: HookSubmit,
    deliveries: DeliveryLog,
    *,
    clock: Callable[[], float] = time.time,
) -> APIRouter:
    """The ``POST /hooks/{name}`` route; ``get_config`` is called per request, so a reloaded config applies."""
    receiver = HookReceiver(submit_hook, deliveries, clock)
    router = APIRouter(tags=["hooks"])

    @router.post("/hooks/{name}", status_code=202, responses=_RESPONSES, openapi_extra=_REQUEST_BODY)
    async def receive_hook(name: str, request: Request) -> Response:
        config = get_config()
        hook = config.hooks.get(name)
        if hook is None:
            outcome, response = "not_found", error_response(404, "hook_not_found", f"no hook named {name!r}")
        else:
            outcome, response = await _receive(receiver, name, hook, request, config.api.max_body_bytes)
        metrics.hook_requests.labels(hook=name if hook else UNKNOWN_HOOK_LABEL, outcome=outcome).inc()
        return response

    return router


async def _receive(
    receiver: HookReceiver, name: str, hook: HookConfig, request: Request, default_limit: int
) -> tuple[str, Response]:
    try:
        body = await read_body(request, hook.max_body_bytes or default_limit)
    except ApiError as exc:
        return "too_large", error_response(exc.status, exc.code, exc.message)
    except ClientDisconnect:
        return "invalid", Response(status_code=400)
    delivery = Delivery(
        hook_name=name,
        hook=hook,
        headers=_merged_headers(request),
        query=collect_fields(request.query_params.multi_items()),
        content_type=request.headers.get("content-type"),
        body=body,
    )
    return await run_in_threadpool(receiver.handle, delivery)


def _merged_headers(request: Request) -> dict[str, str]:
    """Lower-cased header names; a header sent more than once is joined with ``", "`` as HTTP allows."""
    merged: dict[str, str] = {}
    for name, value in request.headers.items():
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return merged


def _job_response(job_id: str, *, duplicate: bool) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{job_id}"}
    if duplicate:
        headers["Idempotent-Replayed"] = "true"
    status_word = "duplicate" if duplicate else "accepted"
    return JSONResponse({"id": job_id, "status": status_word}, status_code=200 if duplicate else 202, headers=headers)


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}},
            "required": ["code", "message"],
        }
    },
}
_JOB_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "status": {"type": "string", "enum": ["accepted", "duplicate"]}},
    "required": ["id", "status"],
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: _json("A delivery seen before: the job it created", _JOB_SCHEMA),
    202: _json("Accepted: the job was created; Location names it", _JOB_SCHEMA),
    204: {"description": "Skipped: `when` is false or names a field the payload lacks"},
    401: _json("The signature or token does not verify", _ERROR_SCHEMA),
    404: _json("No hook of this name", _ERROR_SCHEMA),
    413: _json("The body is over the limit", _ERROR_SCHEMA),
    415: _json("A content type other than JSON or form fields", _ERROR_SCHEMA),
    422: _json("A malformed body, or a template that fails on it", _ERROR_SCHEMA),
    429: _json("The app has max_pending unfinished jobs; redeliver after Retry-After", _ERROR_SCHEMA),
    503: _json("Redis is unreachable or nearly out of memory; redeliver after Retry-After", _ERROR_SCHEMA),
}
_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {JSON_MEDIA_TYPE: {"schema": {}}, FORM_MEDIA_TYPE: {"schema": {"type": "object"}}},
    }
}
