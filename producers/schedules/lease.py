"""The scheduler's leader lease: one Redis key that one replica holds at a time, for a TTL it keeps renewing.

Taken with ``SET NX PX``; renewed and given up with compare-and-extend / compare-and-delete scripts so that only
the holder can do either (a replica whose lease ran out while it stalled can never cut a successor's short).
"""

from __future__ import annotations

from redis import Redis

from difyq.worker.lua_scripts import script_source


class LeaderLease:
    """The lease ``key`` as seen by the replica ``holder``."""

    def __init__(self, redis: Redis, key: str, holder: str, ttl_s: float):
        self.redis = redis
        self.key = key
        self.holder = holder
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self._extend = redis.register_script(script_source("difyq.producers.schedules", None, "extend_lease"))
        self._release = redis.register_script(script_source("difyq.producers.schedules", None, "release_lease"))

    def hold(self) -> bool:
        """Renew the lease if this replica holds it, else take it if nobody does; True when held afterwards."""
        if self._extend(keys=[self.key], args=[self.holder, self.ttl_ms]):
            return True
        return bool(self.redis.set(self.key, self.holder, nx=True, px=self.ttl_ms))

    def release(self) -> bool:
        """Give the lease up at once (when held), so a standby replica takes over on its next tick."""
        return bool(self._release(keys=[self.key], args=[self.holder]))

