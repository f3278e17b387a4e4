"""One error body for every 4xx/5xx the API sends: ``{"error": {"code", "message", "field"}}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = structlog.get_logger("difyq.api")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx body the API sends."""

    error: ErrorDetail


_DESCRIPTIONS = {
    401: "missing or invalid client token", 403: "this client may not use the app", 404: "not found",
    409: "not possible in the job's current state", 413: "body over the size limit", 415: "unsupported content type",
    422: "invalid request; `field` names what is wrong",
    429: "the app or the client has `max_pending` unfinished jobs; retry after `Retry-After`",
    502: "Dify refused or failed the call",
    503: "Redis is unreachable or nearly out of memory; retry after `Retry-After`",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error statuses a route sends."""
    return {status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=headers)


WHOLE_BODY = "body"
"""The ``field`` of an error about the body as a whole (not JSON, not an object)."""


def field_path(location: Sequence[str | int]) -> str:
    """A pydantic error location as the field a client sent: ``('inputs', 'repo')`` → ``inputs.repo``,
    ``('files', 0, 'url')`` → ``files[0].url``; the whole body when the location is empty."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or WHOLE_BODY


def invalid(errors: Sequence[Mapping[str, Any]], code: str = "invalid_request") -> ApiError:
    """The 422 for a pydantic validation failure: its first error, naming the field."""
    first = errors[0]
    path = field_path(first.get("loc", ()))
    return ApiError(422, code, f"{path}: {first.get('msg')}", path)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's locations start with where the value was (body, query, path, header): not part of its name.
        errors = [{**error, "loc": tuple(error.get("loc", ()))[1:]} for error in exc.errors()]
        error = invalid(errors)
        return error_response(error.status, error.code, error.message, error.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis_unavailable", error=type(exc).__name__)
        return error_response(503, "unavailable", "the job store is unreachable; retry shortly",
                              headers={"Retry-After": "5"})
