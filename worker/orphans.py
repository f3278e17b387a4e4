"""The orphan sweep: a job left ``queued`` without a message that would run it is queued again, and so is a
``paused`` one that lost the message that checks its run when its forms expire; a callback left pending without a
message that would deliver it gets a new one.

Every state change of a job writes its next message in the same Lua script, so difyq itself never leaves a queued
job without one; Dramatiq can, when Redis goes away under it. A consumer whose connection breaks forgets the
delayed messages it had fetched (retries, deferrals) while their ids stay in its process's acknowledgement set,
which Dramatiq hands back only once that process is dead; and a delivery whose retry could not be enqueued is
acknowledged all the same (``PatientRedisBroker`` waits for Redis there, but a time limit can still end the
wait). The sweep is the bound on all of these.

One worker process at a time (a Redis lock held for ``turn_s``, a third of ``overdue_s``), once Redis has answered
for a whole lease (see ``leases``), looks at the jobs ``queued`` (or ``paused``, due at their forms' expiry) and
due for longer than ``overdue_s`` (two leases), so an orphan is queued again at most three leases after it was
due (two, a turn, and an upkeep round).
Each job record names its latest ``run_job`` message (``JobField.MESSAGE``: written with the message by difyq's
scripts, and by ``DifyqWorkerMiddleware`` for the messages Dramatiq enqueues itself). A job is an orphan when that
message is neither on the jobs queue (waiting, in its low lane, or fetched by a worker: its body stays in the
queue's bodies until it is acknowledged) nor a delayed message due within the bound (``orphans.lua``). Unless
another message was written for it meanwhile, it gets a new one at the front of the queue (naming only the job,
like the reaper's; a paused job is queued to follow its run, as a submitted form queues it), and
``difyq_orphaned_jobs_requeued_total`` counts it. A misjudged message (a delayed one still
held by a worker far past its time, or one whose recording was cut off by Redis) only means a second delivery,
which the job record turns away.

Callbacks alike: each message of a job's callback (the first, a retry, a replay, a ``job.paused``) is written with
the record's ``JobField.CALLBACK_MESSAGE`` and the job's place in the callbacks' due index
(``RedisKeys.callbacks_due``, by when the message is due), in the same script; a callback done with (delivered or
given up) leaves the index. A job whose callback is still pending, whose status still announces it, and whose
message was due before the same bound but is neither on the callbacks queue nor a delayed message due within the
bound (``callback_orphans.lua``) gets a new message at once, unless another was written meanwhile
(``callback_again.lua``); ``difyq_orphaned_callbacks_requeued_total`` counts it and ``callback_orphaned`` logs it.
A misjudged one means a second delivery attempt, which the callback's lock and block turn away once it is
delivered.

Its cost: one Lua call per 200 unfinished jobs created before the bound (each a hash read and one or two
existence checks), and one per 200 callbacks due before the bound and not done with, every turn.
"""

from __future__ import annotations

import time

import structlog

from difyq.worker import metrics
from difyq.worker.jobs.schema import JobStatus
from difyq.worker.jobs.store import JobStore

log = structlog.get_logger("difyq.orphans")

# What the log calls a job queued again for want of a message, by the status it had.
ORPHANED_EVENTS = {JobStatus.QUEUED: "queued_job_orphaned", JobStatus.PAUSED: "paused_job_orphaned"}


class OrphanSweep:
    """Queues again the overdue queued jobs of ``apps`` that have no message; see the module docstring."""

    def __init__(self, store: JobStore, apps: list[str], overdue_s: float, turn_s: float | None = None):
        self.store = store
        self.apps = apps
        self.overdue_s = overdue_s
        self.turn_s = overdue_s / 3 if turn_s is None else turn_s

    def take_turn(self) -> list[str]:
        """Sweep jobs and callbacks unless another process did in the last ``turn_s``; the ids of the jobs queued
        again or given their callback again."""
        if not self.store.take_orphan_turn(self.turn_s):
            return []
        return self.sweep() + self.sweep_callbacks()

    def sweep(self) -> list[str]:
        """Queue again every orphan (see the module docstring); returns their ids."""
        requeued = []
        for job_id, app, message, status in self.store.orphans(self.apps, time.time() - self.overdue_s):
            state = self.store.requeue(job_id, delay_s=0.0, expected=status, front=True, message_was=message)
            if state == "cancel":
                self.store.finish(job_id, JobStatus.CANCELED)
            elif state.startswith("queued:"):
                log.warning(ORPHANED_EVENTS[status], job_id=job_id, app=app)
                metrics.orphaned_jobs_requeued.labels(app=app).inc()
                requeued.append(job_id)
        return requeued

    def sweep_callbacks(self) -> list[str]:
        """Give a new message to every callback whose message is gone (see the module docstring); returns the ids
        of their jobs."""
        requeued = []
        for job_id, message, app in self.store.callback_orphans(time.time() - self.overdue_s):
            if self.store.enqueue_callback(job_id, 0.0, message_was=message):
                log.warning("callback_orphaned", job_id=job_id, app=app)
                metrics.orphaned_callbacks_requeued.labels(app=app).inc()
                requeued.append(job_id)
        return requeued
