"""PatientRedisBroker: the worker's broker (a ``WakingRedisBroker``) whose ``enqueue`` waits out a Redis outage or
failover.

Inside a worker Dramatiq enqueues on its own in two places: the retry of a delivery that raised (the Retries
middleware) and the move of a delayed message whose time came to its queue. When Redis is away at that moment,
the retry's error would be logged and dropped by Dramatiq's middleware dispatch, and the delivery acknowledged
once Redis is back (Dramatiq retries acknowledgements until they work): the message gone, a job whose delivery
was cut off before its attempt started (no lease for the reaper to find) would stay ``queued``. The move's error
is not one Dramatiq's consumer expects of Redis (it handles its own connection errors only). Waiting for Redis
the way Dramatiq's acknowledgements do keeps both: the message is enqueued on the server that answers next (the
new primary after a failover), before the delivery is acknowledged there.
"""

from __future__ import annotations

import math

import dramatiq

from difyq.worker.redis_retry import through_blips
from difyq.worker.wakeup import WakingRedisBroker


class PatientRedisBroker(WakingRedisBroker):
    """Retries an ``enqueue`` that Redis could not take (connection lost, or no answer), with its wake token, until
    Redis takes it (``enqueue_waiting_for_redis`` in the log). A try whose answer was lost may have been written:
    the job record turns the second message away."""

    def enqueue(self, message: dramatiq.Message, *, delay: int | None = None) -> dramatiq.Message:
        enqueue = super().enqueue
        return through_blips(lambda: enqueue(message, delay=delay), math.inf, event="enqueue_waiting_for_redis")
