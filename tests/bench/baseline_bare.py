"""The ``bare`` baseline: one minimal Dramatiq actor on the bench's Redis, at Dramatiq's defaults.

    REDIS_URL=... BENCH_DIFY_URL=... BENCH_DIFY_KEY=... dramatiq tests.bench.baseline_bare --processes 2 --threads 16
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from tests.bench.baseline_common import run_baseline_job

NAMESPACE = "bare"
QUEUE = "jobs"
ACTOR = "run_job"

broker = RedisBroker(url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), namespace=NAMESPACE)
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, max_retries=0)
def run_job(job_id: str, query: str, callback_url: str) -> None:
    """Call Dify, POST the answer to ``callback_url``."""
    run_baseline_job(job_id, query, callback_url)
