"""A job's message acked by the write that stores the job's outcome, instead of by Dramatiq afterwards.

Dramatiq acks a message after its actor returns, with a script call of its own: the message id leaves the
consumer's ack set and its stored body is dropped. difyq's finish script does the same in the round trip that
stores the outcome, for the message whose run is ending, and the consumer then skips its own ack of that message
(``ACKED_IN_SCRIPT`` in its options): one round trip fewer per job. Once the outcome is stored the message has no
use left: a redelivery would find the job final, and a callback whose worker dies before recording the attempt is
recovered through the job's lease.

``InScriptAcks`` is the worker middleware that knows which message the current thread (or greenlet: gevent
patches ``threading.local``) is processing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

ACKED_IN_SCRIPT = "difyq_acked_in_script"


@dataclass(frozen=True)
class AckTarget:
    """Where a script acks a message: the consumer's ack set, the queue's message bodies, the message's Redis id."""

    acks_key: str
    bodies_key: str
    redis_message_id: str


def was_acked_in_script(message: dramatiq.Message) -> bool:
    return bool(message.options.get(ACKED_IN_SCRIPT))


class InScriptAcks(Middleware):
    """Remembers the message each worker thread is processing, so its job's final write can ack it."""

    def __init__(self) -> None:
        self._local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message) -> None:
        self._local.current = (broker, message)

    def after_process_message(self, broker: dramatiq.Broker, message: dramatiq.Message, *,
                              result: Any = None, exception: BaseException | None = None) -> None:
        self._local.current = None

    after_skip_message = after_process_message

    def target(self) -> AckTarget | None:
        """The current message's ack target; None outside a message or for a broker that is not Redis."""
        current = getattr(self._local, "current", None)
        if current is None:
            return None
        broker, message = current
        redis_message_id = message.options.get("redis_message_id")
        if not isinstance(broker, RedisBroker) or not redis_message_id:
            return None
        return AckTarget(f"{broker.namespace}:__acks__.{broker.broker_id}.{message.queue_name}",
                         f"{broker.namespace}:{message.queue_name}.msgs", str(redis_message_id))

    def acked(self) -> None:
        """The current message was acked by a script: the consumer must not ack it again."""
        current = getattr(self._local, "current", None)
        if current is not None:
            current[1].options[ACKED_IN_SCRIPT] = True
