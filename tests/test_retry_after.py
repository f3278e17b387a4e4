"""One reading of Retry-After for Dify's answers and callback receivers: delay-seconds or an HTTP-date, capped."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from difyq.worker.retry_after import MAX_RETRY_AFTER_S, parse_retry_after

NOW = datetime(2026, 11, 25, 21, 18, 32, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("120", 120.0),
        ("  30 ", 30.0),
        (" 1.5 ", 1.5),
        ("-5", None),
        ("nan", None),
        ("1e3", None),
        ("soon", None),
        ("Wed, 25 Nov 2026 21:20:32 GMT", 120.0),
        ("Wed, 25 Nov 2026 21:17:00 GMT", 0.0),
        ("99999999999", MAX_RETRY_AFTER_S),
        ("Fri, 25 Nov 2050 21:20:32 GMT", MAX_RETRY_AFTER_S),
    ],
)
def test_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == seconds
