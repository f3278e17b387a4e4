"""Jobs taken one at a time through the worker's whole path by hand, without a worker process: submit, Dramatiq's
fetch, the admission, the start, the outcome stored with the admission's release, the callback's first attempt
recorded as delivered, the ack. For measuring what that path costs Redis (its scripts' time, its memory); the
first attempt's record alone serves the store's tests of a run's end."""

from __future__ import annotations

import time
from typing import Any

from difyq.worker.app import build_broker
from difyq.worker.jobs.callback_block import CallbackAttempt, CallbackBlock, CallbackLock
from difyq.worker.jobs.messages import JOBS_QUEUE
from difyq.worker.jobs.model import NewJob
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.jobs.store import JobStore
from difyq.worker.runtime import Runtime
from difyq.worker.throttle import Throttle


def first_attempt_delivered(store: JobStore, job_id: str, status: str, record: dict[str, str],
                            lock: CallbackLock) -> None:
    """Record the callback's first attempt, made by the job's worker under its lease and the callback ``lock`` for
    the ``status`` its finish stored (``record``: the stored record finish returned), as delivered."""
    store.callback_attempted(
        job_id, status, CallbackBlock.of(record).attempted(200, None, delivered=True),
        CallbackAttempt(time.time(), f"job.{status}", 200, None, 0.01, "delivered"),
        retry_in_s=None, lease_of_run=record[JobField.ATTEMPT_STARTED_AT], lock=lock)


class JobPath:
    """The store, a throttle and a jobs-queue consumer of ``runtime``, as one worker process would hold them."""

    def __init__(self, runtime: Runtime) -> None:
        self.store = runtime.store
        self.throttle = Throttle(runtime, slot_lease_s=60)
        self.consumer = build_broker(runtime, 30).consume(JOBS_QUEUE, prefetch=1, timeout=0)

    def through(self, new: NewJob, result: dict[str, Any]) -> None:
        """Submit ``new`` and take it to its end: succeeded with ``result`` (whose usage the limits are charged),
        its callback delivered."""
        store, throttle = self.store, self.throttle
        job_id = store.submit(new).job["id"]
        message = next(self.consumer)
        while message is None:
            message = next(self.consumer)
        admission = throttle.admit(new.app, job_id, None, 0)
        with throttle.slot(new.app, admission) as slot:
            start = store.start_attempt(job_id, 30, admission.upstream_check)
            slot.tokens, slot.succeeded = (result.get("usage") or {}).get("total_tokens"), True
            release = throttle.release_call(slot)
            lock = CallbackLock(15)
            final, record = store.finish_keeping_callback(
                job_id, JobStatus.SUCCEEDED, lease_s=30, lock=lock, result=result, record=start.fields,
                along=[release] if release else [])
        assert record is not None
        first_attempt_delivered(store, job_id, final, record, lock)
        self.consumer.ack(message)

    def close(self) -> None:
        self.consumer.close()
