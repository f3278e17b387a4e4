"""The worker process's broker and actors, for ``difyq worker`` (and ``dramatiq worker.actors``)."""

from __future__ import annotations

import os

import dramatiq

from worker.app import build_worker_broker
from worker.logs import configure_logging
from worker.metrics_server import DifyqPrometheus
from worker.runtime import current_runtime

configure_logging("worker")
broker = build_worker_broker(
    current_runtime(), [DifyqPrometheus()] if os.environ.get("DIFYQ_WORKER_METRICS") == "1" else []
)
dramatiq.set_broker(broker)
