"""The dead letters page: failed callbacks and dead-lettered jobs grouped by error code; replay one, or every one
matching a filter after a confirmation that shows how many."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from difyq.producers.console.web import ConsoleWeb, PostedForm, Refused
from difyq.worker.dead_letters import DeadLetters

KINDS = ("callback", "job")
LISTED = 1000  # the newest dead letters of each kind the page reads, groups and replays at a time


@dataclass(frozen=True)
class LetterFilter:
    kind: str = ""
    app: str = ""
    code: str = ""
    job: str = ""

    def params(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if getattr(self, name)}

    def matches(self, letter: dict[str, Any]) -> bool:
        return all(not getattr(self, name) or letter[name] == getattr(self, name)
                   for name in ("kind", "app", "code", "job"))


def letters(dead: DeadLetters) -> list[dict[str, Any]]:
    """The newest LISTED dead letters of each kind as rows (``letter_rows``)."""
    return letter_rows(dead.list(LISTED))


def callback_code(callback: dict[str, Any]) -> str:
    """The error code a failed callback is grouped by: ``callback_http_<status>`` of the last answer, else
    ``callback_blocked`` (the SSRF guard refused the address) or ``callback_no_answer``."""
    if callback.get("last_status_code"):
        return f"callback_http_{callback['last_status_code']}"
    last = (callback.get("history") or [{}])[-1]
    return "callback_blocked" if last.get("outcome") == "blocked" else "callback_no_answer"


def letter_rows(listed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Dead letters (``DeadLetters.list``) as rows: kind, job, app, error code and message (for a callback, its
    attempts, its host and the last attempt's error)."""
    rows = []
    for entry in listed["callbacks"]:
        callback = entry["callback"]
        last_error = (callback.get("history") or [{}])[-1].get("error")
        message = f"{callback['attempts']} attempt(s) to {urlsplit(callback.get('url') or '').hostname}"
        rows.append({"kind": "callback", "job": entry["job_id"], "app": entry["app"], "code": callback_code(callback),
                     "message": message + (f"; the last: {last_error}" if last_error else "")})
    for entry in listed["jobs"]:
        error = entry.get("error") or {}
        rows.append({"kind": "job", "job": entry["job_id"], "app": entry.get("app") or "",
                     "code": error.get("code") or entry["status"], "message": error.get("message") or ""})
    return rows


def build_dead_letters_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()
    dead = DeadLetters(web.runtime)

    def wanted_from(values: dict[str, str]) -> LetterFilter:
        wanted = LetterFilter(**{name: values.get(name, "")[:200] for name in LetterFilter.__dataclass_fields__})
        if wanted.kind and wanted.kind not in KINDS:
            raise Refused(400, f"kind: must be one of {', '.join(KINDS)}")
        return wanted

    @router.get("/dead-letters")
    def dead_letters(request: Request) -> Response:
        operator = web.operator(request)
        if operator is None:
            return web.sign_in_redirect(request)
        try:
            wanted = wanted_from(dict(request.query_params))
        except Refused as refusal:
            return web.refused(request, operator, refusal)
        every = letters(dead)
        groups: dict[tuple[str, str], int] = {}
        for letter in every:
            groups[letter["kind"], letter["code"]] = groups.get((letter["kind"], letter["code"]), 0) + 1
        shown = [letter for letter in every if wanted.matches(letter)]
        return web.render(request, "dead_letters.html", operator, letters=shown, groups=sorted(groups.items()),
                          wanted=wanted, counts=dead.counts(), listed=LISTED, apps=sorted(web.runtime.config.apps),
                          kinds=KINDS,
                          confirm=request.query_params.get("confirm") == "1")

    @router.post("/dead-letters/replay")
    def replay(request: Request, form: PostedForm) -> Response:
        try:
            operator = web.acting(request, form)
            wanted = wanted_from(form or {})
        except Refused as refusal:
            return web.refused(request, web.operator(request), refusal)
        current = {(letter["kind"], letter["job"]) for letter in letters(dead) if wanted.matches(letter)}
        replayed = dead.replay_matching(lambda kind, job: (kind, job) in current)
        by = operator.name
        for job_id in replayed:
            web.actions.record(by, "replay_dead_letter", "queued", job_id)
        web.actions.record(by, "replay_dead_letters", f"{len(replayed)} replayed", filter=wanted.params())
        return RedirectResponse(f"{web.base}/dead-letters?replayed={len(replayed)}", status_code=303)

    return router
