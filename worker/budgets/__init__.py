"""Spend budgets (``budgets:`` of the config): what an app, an API client or a tenant may spend per minute, hour,
day or month of a time zone, in tokens or in Dify's ``total_price`` of one currency.

The worker reserves a job's estimated cost before its Dify call (``BudgetGate.reserve``), charges Dify's reported
usage after it (``BudgetGate.spending``); the API and the metrics read the figures (``BudgetLedger.status``)."""

from difyq.worker.budgets.gate import BudgetGate, Hold, Spend
from difyq.worker.budgets.ledger import BudgetLedger, Figures
from difyq.worker.budgets.observe import BudgetCollector, record_over_budget
from difyq.worker.budgets.periods import Period, period_at
from difyq.worker.budgets.rules import Budget, JobSubjects, configured_budgets

__all__ = [
    "Budget",
    "BudgetCollector",
    "BudgetGate",
    "BudgetLedger",
    "Figures",
    "Hold",
    "JobSubjects",
    "Period",
    "Spend",
    "configured_budgets",
    "period_at",
    "record_over_budget",
]
