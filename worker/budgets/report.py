"""The budgets as ``GET /v1/budgets`` shows them: each budget's subject in its current period, with what was
spent, what is reserved for calls running now and what remains."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel

from difyq.worker.budgets.ledger import BudgetLedger, Figures
from difyq.worker.budgets.periods import Period
from difyq.worker.budgets.rules import Budget
from difyq.worker.config import BudgetPeriod, BudgetSubject


class PeriodView(BaseModel):
    kind: BudgetPeriod
    id: str
    start: str  # ISO 8601 in the budget's zone
    end: str
    timezone: str


class BudgetView(BaseModel):
    name: str
    by: BudgetSubject
    subject: str
    unit: str  # tokens, or the currency (USD)
    period: PeriodView
    limit: float
    soft_limit: float
    spent: float
    reserved: float
    remaining: float
    on_exhausted: Literal["defer", "fail"]
    state: Literal["ok", "soft", "exhausted"]  # soft: spent reached the soft threshold; exhausted: nothing remains


class BudgetList(BaseModel):
    budgets: list[BudgetView]


def budget_view(budget: Budget, period: Period, figures: Figures) -> BudgetView:
    left = max(budget.limit - figures.spent - figures.reserved, 0)
    state = "exhausted" if left == 0 else "soft" if figures.spent >= budget.soft_limit else "ok"
    return BudgetView(
        name=budget.name, by=budget.config.by, subject=figures.subject, unit=budget.unit,
        period=PeriodView(kind=budget.config.period, id=period.id, start=period.start.isoformat(),
                          end=period.end.isoformat(), timezone=str(budget.zone)),
        limit=budget.config.limit, soft_limit=budget.config.soft_limit, spent=budget.amount(figures.spent),
        reserved=budget.amount(figures.reserved), remaining=budget.amount(left),
        on_exhausted=budget.config.on_exhausted, state=state)


def budget_report(ledger: BudgetLedger, budgets: list[Budget], now: float,
                  visible: Callable[[Budget, str], bool]) -> BudgetList:
    """Every budget's subjects that ``visible(budget, subject)`` lets the caller see, by budget, then subject."""
    return BudgetList(budgets=[budget_view(budget, period, figures)
                               for budget, period, found in ledger.status(budgets, now)
                               for figures in found if visible(budget, figures.subject)])
