"""BudgetGate: the runner's view of spend budgets. Before a Dify call it reserves the job's estimated cost in every
budget the job falls under (or says which has no room); after the call it charges what Dify reported and
releases the reservation; while the call runs it keeps the reservation alive (``renew_held``, on the lease
keeper's rounds)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import redis
import structlog

from difyq.worker.budgets.ledger import BudgetLedger, Claim, Reservation, Shortfall
from difyq.worker.budgets.rules import Budget, JobSubjects, configured_budgets
from difyq.worker.config import Config
from difyq.worker.jobs.store import JobStore

log = structlog.get_logger("difyq.budgets")


@dataclass(frozen=True)
class Hold:
    """What ``reserve`` decided for one job: its reservations, or the budgets without room (``shortfalls``)."""

    app: str
    reservations: tuple[Reservation, ...] = ()
    shortfalls: tuple[Shortfall, ...] = ()

    @property
    def admitted(self) -> bool:
        return not self.shortfalls

    @property
    def deferrable(self) -> bool:
        """Every budget without room defers (``on_exhausted: defer``) rather than fails the job."""
        return all(shortfall.claim.budget.config.on_exhausted == "defer" for shortfall in self.shortfalls)

    def wait_s(self, now: float) -> float:
        """Seconds until every budget without room has begun its next period."""
        return max(shortfall.claim.period.seconds_left(now) for shortfall in self.shortfalls)

    def describe(self) -> str:
        return "; ".join(shortfall.describe() for shortfall in self.shortfalls)


@dataclass
class Spend:
    """What a call reported, for ``BudgetGate.spending`` to charge: the job result's ``usage`` block."""

    usage: dict[str, Any] | None = None


@dataclass(frozen=True)
class Cost:
    """A job's real cost as Dify reported it: tokens, and ``total_price`` in ``currency`` (None: not reported)."""

    tokens: int | None
    price: Decimal | None
    currency: str

    @classmethod
    def of(cls, usage: dict[str, Any] | None) -> Cost:
        usage = usage or {}
        price = usage.get("total_price")
        return cls(usage.get("total_tokens"), None if price is None else Decimal(str(price)),
                   usage.get("currency") or "USD")

    def units_for(self, budget: Budget) -> int | None:
        """This cost in ``budget``'s Redis units: None when Dify reported none; 0 for a price in another currency
        (a budget counts one currency only)."""
        if budget.config.unit == "tokens":
            return self.tokens
        if self.price is None:
            return None
        return budget.units(self.price) if self.currency == budget.config.currency else 0


@dataclass
class BudgetGate:
    """``hold_s``: how long a reservation outlives its worker's last renewal. ``durably`` runs a Redis write through
    a short outage (``redis_retry.through_blips``), so a finished call's charge is not lost to a blip."""

    config: Config
    ledger: BudgetLedger
    store: JobStore
    hold_s: float
    durably: Callable[[Callable[[], int]], int]
    budgets: list[Budget] = field(init=False)
    _held: dict[str, tuple[Reservation, ...]] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.budgets = configured_budgets(self.config)

    def reserve(self, job_id: str, app: str, tenant: str) -> Hold:
        """Reserve the job's estimated cost in each budget it falls under (nothing to do, and no Redis call,
        without budgets; else one read of the job's client and run, and one script). A job whose Dify run is
        already under way is not refused: its cost is being spent at Dify whatever difyq does, so it reserves and
        is charged like any other, past the limit if need be."""
        if not self.budgets:
            return Hold(app)
        subjects = JobSubjects.read(self.store, job_id, app, tenant)
        now = time.time()
        claims = [Claim(budget, subject, budget.period(now), budget.first_estimate(self.config.apps.get(app)))
                  for budget in self.budgets if (subject := budget.subject(subjects)) is not None]
        if not claims:
            return Hold(app)
        reservations, shortfalls = self.ledger.reserve(app, claims, now, self.hold_s, force=subjects.run_started)
        return Hold(app, tuple(reservations), tuple(shortfalls))

    @contextmanager
    def spending(self, hold: Hold) -> Iterator[Spend]:
        """Keep ``hold``'s reservations alive for the ``with`` block, then charge the usage the block put in the
        ``Spend`` (nothing when it put none: a failed, paused or canceled call) and release them."""
        spend = Spend()
        if not hold.reservations:
            yield spend
            return
        key = hold.reservations[0].member
        with self._lock:
            self._held[key] = hold.reservations
        try:
            yield spend
        finally:
            with self._lock:
                self._held.pop(key, None)
            self._settle(hold, Cost.of(spend.usage))

    def _settle(self, hold: Hold, cost: Cost) -> None:
        charges = [units if (units := cost.units_for(r.claim.budget)) is not None else -1 for r in hold.reservations]
        samples: dict[str, int] = {}
        for reservation, charge in zip(hold.reservations, charges, strict=True):
            budget = reservation.claim.budget
            if charge >= 0 and (budget.config.unit == "tokens" or cost.currency == budget.config.currency):
                samples[budget.estimate_field(hold.app)] = charge
            elif cost.price is not None and budget.config.unit == "price":
                log.warning("budget_currency_mismatch", budget=budget.name, currency=cost.currency,
                            budget_currency=budget.config.currency)
        try:
            self.durably(lambda: self.ledger.settle(list(hold.reservations), charges, samples, time.time()))
        except redis.RedisError as exc:
            log.error("budget_settle_failed", error=str(exc), reservations=len(hold.reservations))

    def renew_held(self) -> None:
        """Push on the deadline of every reservation whose call this process runs."""
        with self._lock:
            held = [reservation for reservations in self._held.values() for reservation in reservations]
        self.ledger.renew(held, time.time(), self.hold_s)
