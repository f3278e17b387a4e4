"""The worker process's broker and actors, for ``difyq worker`` (and ``dramatiq difyq.worker.actors``)."""

from __future__ import annotations

import os

import dramatiq

from difyq.worker import otel
from difyq.worker.app import build_worker_broker
from difyq.worker.logs import configure_logging
from difyq.worker.metrics_server import DifyqPrometheus
from difyq.worker.runtime import current_runtime

configure_logging("worker")
otel.configure("worker")
broker = build_worker_broker(
    current_runtime(), [DifyqPrometheus()] if os.environ.get("DIFYQ_WORKER_METRICS") == "1" else []
)
dramatiq.set_broker(broker)
