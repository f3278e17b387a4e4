"""One callback attempt: check the destination again, sign, POST to the checked address, classify the answer.

``deliver`` makes exactly one attempt and never raises for anything the receiver or the network does; what to do
next is in ``DeliveryAttempt.outcome``: ``delivered`` (2xx), ``gone`` (410: stop, the receiver unsubscribed),
``retry`` (any other status including 3xx, which is never followed; timeouts; refused or broken connections; a
host that does not resolve right now), ``blocked`` (the URL fails the SSRF check at send time: DNS may have
changed since submit; never retried) or ``failed`` (nothing to retry: no signing secret is configured). The
caller (the ``deliver_callback`` actor) schedules the next attempt with ``schedule.next_delay`` and records the
outcome with ``record_outcome`` once it knows whether a retry remains.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import requests
import urllib3

from worker.callbacks.signing import signature_headers
from worker.callbacks.ssrf import BlockedDestination, UnresolvableDestination, check_destination
from worker.callbacks.transport import UnpinnedRequest, pinned_session, post_to_destination
from worker.config import CallbacksConfig
from worker.metrics import callback_deliveries, callback_duration

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


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or HTTP-date); None when absent or unreadable.

    A date in the past means 0.
    """
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - now).total_seconds())
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _innermost(exc: BaseException) -> BaseException:
    """The deepest exception behind a requests error (requests wraps urllib3, which wraps the OSError or SSL error)."""
    current, seen = exc, {id(exc)}
    while True:
        links = [current.__cause__, getattr(current, "reason", None), *current.args, current.__context__]
        following = next((link for link in links if isinstance(link, BaseException) and id(link) not in seen), None)
        if following is None:
            return current
        seen.add(id(following))
        current = following


def _read_short_reply(response: requests.Response) -> None:
    """Read a reply body of a declared length up to ``_KEPT_REPLY_BYTES`` so the kept-alive connection can carry
    the next callback; a longer or chunked one is not read and the connection closes with the response."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and 0 < int(length) <= _KEPT_REPLY_BYTES:
        try:
            response.raw.read(int(length))
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
            return


def _describe_failure(exc: requests.RequestException, timeout: float) -> str:
    """A short cause for a failed request without its URL (requests' and urllib3's messages include the path)."""
    if isinstance(exc, requests.ConnectTimeout):
        return f"connect timed out after {timeout:g} s"
    if isinstance(exc, requests.Timeout):
        return f"no response within {timeout:g} s"
    inner = _innermost(exc)
    if isinstance(inner, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {inner.verify_message}"
    if isinstance(inner, ssl.SSLError):
        return f"TLS failed: {inner.reason or type(inner).__name__}"
    if isinstance(inner, OSError) and inner.strerror:
        return f"connection failed: {inner.strerror}"
    if type(inner).__module__.split(".")[0] in ("requests", "urllib3"):
        return f"request failed: {type(inner).__name__}"
    return f"request failed: {type(inner).__name__}: {inner}"


def deliver(
    url: str,
    body: bytes,
    webhook_id: str,
    config: CallbacksConfig,
    *,
    session: requests.Session | None = None,
    now: Callable[[], datetime] | None = None,
) -> DeliveryAttempt:
    """Make one signed POST of ``body`` to ``url``; classify the result (see the module docstring).

    ``webhook_id`` is the job id, the same on every attempt; the timestamp is ``now()`` (UTC) of this attempt.
    ``session`` should come from ``pinned_session()`` (reuse one per thread); without one a fresh session is used
    and closed. The request timeout is ``config.timeout`` for connecting and for each read.
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
    headers = signature_headers(secrets, webhook_id, clock(), body)

    http = session or pinned_session()
    try:
        with post_to_destination(http, destination, body, headers, config.timeout) as response:
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("Retry-After"), clock())
            _read_short_reply(response)
    except UnpinnedRequest:
        raise
    except requests.RequestException as exc:
        callback_duration.observe(time.monotonic() - started)
        return finished("retry", error=_describe_failure(exc, config.timeout))
    finally:
        if session is None:
            http.close()
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
