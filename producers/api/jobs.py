"""/v1/jobs: submit, read, list and cancel jobs, and retry a job's callback."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import redis.asyncio
import structlog
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from difyq.producers.api.auth import authenticate
from difyq.producers.api.body import parse_json_object, read_body, read_model
from difyq.producers.api.dify_stop import stop_dify_task
from difyq.producers.api.errors import ApiError, error_responses, invalid
from difyq.producers.api.multipart import (
    MULTIPART,
    FilePart,
    is_multipart,
    multipart_body_schema,
    read_multipart,
    with_uploads,
)
from difyq.producers.submission import JobSubmission
from difyq.producers.submit import SubmitRejected, submit_async
from difyq.worker.dify.app_form import missing_inputs, required_inputs
from difyq.worker.dify.client import DifyClient
from difyq.worker.dify.errors import DifyError
from difyq.worker.dify.parameters import AppParameters
from difyq.worker.jobs.index_position import POSITION_PATTERN
from difyq.worker.jobs.model import TENANT_MAX_CHARS, client_scope
from difyq.worker.jobs.schema import FINAL_STATUSES, SOURCES, JobStatus
from difyq.worker.jobs.store import IdempotencyConflict
from difyq.worker.json_codec import dumps
from difyq.worker.runtime import Runtime

log = structlog.get_logger("difyq.api")


class FormInput(BaseModel):
    """The body of POST /v1/jobs/{id}/input: the answer to a paused job's form."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any] = Field(default_factory=dict)
    action: str = Field(min_length=1, max_length=200)


class Feedback(BaseModel):
    """The body of POST /v1/jobs/{id}/feedback: a rating of the job's Dify message (null withdraws one)."""

    model_config = ConfigDict(extra="forbid")

    rating: Literal["like", "dislike"] | None
    content: str | None = Field(default=None, max_length=10_000)


def _request_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written in place: a request body declared by hand has no
    ``components`` entry for them to refer to."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inlined(node: Any) -> Any:
        if isinstance(node, dict):
            if isinstance(ref := node.get("$ref"), str) and ref.startswith("#/$defs/"):
                return inlined(definitions[ref.removeprefix("#/$defs/")])
            return {key: inlined(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inlined(item) for item in node]
        return node

    return inlined(schema)


def _job_response(job: dict[str, Any], status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(job), status_code=status, media_type="application/json",
                    headers={"Location": f"/v1/jobs/{job['id']}", **(headers or {})})


def build_jobs_router(runtime: Runtime, async_redis: redis.asyncio.Redis) -> APIRouter:
    """The /v1/jobs routes; submits go through ``async_redis`` (a ``Runtime.async_redis``) on the event loop."""
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 503))
    config = runtime.config
    parameters = AppParameters(config)
    parameters.warm()

    def visible(request: Request, job_id: str) -> dict[str, Any]:
        _, client = authenticate(config, request)
        job = runtime.store.get(job_id)
        if job is None or not client.may_use(job["app"]):
            raise ApiError(404, "not_found", f"no job {job_id}")
        return job

    @router.post(
        "",
        status_code=202,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": _request_body_schema(JobSubmission)},
            MULTIPART: multipart_body_schema(_request_body_schema(JobSubmission)),
        }}},
        responses={200: {"description": "idempotent replay"}, 202: {"description": "accepted"},
                   **error_responses(403, 404, 413, 415, 422, 429)},
    )
    async def create_job(request: Request) -> Response:
        client_name, client = authenticate(config, request)
        parts: list[FilePart] = []
        if is_multipart(request):
            raw = await read_body(request, client.max_upload_bytes or config.api.max_upload_bytes)
            data, parts = await read_multipart(request, raw)
        else:
            data = parse_json_object(await read_body(request, config.api.max_body_bytes))
        try:
            body = JobSubmission.model_validate(data)
        except ValidationError as exc:
            raise invalid(exc.errors()) from None
        header_key = request.headers.get("idempotency-key")
        if header_key is not None and body.idempotency_key is not None and header_key != body.idempotency_key:
            raise ApiError(422, "idempotency_key_mismatch",
                           "the Idempotency-Key header and the body's idempotency_key differ", "idempotency_key")
        if body.app not in config.apps:  # before any file part goes to its Dify
            raise ApiError(404, "unknown_app", f"no app named {body.app!r} is configured", "app")
        if not client.may_use(body.app):
            raise ApiError(403, "forbidden", f"this client may not use app {body.app!r}", "app")
        known = parameters.cached(body.app)
        given = {**body.inputs, **{part.input_name: part.name for part in parts if part.input_name}}
        missing = missing_inputs(required_inputs(known), given) if known is not None else []
        if missing:
            raise ApiError(422, "missing_input", f"inputs.{missing[0]}: the app's input form requires it "
                           "(Dify's /parameters)", f"inputs.{missing[0]}")
        if header_key is not None:
            body = body.model_copy(update={"idempotency_key": header_key})
        if parts:
            body = await run_in_threadpool(with_uploads, runtime, body, parts)
        try:
            outcome = await submit_async(runtime, async_redis, body, source="api", scope=client_scope(client_name),
                                         request_id=request.state.request_id)
        except SubmitRejected as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.field, exc.headers()) from None
        except IdempotencyConflict as exc:
            raise ApiError(422, "idempotency_key_reused", str(exc), "idempotency_key") from None
        if outcome.created:
            return _job_response(outcome.job, 202)
        return _job_response(outcome.job, 200, {"Idempotent-Replayed": "true"})

    @router.get("", responses=error_responses(422))
    def list_jobs(
        request: Request,
        status: Annotated[JobStatus | None, Query()] = None,
        app: Annotated[str | None, Query(max_length=200)] = None,
        source: Annotated[str | None, Query(pattern="^(" + "|".join(SOURCES) + ")$")] = None,
        tenant: Annotated[str | None, Query(min_length=1, max_length=TENANT_MAX_CHARS)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, Query(pattern=POSITION_PATTERN)] = None,
    ) -> dict[str, Any]:
        _, client = authenticate(config, request)
        allowed = None if "*" in client.apps else set(client.apps)
        if app is not None and allowed is not None and app not in allowed:
            return {"jobs": [], "next_cursor": None}
        jobs, next_cursor = runtime.store.list(
            allowed_apps=allowed, status=status.value if status else None, app=app, source=source, tenant=tenant,
            limit=limit, cursor=cursor,
        )
        return {"jobs": jobs, "next_cursor": next_cursor}

    @router.get("/{job_id}", responses=error_responses(404))
    def get_job(request: Request, job_id: str) -> dict[str, Any]:
        return visible(request, job_id)

    @router.delete("/{job_id}", responses=error_responses(404))
    def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        job = visible(request, job_id)
        outcome = runtime.store.cancel(job_id)
        if outcome.task_id:  # a running call, or a paused run: stopped at Dify (retried while it is unreachable)
            stop_dify_task(runtime, job, outcome.task_id)
        return runtime.store.get(job_id) or job

    @router.post(
        "/{job_id}/input",
        status_code=202,
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": _request_body_schema(FormInput)}
        }}},
        responses=error_responses(404, 409, 422, 502),
    )
    async def submit_input(request: Request, job_id: str) -> dict[str, Any]:
        job = visible(request, job_id)
        body = await read_model(request, FormInput, config.api.max_body_bytes)
        if job["status"] != JobStatus.PAUSED or not job.get("form"):
            raise ApiError(409, "job_not_paused", f"the job is {job['status']}; only a paused job takes input")
        await run_in_threadpool(submit_form, runtime, job, body)
        state = runtime.store.resume(job_id, job["app"], job["priority"], job["tenant"])
        if not state.startswith("queued"):
            raise ApiError(409, "job_not_paused", f"the job is {state}; only a paused job takes input")
        return runtime.store.get(job_id) or job

    @router.post(
        "/{job_id}/feedback",
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": _request_body_schema(Feedback)}
        }}},
        responses=error_responses(404, 409, 422, 502),
    )
    async def send_feedback(request: Request, job_id: str) -> dict[str, Any]:
        job = visible(request, job_id)
        body = await read_model(request, Feedback, config.api.max_body_bytes)
        message_id = (job.get("result") or {}).get("message_id")
        if not message_id:
            raise ApiError(409, "no_message", f"the job ({job['status']}) has no Dify message to rate: only a "
                           "finished chat, agent, chatflow or completion job has one")
        await run_in_threadpool(forward_feedback, runtime, job, message_id, body)
        return {"id": job_id, "message_id": message_id, "rating": body.rating, "content": body.content}

    @router.post("/{job_id}/callback/retry", status_code=202, responses=error_responses(404, 409))
    def retry_callback(request: Request, job_id: str) -> dict[str, Any]:
        job = visible(request, job_id)
        if job["callback"]["status"] == "none":
            raise ApiError(409, "no_callback", "this job has no callback_url")
        if job["status"] not in FINAL_STATUSES:
            raise ApiError(409, "job_not_finished", "the callback is sent when the job finishes")
        runtime.store.replay_callback(job_id)
        return runtime.store.get(job_id) or job

    return router


def short_call_client(runtime: Runtime, app_name: str) -> DifyClient:
    """A Dify client for the app, for one short call the API makes while its caller waits."""
    app = runtime.config.apps[app_name]
    return DifyClient(runtime.config.app_base_url(app_name), app.api_key.get_secret_value(),
                      connect_timeout=runtime.config.dify.connect_timeout_s, total_timeout=15.0)


def _client_and_user(runtime: Runtime, job: dict[str, Any]) -> tuple[DifyClient, str]:
    """A Dify client for the job's app, for one short call, and the job's Dify ``user``."""
    app = runtime.config.apps.get(job["app"])
    if app is None:
        raise ApiError(409, "app_not_configured", f"the job's app {job['app']!r} is no longer configured")
    return short_call_client(runtime, job["app"]), (job.get("request") or {}).get("user") or app.user


def forward_feedback(runtime: Runtime, job: dict[str, Any], message_id: str, feedback: Feedback) -> None:
    """Rate the job's message at Dify, as the job's user. A message Dify does not know (deleted with its
    conversation) is a 409, any other failure 502."""
    client, user = _client_and_user(runtime, job)
    try:
        client.feedback(message_id, feedback.rating, feedback.content, user)
    except DifyError as exc:
        if exc.status == 404:
            raise ApiError(409, "message_not_found", f"Dify no longer has the job's message: {exc.message}") from None
        raise ApiError(502, "dify_error", f"Dify refused the feedback: {exc}") from None


def submit_form(runtime: Runtime, job: dict[str, Any], answer: FormInput) -> None:
    """Hand a paused job's answer to Dify, as the run's user (Dify accepts a form once). Dify's refusal of the
    answer is the caller's 422 (naming the field), a form answered or expired meanwhile 409, anything else 502."""
    client, user = _client_and_user(runtime, job)
    try:
        client.submit_form(job["form"]["token"], answer.inputs, answer.action, user, trace_id=job["trace_id"])
    except DifyError as exc:
        if exc.code in ("invalid_form_data", "invalid_action", "invalid_param"):
            field = "action" if "action" in exc.message.lower() else "inputs"
            raise ApiError(422, exc.code, exc.message, field) from None
        if exc.status == 412 or exc.code.startswith("human_input_form"):
            raise ApiError(409, exc.code, exc.message) from None
        raise ApiError(502, "dify_error", f"Dify refused the form: {exc}") from None
