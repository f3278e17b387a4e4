"""TraceContextMiddleware: a job's trace context crosses the queue in its Dramatiq messages.

On enqueue the message gets the current job's ``traceparent`` as a message option (messages that difyq's Lua
scripts write get it from ``build_message`` through the same ``tracing.message_options``); on process the option
makes the job current for the actor (its log lines, spans and outgoing calls), and the time the message spent
queued is recorded as a ``difyq.queue_wait`` span. Retries and deferrals are new messages of the same job, so
they stay in its trace.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack

import dramatiq
from dramatiq.middleware import Middleware

from difyq.worker import otel, tracing


class TraceContextMiddleware(Middleware):
    def __init__(self) -> None:
        self._local = threading.local()

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message, delay: int | None) -> None:
        if tracing.TRACEPARENT not in message.options:
            message.options.update(tracing.message_options())

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        stack = ExitStack()
        stack.enter_context(tracing.job(message.options.get(tracing.TRACEPARENT)))
        self._local.stack = stack
        if tracing.job_traceparent() is not None:
            tracing.backdated("difyq.queue_wait", message.message_timestamp / 1000, attributes={
                "messaging.system": "dramatiq", "messaging.destination.name": message.queue_name,
                "messaging.message.id": message.message_id,
                "difyq.job.id": str(message.args[0]) if message.args else None,
            })

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message, *, result: object = None,
                              exception: BaseException | None = None) -> None:
        self._leave()

    def after_skip_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        self._leave()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        otel.flush()

    def _leave(self) -> None:
        stack = getattr(self._local, "stack", None)
        if stack is not None:
            self._local.stack = None
            stack.close()
