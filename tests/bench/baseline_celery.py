"""The ``celery`` baseline: the same job as a Celery task on the same Redis (no result backend).

    REDIS_URL=... BENCH_DIFY_URL=... BENCH_DIFY_KEY=... celery -A tests.bench.baseline_celery worker -P threads -c 16
"""

from __future__ import annotations

import os

from celery import Celery

from tests.bench.baseline_common import run_baseline_job

TASK = "bench.run_job"


def make_app(redis_url: str) -> Celery:
    """A Celery app on ``redis_url`` with the task registered; the load generator builds one to send tasks."""
    celery = Celery("bench", broker=redis_url)
    celery.conf.update(task_ignore_result=True, worker_hijack_root_logger=False,
                       broker_connection_retry_on_startup=True, worker_send_task_events=False)

    @celery.task(name=TASK)
    def run_job(job_id: str, query: str, callback_url: str) -> None:
        """Call Dify, POST the answer to ``callback_url``."""
        run_baseline_job(job_id, query, callback_url)

    return celery


app = make_app(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
