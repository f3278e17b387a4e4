"""Job leases: each worker process renews the leases of the jobs it runs, and one process at a time (a Redis
lock) sweeps expired leases back into the queue, so a SIGKILLed worker's jobs run again within a minute instead
of waiting for Dramatiq's heartbeat-and-dice-roll recovery. A job whose worker died too often ends failed."""

from __future__ import annotations

import threading

import redis
import structlog

from worker import metrics
from worker.jobs.model import JobStatus
from worker.jobs.store import JobStore

log = structlog.get_logger("difyq.leases")

MAX_WORKER_LOSSES = 3


class LeaseKeeper:
    """Renews this process's leases every ``lease_s / 3`` and sweeps expired ones every ``sweep_s``."""

    def __init__(self, store: JobStore, lease_s: float = 30.0, sweep_s: float = 10.0):
        self.store = store
        self.lease_s = lease_s
        self.sweep_s = sweep_s
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, job_id: str) -> None:
        with self._lock:
            self._running.add(job_id)

    def untrack(self, job_id: str) -> None:
        with self._lock:
            self._running.discard(job_id)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="difyq-leases", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        interval = min(self.lease_s / 3, self.sweep_s)
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    running = list(self._running)
                self.store.renew_leases(running, self.lease_s)
                self.sweep()
            except redis.RedisError as exc:
                log.warning("lease_upkeep_failed", error=str(exc))

    def sweep(self) -> list[str]:
        """Requeue jobs whose lease expired, if no other process swept in the last ``sweep_s``."""
        lock_key = f"{self.store.namespace}:reaper"
        if not self.store.redis.set(lock_key, self.store.worker_id, nx=True, px=int(self.sweep_s * 1000)):
            return []
        recovered = []
        for job_id in self.store.expired_leases():
            state = self.store.requeue(job_id, delay_s=0.0, count_field="worker_losses")
            if state.startswith("queued:") and int(state.split(":")[1]) > MAX_WORKER_LOSSES:
                self._give_up(job_id)
            elif state == "cancel":
                fields = self.store.fields(job_id) or {}
                self.store.finish(job_id, fields, JobStatus.CANCELED)
            else:
                self.store.redis.zrem(self.store.leases_key, job_id)
            log.warning("lease_expired_job_requeued", job_id=job_id, state=state)
            recovered.append(job_id)
        return recovered

    def _give_up(self, job_id: str) -> None:
        fields = self.store.fields(job_id)
        if fields is None:
            return
        error = {"code": "worker_lost", "status": None,
                 "message": f"the worker running this job died {MAX_WORKER_LOSSES + 1} times; not retried again"}
        status = self.store.finish(job_id, fields, JobStatus.FAILED, error=error)
        metrics.jobs_finished.labels(app=fields["app"], status=status).inc()
        log.error("job_failed_worker_lost", job_id=job_id)
