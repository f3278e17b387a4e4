"""Builds a worker's broker: Dramatiq's RedisBroker with difyq's middleware and the two actors bound to it.

``difyq.worker.actors`` calls this once for the process (what ``dramatiq difyq.worker.actors`` and ``difyq worker``
load);
tests call it with a runtime of their own to run an in-process worker on a private namespace.
"""

from __future__ import annotations

from functools import partial

import dramatiq
import redis
import structlog
from dramatiq.middleware import Middleware, Retries, ShutdownNotifications, TimeLimit

from difyq.worker.broker import PatientRedisBroker
from difyq.worker.budgets import BudgetGate, BudgetLedger
from difyq.worker.callbacks.sender import CallbackSender
from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.jobs.schema import JobField, JobStatus
from difyq.worker.leases import LeaseKeeper, dramatiq_recovery, lease_from_env
from difyq.worker.orphans import OrphanSweep
from difyq.worker.redis_retry import through_blips
from difyq.worker.runner import JobRunner
from difyq.worker.runtime import Runtime
from difyq.worker.task_ids import TaskIdRecorder
from difyq.worker.throttle import Throttle
from difyq.worker.trace_middleware import TraceContextMiddleware

log = structlog.get_logger("difyq.worker")

MAX_DELIVERY_RETRIES = 3
# The record field that names a job's latest message of each actor, for the orphan sweep.
NOTED_MESSAGES = {"run_job": JobField.MESSAGE, "deliver_callback": JobField.CALLBACK_MESSAGE}


def retry_delivery(retries: int, exception: BaseException) -> bool:
    """Dramatiq's retry policy for both actors (``retries``: the delivery's retries so far): a delivery that Redis
    cut off (connection lost, or no answer) is retried however often that happens, the message being in no way at
    fault; one that raised anything else up to ``MAX_DELIVERY_RETRIES`` times, then dead-lettered."""
    return isinstance(exception, redis.ConnectionError | redis.TimeoutError) or retries < MAX_DELIVERY_RETRIES


class DifyqWorkerMiddleware(Middleware):
    """Keeps leases for the whole life of each worker process, marks jobs whose message Dramatiq dead-lettered
    failed, and records each message Dramatiq enqueues itself (a retry, a delayed message moved to the queue) as
    its job's latest ``run_job`` or ``deliver_callback`` message, which the orphan sweep looks for. Lease upkeep
    stops only after the worker shut down: on SIGTERM the jobs still running finish first, and a lease that lapsed
    meanwhile would let another worker call Dify for them a second time. The task-id recorder's thread ends with
    the worker too."""

    def __init__(self, runtime: Runtime, leases: LeaseKeeper, task_ids: TaskIdRecorder):
        self.runtime = runtime
        self.leases = leases
        self.task_ids = task_ids

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.leases.start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.leases.stop()
        self.task_ids.close()

    def after_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message, delay: int | None) -> None:
        field = NOTED_MESSAGES.get(message.actor_name)
        if field is not None and message.args:
            self.runtime.store.note_message(str(message.args[0]), message.options["redis_message_id"], field)

    def after_nack(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        if message.actor_name != "run_job" or not message.args:
            return
        job_id = str(message.args[0])
        error = {"code": "internal_error", "status": None,
                 "message": "difyq could not process this job; see the worker logs for the job id"}
        if self.runtime.store.finish(job_id, JobStatus.FAILED, error=error) != "missing":
            log.error("job_dead_lettered", job_id=job_id)


def build_broker(runtime: Runtime, lease_s: float) -> PatientRedisBroker:
    """Dramatiq's broker with only the middleware difyq's actors use (time limits, retries of a crashed
    delivery, shutdown notices); message age limits, callbacks and pipelines would only cost hooks per message.
    Its recovery of a dead worker process's messages follows the job lease (``dramatiq_recovery``); an idle
    consumer of the jobs queue is woken by a new job instead of polling, and enqueues wait out a Redis outage
    (``PatientRedisBroker``, a ``WakingRedisBroker``)."""
    return PatientRedisBroker(client=runtime.raw_redis, namespace=runtime.namespace, woken_queues=[JOBS_QUEUE],
                              low_share=runtime.config.jobs.low_priority_min_share, dead_message_ttl=7 * 86_400_000,
                              middleware=[TimeLimit(), ShutdownNotifications(), Retries()],
                              **dramatiq_recovery(lease_s))


def build_worker_broker(runtime: Runtime, extra_middleware: list[Middleware] | None = None) -> PatientRedisBroker:
    lease_s = lease_from_env()
    orphans = OrphanSweep(runtime.store, list(runtime.config.apps), overdue_s=2 * lease_s)
    leases = LeaseKeeper(runtime.store, lease_s=lease_s, orphans=orphans)
    leases.also_on_sweep(partial(runtime.store.trim_indexes, list(runtime.config.apps)))
    broker = build_broker(runtime, leases.lease_s)
    task_ids = TaskIdRecorder(runtime.store)
    broker.add_middleware(DifyqWorkerMiddleware(runtime, leases, task_ids))
    broker.add_middleware(TraceContextMiddleware())
    for middleware in extra_middleware or []:
        broker.add_middleware(middleware)
    throttle = Throttle(runtime, slot_lease_s=2 * leases.lease_s)
    leases.also_renew(throttle.renew_held)
    budgets = BudgetGate(runtime.config, BudgetLedger(runtime.limits_redis, runtime.namespace), runtime.store,
                         hold_s=2 * leases.lease_s, durably=lambda write: through_blips(write, leases.lease_s))
    leases.also_renew(budgets.renew_held)
    sender = CallbackSender(runtime)
    runner = JobRunner(runtime, leases, throttle, sender, task_ids, budgets)
    longest_call_s = max((app.timeout_s for app in runtime.config.apps.values()), default=600.0)

    def run_job(job_id: str, app: str | None = None, waiting_since: float | None = None, priority: int = 0,
                tenant: str | None = None) -> None:
        """Call Dify for one job; retries of Dify errors are the job's own (see JobRunner), not Dramatiq's."""
        runner.run(job_id, app, waiting_since, priority, tenant)

    def deliver_callback(job_id: str) -> None:
        """POST the finished job to its callback URL; never calls Dify."""
        sender.deliver(job_id)

    dramatiq.actor(run_job, broker=broker, queue_name=JOBS_QUEUE, retry_when=retry_delivery, min_backoff=1_000,
                   max_backoff=60_000, time_limit=int((longest_call_s + 60) * 1000))
    dramatiq.actor(deliver_callback, broker=broker, queue_name=CALLBACKS_QUEUE, retry_when=retry_delivery,
                   min_backoff=1_000, max_backoff=60_000,
                   time_limit=int((runtime.config.callbacks.timeout + 60) * 1000))
    return broker
