"""MemoryGuard: whether Redis is too full to take new jobs (``redis.memory_guard``): its ``used_memory`` at or over
that share of its ``maxmemory``, read from ``INFO memory`` at most once a second per process, so submits answer
503 before Redis starts refusing writes while running jobs still store their results. It records no metric
itself (the submit path does, ``difyq.producers.submit``): ``difyq worker`` builds a runtime before its metrics
directory exists."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis
import redis.asyncio
import structlog

log = structlog.get_logger("difyq.redis")

READ_INTERVAL_S = 1.0


class MemoryGuard:
    """``full(client)`` / ``await full_async(client)``: the guard's verdict, from a reading at most
    ``READ_INTERVAL_S`` old; ``used_ratio``: used_memory / maxmemory at that reading (0 without a maxmemory).
    ``share`` None (or a Redis without ``maxmemory``) never guards; a Redis that refuses INFO (a managed one may
    rename it) turns the guard off with a warning instead of failing every submit."""

    def __init__(self, share: float | None, clock: Callable[[], float] = time.monotonic):
        self.share = share
        self.clock = clock
        self._read_at = float("-inf")
        self._active = False
        self.used_ratio = 0.0
        self._lock = threading.Lock()

    def _reading_due(self) -> bool:
        """Claim this interval's reading: one caller reads, the others use the last verdict meanwhile."""
        with self._lock:
            now = self.clock()
            if now - self._read_at < READ_INTERVAL_S:
                return False
            self._read_at = now
            return True

    def _judge(self, info: Mapping[str, Any]) -> bool:
        used, limit = int(info["used_memory"]), int(info.get("maxmemory", 0))
        ratio = used / limit if limit > 0 else 0.0
        active = self.share is not None and limit > 0 and ratio >= self.share
        if active != self._active:
            log.warning("redis_memory_guard", active=active, used_memory=used, maxmemory=limit, share=self.share)
        self._active, self.used_ratio = active, ratio
        return active

    def _refused(self, exc: redis.ResponseError) -> bool:
        log.warning("redis_memory_guard_off", reason=f"INFO memory refused: {exc}")
        self.share = None
        return False

    def full(self, client: redis.Redis) -> bool:
        if self.share is None:
            return False
        if self._reading_due():
            try:
                return self._judge(client.info("memory"))
            except redis.ResponseError as exc:
                return self._refused(exc)
        return self._active

    async def full_async(self, client: redis.asyncio.Redis) -> bool:
        if self.share is None:
            return False
        if self._reading_due():
            try:
                return self._judge(await client.info("memory"))
            except redis.ResponseError as exc:
                return self._refused(exc)
        return self._active
