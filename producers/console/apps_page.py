"""The apps page: per Dify key its limits, its use of the current window, jobs waiting for it and the oldest
wait, an upstream cooldown, and the errors of its last hour's attempts by code."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import Response

from difyq.producers.console.jobs_query import EXAMINE_LIMIT
from difyq.producers.console.web import ConsoleWeb
from difyq.worker.jobs.schema import JobField
from difyq.worker.json_codec import loads
from difyq.worker.limits.keys import shared_limits
from difyq.worker.limits.limiter import KeyLimiter

HOUR_S = 3600


def build_apps_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()
    runtime = web.runtime
    config = runtime.config
    limiter = KeyLimiter(runtime.limits_redis, runtime.namespace)
    limits = shared_limits(config.apps)

    def errors_last_hour(app: str) -> tuple[dict[str, int], int]:
        """Failed attempts of the last hour's jobs by error code, from at most EXAMINE_LIMIT of the app's newest
        jobs (and how many jobs that looked at)."""
        store = runtime.store
        since_ms = int((time.time() - HOUR_S) * 1000)
        job_ids = store.redis.zrevrangebyscore(store.index_key(app), "+inf", since_ms, start=0, num=EXAMINE_LIMIT)
        pipe = store.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(store.job_key(job_id.decode() if isinstance(job_id, bytes) else job_id), JobField.ATTEMPT_ERRORS)
        counts: dict[str, int] = {}
        for errors in pipe.execute():
            for error in (loads(errors) if errors else None) or []:
                code = error.get("code") or "unknown"
                counts[code] = counts.get(code, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: -item[1])), len(job_ids)

    def rows() -> list[dict[str, Any]]:
        shown = []
        for name, app in config.apps.items():
            key = limiter.key_id(app.api_key.get_secret_value())
            errors, looked_at = errors_last_hour(name)
            shown.append({"name": name, "mode": app.mode, "host": urlsplit(config.app_base_url(name)).hostname,
                          "key_id": key, "limits": limits[name], "usage": limiter.usage(key), "errors": errors,
                          "looked_at": looked_at})
        return shown

    @router.get("/apps")
    def apps_page(request: Request) -> Response:
        operator = web.operator(request)
        if operator is None:
            return web.sign_in_redirect(request)
        return web.render(request, "apps.html", operator, apps=rows(), examine_limit=EXAMINE_LIMIT)

    return router
