"""The job's trace: the one place that computes a job's W3C trace context, and the spans of its life.

Every job has a trace context, with or without OpenTelemetry: it is made at submit (inside the submit span, or
from an incoming ``traceparent``, or new), stored in the job record (``traceparent``; the resource shows its
``trace_id``), carried in each of the job's Dramatiq messages (the ``traceparent`` message option, see
``TraceContextMiddleware``), bound to every log line of the job, and sent to Dify (``traceparent``,
``X-Trace-Id``) and to the callback receiver (``traceparent``).

The spans are recorded only when ``difyq.worker.otel`` set up an exporter (the ``difyq[otel]`` extra installed
and ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set); otherwise ``span`` yields a
no-op and nothing from OpenTelemetry is imported here.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar, Token
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import structlog

from difyq.worker import otel
from difyq.worker.jobs.schema import JobField

TRACEPARENT = "traceparent"
TRACE_ID_HEADER = "X-Trace-Id"
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

SpanKind = Literal["internal", "server", "client", "producer", "consumer"]

# The traceparent of the job being submitted or processed in this thread (or task): the job's trace context.
_job: ContextVar[str | None] = ContextVar("difyq_job_traceparent", default=None)
# The traceparent a producer's request came with (the API's RequestContext sets it).
_incoming: ContextVar[str | None] = ContextVar("difyq_incoming_traceparent", default=None)
# The trace ids that named a job lately (``naming_trace_id``), oldest first.
_named: OrderedDict[str, None] = OrderedDict()
_naming_lock = threading.Lock()
_NAMED_KEPT = 4096


def valid_traceparent(value: str | None) -> str | None:
    """``value`` when it is a W3C traceparent (version 00, non-zero ids), else None."""
    if not value:
        return None
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None or match.group(1) == _ZERO_TRACE or match.group(2) == _ZERO_SPAN:
        return None
    return match.group(0)


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a traceparent, or None."""
    valid = valid_traceparent(traceparent)
    return valid[3:35] if valid else None


class _MonotonicUlids:
    """ULIDs as 128-bit numbers, in ULID's monotonic mode: one made in the same millisecond as the one before (or
    while the clock stepped back) is that one plus one, so the ids of one process sort in the order it made them."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        fresh = (int(time.time() * 1000) << 80) | secrets.randbits(80)
        with self._lock:
            self._last = max(fresh, self._last + 1)
            return self._last


_ulids = _MonotonicUlids()


def new_trace_id() -> str:
    """A new trace id, shaped as a ULID: 48 bits of milliseconds, then 80 random bits (monotonic within a
    millisecond: ``_MonotonicUlids``). A trace difyq starts gets one (``difyq.worker.otel_sdk`` makes the SDK's the
    same way), and names the job submitted in it, so a process's jobs of one millisecond list in submit order."""
    return format(_ulids.next(), "032x")


def _new_traceparent(parent: str | None) -> str:
    """A traceparent in ``parent``'s trace (a new one without it), with a span id of its own."""
    valid = valid_traceparent(parent)
    trace_id, flags = (valid[3:35], valid[-2:]) if valid else (new_trace_id(), "01")
    return f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"


def naming_trace_id(traceparent: str | None) -> str | None:
    """The trace id that names the job being submitted (its id is then made from it): the trace's own when difyq
    started it (no caller's ``traceparent``: a request, delivery, fire or enqueue) and no other job of this
    process took it first (a trace holding several submits names only its first job). None otherwise."""
    trace_id = trace_id_of(traceparent)
    if trace_id is None or _incoming.get() is not None:
        return None
    with _naming_lock:
        if trace_id in _named:
            return None
        _named[trace_id] = None
        if len(_named) > _NAMED_KEPT:
            _named.popitem(last=False)
    return trace_id


def job_traceparent() -> str | None:
    """The trace context of the job this thread works for (None outside a job)."""
    return _job.get()


def log_context(traceparent: str | None) -> dict[str, str]:
    """The ``trace_id`` every log line of a job carries (nothing when the job has no trace context)."""
    trace_id = trace_id_of(traceparent)
    return {"trace_id": trace_id} if trace_id else {}


@contextmanager
def job(traceparent: str | None) -> Iterator[None]:
    """Work for the job whose trace context is ``traceparent`` (from its message or record): its messages carry
    it, its log lines show its trace id, its spans are its children. A no-op when the job is already current or
    has no context."""
    traceparent = valid_traceparent(traceparent)
    if traceparent is None or traceparent == _job.get():
        yield
        return
    token = _job.set(traceparent)
    try:
        with structlog.contextvars.bound_contextvars(**log_context(traceparent)):
            yield
    finally:
        _job.reset(token)


class IncomingTrace:
    """A producer's request: its ``traceparent`` header (when valid) parents the jobs it submits. A class, not a
    generator, so whatever the request raises passes through untouched (frozen exceptions included)."""

    def __init__(self, traceparent: str | None):
        self._traceparent = valid_traceparent(traceparent)
        self._token: Token[str | None] | None = None

    def __enter__(self) -> None:
        self._token = _incoming.set(self._traceparent)

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _incoming.reset(self._token)


class Span(Protocol):
    """What difyq does with a span: attributes, an error type, and the traceparent to send on."""

    def set(self, name: str, value: Any) -> None: ...

    def fail(self, error_type: str) -> None: ...

    @property
    def traceparent(self) -> str | None: ...


class _NoSpan:
    """Without OpenTelemetry: attributes go nowhere, and what is sent on is the job's own trace context."""

    def __init__(self, traceparent: str | None):
        self._traceparent = traceparent

    def set(self, name: str, value: Any) -> None:
        pass

    def fail(self, error_type: str) -> None:
        pass

    @property
    def traceparent(self) -> str | None:
        return self._traceparent


@contextmanager
def span(name: str, kind: SpanKind = "internal", *, attributes: Mapping[str, Any] | None = None,
         start_time: float | None = None) -> Iterator[Span]:
    """A span of the current job: a child of the span current in this thread, else of the job's trace context.
    ``start_time`` (epoch seconds) backdates its start."""
    recorder = otel.recorder()
    if recorder is None:
        yield _NoSpan(_job.get())
        return
    with recorder.span(name, kind, attributes or {}, _job.get(), start_time) as recorded:
        yield recorded


def backdated(name: str, started: float, *, attributes: Mapping[str, Any] | None = None) -> None:
    """A span of the current job from ``started`` (epoch seconds) to now: a wait, recorded when it ends."""
    with span(name, attributes=attributes, start_time=min(started, time.time())):
        pass


@contextmanager
def submitting(attributes: Mapping[str, Any]) -> Iterator[Span]:
    """The submit of one job: its span, a child of the request's span, or of the incoming ``traceparent``, or a
    new trace. The span's ``traceparent`` is the job's trace context, which its record and messages carry."""
    recorder = otel.recorder()
    with (nullcontext(_NoSpan(_new_traceparent(_incoming.get()))) if recorder is None
          else recorder.span("difyq.submit", "producer", attributes, _incoming.get(), None)) as submit:
        token = _job.set(submit.traceparent)
        try:
            yield submit
        finally:
            _job.reset(token)


@contextmanager
def attempt(job_id: str, fields: Mapping[str, str], number: int) -> Iterator[Span]:
    """One attempt of a job (``fields`` is its record): the job's context from its message, else its record."""
    with job(_job.get() or fields.get(JobField.TRACEPARENT)), span("difyq.attempt", "consumer", attributes={
        "difyq.job.id": job_id, "difyq.app": fields.get(JobField.APP), "difyq.attempt": number,
        "messaging.system": "dramatiq", "messaging.destination.name": "jobs",
    }) as recorded:
        yield recorded


@contextmanager
def callback_attempt(job_id: str, fields: Mapping[str, str], number: int) -> Iterator[Span]:
    """One attempt to deliver a job's callback (``fields`` is its record)."""
    with job(_job.get() or fields.get(JobField.TRACEPARENT)), span("difyq.callback", "client", attributes={
        "difyq.job.id": job_id, "difyq.callback.attempt": number, "http.request.method": "POST",
        "server.address": urlsplit(fields.get(JobField.CALLBACK_URL) or "").hostname,
    }) as recorded:
        yield recorded


def message_options() -> dict[str, str]:
    """The options a Dramatiq message of the current job carries: its trace context, when there is one."""
    traceparent = _job.get()
    return {TRACEPARENT: traceparent} if traceparent else {}


def current_traceparent() -> str | None:
    """What an outgoing call carries: the current span's context (the call's own span), else the job's."""
    recorder = otel.recorder()
    if recorder is not None and recorder.in_span():
        return recorder.current_traceparent()
    return _job.get()


def dify_headers(trace_id: str | None) -> dict[str, str]:
    """What a call to Dify for the job whose trace id is ``trace_id`` carries: W3C ``traceparent`` (the call's own
    span when spans are recorded, else the job's context, else a new span id in that trace) and ``X-Trace-Id``,
    which Dify takes first as the external trace id of its tracing integrations (Langfuse, LangSmith, Opik…)."""
    if not trace_id:
        return {}
    traceparent = current_traceparent()
    if trace_id_of(traceparent) != trace_id:
        traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    return {TRACEPARENT: traceparent, TRACE_ID_HEADER: trace_id}


def callback_headers() -> dict[str, str]:
    """What a callback POST carries: the ``traceparent`` of its attempt's span."""
    traceparent = current_traceparent()
    return {TRACEPARENT: traceparent} if traceparent else {}
