"""``difyq scheduler``: the cron producer's process — signals, a /metrics and /healthz port, and fires submitted
through the one ``submit()`` path."""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import datetime
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import MetricsHandler

from difyq.producers.scheduler import SubmitFire, lease_from_env, run_scheduler
from difyq.producers.submission import JobSubmission
from difyq.producers.submit import submit
from difyq.worker import tracing
from difyq.worker.config import ScheduleConfig
from difyq.worker.runtime import Runtime

DEFAULT_METRICS_PORT = 9192


class _Handler(MetricsHandler):
    """prometheus-client's handler, plus /healthz for probes."""

    def do_GET(self) -> None:
        if self.path.startswith("/healthz"):
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok\n")
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        return


def submit_fire_for(runtime: Runtime) -> SubmitFire:
    def submit_fire(name: str, schedule: ScheduleConfig, fire_time: datetime, rendered: dict[str, Any]) -> object:
        fields = {name: value for name, value in rendered.items() if name != "schedule"}
        fields.update({name: rendered[name] or None for name in ("user", "conversation_id", "callback_url")})
        with tracing.span("difyq.schedule_fire", attributes={"difyq.schedule": name,
                                                             "difyq.schedule.fire_time": fire_time.isoformat()}):
            return submit(runtime, JobSubmission.model_validate(fields), source="schedule", scope="schedule")

    return submit_fire


def run_scheduler_process(runtime: Runtime) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        lease_s = lease_from_env()
    except ValueError as exc:
        print(f"difyq scheduler: {exc}", file=sys.stderr)
        return 2
    port = int(os.environ.get("DIFYQ_METRICS_PORT") or DEFAULT_METRICS_PORT)
    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), _Handler)
    except OSError as exc:
        print(f"difyq scheduler: cannot serve /metrics on port {port} (DIFYQ_METRICS_PORT): {exc.strerror}",
              file=sys.stderr)
        return 2
    threading.Thread(target=server.serve_forever, name="difyq-metrics", daemon=True).start()
    try:
        run_scheduler(runtime.config, runtime.connector, stop, submit_fire_for(runtime), lease_s)
    finally:
        server.shutdown()
    return 0
