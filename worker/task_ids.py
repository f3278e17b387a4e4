"""TaskIdRecorder: puts the Dify task id of each running call into its job record, where ``DELETE /v1/jobs/{id}``
finds it to stop the task, and stops the task itself when the cancel came first.

A task id is known once the call's stream has begun. Writing it there and then costs a round trip per job, and a
cancel that lands before the write finds nothing to stop. The recorder writes it ``RECORD_AFTER_S`` later instead,
for every call that began meanwhile in one round trip (``JobStore.record_task_ids``); a call that ended by then
writes nothing (there is nothing left to stop). The write reports each job whose cancel was asked before its task
id was there, and the recorder stops those tasks: a cancel always reaches a running task, whichever came first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis
import structlog

from difyq.worker.dify.errors import DifyError
from difyq.worker.jobs.store import JobStore

RECORD_AFTER_S = 0.05

log = structlog.get_logger("difyq.worker")

StopTask = Callable[[str], None]


class TaskIdRecorder:
    """One per worker process; ``note`` and ``forget`` are called from the job threads (or greenlets)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._pending: dict[str, tuple[str, StopTask]] = {}
        self._run_ids: dict[str, str] = {}
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def note_run(self, job_id: str, run_id: str) -> None:
        """The call of ``job_id`` started workflow run ``run_id`` (recorded with the task id that follows)."""
        with self._changed:
            self._run_ids[job_id] = run_id

    def note(self, job_id: str, task_id: str, stop: StopTask) -> None:
        """The call of ``job_id`` runs as Dify task ``task_id``; ``stop(task_id)`` stops it."""
        with self._changed:
            self._pending[job_id] = (task_id, stop)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="difyq-task-ids", daemon=True)
                self._thread.start()
            self._changed.notify()

    def forget(self, job_id: str) -> None:
        """The call ended: its task id need not be written any more."""
        with self._changed:
            self._pending.pop(job_id, None)
            self._run_ids.pop(job_id, None)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
            time.sleep(RECORD_AFTER_S)
            with self._changed:
                batch, self._pending = self._pending, {}
                run_ids = {job_id: self._run_ids.pop(job_id) for job_id in batch if job_id in self._run_ids}
            if batch:
                try:
                    self._record(batch, run_ids)
                except Exception:  # the thread must outlive any one batch, or no task id is recorded again
                    log.exception("task_ids_not_recorded", jobs=len(batch))

    def _record(self, batch: dict[str, tuple[str, StopTask]], run_ids: dict[str, str]) -> None:
        try:
            canceled = self.store.record_task_ids({job_id: (task_id, run_ids.get(job_id))
                                                   for job_id, (task_id, _) in batch.items()})
        except redis.RedisError as exc:
            log.warning("task_ids_not_recorded", jobs=len(batch), error=str(exc))
            return
        for job_id in canceled:
            task_id, stop = batch[job_id]
            try:
                stop(task_id)
            except DifyError as error:
                log.warning("dify_stop_failed", job_id=job_id, code=error.code, message=error.message[:500])
            else:
                log.info("dify_task_stopped", job_id=job_id, reason="canceled before its task id was recorded")
