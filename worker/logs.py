"""structlog setup: JSON lines by default, console with DIFYQ_LOG_FORMAT=console; secrets are redacted."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import Any

import structlog

from difyq.worker.jobs.schema import JobField
from difyq.worker.json_codec import dumps
from difyq.worker.tracing import log_context

_SECRET_KEYS = re.compile(r"(api_key|token|secret|authorization|password)", re.IGNORECASE)
_SECRET_VALUES = re.compile(r"(app-[A-Za-z0-9]{8,}|whsec_[A-Za-z0-9+/=]{8,}|Bearer\s+\S+)")


def _redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and key != "event":
            event[key] = "[redacted]"
        elif isinstance(value, str):
            event[key] = _SECRET_VALUES.sub("[redacted]", value)
    return event


def _json_line(event: dict[str, Any], **options: Any) -> str:
    """JSONRenderer's serializer: one compact line; ``default`` is structlog's fallback (the repr)."""
    return dumps(event, default=options.get("default")).decode()


class _StderrLogger:
    """structlog's output: each rendered line to the *current* ``sys.stderr`` (looked up per line, as a replaced
    stream would otherwise be written after it closed). A failed write is dropped, as the standard library's
    handlers do: a log line must never fail the job or request that emits it."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        try:
            with self._lock:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except (OSError, ValueError):
            pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def configure_logging(process: str) -> None:
    """One renderer on stderr for structlog's events (written directly: no stdlib record per line) and for the
    standard library's loggers (Dramatiq, uvicorn), which go through a ProcessorFormatter with the same chain."""
    level = getattr(logging, os.environ.get("DIFYQ_LOG_LEVEL", "INFO").upper(), logging.INFO)
    console = os.environ.get("DIFYQ_LOG_FORMAT", "json").lower() == "console"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # JSON lines carry the traceback as an "exception" string (redacted like any value); the console renderer
        # prints it itself.
        *([] if console else [structlog.processors.format_exc_info]),
        _redact,
    ]
    renderer = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(serializer=_json_line)
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=lambda *_: _StderrLogger(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    structlog.contextvars.bind_contextvars(process=process)


def job_log_context(job_id: str, fields: dict[str, str]) -> dict[str, str]:
    """The fields every log line about a job carries: its id, app, the request id it was submitted with and its
    trace id."""
    context = {"job_id": job_id, "app": fields.get(JobField.APP, "")}
    if fields.get(JobField.REQUEST_ID):
        context["request_id"] = fields[JobField.REQUEST_ID]
    return context | log_context(fields.get(JobField.TRACEPARENT))
