"""Scrape-time gauges read from Redis in one script call: queue depth (the low lane's messages included: they wait
for a worker thread too), delayed and dead messages, the oldest waiting job's age, callback dead letters, and jobs
running and paused per app."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.jobs.scripts import job_script
from difyq.worker.redis_keys import RedisKeys

QUEUES = (JOBS_QUEUE, CALLBACKS_QUEUE)


class QueueCollector(Collector):
    """A prometheus-client collector; a Redis outage yields no samples rather than a failed scrape.

    ``apps`` are the configured app names: each gets a ``difyq_jobs_running`` and a ``difyq_jobs_paused``
    sample, 0 when none of its jobs runs (or waits for human input), so an idle fleet reads 0 rather than no data.
    """

    def __init__(self, client: redis.Redis, namespace: str, apps: Iterable[str] = ()):
        self.redis = client
        self.keys = RedisKeys(namespace)
        self.apps = tuple(apps)
        self._stats = client.register_script(job_script("queue_stats"))

    def _read(self) -> tuple[list[Any], int, dict[str, float], dict[str, float]]:
        """The queue figures, the callback dead letters, and the running and the paused jobs per app (two round
        trips; a job counts only while its record says so)."""
        keys = self.keys
        queue_keys = [key for queue in QUEUES for key in (keys.queue(queue), keys.queue_bodies(queue),
                                                          keys.delayed_bodies(queue), keys.dead_letters(queue),
                                                          keys.low_lane(queue))]
        queues, callback_dead, leased, paused = self._stats(
            keys=[self.keys.leases, self.keys.callback_dead_letters, self.keys.paused, *queue_keys],
            args=list(QUEUES))
        pipe = self.redis.pipeline(transaction=False)
        for job_id in [*leased, *paused]:
            pipe.hmget(self.keys.job(_text(job_id)), JobField.APP, JobField.STATUS)
        counts: dict[str, dict[str, float]] = {JobStatus.RUNNING: {}, JobStatus.PAUSED: {}}
        for app, status in pipe.execute():
            if app is not None and (per_app := counts.get(_text(status))) is not None:
                per_app[_text(app)] = per_app.get(_text(app), 0.0) + 1
        return queues, int(callback_dead), counts[JobStatus.RUNNING], counts[JobStatus.PAUSED]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            queues, callback_dead, running, paused = self._read()
        except redis.RedisError:
            return
        waiting = GaugeMetricFamily("difyq_queue_messages", "Messages waiting in a queue (its low lane "
                                    "included).", labels=["queue"])
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
        for app, count in {**dict.fromkeys(self.apps, 0.0), **running}.items():
            in_flight.add_metric([app], count)
        awaiting = GaugeMetricFamily("difyq_jobs_paused", "Jobs whose Dify run waits for human input (status "
                                     "paused) now.", labels=["app"])
        for app, count in {**dict.fromkeys(self.apps, 0.0), **paused}.items():
            awaiting.add_metric([app], count)
        yield from (waiting, delayed, dead, oldest, in_flight, awaiting)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
