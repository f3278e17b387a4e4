"""Whether this process records OpenTelemetry spans, and its recorder when it does.

Off by default. On when the ``difyq[otel]`` extra is installed and the standard variables ask for traces:
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, ``OTEL_TRACES_EXPORTER`` unset or
``otlp``, ``OTEL_SDK_DISABLED`` not ``true``. Everything else (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``...) is read by the SDK itself
(``difyq.worker.otel_sdk``, imported only then).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from difyq.worker.otel_sdk import Recorder

log = structlog.get_logger("difyq.otel")

_recorder: Recorder | None = None


def wanted(environ: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "otlp":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def installed() -> bool:
    """Whether the ``difyq[otel]`` extra (the SDK and its OTLP/HTTP exporter) is installed."""
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None and \
            importlib.util.find_spec("opentelemetry.sdk") is not None
    except ModuleNotFoundError:
        return False


def configure(process: str) -> bool:
    """Set up span export for this process (``api``, ``worker``, ``scheduler``...) when the environment asks for
    it; says so once in the log either way. Returns whether spans are recorded."""
    global _recorder
    if _recorder is not None or not wanted():
        return _recorder is not None
    if not installed():
        log.warning("otel_unavailable", reason="OTEL_EXPORTER_OTLP_ENDPOINT is set but the difyq[otel] extra is "
                                               "not installed; traces are off")
        return False
    from difyq.worker.otel_sdk import build_recorder

    _recorder = build_recorder(process)
    log.info("otel_tracing", endpoint=os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
             or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"), service=_recorder.service_name)
    return True


def recorder() -> Recorder | None:
    """The process's span recorder, or None when traces are off."""
    return _recorder


def flush() -> None:
    """Export the spans still buffered (a worker's shutdown, before the process ends)."""
    if _recorder is not None:
        _recorder.flush()
