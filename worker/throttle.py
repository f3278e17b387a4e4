"""Throttle: the runner's view of the per-key limits — admit or defer a job, release its reservation with the
real token usage, cool a key down after an upstream 429, and keep the remaining-capacity gauge fresh."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from difyq.worker.limits import (
    Admission,
    KeyLimiter,
    publish_fair_line,
    publish_remaining,
    record_deferral,
    record_upstream_limited,
    shared_limits,
)
from difyq.worker.lua_scripts import ScriptCall
from difyq.worker.runtime import Runtime

REMAINING_EVERY_S = 5.0
ADMITTED = Admission(admitted=True, wait_s=0.0, limit=None, reservation=None)


@dataclass
class Slot:
    """An admitted call of ``app`` and what it made of its ``admission``, for ``Throttle`` to release: the tokens
    Dify reported, and whether Dify answered 429 (the key cools down for every worker); ``released`` once its
    release was sent or handed over (``Throttle.release_call``); ``called`` False when no call was made."""

    app: str
    admission: Admission
    tokens: int | None = None
    rate_limited: bool = False
    succeeded: bool = False
    released: bool = False
    called: bool = True  # False: no call was made (the job did not start), so the admission is withdrawn whole


class Throttle:
    """``slot_lease_s``: how long a concurrency slot outlives its holder's last renewal (``renew_held``)."""

    def __init__(self, runtime: Runtime, slot_lease_s: float, limiter: KeyLimiter | None = None):
        self.slot_lease_s = slot_lease_s
        self.limiter = limiter or KeyLimiter(runtime.limits_redis, runtime.namespace)
        self.limits = shared_limits(runtime.config.apps)
        self.priority_step = runtime.config.jobs.priority_step
        self.low_share = runtime.config.jobs.low_priority_min_share
        self.apps = runtime.config.apps
        self.key_ids = {name: self.limiter.key_id(app.api_key.get_secret_value())
                        for name, app in runtime.config.apps.items()}
        self._published: dict[str, float] = {}
        self._held: dict[str, tuple[str, str, str | None]] = {}
        self._lock = threading.Lock()

    def admit(self, app: str, ticket: str, waiting_since: float | None, priority: int = 0, tenant: str = "",
              ) -> Admission:
        """Admit one Dify call for ``app`` now (one round trip; none for an app without limits, whose admission
        leaves the key's upstream cooldown to the job's start: ``Admission.upstream_check``), or say how long to
        wait; a job of a higher ``priority`` takes its place in the key's waiting line ``jobs.priority_step`` per
        level ahead; the app's ``fairness`` and ``tenant_limits`` apply to its ``tenant``. An app that is not
        configured (any more) is admitted without a check: its attempt fails ``app_not_configured``."""
        if app not in self.key_ids:
            return ADMITTED
        key_id, limits, config = self.key_ids[app], self.limits[app], self.apps[app]
        admission = self.limiter.acquire(
            key_id, limits, estimated_tokens=self.limiter.tokens.estimate(key_id, limits), lease_s=self.slot_lease_s,
            ticket=ticket, waiting_since=waiting_since, priority_offset_s=priority * self.priority_step,
            tenant=tenant, fair=config.fairness == "tenant", tenant_limits=config.tenant_limits,
            low_share=self.low_share,
        )
        if admission.limit != "upstream":
            record_deferral(app, admission)  # limit="upstream" counts the 429s themselves (upstream_limited)
        self._publish(app)
        return admission

    @contextmanager
    def slot(self, app: str, admission: Admission) -> Iterator[Slot]:
        """Hold an admitted call's slot for the ``with`` block (its lease renewed by ``renew_held``); a slot whose
        release the block did not hand over (``release_call``) is released when the block ends."""
        slot = Slot(app, admission)
        if admission.reservation:
            with self._lock:
                self._held[admission.reservation] = (self.key_ids[app], admission.reservation, admission.tenant)
        try:
            yield slot
        finally:
            if not slot.released:
                self._release(slot)

    def renew_held(self) -> None:
        """Renew the slot lease of every call this process runs; a dead process's slots lapse in slot_lease_s."""
        with self._lock:
            held = list(self._held.values())
        for key_id, reservation, tenant in held:
            self.limiter.renew(key_id, reservation, self.slot_lease_s, tenant)

    def release_call(self, slot: Slot) -> ScriptCall | None:
        """End ``slot``'s call: the release of its reservation with the tokens the call reported, as a call for the
        caller to send with its next write (``run_together``), or None when there is nothing to send. The slot is
        no longer renewed, so a release that never reaches Redis lapses with the slot's lease. The key's upstream
        cooldown is ended or started at once."""
        slot.released = True
        admission, key_id = slot.admission, self.key_ids.get(slot.app)
        if key_id is None:
            return None
        call = None
        if admission.reservation:
            with self._lock:
                self._held.pop(admission.reservation, None)
            call = self.limiter.release_call(key_id, admission.reservation, 0 if slot.rate_limited else slot.tokens,
                                             admission.tenant, called=slot.called)
        elif slot.tokens:
            self.limiter.tokens.observe(key_id, slot.tokens)
        if slot.rate_limited:
            record_upstream_limited(slot.app)
            self.limiter.report_upstream_limited(key_id)
        elif slot.succeeded and admission.upstream_streak:
            self.limiter.report_success(key_id)
        return call

    def _release(self, slot: Slot) -> None:
        call = self.release_call(slot)
        if call is not None:
            call.run()

    def abandon(self, app: str, ticket: str, tenant: str | None = None) -> None:
        self.limiter.abandon(self.key_ids[app], ticket, tenant if self.apps[app].tenant_limits else None)

    def give_back(self, app: str, admission: Admission) -> None:
        """Withdraw an admission whose call will not be made (a budget refused the job): its slot, its request and
        its reserved tokens."""
        self._release(Slot(app, admission, called=False))

    def _publish(self, app: str) -> None:
        limits = self.limits[app]
        now = time.monotonic()
        if limits is None or now - self._published.get(app, 0.0) < REMAINING_EVERY_S:
            return
        self._published[app] = now
        publish_remaining(app, self.limiter.remaining(self.key_ids[app], limits))
        if self.apps[app].fairness == "tenant":
            publish_fair_line(app, self.limiter.fair_line(self.key_ids[app]))
