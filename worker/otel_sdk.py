"""The OpenTelemetry SDK side of difyq's traces (the ``difyq[otel]`` extra): a tracer provider exporting over
OTLP/HTTP as the ``OTEL_*`` variables say, and the recorder ``difyq.worker.tracing`` makes its spans with.

Imported only when ``difyq.worker.otel`` found the extra installed and traces asked for.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from difyq.worker import tracing

_KINDS = {"internal": SpanKind.INTERNAL, "server": SpanKind.SERVER, "client": SpanKind.CLIENT,
          "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}
# The job's trace context is always W3C trace context, whatever OTEL_PROPAGATORS says for other libraries.
_W3C = TraceContextTextMapPropagator()
_DEFAULT_SERVICE_NAME = "difyq"


def _version() -> str:
    try:
        return importlib.metadata.version("difyq")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class TimeOrderedIds(RandomIdGenerator):
    """Span ids at random; trace ids as ``tracing.new_trace_id`` makes them (a ULID's bits), so the job submitted
    in a trace difyq started takes the trace id as its id."""

    def generate_trace_id(self) -> int:
        return int(tracing.new_trace_id(), 16)


class RecordedSpan:
    """An SDK span as ``difyq.worker.tracing.Span``."""

    def __init__(self, span: trace.Span):
        self._span = span

    def set(self, name: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(name, value)

    def fail(self, error_type: str) -> None:
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(Status(StatusCode.ERROR))

    @property
    def traceparent(self) -> str | None:
        return _traceparent(trace.set_span_in_context(self._span))


def _traceparent(context: Context | None) -> str | None:
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=context)
    return carrier.get("traceparent")


class Recorder:
    """Starts difyq's spans on the process's tracer provider."""

    def __init__(self, provider: TracerProvider, service_name: str):
        self.provider = provider
        self.service_name = service_name
        self._tracer = provider.get_tracer("difyq", _version())

    @staticmethod
    def in_span() -> bool:
        """Whether a span is current (the API's request span, or one of difyq's own)."""
        return trace.get_current_span().get_span_context().is_valid

    @contextmanager
    def span(self, name: str, kind: str, attributes: Mapping[str, Any], job_traceparent: str | None,
             start_time: float | None) -> Iterator[RecordedSpan]:
        """A span under the current one, else under ``job_traceparent`` (the job's trace context)."""
        context: Context | None = None
        if job_traceparent and not self.in_span():
            context = _W3C.extract({"traceparent": job_traceparent})
        with self._tracer.start_as_current_span(
            name, context=context, kind=_KINDS[kind],
            attributes={key: value for key, value in attributes.items() if value is not None},
            start_time=int(start_time * 1e9) if start_time is not None else None,
        ) as span:
            yield RecordedSpan(span)

    @staticmethod
    def current_traceparent() -> str | None:
        """The traceparent of the span current in this thread."""
        return _traceparent(None)

    def flush(self) -> None:
        self.provider.force_flush()


def build_recorder(process: str) -> Recorder:
    """The process's provider (set as OpenTelemetry's global one, so FastAPI's request spans use it too): the
    resource from ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` (``service.name`` ``difyq`` unless given)
    plus ``difyq.process``; the sampler from ``OTEL_TRACES_SAMPLER``; spans batched (``OTEL_BSP_*``) to the
    OTLP/HTTP exporter (``OTEL_EXPORTER_OTLP_*``)."""
    resource = Resource.create({"difyq.process": process})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: _DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, id_generator=TimeOrderedIds())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return Recorder(provider, str(resource.attributes.get(SERVICE_NAME)))
