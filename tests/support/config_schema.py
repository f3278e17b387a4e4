"""The JSON schema of the chart's `config` value (helm/difyq/values.schema.json), generated from the config model in
worker/config.py, so that `helm install` accepts exactly the keys, types, bounds and allowed values `difyq
check-config` does. What JSON schema cannot say (a valid cron expression, `burst` within `requests_per_minute`,
known app names) is left to `difyq check-config`, which the chart's test pod runs.

After changing the config model: `python -m tests.support.config_schema --write` rewrites the `config` part of
values.schema.json; tests/test_helm_chart.py fails while the file differs from what this module generates."""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from tests.support.config_reference import _args, _flatten, _is_duration, nested_model

CHART_SCHEMA = Path(__file__).resolve().parents[2] / "helm" / "difyq" / "values.schema.json"
DESCRIPTION = "difyq.yaml (docs/configuration.md), rendered into the ConfigMap"
SECRET = {"type": "string", "description": "a ${ENV_NAME} reference to a key of the Secret (checked at render)"}
DURATION = {"$ref": "#/definitions/duration"}
SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _bounds(metadata: list[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            found["exclusiveMinimum"] = item.gt
        elif isinstance(item, annotated_types.Ge):
            found["minimum"] = item.ge
        elif isinstance(item, annotated_types.Lt):
            found["exclusiveMaximum"] = item.lt
        elif isinstance(item, annotated_types.Le):
            found["maximum"] = item.le
        elif getattr(item, "pattern", None):
            found["pattern"] = item.pattern
    return found


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema.get("type"), str) and "$ref" not in schema:
        return {**schema, "type": [schema["type"], "null"]}
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    if "anyOf" in schema:
        return {"anyOf": [*schema["anyOf"], {"type": "null"}]}
    return {"anyOf": [schema, {"type": "null"}]}


def annotation_schema(annotation: Any, metadata: list[Any] = ()) -> dict[str, Any]:
    annotation, extra = _args(annotation)
    metadata = _flatten([*metadata, *extra])
    if _is_duration(metadata):
        return dict(DURATION)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        schema = (annotation_schema(members[0]) if len(members) == 1
                  else {"anyOf": [annotation_schema(member) for member in members]})
        return _nullable(schema) if type(None) in typing.get_args(annotation) else schema
    if origin is Literal:
        return {"enum": list(typing.get_args(annotation))}
    if origin is list:
        return {"type": "array", "items": annotation_schema(typing.get_args(annotation)[0])}
    if origin is dict:
        value = typing.get_args(annotation)[1]
        nested = nested_model(value)
        return {"type": "object", "additionalProperties": model_schema(nested[1])} if nested else {"type": "object"}
    if annotation is SecretStr:
        return dict(SECRET)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_schema(annotation)
    bounds = _bounds(metadata)
    if annotation is int and "exclusiveMinimum" in bounds:  # "minimum: got 0, want 1" reads better
        bounds["minimum"] = bounds.pop("exclusiveMinimum") + 1
    return {"type": SIMPLE[annotation], **bounds}


def field_schema(field: FieldInfo) -> dict[str, Any]:
    return annotation_schema(field.annotation, field.metadata)


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {name: field_schema(field) for name, field in model.model_fields.items()},
        "additionalProperties": False,
    }
    required = [name for name, field in model.model_fields.items() if field.is_required()]
    if required:
        schema["required"] = required
    return schema


def config_schema() -> dict[str, Any]:
    """The schema of the chart's `config` value."""
    from difyq.worker.config import Config

    return {**model_schema(Config), "description": DESCRIPTION}


def write() -> None:
    chart = json.loads(CHART_SCHEMA.read_text(encoding="utf-8"))
    chart["properties"]["config"] = config_schema()
    CHART_SCHEMA.write_text(json.dumps(chart, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(json.dumps(config_schema(), indent=2, ensure_ascii=False))
