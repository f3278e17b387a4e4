"""The jobs list, a job's page, and the actions on a job: cancel, retry, redeliver the callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from difyq.producers.api.dify_stop import stop_dify_task
from difyq.producers.console.job_view import job_page
from difyq.producers.console.jobs_query import PAGE_SIZE, JobFilter, JobsQuery
from difyq.producers.console.web import ConsoleWeb, PostedForm, Refused
from difyq.worker.config import Config
from difyq.worker.jobs.schema import SOURCES, JobStatus

STATUSES = [status.value for status in JobStatus]
_FILTER = Annotated[str, Query(max_length=200)]


def build_jobs_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()
    runtime = web.runtime
    query = JobsQuery(runtime.store, runtime.threads, runtime.config)

    @router.get("/jobs")
    def jobs(request: Request, status: _FILTER = "", app: _FILTER = "", source: _FILTER = "", client: _FILTER = "",
             tenant: _FILTER = "", since: _FILTER = "", until: _FILTER = "", q: _FILTER = "", cursor: _FILTER = "",
             ) -> Response:
        operator = web.operator(request)
        if operator is None:
            return web.sign_in_redirect(request)
        wanted = JobFilter(status=status, app=app, source=source, client=client, tenant=tenant.strip(), since=since,
                           until=until, q=q)
        partial = request.headers.get("hx-request") == "true"
        try:
            if status and status not in STATUSES:
                raise ValueError(f"status: must be one of {', '.join(STATUSES)}")
            page = query.page(wanted, cursor)
        except ValueError as exc:
            return web.refused(request, operator, Refused(400, str(exc)))
        return web.render(request, "jobs_rows.html" if partial else "jobs.html", operator, page=page,
                          wanted=wanted, cursor=cursor, statuses=STATUSES, sources=_source_choices(runtime.config),
                          apps=sorted(runtime.config.apps), clients=sorted(runtime.config.clients),
                          page_size=PAGE_SIZE)

    @router.get("/jobs/{job_id}")
    def job(request: Request, job_id: str) -> Response:
        operator = web.operator(request)
        if operator is None:
            return web.sign_in_redirect(request)
        fields = runtime.store.fields(job_id)
        if fields is None:
            return web.refused(request, operator, Refused(404, f"no job {job_id} (or it has expired)"))
        view = job_page(fields, web.actions.of(job_id), web.redactor, str(request.base_url).rstrip("/"))
        partial = request.headers.get("hx-request") == "true"
        return web.render(request, "job_live.html" if partial else "job.html", operator, **view)

    def action(name: str, run: Callable[[str], str]) -> None:
        @router.post(f"/jobs/{{job_id}}/{name}", name=f"console_{name}")
        def act(request: Request, job_id: str, form: PostedForm) -> Response:
            try:
                operator = web.acting(request, form)
                if not runtime.store.fields(job_id):
                    raise Refused(404, f"no job {job_id} (or it has expired)")
            except Refused as refusal:
                return web.refused(request, web.operator(request), refusal)
            web.actions.record(operator.name, name, run(job_id), job_id)
            return RedirectResponse(f"{web.base}/jobs/{job_id}?done={name}", status_code=303)

    def cancel(job_id: str) -> str:
        outcome = runtime.store.cancel(job_id)
        if outcome.task_id:
            stop_dify_task(runtime, runtime.store.get(job_id) or {"id": job_id, "app": ""}, outcome.task_id)
        return outcome.state

    def retry(job_id: str) -> str:
        return runtime.store.rerun(job_id)

    def redeliver(job_id: str) -> str:
        return "queued" if runtime.store.replay_callback(job_id) else "refused: no callback to deliver"

    action("cancel", cancel)
    action("retry", retry)
    action("redeliver", redeliver)
    return router


def _source_choices(config: Config) -> list[str]:
    """The source filter's choices: each kind, then each hook and schedule by name."""
    return [*SOURCES, *(f"hook:{name}" for name in config.hooks), *(f"schedule:{name}" for name in config.schedules)]
