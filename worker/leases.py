"""Job leases and the reaper: what brings a dead worker's jobs back within 90 s.

Every running job holds a lease (an expiry in ``{ns}:leases``) that its worker process renews every third of the
lease. Every worker process also runs the reaper, but one at a time (a Redis lock that lapses after ``sweep_s``):

* a job whose lease expired stays with its worker process while that process's heartbeat lives
  (``RedisKeys.worker_alive``: the time of its last renewal round, expiring ``jobs.store.HEARTBEAT_LEASES``
  leases later) and that round renewed the job's lease: a live process starved of CPU whose renewals fell behind
  still runs the job, and running it again would call Dify twice; its lease is renewed instead
  (``keep_live_lease.lua``);
* any other job whose lease expired (its process is dead, or no longer runs it) goes back to the front of the
  queue with a new message, and its ``worker_losses`` count grows; past ``MAX_WORKER_LOSSES`` it gets no message
  and ends failed ``worker_lost`` (the bound for a poison message that kills every worker that runs it: Dramatiq
  itself never counts such redeliveries; no worker starts it between the count and the failure);
* a finished job whose lease expired lost the worker that was sending its first callback attempt: the callback
  goes to the callbacks queue if it is still pending.

The other messages a dead worker process had fetched (jobs it had not started yet, delayed retries, callbacks)
come back through Dramatiq's own recovery (``dramatiq_recovery``): its maintenance puts a dead process's
unacked messages back on their queues once its heartbeat is ``2 * lease_s`` old. The original message of a
recovered job may come back as well; it calls Dify only if the job record says nobody else runs the job
(``start.lua``). With the default 30 s lease a killed worker's running jobs are queued again within 70 s (its
heartbeat's two leases and one sweep).

Leases keep their meaning across a Redis outage: renewals fail while Redis is away, so the reaper sweeps only
after Redis has answered for one whole lease, time enough for every live worker to renew. The orphan sweep
(``orphans``: queued jobs left without a message) runs on the same rounds, in one process at a time, and so do
the tidy-ups given to ``also_on_sweep`` (the trim of the job indexes' expired entries) on the reaper's turns.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping

import redis
import structlog

from difyq.worker import metrics
from difyq.worker.durations import duration_from_env
from difyq.worker.jobs.schema import FINAL_STATUSES, JobField, JobStatus
from difyq.worker.jobs.store import JobStore
from difyq.worker.orphans import OrphanSweep

log = structlog.get_logger("difyq.leases")

MAX_WORKER_LOSSES = 3
DEFAULT_LEASE_S = 30.0
LEASE_ENV = "DIFYQ_JOB_LEASE"
# On how many of its calls to Redis per million a Dramatiq consumer also runs maintenance, which hands back the
# messages of worker processes whose heartbeat is older than the heartbeat timeout. Dramatiq's default of 1,000
# can leave them for hours on a quiet queue; on every call, they come back at the next poll of their queue (every
# process polls each queue at least once per worker timeout, 1 s). With no dead process the maintenance is two
# range reads of small sorted sets.
MAINTENANCE_CHANCE = 1_000_000


def dramatiq_recovery(lease_s: float) -> dict[str, int]:
    """Options of Dramatiq's RedisBroker for its recovery of a dead worker process's fetched messages: the process
    counts as dead once its heartbeat is two leases old (a live one renews its leases meanwhile)."""
    return {"heartbeat_timeout": int(2 * lease_s * 1000), "maintenance_chance": MAINTENANCE_CHANCE}


def lease_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """The job lease in seconds: ``DIFYQ_JOB_LEASE`` (a duration such as ``30s``), else 30 s."""
    return duration_from_env(LEASE_ENV, DEFAULT_LEASE_S, environ)


class LeaseKeeper:
    """Renews this process's leases every ``lease_s / 3`` and runs the reaper every ``sweep_s`` (``lease_s / 3``),
    and with it ``orphans`` (which takes its own turns)."""

    def __init__(self, store: JobStore, lease_s: float = DEFAULT_LEASE_S, sweep_s: float | None = None,
                 orphans: OrphanSweep | None = None):
        self.store = store
        self.orphans = orphans
        self.lease_s = lease_s
        self.sweep_s = lease_s / 3 if sweep_s is None else sweep_s
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected_since: float | None = None
        self._renewals: list[Callable[[], None]] = []
        self._tidy_ups: list[Callable[[], object]] = []

    def also_renew(self, renew: Callable[[], None]) -> None:
        """Call ``renew`` on every upkeep round too (the rate limiter's concurrency slots ride on this)."""
        self._renewals.append(renew)

    def also_on_sweep(self, tidy_up: Callable[[], object]) -> None:
        """Call ``tidy_up`` on every round this process takes the reaper's turn (one process at a time)."""
        self._tidy_ups.append(tidy_up)

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
        try:
            self.store.forget_alive()
        except redis.RedisError as exc:
            log.warning("worker_heartbeat_not_dropped", error=str(exc))

    def _loop(self) -> None:
        interval = min(self.lease_s / 3, self.sweep_s)
        while not self._stop.wait(interval):
            try:
                self.upkeep()
            except redis.RedisError as exc:
                self._connected_since = None
                log.warning("lease_upkeep_failed", error=str(exc))

    def upkeep(self) -> None:
        """One round: renew; sweep only once Redis has answered for a whole lease (see the module docstring).
        Raises redis.RedisError while Redis is away."""
        with self._lock:
            running = list(self._running)
        self.store.renew_leases(running, self.lease_s)
        for renew in self._renewals:
            renew()
        now = time.monotonic()
        if self._connected_since is None:
            self.store.redis.ping()
            self._connected_since = now
        if now - self._connected_since >= self.lease_s:
            self.sweep()
            if self.orphans is not None:
                self.orphans.take_turn()

    def sweep(self) -> list[str]:
        """Requeue jobs whose lease expired, then run the tidy-ups (``also_on_sweep``), unless another process
        swept in the last ``sweep_s``; returns the ids of the expired leases handled."""
        if not self.store.take_reaper_turn(self.sweep_s):
            return []
        expired = self.store.expired_leases()
        for job_id in expired:
            if self.store.keep_live_lease(job_id, self.lease_s):
                log.info("lease_expired_worker_alive", job_id=job_id)
            else:
                self._recover(job_id)
        for tidy_up in self._tidy_ups:
            tidy_up()
        return expired

    def _recover(self, job_id: str) -> None:
        state = self.store.requeue(job_id, delay_s=0.0, count_field=JobField.WORKER_LOSSES, front=True,
                                   count_limit=MAX_WORKER_LOSSES)
        if state.startswith("exhausted:"):
            self._give_up(job_id)
        elif state == "cancel":
            self.store.finish(job_id, JobStatus.CANCELED)
        elif state in FINAL_STATUSES:
            resumed = self.store.resume_callback(job_id)
            log.warning("lease_expired_callback_requeued" if resumed else "lease_expired_job_final", job_id=job_id)
            return
        elif not state.startswith("queued:"):
            self.store.drop_lease(job_id)
        log.warning("lease_expired_job_requeued", job_id=job_id, state=state)

    def _give_up(self, job_id: str) -> None:
        fields = self.store.fields(job_id)
        if fields is None:
            return
        error = {"code": "worker_lost", "status": None,
                 "message": f"the worker running this job died {MAX_WORKER_LOSSES + 1} times; not retried again"}
        status = self.store.finish(job_id, JobStatus.FAILED, error=error)
        metrics.jobs_finished.labels(app=fields[JobField.APP], status=status).inc()
        log.error("job_failed_worker_lost", job_id=job_id)
