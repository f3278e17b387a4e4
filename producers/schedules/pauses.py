"""Paused schedules, shared by every scheduler replica and set from the console.

``{ns}:schedule:paused`` is a hash: schedule name → JSON ``{"by": operator, "at": unix time}``. The leader reads
it on every pass; a paused schedule fires nothing, and its fires while paused are neither run nor counted as
missed when it resumes.
"""

from __future__ import annotations

import time
from typing import Any

from redis import Redis

from difyq.worker.json_codec import dumps, loads
from difyq.worker.redis_keys import RedisKeys


class SchedulePauses:
    def __init__(self, redis: Redis, namespace: str):
        self.redis = redis
        self.key = RedisKeys(namespace).schedule_pauses

    def pause(self, name: str, by: str) -> None:
        self.redis.hset(self.key, name, dumps({"by": by, "at": time.time()}))

    def resume(self, name: str) -> None:
        self.redis.hdel(self.key, name)

    def paused(self) -> dict[str, dict[str, Any]]:
        """Each paused schedule's name → who paused it and when."""
        return {(k.decode() if isinstance(k, bytes) else k): loads(v) for k, v in self.redis.hgetall(self.key).items()}
