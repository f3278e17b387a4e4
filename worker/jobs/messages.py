"""Dramatiq messages written by our own Lua scripts, so a state change and its message land in one step.

Dramatiq's RedisBroker keeps a queue as a list of ids (``{ns}:{queue}``) plus a hash of bodies
(``{ns}:{queue}.msgs``); delayed messages live on ``{queue}.DQ`` with an ``eta`` option. Writing that layout from
the same script that changes a job record closes the gap where a crash between the two would leave a job without
a message (or a message without its job).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from dramatiq.common import dq_name
from dramatiq.message import Message

from difyq.worker.redis_keys import RedisKeys
from difyq.worker.tracing import message_options

JOBS_QUEUE = "jobs"
CALLBACKS_QUEUE = "callbacks"


@dataclass(frozen=True)
class QueuedMessage:
    """The keys and arguments a script needs to enqueue one Dramatiq message."""

    queue_key: str
    bodies_key: str
    redis_message_id: str
    body: bytes
    wake_key: str  # the token that wakes an idle consumer of the message's queue (worker.wakeup)
    due_ms: int  # when it is due: now, or its eta on the delay queue (unix ms)


def build_message(
    namespace: str, queue: str, actor: str, job_id: str, delay_s: float = 0.0, message_id: str | None = None,
    hints: dict[str, object] | None = None,
) -> QueuedMessage:
    """A message for ``actor(job_id, **hints)`` on ``queue``, optionally delayed (Dramatiq's delay queue)."""
    redis_message_id = str(uuid.uuid4())
    options: dict[str, object] = {"redis_message_id": redis_message_id, **message_options()}
    queue_name = queue
    due_ms = int(time.time() * 1000)
    if delay_s > 0:
        queue_name = dq_name(queue)
        due_ms = int((time.time() + delay_s) * 1000)
        options["eta"] = due_ms
    message = Message(
        queue_name=queue_name,
        actor_name=actor,
        args=(job_id,),
        kwargs=hints or {},
        options=options,
        message_id=message_id or str(uuid.uuid4()),
        message_timestamp=int(time.time() * 1000),
    )
    keys = RedisKeys(namespace)
    return QueuedMessage(keys.queue(queue_name), keys.queue_bodies(queue_name), redis_message_id, message.encode(),
                         keys.wake(queue_name), due_ms)


@dataclass(frozen=True)
class RunHints:
    """What the worker reads from a job's record when its message carries no hints: its app (None for a missing
    job), priority and tenant."""

    app: str | None
    priority: int
    tenant: str


def run_hints(app: str, waiting_since: float | None = None, priority: int = 0, tenant: str | None = None,
              ) -> dict[str, object]:
    """What a ``run_job`` message carries besides the job id, so the worker can take the app's rate-limit admission
    before it reads the record (which ``start.lua`` then returns): the app, when the job waits in a limit's
    line the time of its first deferral, a priority other than 0, and the job's tenant. A message without them (an
    older one, or one the reaper wrote) still works: the worker reads them from the record first."""
    hints: dict[str, object] = {"app": app}
    if waiting_since is not None:
        hints["waiting_since"] = waiting_since
    if priority:
        hints["priority"] = priority
    if tenant:
        hints["tenant"] = tenant
    return hints
