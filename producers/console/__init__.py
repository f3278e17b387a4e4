"""The operator console: server-rendered pages under ``{console.path_prefix}/console`` of ``difyq api``."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from difyq.producers.console.apps_page import build_apps_router
from difyq.producers.console.dead_letters_page import build_dead_letters_router
from difyq.producers.console.hooks_page import build_hooks_router
from difyq.producers.console.jobs_pages import build_jobs_router
from difyq.producers.console.schedules_page import build_schedules_router
from difyq.producers.console.sign_in import build_sign_in_router
from difyq.producers.console.web import ConsoleWeb
from difyq.worker.runtime import Runtime

STATIC = Path(__file__).parent / "static"


def install_console(app: FastAPI, runtime: Runtime) -> None:
    """Serve the console on ``app`` unless ``console.enabled`` is false."""
    if not runtime.config.console.enabled:
        return
    web = ConsoleWeb(runtime)
    for router in (build_sign_in_router(web), build_jobs_router(web), build_schedules_router(web),
                   build_dead_letters_router(web), build_apps_router(web), build_hooks_router(web)):
        app.include_router(router, prefix=web.base, include_in_schema=False)

    @app.get(web.base, include_in_schema=False)
    @app.get(web.base + "/", include_in_schema=False)
    def console_home() -> RedirectResponse:
        return RedirectResponse(f"{web.base}/jobs", status_code=303)

    app.mount(web.base + "/static", StaticFiles(directory=STATIC), name="console_static")
