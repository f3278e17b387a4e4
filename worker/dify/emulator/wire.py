"""Dify 0.15.8's bytes on the wire: JSON bodies, error bodies, SSE frames, usage blocks and werkzeug's HTML pages.

The 0.15.8 server serialises with `json.dumps` defaults (", " and ": " separators, ASCII escapes), so the emulator
does too. Flask-RESTX answers (errors, stop, parameters, info) end with a newline; the blocking answer of a
generation call is `json.dumps` output with none. Every detail here is checked against the raw captures.
"""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from starlette.responses import Response

DIFY_HEADERS = {"Access-Control-Allow-Origin": "*", "X-Version": "0.15.8", "X-Env": "PRODUCTION"}
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
PING_FRAME = b"event: ping\n\n"

AUTH_MISSING = "Authorization header must be provided and start with 'Bearer'"
AUTH_SCHEME = "Authorization scheme must be 'Bearer'"
AUTH_INVALID = "Access token is invalid"
API_DISABLED = "The app's API service has been disabled."
MODE_MISMATCH = "Please check if your app mode matches the right API route."
APP_UNAVAILABLE = "App unavailable, please check your app configurations."
BAD_REQUEST = "The browser (or proxy) sent a request that this server could not understand."
UNSUPPORTED_MEDIA_TYPE = (
    "Did not attempt to load JSON data because the request Content-Type was not 'application/json'."
)
MISSING_PARAMETER = "Missing required parameter in the JSON body"
USER_REQUIRED = "Arg user must be provided."
CONVERSATION_NOT_EXISTS = "Conversation Not Exists."
INTERNAL_SERVER_ERROR = (
    "The server encountered an internal error and was unable to complete your request. "
    "Either the server is overloaded or there is an error in the application."
)
STREAM_INTERNAL_ERROR = "Internal Server Error, please contact support."
QUOTA_EXCEEDED = "Rate Limit Error"
VERSION_NOT_ALLOWED = (
    "Workflow version execution is not available on your current plan. Please upgrade to a paid plan."
)

_PRICE_STEP = Decimal("0.0000001")
_PRICE_UNIT = Decimal("0.000001")
_PROMPT_UNIT_PRICE = Decimal("0.15")
_COMPLETION_UNIT_PRICE = Decimal("0.6")


class ApiError(Exception):
    """An error answer: raised anywhere in a handler, turned into its response at the top."""

    def __init__(self, response: Response, code: str | None) -> None:
        super().__init__(code)
        self.response = response
        self.code = code


def dumps(value: Any) -> str:
    return json.dumps(value)


def json_response(
    body: Any, status: int = 200, *, newline: bool = True, headers: dict[str, str] | None = None
) -> Response:
    text = dumps(body) + ("\n" if newline else "")
    return Response(
        text, status_code=status, media_type="application/json", headers={**DIFY_HEADERS, **(headers or {})}
    )


def error(status: int, code: str, message: str) -> ApiError:
    """Dify's `{"code", "message", "status"}` error; a 401 also gets `WWW-Authenticate`."""
    headers = {"WWW-Authenticate": 'Bearer realm="api"'} if status == 401 else None
    return ApiError(json_response({"code": code, "message": message, "status": status}, status, headers=headers), code)


def param_error(message: str, param: str) -> ApiError:
    """Flask-RESTX reqparse's 400: `params` names the field and there is no `status`."""
    return ApiError(json_response({"code": "invalid_param", "message": message, "params": param}, 400), "invalid_param")


def html_error(status: int, title: str, description: str, headers: dict[str, str] | None = None) -> Response:
    """werkzeug's default HTML error page, as Flask sends for a URL or method no route knows."""
    body = f"<!doctype html>\n<html lang=en>\n<title>{status} {title}</title>\n<h1>{title}</h1>\n<p>{description}</p>\n"
    return Response(
        body,
        status_code=status,
        media_type="text/html",
        headers={"X-Version": DIFY_HEADERS["X-Version"], "X-Env": DIFY_HEADERS["X-Env"], **(headers or {})},
    )


def sse_frame(event: dict[str, Any]) -> bytes:
    return f"data: {dumps(event)}\n\n".encode()


def _price(tokens: int, unit_price: Decimal) -> Decimal:
    return (Decimal(tokens) * unit_price * _PRICE_UNIT).quantize(_PRICE_STEP, rounding=ROUND_HALF_UP)


def usage(prompt_tokens: int, completion_tokens: int, latency: float) -> dict[str, Any]:
    """`LLMUsage` as Dify dumps it: int token counts, Decimal prices as strings (so `0E-7` for zero)."""
    prompt_price = _price(prompt_tokens, _PROMPT_UNIT_PRICE)
    completion_price = _price(completion_tokens, _COMPLETION_UNIT_PRICE)
    return {
        "prompt_tokens": prompt_tokens,
        "prompt_unit_price": str(_PROMPT_UNIT_PRICE),
        "prompt_price_unit": str(_PRICE_UNIT),
        "prompt_price": str(prompt_price),
        "completion_tokens": completion_tokens,
        "completion_unit_price": str(_COMPLETION_UNIT_PRICE),
        "completion_price_unit": str(_PRICE_UNIT),
        "completion_price": str(completion_price),
        "total_tokens": prompt_tokens + completion_tokens,
        "total_price": str(prompt_price + completion_price),
        "currency": "USD",
        "latency": latency,
    }
