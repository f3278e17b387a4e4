"""The one read of Dramatiq's Redis consumer beyond its interface: how many messages it holds fetched and not yet
handed over (its ``message_cache``). ``worker.wakeup`` uses it to tell when a fetch took the queue's last message.

Guarded: a consumer without that list (another Dramatiq release, another broker) reads as None, and the caller
then fetches as it would without it. ``tests/test_dramatiq_contract.py`` pins what the list holds, so a release
that changes its meaning fails there first.
"""

from __future__ import annotations

from dramatiq.broker import Consumer


def prefetched(consumer: Consumer) -> int | None:
    """How many messages ``consumer`` holds fetched and not yet handed over; None when that is not known."""
    cache = getattr(consumer, "message_cache", None)
    return len(cache) if isinstance(cache, list) else None
