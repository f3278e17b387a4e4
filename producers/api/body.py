"""Reading request bodies with a size cap, without buffering more than the cap, and into their models."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from difyq.producers.api.errors import WHOLE_BODY, ApiError, invalid
from difyq.worker.json_codec import loads

Model = TypeVar("Model", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, or 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object from ``raw``, or 422 saying what is wrong with it."""
    try:
        data = loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(422, "invalid_json", f"the body is not valid JSON: {exc}", WHOLE_BODY) from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", "the body must be a JSON object", WHOLE_BODY)
    return data


async def read_model(request: Request, model: type[Model], limit: int) -> Model:
    """The body as ``model``: 413 past ``limit`` bytes, 422 naming the field that is wrong."""
    try:
        return model.model_validate(parse_json_object(await read_body(request, limit)))
    except ValidationError as exc:
        raise invalid(exc.errors()) from None
