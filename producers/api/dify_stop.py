"""Stopping a canceled job's Dify task: ``POST /workflows/tasks/{task_id}/stop`` (or the chat/completion stop), as
the job's ``user``, for a running call or a paused run.

The cancel never waits on Dify: the job is canceled in Redis first, then the stop is asked once; a stop that fails
for a reason a retry can fix (Dify unreachable, 5xx, 429) is asked again after each of ``STOP_RETRY_DELAYS_S`` on a
timer thread of this process, and a stop still failing after the last is logged ``dify_stop_abandoned`` (the run
then ends as Dify ends it: a paused run at its form's expiry). The retries live in this process only: a restart
drops them, and says so in the log line of each attempt that failed (``dify_stop_failed``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import structlog

from difyq.worker.dify.client import DifyClient
from difyq.worker.dify.errors import DifyError
from difyq.worker.runtime import Runtime

log = structlog.get_logger("difyq.api")

STOP_RETRY_DELAYS_S = (1.0, 5.0, 30.0, 120.0)
STOP_TIMEOUT_S = 15.0


def stop_dify_task(runtime: Runtime, job: dict[str, Any], task_id: str,
                   retry_delays_s: Sequence[float] = STOP_RETRY_DELAYS_S) -> None:
    """Ask Dify to stop a canceled job's task (its user's); retried on a timer while the failure is transient."""
    app = runtime.config.apps.get(job["app"])
    if app is None:
        return
    client = DifyClient(runtime.config.app_base_url(job["app"]), app.api_key.get_secret_value(),
                        connect_timeout=runtime.config.dify.connect_timeout_s, total_timeout=STOP_TIMEOUT_S)
    user = (job.get("request") or {}).get("user") or app.user

    def attempt(number: int) -> None:
        try:
            client.stop(app.mode, task_id, user)
        except DifyError as exc:
            retry = exc.retryable and number <= len(retry_delays_s)
            log.warning("dify_stop_failed" if retry else "dify_stop_abandoned", job_id=job["id"], code=exc.code,
                        attempt=number, next_attempt_in_s=retry_delays_s[number - 1] if retry else None)
            if retry:
                timer = threading.Timer(retry_delays_s[number - 1], attempt, (number + 1,))
                timer.daemon = True
                timer.start()
            return
        log.info("dify_task_stopped", job_id=job["id"], attempt=number)

    attempt(1)
