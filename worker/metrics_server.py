"""The worker's /metrics: every worker process's samples (prometheus-client multiprocess mode, which also
carries Dramatiq's own ``dramatiq_*`` metrics) plus the scrape-time queue gauges. Dramatiq's CLI runs
``serve_worker_metrics`` in a forked side process (see ``DifyqPrometheus.forks``).

Dramatiq's message-duration histogram is exported in base units, as ``dramatiq_message_duration_seconds``
(Dramatiq records ``dramatiq_message_duration_milliseconds``, which ``promtool check metrics`` rejects)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dramatiq
from dramatiq.middleware.prometheus import Prometheus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from difyq.worker import metrics
from difyq.worker.budgets import BudgetCollector, BudgetLedger, configured_budgets
from difyq.worker.queue_metrics import QueueCollector
from difyq.worker.runtime import current_runtime

DRAMATIQ_DURATION_MS = "dramatiq_message_duration_milliseconds"
DRAMATIQ_DURATION_S = "dramatiq_message_duration_seconds"


class BaseUnits(Collector):
    """Another collector's families, with Dramatiq's message-duration histogram converted to seconds."""

    def __init__(self, inner: Collector):
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            yield _duration_in_seconds(family) if family.name == DRAMATIQ_DURATION_MS else family


def _duration_in_seconds(family: Metric) -> Metric:
    """The milliseconds histogram as ``dramatiq_message_duration_seconds``: bucket bounds and sum / 1000."""
    converted = Metric(DRAMATIQ_DURATION_S, "The time spent processing messages.", "histogram")
    for sample in family.samples:
        suffix = sample.name.removeprefix(DRAMATIQ_DURATION_MS)
        labels, value = dict(sample.labels), sample.value
        if suffix == "_bucket":
            labels["le"] = floatToGoString(float(labels["le"]) / 1000)
        elif suffix == "_sum":
            value /= 1000
        converted.add_sample(DRAMATIQ_DURATION_S + suffix, labels, value)
    return converted


def _handler(registry: CollectorRegistry) -> type[BaseHTTPRequestHandler]:
    class MetricsHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/healthz"):
                body, content_type = b"ok\n", "text/plain"
            else:
                body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    return MetricsHandler


def serve_worker_metrics() -> int:
    runtime = current_runtime()
    registry = CollectorRegistry()
    registry.register(BaseUnits(MultiProcessCollector(None)))
    registry.register(QueueCollector(runtime.raw_redis, runtime.namespace, runtime.config.apps))
    registry.register(BudgetCollector(BudgetLedger(runtime.redis, runtime.namespace),
                                      configured_budgets(runtime.config)))
    address = (os.environ.get("dramatiq_prom_host", "0.0.0.0"), int(os.environ.get("dramatiq_prom_port", "9191")))
    server = ThreadingHTTPServer(address, _handler(registry))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


class DifyqPrometheus(Prometheus):
    """Dramatiq's Prometheus middleware, exposing our registry instead of its own bare exposition server."""

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_worker_metrics]

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """Dramatiq's metrics, then the counters alerts and ratios read created at 0 in this worker process:
        Dramatiq's messages, errors and rejects per actor, and difyq's (``metrics.zero_worker_series``). A
        healthy worker then reads 0 failed attempts rather than no data."""
        super().after_process_boot(broker)
        for name in broker.get_declared_actors():
            actor = broker.get_actor(name)
            for counter in (self.total_messages, self.total_errored_messages, self.total_rejected_messages):
                counter.labels(actor.queue_name, actor.actor_name)
        metrics.zero_worker_series(current_runtime().config.apps)
