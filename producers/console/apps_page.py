"""The apps page: per Dify key its limits, its use of the current window, jobs waiting for it and the oldest
wait, an upstream cooldown, and its failed attempts of the last hour by error code (``ErrorCounts``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response

from difyq.producers.console.web import ConsoleWeb
from difyq.worker.limits.keys import shared_limits
from difyq.worker.limits.limiter import KeyLimiter


def build_apps_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()
    runtime = web.runtime
    config = runtime.config
    limiter = KeyLimiter(runtime.limits_redis, runtime.namespace)
    limits = shared_limits(config.apps)

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
        return web.render(request, "apps.html", operator, apps=rows())

    return router
