"""What the configuration reference (docs/configuration.md) must say about each key, read from the pydantic model
in worker/config.py: the dotted path of every leaf setting, its type, whether it is required, its default and its
allowed values. The doc test compares the reference table with these; `python -m tests.support.config_reference`
prints the rows the model implies, descriptions left blank, for a new key's row."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, BeforeValidator, SecretStr
from pydantic.fields import FieldInfo

from difyq.worker.durations import parse_duration

MAP_SEGMENT = "<name>"


@dataclass(frozen=True)
class Setting:
    path: str
    field: FieldInfo
    type_name: str
    allowed: str

    @property
    def required(self) -> bool:
        return self.field.is_required()

    def default(self) -> Any:
        return self.field.get_default(call_default_factory=True)


def _is_duration(metadata: list[Any]) -> bool:
    return any(isinstance(item, BeforeValidator) and item.func is parse_duration for item in metadata)


def _args(annotation: Any) -> tuple[Any, list[Any]]:
    """An ``Annotated[X, ...]`` as (X, its metadata); any other annotation as (itself, [])."""
    if typing.get_origin(annotation) is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        return inner, metadata
    return annotation, []


def type_name(annotation: Any, metadata: list[Any] = ()) -> str:
    """``string``, ``integer``, ``number``, ``boolean``, ``duration``, ``secret``, ``one of``, ``list of X``,
    ``mapping`` and ``X or null``."""
    annotation, extra = _args(annotation)
    metadata = [*metadata, *extra]
    if _is_duration(metadata):
        return "duration"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        names = [type_name(member) for member in members if member is not type(None)]
        return " or ".join(names + (["null"] if type(None) in members else []))
    if origin is Literal:
        return "one of"
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", SecretStr: "secret"}
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def allowed_values(annotation: Any, metadata: list[Any] = ()) -> str:
    """Literal values (``chat, agent``), bounds (``> 0``, ``>= 1, <= 100``) and patterns, as the table shows them."""
    annotation, extra = _args(annotation)
    metadata = _flatten([*metadata, *extra])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = [allowed_values(member) for member in typing.get_args(annotation) if member is not type(None)]
        found = [part for part in parts if part]
        if found:
            return "; ".join(found)
    if typing.get_origin(annotation) is Literal:
        return ", ".join(str(value) for value in typing.get_args(annotation))
    words = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            words.append(f">= {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            words.append(f"<= {item.le}")
        elif getattr(item, "pattern", None):
            words.append(f"pattern {item.pattern}")
    return ", ".join(words)


def _flatten(metadata: list[Any]) -> list[Any]:
    """``Field(gt=0)`` inside ``Annotated`` arrives as a FieldInfo whose own metadata holds the bounds."""
    return [inner for item in metadata
            for inner in (item.metadata if isinstance(item, FieldInfo) else [item])]


def nested_model(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """('self', Model) for a model field (optionally ``| None``), ('map', Model) for ``dict[str, Model]``."""
    origin = typing.get_origin(annotation)
    if origin is dict:
        inner = nested_model(typing.get_args(annotation)[1])
        return ("map", inner[1]) if inner and inner[0] == "self" else None
    if origin in (typing.Union, types.UnionType):
        return next(filter(None, (nested_model(arg) for arg in typing.get_args(annotation))), None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("self", annotation)
    return None


def settings(model: type[BaseModel], prefix: str = "") -> Iterator[Setting]:
    """Every leaf setting of ``model``, depth first, in declaration order."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = nested_model(field.annotation)
        if nested is None:
            yield Setting(path, field, type_name(field.annotation, field.metadata),
                          allowed_values(field.annotation, field.metadata))
            continue
        kind, inner = nested
        yield from settings(inner, f"{path}.{MAP_SEGMENT}." if kind == "map" else f"{path}.")


def default_text(setting: Setting) -> str:
    """A default as the table writes it (YAML, durations in seconds)."""
    if setting.required:
        return "required"
    value = setting.default()
    return "null" if value is None else json.dumps(value) if not isinstance(value, str) or not value else value


def main() -> None:
    from difyq.worker.config import Config

    for setting in settings(Config):
        print(f"| `{setting.path}` | {setting.type_name} | {default_text(setting)} | {setting.allowed} |  |")


if __name__ == "__main__":
    main()
