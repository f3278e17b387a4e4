"""The OpenAPI document as the API really answers: FastAPI declares its own 422 ("Validation Error", a list of
pydantic errors) on every route with a parameter, but difyq answers a failed validation with its one error body,
and a route whose only parameters are plain path strings can never fail validation at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from difyq.producers.api.errors import ErrorBody, error_responses

FASTAPI_VALIDATION_ERROR = "Validation Error"
FASTAPI_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _cannot_fail_validation(operation: dict[str, Any]) -> bool:
    """Only unconstrained path strings: any value a URL can carry passes."""
    parameters = operation.get("parameters", [])
    return "requestBody" not in operation and all(
        parameter["in"] == "path" and parameter.get("schema", {}).get("type") == "string"
        and set(parameter["schema"]) <= {"type", "title"}
        for parameter in parameters
    )


def _error_body_response() -> dict[str, Any]:
    entry = error_responses(422)[422]
    return {"description": entry["description"], "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}}}


def _rewrite(schema: dict[str, Any]) -> dict[str, Any]:
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.get("422", {}).get("description") != FASTAPI_VALIDATION_ERROR:
                continue
            if _cannot_fail_validation(operation):
                del responses["422"]
            else:
                responses["422"] = _error_body_response()
    if f"#/components/schemas/{FASTAPI_ERROR_SCHEMAS[0]}" not in json.dumps(schema.get("paths", {})):
        for name in FASTAPI_ERROR_SCHEMAS:  # HTTPValidationError, and the ValidationError only it refers to
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the rewritten document at /openapi.json (FastAPI's documented way of extending it)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _rewrite(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
