"""BudgetLedger: budgets' spent and reserved figures in Redis; reserving, settling and reading are each one Lua
script (``lua/``), so every worker process on every host sees one consistent figure.

A reservation has a deadline (``hold_s`` from its reservation, pushed on by ``renew`` while its call runs): one
whose worker was killed is reclaimed by the next script that touches the budget once the deadline passes."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis

from difyq.worker.budgets.periods import Period
from difyq.worker.budgets.rules import Budget
from difyq.worker.json_codec import dumps
from difyq.worker.lua_scripts import script_source
from difyq.worker.redis_keys import RedisKeys

KEEP_MS = 24 * 3600 * 1000  # how long reservation keys outlive their latest deadline, spent keys their period's end
ESTIMATE_WEIGHT = 0.2  # the weight of a job's real cost in its app's running mean


def _script(name: str) -> str:
    return script_source("difyq.worker.budgets", "_common", name)


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@dataclass(frozen=True)
class Claim:
    """One budget a job falls under: the subject it counts, in its current period, and what to reserve while the
    app's mean cost is unknown (Redis units)."""

    budget: Budget
    subject: str
    period: Period
    first_estimate: int


@dataclass(frozen=True)
class Reservation:
    """A job's reservation in one budget (``member`` of its reservations set, ``amount`` in Redis units)."""

    claim: Claim
    member: str
    amount: int


@dataclass(frozen=True)
class Shortfall:
    """A budget that had no room for a job: what was spent and reserved, and the job's estimate (Redis units)."""

    claim: Claim
    spent: int
    reserved: int
    estimate: int

    def describe(self) -> str:
        budget, claim = self.claim.budget, self.claim
        return (f"budget {budget.name!r} ({budget.config.by} {claim.subject!r}, {budget.config.period} "
                f"{claim.period.id}): {budget.amount(self.spent):g} spent and {budget.amount(self.reserved):g} "
                f"reserved of {budget.config.limit:g} {budget.unit}; this job is estimated at "
                f"{budget.amount(self.estimate):g}; the period ends {claim.period.end.isoformat()}")


@dataclass(frozen=True)
class Figures:
    """One subject's figures of a budget in its current period (Redis units)."""

    subject: str
    spent: int
    reserved: int


class BudgetLedger:
    """Every budget's figures, under ``{namespace}:budget:…`` (``RedisKeys``)."""

    def __init__(self, client: redis.Redis, namespace: str):
        self.redis = client
        self.keys = RedisKeys(namespace)
        self._reserve = client.register_script(_script("reserve"))
        self._settle = client.register_script(_script("settle"))
        self._status = client.register_script(_script("status"))

    def _budget_keys(self, budget: str, period: str) -> list[str]:
        return [self.keys.budget_spent(budget, period), self.keys.budget_reserved(budget),
                self.keys.budget_reservations(budget)]

    def reserve(self, app: str, claims: list[Claim], now: float, hold_s: float, force: bool = False,
                ) -> tuple[list[Reservation], list[Shortfall]]:
        """Reserve ``app``'s estimated cost in every claimed budget (one round trip), or in none: the reservations,
        or the budgets that had no room. ``force`` reserves whether there is room or not."""
        rid = secrets.token_hex(8)
        keys = [self.keys.budget_estimates]
        for claim in claims:
            keys += self._budget_keys(claim.budget.name, claim.period.id)
        reply = self._reserve(keys=keys, args=[dumps({
            "now": _ms(now), "deadline": _ms(now + hold_s), "keep": KEEP_MS, "rid": rid, "force": force,
            "budgets": [{"subject": claim.subject, "period": claim.period.id, "limit": claim.budget.limit,
                         "estimate_field": claim.budget.estimate_field(app), "estimate": claim.first_estimate}
                        for claim in claims]})])
        if int(reply[0]) == 0:
            shortfalls = [Shortfall(claims[int(reply[i]) - 1], int(reply[i + 1]), int(reply[i + 2]), int(reply[i + 3]))
                          for i in range(1, len(reply), 4)]
            return [], shortfalls
        return [Reservation(claim, f"{rid}|{int(amount)}|{claim.period.id}|{claim.subject}", int(amount))
                for claim, amount in zip(claims, reply[1:], strict=True)], []

    def settle(self, reservations: list[Reservation], charges: list[int], samples: dict[str, int],
               now: float) -> int:
        """Release ``reservations`` and charge each its real cost (``charges``, Redis units; -1 when Dify reported
        none), feeding ``samples`` (estimate field -> the job's real cost) into the apps' means. Settling twice
        charges once. Returns how many reservations were still held."""
        keys = [self.keys.budget_estimates]
        budgets: list[dict[str, Any]] = []
        for reservation, charge in zip(reservations, charges, strict=True):
            claim = reservation.claim
            keys += self._budget_keys(claim.budget.name, claim.period.id)
            retention = max(claim.period.end - claim.period.start, timedelta(days=1))
            budgets.append({"member": reservation.member, "subject": claim.subject, "charge": charge,
                            "spent_expire_at": _ms((claim.period.end + retention).timestamp())})
        return int(self._settle(keys=keys, args=[dumps({
            "now": _ms(now), "budgets": budgets, "weight": ESTIMATE_WEIGHT,
            "samples": [{"field": field, "value": value} for field, value in samples.items()]})]))

    def renew(self, reservations: list[Reservation], now: float, hold_s: float) -> None:
        """Push the deadline of reservations whose call still runs ``hold_s`` past ``now`` (one round trip); one
        already settled or reclaimed is not brought back."""
        if not reservations:
            return
        pipe = self.redis.pipeline(transaction=False)
        for reservation in reservations:
            name = reservation.claim.budget.name
            pipe.zadd(self.keys.budget_reservations(name), {reservation.member: _ms(now + hold_s)}, xx=True)
            for key in (self.keys.budget_reservations(name), self.keys.budget_reserved(name)):
                pipe.pexpire(key, _ms(hold_s) + KEEP_MS)
        pipe.execute()

    def status(self, budgets: list[Budget], now: float) -> list[tuple[Budget, Period, list[Figures]]]:
        """Each budget's current period and the figures of its subjects, by name: its ``known_subjects`` and every
        other subject with something spent or reserved in the period (one round trip)."""
        periods = [budget.period(now) for budget in budgets]
        if not budgets:
            return []
        keys: list[str] = []
        for budget, period in zip(budgets, periods, strict=True):
            keys += self._budget_keys(budget.name, period.id)
        reply = self._status(keys=keys, args=[dumps({
            "now": _ms(now), "budgets": [{"period": period.id, "subject": budget.config.of or ""}
                                         for budget, period in zip(budgets, periods, strict=True)]})])
        found = []
        for budget, period, flat in zip(budgets, periods, reply, strict=True):
            figures = {subject: Figures(subject, 0, 0) for subject in budget.known_subjects}
            figures.update({_text(flat[i]): Figures(_text(flat[i]), int(flat[i + 1]), int(flat[i + 2]))
                            for i in range(0, len(flat), 3)})
            found.append((budget, period, sorted(figures.values(), key=lambda f: f.subject)))
        return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
