"""Request plumbing shared by the console's pages: the signed-in operator, CSRF-checked forms, rendering."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from difyq.producers.api.body import read_body
from difyq.producers.api.errors import ApiError
from difyq.producers.console.audit import ActionLog
from difyq.producers.console.job_view import duration_text, pretty_json
from difyq.producers.console.redact import Redactor
from difyq.producers.console.sessions import SESSION_COOKIE, ConsoleSessions, Operator, same_token
from difyq.worker.runtime import Runtime

MAX_FORM_BYTES = 16_384
# Only the console's own files run or style a page; no page can be framed (clickjacking) or post elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
TEMPLATES = Path(__file__).parent / "templates"


async def read_form(request: Request) -> dict[str, str] | None:
    """A POSTed url-encoded form (the last value of each name), None when over MAX_FORM_BYTES. A dependency, so
    the handlers that use it can be plain functions that FastAPI runs off the event loop."""
    try:
        body = await read_body(request, MAX_FORM_BYTES)
    except ApiError:
        return None
    return {name: values[-1] for name, values in parse_qs(body.decode("utf-8", "replace")).items()}


PostedForm = Annotated[dict[str, str] | None, Depends(read_form)]


class Refused(Exception):
    """A request the console answers with an error page: ``status`` and what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ConsoleWeb:
    """The console's base path, sessions and templates, and the checks every page and action makes."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.config = runtime.config.console
        self.base = f"{self.config.path_prefix}/console"
        self.sessions = ConsoleSessions(runtime.redis, runtime.namespace, self.config)
        self.actions = ActionLog(runtime.redis, runtime.namespace, runtime.config.jobs.result_ttl)
        self.redactor = Redactor(self.config.sensitive_inputs)
        self.templates = Jinja2Templates(directory=str(TEMPLATES))
        self.templates.env.globals["base"] = self.base
        self.templates.env.filters["seconds"] = duration_text
        self.templates.env.filters["query"] = urlencode
        self.templates.env.filters["pretty"] = pretty_json

    def operator(self, request: Request) -> Operator | None:
        return self.sessions.operator(request.cookies.get(SESSION_COOKIE))

    def sign_in_redirect(self, request: Request) -> RedirectResponse:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{self.base}/login?{urlencode({'next': target})}", status_code=303)

    def acting(self, request: Request, form: dict[str, str] | None, *, acting: bool = True) -> Operator:
        """The signed-in operator (one who may act, when ``acting``) whose POSTed ``form`` carries the session's
        CSRF token; Refused otherwise."""
        operator = self.operator(request)
        if operator is None:
            raise Refused(401, "sign in first")
        if form is None:
            raise Refused(413, "form too large")
        if not same_token(form.get("csrf_token", ""), operator.csrf):
            raise Refused(403, "csrf_token: missing or not this session's; reload the page and try again")
        if acting and not operator.may_act:
            raise Refused(403, f"{operator.name} is a viewer and may not act")
        return operator

    def render(self, request: Request, template: str, operator: Operator | None, status: int = 200,
               **context: Any) -> HTMLResponse:
        response = self.templates.TemplateResponse(
            request, template, {"operator": operator, "nav": template.split(".")[0], **context}, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def refused(self, request: Request, operator: Operator | None, refusal: Refused) -> Response:
        return self.render(request, "error.html", operator, status=refusal.status, message=refusal.message)
