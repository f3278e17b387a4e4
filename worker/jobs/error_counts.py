"""Failed attempts per app and error code, counted by the minute for the last hour (the console's apps page).

Each minute of an app is a hash ``RedisKeys.app_errors`` (error code -> count) that expires once it is older than
the hour it is read for, so reading the last hour costs the same however many jobs ran: ``WINDOW_MINUTES`` hashes
in one round trip.
"""

from __future__ import annotations

import time

import redis

from difyq.worker.redis_keys import RedisKeys

WINDOW_MINUTES = 60


def _minute(now: float) -> int:
    return int(now // 60)


class ErrorCounts:
    def __init__(self, client: redis.Redis, keys: RedisKeys):
        self.redis = client
        self.keys = keys

    def record(self, app: str, code: str) -> None:
        """Count one failed attempt of ``app`` with error ``code`` in the current minute."""
        key = self.keys.app_errors(app, _minute(time.time()))
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(key, code, 1)
        pipe.expire(key, (WINDOW_MINUTES + 1) * 60)
        pipe.execute()

    def last_hour(self, app: str) -> dict[str, int]:
        """The failed attempts of ``app`` in the last ``WINDOW_MINUTES`` minutes (to the minute) by error code,
        most frequent first."""
        current = _minute(time.time())
        pipe = self.redis.pipeline(transaction=False)
        for minute in range(current - WINDOW_MINUTES + 1, current + 1):
            pipe.hgetall(self.keys.app_errors(app, minute))
        counts: dict[str, int] = {}
        for minute_counts in pipe.execute():
            for code, count in minute_counts.items():
                name = code.decode() if isinstance(code, bytes) else code
                counts[name] = counts.get(name, 0) + int(count)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
