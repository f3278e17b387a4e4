"""Throttle: the runner's view of the per-key limits — admit or defer a job, release its reservation with the
real token usage, cool a key down after an upstream 429, and keep the remaining-capacity gauge fresh."""

from __future__ import annotations

import threading
import time

from difyq.worker.limits import (
    Admission,
    KeyLimiter,
    deferral_delay,
    publish_remaining,
    record_deferral,
    record_upstream_limited,
    shared_limits,
)
from difyq.worker.runtime import Runtime

REMAINING_EVERY_S = 5.0


class Throttle:
    """``slot_lease_s``: how long a concurrency slot outlives its holder's last renewal (``renew_held``)."""

    def __init__(self, runtime: Runtime, slot_lease_s: float, limiter: KeyLimiter | None = None):
        self.slot_lease_s = slot_lease_s
        self.limiter = limiter or KeyLimiter(runtime.limits_redis, runtime.namespace)
        self.limits = shared_limits(runtime.config.apps)
        self.key_ids = {name: self.limiter.key_id(app.api_key.get_secret_value())
                        for name, app in runtime.config.apps.items()}
        self._published: dict[str, float] = {}
        self._held: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def admit(self, app: str, ticket: str, waiting_since: float | None) -> Admission:
        """Admit one Dify call for ``app`` now (one round trip), or say how long to wait."""
        key_id, limits = self.key_ids[app], self.limits[app]
        admission = self.limiter.acquire(
            key_id, limits, estimated_tokens=self.limiter.tokens.estimate(key_id, limits), lease_s=self.slot_lease_s,
            ticket=ticket, waiting_since=waiting_since,
        )
        if admission.limit != "upstream":
            record_deferral(app, admission)  # limit="upstream" counts the 429s themselves (upstream_limited)
        self._publish(app)
        return admission

    def cooldown_gate(self, app: str) -> str | None:
        """For an app without limits, the only admission check is the key's upstream cooldown: its hash, for the
        start script to check in the same round trip (the limiter's clock must then be Redis TIME). None for an
        app with limits, which goes through ``admit``."""
        if self.limits[app] is not None or self.limiter.clock_is_fake:
            return None
        return self.limiter.cooldown_key(self.key_ids[app])

    def delay(self, admission: Admission) -> float:
        return deferral_delay(admission)

    def hold(self, app: str, admission: Admission) -> None:
        """Keep renewing this admission's slot lease (``renew_held``) until it is released."""
        if admission.reservation:
            with self._lock:
                self._held[admission.reservation] = (self.key_ids[app], admission.reservation)

    def renew_held(self) -> None:
        """Renew the slot lease of every call this process runs; a dead process's slots lapse in slot_lease_s."""
        with self._lock:
            held = list(self._held.values())
        for key_id, reservation in held:
            self.limiter.renew(key_id, reservation, self.slot_lease_s)

    def release(self, app: str, admission: Admission, actual_tokens: int | None) -> None:
        key_id = self.key_ids[app]
        if actual_tokens:
            self.limiter.tokens.observe(key_id, actual_tokens)
        if admission.reservation:
            with self._lock:
                self._held.pop(admission.reservation, None)
            self.limiter.release(key_id, admission.reservation, actual_tokens)

    def abandon(self, app: str, ticket: str) -> None:
        self.limiter.abandon(self.key_ids[app], ticket)

    def upstream_limited(self, app: str) -> float:
        record_upstream_limited(app)
        return self.limiter.report_upstream_limited(self.key_ids[app])

    def succeeded(self, app: str, admission: Admission) -> None:
        """A call went through: end the key's 429 streak if it had one when the call was admitted."""
        if admission.upstream_streak:
            self.limiter.report_success(self.key_ids[app])

    def _publish(self, app: str) -> None:
        limits = self.limits[app]
        now = time.monotonic()
        if limits is None or now - self._published.get(app, 0.0) < REMAINING_EVERY_S:
            return
        self._published[app] = now
        publish_remaining(app, self.limiter.remaining(self.key_ids[app], limits))
