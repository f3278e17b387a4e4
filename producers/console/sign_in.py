"""Sign-in and sign-out pages: a token from ``console.users`` opens a session."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from difyq.producers.console.sessions import LOGIN_COOKIE, SESSION_COOKIE, same_token
from difyq.producers.console.web import ConsoleWeb, PostedForm, Refused


def _safe_next(web: ConsoleWeb, target: str | None) -> str:
    """Where to go after signing in: a console path, never another site."""
    if target and target.startswith(web.base + "/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{web.base}/jobs"


def build_sign_in_router(web: ConsoleWeb) -> APIRouter:
    router = APIRouter()

    def cookie_options(request: Request) -> dict[str, object]:
        return {"httponly": True, "samesite": "strict", "secure": request.url.scheme == "https",
                "path": web.base}

    @router.get("/login")
    def login_form(request: Request, next: str = "") -> Response:
        challenge = secrets.token_urlsafe(24)
        response = web.render(request, "login.html", None, challenge=challenge, next=_safe_next(web, next),
                              no_users=not web.config.users)
        response.set_cookie(LOGIN_COOKIE, challenge, max_age=900, **cookie_options(request))
        return response

    @router.post("/login")
    def login(request: Request, form: PostedForm) -> Response:
        form = form or {}
        target = _safe_next(web, form.get("next"))
        if not same_token(form.get("csrf_token", ""), request.cookies.get(LOGIN_COOKIE, "")):
            return web.refused(request, None, Refused(403, "csrf_token: the sign-in form expired; reload it"))
        user = web.sessions.user_for_token(form.get("token", "").strip())
        if user is None:
            challenge = secrets.token_urlsafe(24)
            response = web.render(request, "login.html", None, status=401, challenge=challenge, next=target,
                                  failed=True)
            response.set_cookie(LOGIN_COOKIE, challenge, max_age=900, **cookie_options(request))
            return response
        web.actions.record(user, "sign_in", "ok")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, web.sessions.open(user), max_age=int(web.config.session_ttl),
                            **cookie_options(request))
        response.delete_cookie(LOGIN_COOKIE, path=web.base)
        return response

    @router.post("/logout")
    def logout(request: Request, form: PostedForm) -> Response:
        try:
            web.acting(request, form, acting=False)
        except Refused as refusal:
            return web.refused(request, web.operator(request), refusal)
        web.sessions.close(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse(f"{web.base}/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=web.base)
        return response

    return router
