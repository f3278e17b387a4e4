"""Recording budgets in Prometheus: ``difyq_budget_refused_total`` as jobs are refused, and the scrape-time gauges
``difyq_budget_spent``, ``difyq_budget_reserved``, ``difyq_budget_remaining`` and ``difyq_budget_limit`` read
from Redis.

Labels: the budget's name, its ``subject`` (the app, client or tenant it counts) and its ``unit`` (``tokens`` or the
currency). A budget without ``of`` has a series per subject with something spent or reserved in the period, at
most ``MAX_SUBJECTS`` of them (those nearest their limit)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from difyq.worker.budgets.gate import Hold
from difyq.worker.budgets.ledger import BudgetLedger
from difyq.worker.budgets.rules import Budget
from difyq.worker.metrics import budget_refused

MAX_SUBJECTS = 200
LABELS = ["budget", "subject", "unit"]


def record_over_budget(hold: Hold, outcome: str) -> None:
    """Count one refused job under each budget that had no room for it."""
    for shortfall in hold.shortfalls:
        budget_refused.labels(budget=shortfall.claim.budget.name, outcome=outcome).inc()


class BudgetCollector(Collector):
    """A prometheus-client collector of every configured budget's figures in its current period; a Redis outage
    yields no samples rather than a failed scrape."""

    def __init__(self, ledger: BudgetLedger, budgets: list[Budget]):
        self.ledger = ledger
        self.budgets = budgets

    def collect(self) -> Iterator[GaugeMetricFamily]:
        spent = GaugeMetricFamily("difyq_budget_spent", "What a budget's subject spent in the current period "
                                  "(tokens, or the currency).", labels=LABELS)
        reserved = GaugeMetricFamily("difyq_budget_reserved", "The estimated cost of the calls running now under a "
                                     "budget's subject.", labels=LABELS)
        remaining = GaugeMetricFamily("difyq_budget_remaining", "A budget's limit less what its subject spent and "
                                      "reserved in the current period (0 at the least).", labels=LABELS)
        limit = GaugeMetricFamily("difyq_budget_limit", "A budget's thresholds (threshold: soft, hard).",
                                  labels=[*LABELS, "threshold"])
        try:
            found = self.ledger.status(self.budgets, time.time())
        except redis.RedisError:
            found = []
        for budget, _period, figures in found:
            if budget.config.of is not None:
                shown = figures
            else:
                shown = sorted(figures, key=lambda f: f.spent + f.reserved, reverse=True)[:MAX_SUBJECTS]
            for figure in shown:
                labels = [budget.name, figure.subject, budget.unit]
                spent.add_metric(labels, budget.amount(figure.spent))
                reserved.add_metric(labels, budget.amount(figure.reserved))
                remaining.add_metric(labels, budget.amount(max(budget.limit - figure.spent - figure.reserved, 0)))
                limit.add_metric([*labels, "soft"], budget.config.soft_limit)
                limit.add_metric([*labels, "hard"], budget.config.limit)
        yield from (spent, reserved, remaining, limit)
