"""Signed callbacks: Standard Webhooks signing, the SSRF guard, one delivery attempt, and the retry schedule.

The ``deliver_callback`` actor calls ``deliver`` once per attempt and ``next_delay`` to schedule the next one; the
API calls ``check_destination`` at submit to answer 422 with ``BlockedDestination.reason``.
"""

from difyq.worker.callbacks.delivery import (
    AttemptOutcome,
    DeliveryAttempt,
    MetricOutcome,
    deliver,
    metric_outcome,
    record_outcome,
)
from difyq.worker.callbacks.schedule import next_delay
from difyq.worker.callbacks.signing import USER_AGENT, signature_headers
from difyq.worker.callbacks.ssrf import (
    AllowList,
    BlockedDestination,
    Destination,
    UnresolvableDestination,
    blocked_reason,
    check_destination,
    is_ip_literal,
    resolve_host,
)
from difyq.worker.callbacks.transport import PinnedTransport, UnpinnedRequest, post_to_destination

__all__ = [
    "USER_AGENT",
    "AllowList",
    "AttemptOutcome",
    "BlockedDestination",
    "DeliveryAttempt",
    "Destination",
    "MetricOutcome",
    "PinnedTransport",
    "UnpinnedRequest",
    "UnresolvableDestination",
    "blocked_reason",
    "check_destination",
    "deliver",
    "is_ip_literal",
    "metric_outcome",
    "next_delay",
    "post_to_destination",
    "record_outcome",
    "resolve_host",
    "signature_headers",
]
