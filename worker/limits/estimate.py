"""A better token estimate than the configured one, learned in-process from Dify's reported usage."""

from __future__ import annotations

import threading

from difyq.worker.config import AppLimits


class TokenEstimator:
    """Mean real ``total_tokens`` per call of each key (exponentially weighted), fed by ``KeyLimiter.release``.

    Until ``min_samples`` calls were seen, the configured ``estimated_tokens_per_call`` is used. Reserving the
    mean instead of a guess keeps tokens/min throughput close to the limit; reconciliation corrects each call.
    """

    def __init__(self, weight: float = 0.2, min_samples: int = 5):
        self.weight = weight
        self.min_samples = min_samples
        self._seen: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def observe(self, key_id: str, tokens: int) -> None:
        with self._lock:
            count, mean = self._seen.get(key_id, (0, float(tokens)))
            self._seen[key_id] = (count + 1, mean + self.weight * (tokens - mean))

    def estimate(self, key_id: str, limits: AppLimits | None) -> int:
        configured = limits.estimated_tokens_per_call if limits is not None else 0
        with self._lock:
            count, mean = self._seen.get(key_id, (0, 0.0))
        return round(mean) if count >= self.min_samples else configured
