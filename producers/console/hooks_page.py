"""The hooks page: each webhook route's recent deliveries with their outcome and the job they made."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from difyq.producers.console.web import ConsoleWeb
from difyq.producers.hooks import HookDeliveries
from difyq.worker.jobs.model import iso_time

# The hook route's metric outcomes, as the page names them.
OUTCOMES = {"accepted": "accepted", "duplicate": "duplicate", "skipped": "filtered out",
            "unauthorized": "bad signature", "too_large": "body too large",
            "throttled": "too many pending jobs", "unavailable": "job store unavailable"}


def _shown_outcome(entry: dict[str, object]) -> str:
    if entry["outcome"] == "invalid":
        return "mapping error" if entry.get("code") == "mapping_failed" else f"rejected ({entry.get('code')})"
    return OUTCOMES.get(str(entry["outcome"]), str(entry["outcome"]))


def build_hooks_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()
    deliveries = HookDeliveries(web.runtime.redis, web.runtime.namespace)

    @router.get("/hooks")
    def hooks_page(request: Request) -> Response:
        operator = web.operator(request)
        if operator is None:
            return web.sign_in_redirect(request)
        hooks = []
        for name, hook in web.runtime.config.hooks.items():
            recent = [{**entry, "time": iso_time(entry["at"]), "shown": _shown_outcome(entry)}
                      for entry in deliveries.recent(name)]
            hooks.append({"name": name, "app": hook.app, "scheme": hook.verify.scheme, "recent": recent})
        return web.render(request, "hooks.html", operator, hooks=hooks)

    return router
