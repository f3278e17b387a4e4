"""The apps page: per Dify key its limits, its use of the current window, jobs waiting for it and the oldest
wait, an upstream cooldown, and its failed attempts of the last hour by error code (``ErrorCounts``); below, every
spend budget's figures in its current period (as ``GET /v1/budgets`` shows them)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response

from difyq.producers.console.web import ConsoleWeb
from difyq.worker.budgets import BudgetLedger, configured_budgets
from difyq.worker.budgets.report import budget_report
from difyq.worker.limits.keys import shared_limits
from difyq.worker.limits.limiter import KeyLimiter


def build_apps_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()
    runtime = web.runtime
    config = runtime.config
    limiter = KeyLimiter(runtime.limits_redis, runtime.namespace)
    limits = shared_limits(config.apps)
    ledger = BudgetLedger(runtime.redis, runtime.namespace)
    budgets = configured_budgets(config)

    def rows() -> list[dict[str, Any]]:
        shown = []
        for name, app in config.apps.items():
            key = limiter.key_id(app.api_key.get_secret_value())
            shown.append({"name": name, "mode": app.mode, "host": urlsplit(config.app_base_url(name)).hostname,
                          "key_id": key, "limits": limits[name], "usage": limiter.usage(key),
                          "errors": runtime.store.error_counts.last_hour(name)})
        return shown

    @router.get("/apps")
    def apps_page(request: Request) -> Response:
        operator = web.operator(request)
        if operator is None:
            return web.sign_in_redirect(request)
        shown = budget_report(ledger, budgets, time.time(), lambda _budget, _subject: True).budgets
        return web.render(request, "apps.html", operator, apps=rows(), budgets=shown)

    return router
