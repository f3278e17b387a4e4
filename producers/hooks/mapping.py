"""From a verified webhook delivery to a job: parse the body, then render the hook's templates over it.

Templates run in the sandboxed environment of ``difyq.worker.templating`` (StrictUndefined: a missing field is an
error, never an empty string), overlaid so that a JSON ``null`` prints as the empty string rather than
``None``. The context is ``body`` (parsed JSON, or the form fields), ``headers`` (lower-cased names) and
``query`` (URL parameters); a field or parameter given more than once is a list of its values.

Value types: ``query``, ``user``, ``conversation_id``, ``thread``, ``callback_url`` and ``idempotency_key`` are
always strings, and one that renders empty is left unset (None). An ``inputs``, ``metadata`` or ``files`` template that
is exactly one expression (``"{{ body.issue.number }}"``) keeps the expression's native value when it is JSON
data other than a string (a number, a bool, null, a list, an object); every other template renders to a
string. Non-string values in ``inputs``/``metadata``/``files`` are not templates and pass through unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from jinja2 import Template, TemplateError, TemplateSyntaxError, Undefined, UndefinedError

from difyq.worker.config import HookConfig
from difyq.worker.templating import ENVIRONMENT

JSON_MEDIA_TYPE = "application/json"
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
_FALSE_WORDS = frozenset({"", "false", "0", "no", "off", "none"})
_SINGLE_EXPRESSION = re.compile(r"\s*\{\{[-+]?(?P<expression>.*?)-?\}\}\s*", re.DOTALL)
_MAX_MESSAGE = 300


def _null_as_empty(value: Any) -> Any:
    return "" if value is None else value


_TEMPLATES = ENVIRONMENT.overlay(finalize=_null_as_empty)


@dataclass(frozen=True)
class MappedJob:
    """What a hook delivery asks for: the fields of a job submission (docs/http-api.md, ``POST /v1/jobs`` body)."""

    app: str
    query: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    user: str | None = None
    conversation_id: str | None = None
    thread: str | None = None
    files: list[dict[str, Any]] | None = None
    callback_url: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    priority: int | str = 0
    tenant: str | None = None


class MappingError(Exception):
    """A template that failed on this payload; ``field`` is its path in the hook config (``inputs.repo``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class MissingFieldError(MappingError):
    """A template that needs a field (of ``body``, ``headers`` or ``query``) the payload does not have."""


class BodyError(Exception):
    """A body that cannot be parsed: ``status`` 415 for a content type we do not read, 422 for a malformed one."""

    def __init__(self, status: int, code: str, message: str):
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


def collect_fields(pairs: Iterable[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Name → value for form fields or URL parameters; a name given more than once maps to a list of values."""
    fields: dict[str, str | list[str]] = {}
    for name, value in pairs:
        if name not in fields:
            fields[name] = value
        elif isinstance(existing := fields[name], list):
            existing.append(value)
        else:
            fields[name] = [existing, value]
    return fields


def parse_body(content_type: str | None, body: bytes) -> Any:
    """Parse ``body`` as JSON (``application/json``, ``application/*+json``) or URL-encoded form fields."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type == JSON_MEDIA_TYPE or (media_type.startswith("application/") and media_type.endswith("+json")):
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise BodyError(422, "invalid_body", f"body is not valid JSON: {_shorten(str(exc))}") from None
    if media_type == FORM_MEDIA_TYPE:
        try:
            return collect_fields(parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict"))
        except (UnicodeDecodeError, ValueError):
            raise BodyError(422, "invalid_body", "form body is not valid UTF-8 URL-encoded data") from None
    shown = _shorten(media_type) or "none"
    message = f"content type {shown} is not supported: send {JSON_MEDIA_TYPE} or {FORM_MEDIA_TYPE}"
    raise BodyError(415, "unsupported_media_type", message)


def render_hook(hook: HookConfig, body: Any, headers: dict[str, Any], query: dict[str, Any]) -> MappedJob | None:
    """Map one delivery to a job, or None when ``when`` is false or names a field this payload lacks.

    Raises MappingError (MissingFieldError for a missing field) naming the first template that failed.
    """
    context = {"body": body, "headers": headers, "query": query}
    if hook.when is not None:
        try:
            if not _is_true(_render_value("when", hook.when, context)):
                return None
        except MissingFieldError:
            return None
    return MappedJob(
        app=hook.app,
        query=_render_text_field("query", hook.query, context),
        inputs=_render_section("inputs", hook.inputs, context),
        user=_render_text_field("user", hook.user, context),
        conversation_id=_render_text_field("conversation_id", hook.conversation_id, context),
        thread=_render_text_field("thread", hook.thread, context),
        files=_render_files(hook.files, context),
        callback_url=_render_text_field("callback_url", hook.callback_url, context),
        metadata=_render_section("metadata", hook.metadata, context),
        idempotency_key=_render_text_field("idempotency_key", hook.idempotency_key, context),
        priority=hook.priority,
        tenant=_render_text_field("tenant", hook.tenant, context),
    )


def _is_true(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_WORDS
    return bool(value)


def _render_text_field(path: str, source: str | None, context: dict[str, Any]) -> str | None:
    if source is None:
        return None
    return _render_text(path, source, context) or None


def _render_section(section: str, values: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    return {
        key: _render_value(f"{section}.{key}", value, context) if isinstance(value, str) else value
        for key, value in values.items()
    }


def _render_files(files: list[dict[str, Any]] | None, context: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Each file object with its templates rendered (``files[0].url``)."""
    if files is None:
        return None
    return [_render_section(f"files[{index}]", file, context) for index, file in enumerate(files)]


def _render_value(path: str, source: str, context: dict[str, Any]) -> Any:
    """The template's native value when it is one expression yielding non-string JSON data, else its text."""
    expression = _expression(source)
    if expression is not None:
        value = _run(path, lambda: _defined(expression(**context)))
        if not isinstance(value, str) and _is_json_data(value):
            return value
    return _render_text(path, source, context)


def _render_text(path: str, source: str, context: dict[str, Any]) -> str:
    template = _template(path, source)
    return _run(path, lambda: template.render(context))


def _run(path: str, render: Callable[[], Any]) -> Any:
    """Run one template, turning whatever it raises into a MappingError for ``path``.

    Templates are code from the config applied to data from strangers: any exception they raise (an undefined
    field, a type error, a sandbox refusal) is that template failing on that payload, an answer for the sender.
    """
    try:
        return render()
    except UndefinedError as exc:
        raise MissingFieldError(path, _shorten(exc.message or str(exc))) from None
    except TemplateError as exc:
        raise MappingError(path, _shorten(exc.message or str(exc))) from None
    except Exception as exc:
        raise MappingError(path, _shorten(f"{type(exc).__name__}: {exc}")) from None


def _defined(value: Any) -> Any:
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises UndefinedError, which names the missing field
    return value


@lru_cache(maxsize=1024)
def _template_for(source: str) -> Template:
    return _TEMPLATES.from_string(source)


def _template(path: str, source: str) -> Template:
    try:
        return _template_for(source)
    except TemplateSyntaxError as exc:
        raise MappingError(path, f"template syntax error: {exc.message} (line {exc.lineno})") from None


@lru_cache(maxsize=1024)
def _expression(source: str) -> Callable[..., Any] | None:
    """The compiled expression when ``source`` is exactly ``{{ expression }}`` (whitespace around allowed)."""
    match = _SINGLE_EXPRESSION.fullmatch(source)
    if match is None:
        return None
    try:
        return _TEMPLATES.compile_expression(match["expression"], undefined_to_none=False)
    except TemplateSyntaxError:
        return None


def _is_json_data(value: Any) -> bool:
    """True for None, bool, int, float, str and lists/dicts (string keys) of them; iterative, so depth is free."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                return False
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif item is not None and not isinstance(item, str | int | float):
            return False
    return True


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"
