"""Per-Dify-key rate limits shared through Redis: requests/min, tokens/min, concurrency, upstream cooldown.

Use from the worker actor::

    limiter = KeyLimiter(redis_client, config.redis.namespace)
    kid = limiter.key_id(api_key)
    admission = limiter.acquire(kid, limits, estimated_tokens=limiter.tokens.estimate(kid, limits),
                                lease_s=60, ticket=message_id, waiting_since=since)
    if not admission.admitted:
        record_deferral(app, admission)
        since = since or time.time()          # first deferral; keep it in the message options
        delay = deferral_delay(admission)     # re-enqueue with this delay (retries untouched)
        # fail with rate_limit_wait_exceeded when wait_exceeded(since, time.time(), delay, max_wait)
    else:
        # limits None: no round trip was made; the job's start checks the key's cooldown (upstream_check)
        try: ...call Dify; renew(kid, reservation, 60) every ~20 s while it runs...
        finally: limiter.release(kid, admission.reservation, usage_total_tokens_or_None)
        # then report_success(kid), or report_upstream_limited(kid) on a 429 / too_many_requests
"""

from difyq.worker.limits.admission import LIMITS, Admission, Reservation, UpstreamCheck
from difyq.worker.limits.deferral import deferral_delay, wait_exceeded
from difyq.worker.limits.estimate import TokenEstimator
from difyq.worker.limits.keys import KeyNames, key_id, shared_limits
from difyq.worker.limits.limiter import KeyLimiter
from difyq.worker.limits.observe import publish_fair_line, publish_remaining, record_deferral, record_upstream_limited

__all__ = [
    "LIMITS",
    "Admission",
    "KeyLimiter",
    "KeyNames",
    "Reservation",
    "TokenEstimator",
    "UpstreamCheck",
    "deferral_delay",
    "key_id",
    "publish_fair_line",
    "publish_remaining",
    "record_deferral",
    "record_upstream_limited",
    "shared_limits",
    "wait_exceeded",
]
