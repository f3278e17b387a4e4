"""One callback attempt: check the destination again, sign, POST to the checked address, classify the answer.

``deliver`` makes exactly one attempt and never raises for anything the receiver or the network does; what to do
next is in ``DeliveryAttempt.outcome``: ``delivered`` (2xx), ``gone`` (410: stop, the receiver unsubscribed),
``retry`` (any other status including 3xx, which is never followed; timeouts; refused or broken connections; a
host that does not resolve right now), ``blocked`` (the URL fails the SSRF check at send time: DNS may have
changed since submit; never retried) or ``failed`` (nothing to retry: no signing secret is configured). The
caller (the ``deliver_callback`` actor) schedules the next attempt with ``schedule.next_delay`` and records the
outcome with ``record_outcome`` once it knows whether a retry remains.

The POST goes through ``transport.PinnedTransport`` (urllib3 pools pinned to the checked addresses). A short reply
body is read so the kept-alive connection carries the next callback; any other reply closes its connection.
urllib3's errors become short texts without the URL (``connect timed out after 10 s``, ``no response within 10 s``,
``TLS certificate rejected: ...``, ``connection failed: Connection refused``).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from urllib3 import HTTPResponse
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError

from difyq.worker import tracing
from difyq.worker.callbacks.signing import signature_headers
from difyq.worker.callbacks.ssrf import BlockedDestination, Destination, UnresolvableDestination, check_destination
from difyq.worker.callbacks.transport import PinnedTransport, post_to_destination
from difyq.worker.config import CallbacksConfig
from difyq.worker.metrics import callback_deliveries, callback_duration
from difyq.worker.retry_after import parse_retry_after

_KEPT_REPLY_BYTES = 64 * 1024
AttemptOutcome = Literal["delivered", "retry", "gone", "failed", "blocked"]
MetricOutcome = Literal["delivered", "retried", "failed", "blocked"]


@dataclass(frozen=True)
class DeliveryAttempt:
    """What one attempt did. ``error`` is a short, secret-free description for the job record and logs."""

    outcome: AttemptOutcome
    status_code: int | None = None
    retry_after_s: float | None = None
    duration_s: float = 0.0
    error: str | None = None

    @property
    def retryable(self) -> bool:
        """Whether another attempt may succeed (the schedule decides whether one is left)."""
        return self.outcome == "retry"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _innermost(exc: BaseException) -> BaseException:
    """The deepest exception behind a urllib3 error (urllib3 wraps the OSError or SSL error that caused it)."""
    current, seen = exc, {id(exc)}
    while True:
        links = [current.__cause__, getattr(current, "reason", None), *current.args, current.__context__]
        following = next((link for link in links if isinstance(link, BaseException) and id(link) not in seen), None)
        if following is None:
            return current
        seen.add(id(following))
        current = following


def _read_short_reply(response: HTTPResponse) -> bool:
    """Read a reply body of a declared length up to ``_KEPT_REPLY_BYTES`` (or none: 204, 304, Content-Length 0)
    so the kept-alive connection can carry the next callback; return whether the reply was read whole. A longer,
    chunked or unframed one is not read (the caller closes the connection)."""
    length = response.length_remaining
    if length is None or length > _KEPT_REPLY_BYTES:
        return False
    try:
        response.read(decode_content=False)
    except (HTTPError, OSError):
        return False
    return response.isclosed()


def _exchange(
    transport: PinnedTransport, destination: Destination, body: bytes, headers: dict[str, str], timeout: float,
    clock: Callable[[], datetime],
) -> tuple[int, float | None]:
    """POST and take the status and ``Retry-After`` of the reply; a short reply body is read and the connection
    returned to the pool for the next callback, anything else closes the connection before it is released."""
    response = post_to_destination(transport, destination, body, headers, timeout)
    complete = False
    try:
        status = response.status
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=clock())
        complete = _read_short_reply(response)
    finally:
        if not complete:
            response.close()
        response.release_conn()
    return status, retry_after


def _describe_failure(exc: Exception, timeout: float) -> str:
    """A short cause for a failed request without its URL (urllib3's messages include the host and path)."""
    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        return f"connect timed out after {timeout:g} s"
    if isinstance(exc, ReadTimeoutError):
        return f"no response within {timeout:g} s"
    inner = _innermost(exc)
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {inner.verify_message}"
    if isinstance(inner, ssl.SSLError):
        return f"TLS failed: {getattr(inner, 'reason', None) or type(inner).__name__}"
    if isinstance(inner, OSError) and inner.strerror:
        return f"connection failed: {inner.strerror}"
    if type(inner).__module__.split(".")[0] == "urllib3":
        return f"request failed: {type(inner).__name__}"
    return f"request failed: {type(inner).__name__}: {inner}"


def deliver(
    url: str,
    body: bytes,
    webhook_id: str,
    config: CallbacksConfig,
    *,
    session: PinnedTransport | None = None,
    now: Callable[[], datetime] | None = None,
) -> DeliveryAttempt:
    """Make one signed POST of ``body`` to ``url``; classify the result (see the module docstring).

    ``webhook_id`` is the job id, the same on every attempt; the timestamp is ``now()`` (UTC) of this attempt.
    ``session`` is the process's ``PinnedTransport`` (share one across threads so connections stay alive); without
    one a fresh transport is used and closed. Anything else is refused with ``UnpinnedRequest`` and nothing is sent.
    The request timeout is ``config.timeout`` for connecting and for each read.
    """
    clock = now or _utcnow
    started = time.monotonic()

    def finished(
        outcome: AttemptOutcome,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        error: str | None = None,
    ) -> DeliveryAttempt:
        return DeliveryAttempt(outcome, status_code, retry_after_s, time.monotonic() - started, error)

    try:
        destination = check_destination(url, config.allow_hosts)
    except UnresolvableDestination as exc:
        return finished("retry", error=exc.reason)
    except BlockedDestination as exc:
        return finished("blocked", error=exc.reason)
    secrets = config.signing_secrets()
    if not secrets:
        return finished("failed", error="callbacks.signing_secret is not configured; unsigned callbacks are not sent")
    headers = signature_headers(secrets, webhook_id, clock(), body) | tracing.callback_headers()

    transport = PinnedTransport() if session is None else session
    try:
        status, retry_after = _exchange(transport, destination, body, headers, config.timeout, clock)
    except (HTTPError, OSError) as exc:
        callback_duration.observe(time.monotonic() - started)
        return finished("retry", error=_describe_failure(exc, config.timeout))
    finally:
        if session is None:
            transport.close()
    callback_duration.observe(time.monotonic() - started)

    if 200 <= status < 300:
        return finished("delivered", status_code=status)
    if status == 410:
        return finished("gone", status_code=status, error="HTTP 410: the receiver asked to stop")
    if 300 <= status < 400:
        return finished(
            "retry", status_code=status, retry_after_s=retry_after, error=f"HTTP {status}: redirect not followed"
        )
    return finished("retry", status_code=status, retry_after_s=retry_after, error=f"HTTP {status}")


def metric_outcome(outcome: AttemptOutcome, *, retries_remain: bool) -> MetricOutcome:
    """The ``callback_deliveries`` label for an attempt: a retryable failure is ``retried`` while the schedule has
    a step left and ``failed`` after the last one; ``gone`` (410) counts as ``failed``."""
    if outcome == "delivered":
        return "delivered"
    if outcome == "blocked":
        return "blocked"
    if outcome == "retry" and retries_remain:
        return "retried"
    return "failed"


def record_outcome(attempt: DeliveryAttempt, *, retries_remain: bool) -> MetricOutcome:
    """Count ``attempt`` in ``difyq_callback_deliveries_total`` and return the label used."""
    label = metric_outcome(attempt.outcome, retries_remain=retries_remain)
    callback_deliveries.labels(outcome=label).inc()
    return label
