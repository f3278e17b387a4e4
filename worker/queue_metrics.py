"""Scrape-time gauges read from Redis in one script call: queue depth, delayed and dead messages, the oldest
waiting job's age, callback dead letters and jobs running per app."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from importlib import resources

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.redis_scripts import register_script


class QueueCollector(Collector):
    """A prometheus-client collector; a Redis outage yields no samples rather than a failed scrape.

    ``apps`` are the configured app names: each gets a ``difyq_jobs_running`` sample, 0 when none of its jobs
    runs, so an idle fleet reads 0 rather than no data.
    """

    def __init__(self, client: redis.Redis, namespace: str, apps: Iterable[str] = ()):
        self.namespace = namespace
        self.apps = tuple(apps)
        self._stats = register_script(
            client, resources.files("difyq.worker.jobs").joinpath("lua/queue_stats.lua").read_text(encoding="utf-8"))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            queues, running, callback_dead = self._stats(
                keys=[f"{self.namespace}:leases", f"{self.namespace}:dlq:callbacks"],
                args=[self.namespace, JOBS_QUEUE, CALLBACKS_QUEUE],
            )
        except redis.RedisError:
            return
        waiting = GaugeMetricFamily("difyq_queue_messages", "Messages waiting in a queue.", labels=["queue"])
        delayed = GaugeMetricFamily("difyq_queue_delayed_messages", "Messages waiting for their time (retries, "
                                    "rate limits, callback backoff).", labels=["queue"])
        dead = GaugeMetricFamily("difyq_dead_letters", "Dead letters: messages Dramatiq gave up on, and callbacks "
                                 "that ended failed (queue=callbacks).", labels=["queue"])
        oldest = GaugeMetricFamily("difyq_oldest_queued_job_age_seconds", "Age of the oldest waiting message.",
                                   labels=["queue"])
        now_ms = time.time() * 1000
        for index in range(0, len(queues), 5):
            name = _text(queues[index])
            waiting.add_metric([name], float(queues[index + 1]))
            delayed.add_metric([name], float(queues[index + 2]))
            extra = float(callback_dead) if name == CALLBACKS_QUEUE else 0.0
            dead.add_metric([name], float(queues[index + 3]) + extra)
            enqueued_ms = float(_text(queues[index + 4]))
            oldest.add_metric([name], max((now_ms - enqueued_ms) / 1000, 0.0) if enqueued_ms >= 0 else 0.0)
        in_flight = GaugeMetricFamily("difyq_jobs_running", "Jobs holding a worker lease now.", labels=["app"])
        counts = dict.fromkeys(self.apps, 0.0)
        for index in range(0, len(running), 2):
            counts[_text(running[index])] = float(running[index + 1])
        for app, count in counts.items():
            in_flight.add_metric([app], count)
        yield from (waiting, delayed, dead, oldest, in_flight)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
