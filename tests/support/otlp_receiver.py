"""An OTLP/HTTP trace receiver on loopback: what an OpenTelemetry collector sees of difyq's spans.

It accepts ``POST /v1/traces`` (protobuf, gzip or not), decodes each ``ExportTraceServiceRequest`` with the
``opentelemetry-proto`` package, keeps every span as a ``ReceivedSpan`` and answers as a collector does. ``tree``
renders the spans of one trace as an indented tree (name, kind, service and process, chosen attributes).
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

_KINDS = {Span.SPAN_KIND_INTERNAL: "internal", Span.SPAN_KIND_SERVER: "server", Span.SPAN_KIND_CLIENT: "client",
          Span.SPAN_KIND_PRODUCER: "producer", Span.SPAN_KIND_CONSUMER: "consumer"}


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status_code: int
    attributes: dict[str, Any]
    resource: dict[str, Any]

    @property
    def process(self) -> str:
        return str(self.resource.get("difyq.process", "?"))


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterable[Any]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def decode(payload: bytes) -> list[ReceivedSpan]:
    """The spans of one OTLP/HTTP protobuf export request."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(payload)
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None, name=span.name,
                    kind=_KINDS.get(span.kind, "unspecified"), start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano, status_code=span.status.code,
                    attributes=_attributes(span.attributes), resource=resource))
    return spans


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.receiver.add(decode(body))
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: OtlpReceiver


class OtlpReceiver:
    """``with OtlpReceiver() as otlp:`` serves on a free loopback port; ``otlp.endpoint`` is the value for
    ``OTEL_EXPORTER_OTLP_ENDPOINT``."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.receiver = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self._spans if trace_id is None or span.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: Iterable[str], timeout: float = 30.0) -> list[ReceivedSpan]:
        """The trace's spans once every name in ``names`` arrived (a name listed twice must arrive twice)."""
        wanted = list(names)
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans(trace_id)
            have = [span.name for span in spans]
            if all(have.count(name) >= wanted.count(name) for name in wanted):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"trace {trace_id} lacks some of {wanted} after {timeout}s:\n{tree(spans)}")
            time.sleep(0.05)


_SHOWN = ("difyq.attempt", "difyq.callback.attempt", "gen_ai.operation.name", "gen_ai.provider.name",
          "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.conversation.id", "error.type",
          "http.response.status_code", "messaging.destination.name")


def tree(spans: list[ReceivedSpan]) -> str:
    """The spans as an indented tree by parent, children in start order; spans whose parent is not among them
    are roots."""
    ids = {span.span_id for span in spans}
    children: dict[str | None, list[ReceivedSpan]] = {}
    for span in sorted(spans, key=lambda span: span.start_ns):
        children.setdefault(span.parent_span_id if span.parent_span_id in ids else None, []).append(span)
    lines: list[str] = []

    def render(span: ReceivedSpan, depth: int) -> None:
        shown = " ".join(f"{key}={span.attributes[key]}" for key in _SHOWN if key in span.attributes)
        lines.append(f"{'  ' * depth}{span.name} [{span.kind}, {span.process}, "
                     f"{(span.end_ns - span.start_ns) / 1e6:.1f} ms] {shown}".rstrip())
        for child in children.get(span.span_id, []):
            render(child, depth + 1)

    for root in children.get(None, []):
        render(root, 0)
    return "\n".join(lines)
