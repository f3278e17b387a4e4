"""``parse_retry_after``: the one reading of a ``Retry-After`` header, for Dify's answers and callback receivers.

RFC 9110 §10.2.3: the value is delay-seconds (digits; a decimal fraction is accepted too) or an HTTP-date. Anything
else (a negative number, ``nan``, words) is no Retry-After at all. A date in the past means 0; any value is capped
at ``MAX_RETRY_AFTER_S`` (callers cap it further by their own schedules).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

MAX_RETRY_AFTER_S = 24 * 3600.0
_DELAY_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header; None when absent or unreadable. ``now`` (UTC) is for
    dates; the current time by default."""
    text = (value or "").strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
