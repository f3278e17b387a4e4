"""Builds a worker's broker: Dramatiq's RedisBroker with difyq's middleware and the two actors bound to it.

``difyq.worker.actors`` calls this once for the process (what ``dramatiq difyq.worker.actors`` and ``difyq worker``
load);
tests call it with a runtime of their own to run an in-process worker on a private namespace.
"""

from __future__ import annotations

import dramatiq
import structlog
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, Retries, ShutdownNotifications, TimeLimit

from difyq.worker.budgets import BudgetGate, BudgetLedger
from difyq.worker.callbacks.sender import CallbackSender
from difyq.worker.jobs.messages import CALLBACKS_QUEUE, JOBS_QUEUE
from difyq.worker.jobs.schema import JobStatus
from difyq.worker.leases import LeaseKeeper, dramatiq_recovery, lease_from_env
from difyq.worker.redis_retry import through_blips
from difyq.worker.runner import JobRunner
from difyq.worker.runtime import Runtime
from difyq.worker.task_ids import TaskIdRecorder
from difyq.worker.throttle import Throttle
from difyq.worker.trace_middleware import TraceContextMiddleware
from difyq.worker.wakeup import WakingRedisBroker

log = structlog.get_logger("difyq.worker")


class DifyqWorkerMiddleware(Middleware):
    """Keeps leases for the whole life of each worker process and marks jobs whose message Dramatiq dead-lettered
    failed. Lease upkeep stops only after the worker shut down: on SIGTERM the jobs still running finish first,
    and a lease that lapsed meanwhile would let another worker call Dify for them a second time. The task-id
    recorder's thread ends with the worker too."""

    def __init__(self, runtime: Runtime, leases: LeaseKeeper, task_ids: TaskIdRecorder):
        self.runtime = runtime
        self.leases = leases
        self.task_ids = task_ids

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.leases.start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.leases.stop()
        self.task_ids.close()

    def after_nack(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        if message.actor_name != "run_job" or not message.args:
            return
        job_id = str(message.args[0])
        error = {"code": "internal_error", "status": None,
                 "message": "difyq could not process this job; see the worker logs for the job id"}
        if self.runtime.store.finish(job_id, JobStatus.FAILED, error=error) != "missing":
            log.error("job_dead_lettered", job_id=job_id)


def build_broker(runtime: Runtime, lease_s: float) -> RedisBroker:
    """Dramatiq's broker with only the middleware difyq's actors use (time limits, retries of a crashed
    delivery, shutdown notices); message age limits, callbacks and pipelines would only cost hooks per message.
    Its recovery of a dead worker process's messages follows the job lease (``dramatiq_recovery``); an idle
    consumer of the jobs queue is woken by a new job (``WakingRedisBroker``) instead of polling."""
    return WakingRedisBroker(client=runtime.raw_redis, namespace=runtime.namespace, woken_queues=[JOBS_QUEUE],
                             dead_message_ttl=7 * 86_400_000,
                             middleware=[TimeLimit(), ShutdownNotifications(), Retries()], **dramatiq_recovery(lease_s))


def build_worker_broker(runtime: Runtime, extra_middleware: list[Middleware] | None = None) -> RedisBroker:
    leases = LeaseKeeper(runtime.store, lease_s=lease_from_env())
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

    dramatiq.actor(run_job, broker=broker, queue_name=JOBS_QUEUE, max_retries=3, min_backoff=1_000,
                   max_backoff=60_000, time_limit=int((longest_call_s + 60) * 1000))
    dramatiq.actor(deliver_callback, broker=broker, queue_name=CALLBACKS_QUEUE, max_retries=3, min_backoff=1_000,
                   max_backoff=60_000, time_limit=int((runtime.config.callbacks.timeout + 60) * 1000))
    return broker
