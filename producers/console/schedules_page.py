"""The schedules page: each schedule's next fire in its zone, its last fire and that fire's job; pause, resume."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from difyq.producers.console.web import ConsoleWeb, PostedForm, Refused
from difyq.producers.schedules.fires import fire_idempotency_key
from difyq.producers.schedules.lease import LeaderLease
from difyq.producers.schedules.pauses import SchedulePauses
from difyq.producers.schedules.store import ScheduleStore
from difyq.producers.schedules.timetable import Timetable
from difyq.worker.redis_keys import RedisKeys


def build_schedules_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()
    runtime = web.runtime
    schedules = runtime.config.schedules
    pauses = SchedulePauses(runtime.raw_redis, runtime.namespace)
    # Read-only use of the schedule state: this lease is never taken.
    unheld = LeaderLease(runtime.raw_redis, RedisKeys(runtime.namespace).scheduler_leader, "console", 1.0)
    states = ScheduleStore(runtime.raw_redis, runtime.namespace, unheld)

    def rows() -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        paused = pauses.paused()
        loaded = states.load(list(schedules))
        pipe = runtime.store.redis.pipeline(transaction=False)
        for state_name, state in loaded.items():
            fired = fire_idempotency_key(state_name, state.last_fire) if state.last_fire else ""
            pipe.get(runtime.store.idempotency_key("schedule", fired))
        claims = dict(zip(loaded, pipe.execute(), strict=True))
        shown = []
        for name, schedule in schedules.items():
            timetable = Timetable(schedule.cron, schedule.timezone)
            state, claim = loaded[name], claims.get(name)
            upcoming = next(timetable.fires_after(now), None)
            shown.append({
                "name": name, "cron": schedule.cron, "zone": schedule.timezone, "app": schedule.app,
                "next": upcoming.astimezone(timetable.zone).isoformat() if upcoming else None,
                "last": state.last_fire.astimezone(timetable.zone).isoformat() if state.last_fire else None,
                "last_job": (claim.decode() if isinstance(claim, bytes) else claim or "").partition("|")[0] or None,
                "paused": paused.get(name),
            })
        return shown

    @router.get("/schedules")
    def schedules_page(request: Request) -> Response:
        operator = web.operator(request)
        if operator is None:
            return web.sign_in_redirect(request)
        return web.render(request, "schedules.html", operator, schedules=rows())

    def toggle(action: str) -> None:
        @router.post(f"/schedules/{{name}}/{action}", name=f"console_schedule_{action}")
        def act(request: Request, name: str, form: PostedForm) -> Response:
            try:
                operator = web.acting(request, form)
                if name not in schedules:
                    raise Refused(404, f"no schedule named {name!r} is configured")
            except Refused as refusal:
                return web.refused(request, web.operator(request), refusal)
            by = operator.name
            if action == "pause":
                pauses.pause(name, by)
            else:
                pauses.resume(name)
            web.actions.record(by, f"{action}_schedule", "ok", schedule=name)
            return RedirectResponse(f"{web.base}/schedules", status_code=303)

    toggle("pause")
    toggle("resume")
    return router
