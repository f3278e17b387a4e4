"""/v1/budgets: each spend budget's figures in its current period."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from difyq.producers.api.auth import authenticate
from difyq.producers.api.errors import error_responses
from difyq.worker.budgets import Budget, BudgetLedger, configured_budgets
from difyq.worker.budgets.report import BudgetList, budget_report
from difyq.worker.config import ClientConfig
from difyq.worker.runtime import Runtime


def may_see(client_name: str, client: ClientConfig, budget: Budget, subject: str) -> bool:
    """A client of every app (``apps: ["*"]``) sees every budget; another sees the app budgets of its apps, and the
    client and tenant budgets of its own name (a client's jobs have its name as tenant unless they give one)."""
    if "*" in client.apps:
        return True
    return client.may_use(subject) if budget.config.by == "app" else subject == client_name


def build_budgets_router(runtime: Runtime) -> APIRouter:
    router = APIRouter(prefix="/v1/budgets", tags=["budgets"], responses=error_responses(401, 503))
    config = runtime.config
    ledger = BudgetLedger(runtime.redis, runtime.namespace)
    budgets = configured_budgets(config)

    @router.get("", response_model=BudgetList)
    async def list_budgets(request: Request) -> BudgetList:
        client_name, client = authenticate(config, request)
        return await run_in_threadpool(budget_report, ledger, budgets, time.time(),
                                       lambda budget, subject: may_see(client_name, client, budget, subject))

    return router
