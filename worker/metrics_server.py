"""The worker's /metrics: every worker process's samples (prometheus-client multiprocess mode, which also
carries Dramatiq's own ``dramatiq_*`` metrics) plus the scrape-time queue gauges. Dramatiq's CLI runs
``serve_worker_metrics`` in a forked side process (see ``DifyqPrometheus.forks``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dramatiq.middleware.prometheus import Prometheus
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from worker.queue_metrics import QueueCollector
from worker.runtime import current_runtime


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
    MultiProcessCollector(registry)
    registry.register(QueueCollector(runtime.raw_redis, runtime.namespace))
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
