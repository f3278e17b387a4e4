"""Console access over real HTTP: turned off, behind a path prefix, the session cookie's attributes, sign-in
refusals and a sign-in that may only lead back into the console."""

from __future__ import annotations

import re

import requests

from difyq.worker.runtime import Runtime
from tests.support.stack import make_runtime, serving_api

APPS = {"support": {"api_key": "app-access-key", "mode": "chat"}}
TOKEN = "operator-token-0123456789abcdef"


def console_runtime(redis_url: str, namespace: str, **console: object) -> Runtime:
    return make_runtime(redis_url, namespace, APPS,
                        console={"users": {"alice": {"token": TOKEN, "role": "operator"}}, **console})


def sign_in(session: requests.Session, base: str, token: str, next_path: str = "") -> requests.Response:
    form = session.get(f"{base}/login", params={"next": next_path} if next_path else None, timeout=10)
    challenge = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
    return session.post(f"{base}/login", data={"csrf_token": challenge, "token": token, "next": next_path},
                        timeout=10, allow_redirects=False)


def test_a_disabled_console_is_not_served(redis_url: str, namespace: str) -> None:
    with serving_api(console_runtime(redis_url, namespace, enabled=False)) as api:
        assert requests.get(f"{api}/console/login", timeout=10).status_code == 404
        assert requests.get(f"{api}/healthz", timeout=10).status_code == 200


def test_prefix_cookie_and_sign_in(redis_url: str, namespace: str) -> None:
    with serving_api(console_runtime(redis_url, namespace, path_prefix="/ops")) as api:
        base = f"{api}/ops/console"
        assert requests.get(f"{api}/console/login", timeout=10).status_code == 404
        assert requests.get(f"{base}/static/htmx.min.js", timeout=10).status_code == 200
        anonymous = requests.get(f"{base}/jobs?status=failed", timeout=10, allow_redirects=False)
        assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/ops/console/login?next=")

        session = requests.Session()
        assert sign_in(session, base, "wrong-token-0123456789").status_code == 401
        assert session.post(f"{base}/login", data={"token": TOKEN}, timeout=10).status_code == 403  # no CSRF token
        signed_in = sign_in(session, base, TOKEN, next_path="https://evil.example/")
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ops/console/jobs"
        cookie = next(value for name, value in signed_in.headers.items() if name.lower() == "set-cookie"
                      and value.startswith("difyq_console="))
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "path", "samesite"} <= attributes and "secure" not in attributes  # plain HTTP here
        assert "Path=/ops/console" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        jobs = session.get(f"{base}/jobs", timeout=10)
        assert jobs.status_code == 200 and "alice" in jobs.text and TOKEN not in jobs.text
        assert session.get(f"{base}/jobs", params={"since": "last week"}, timeout=10).status_code == 400
        too_large = session.post(f"{base}/logout", data={"csrf_token": "x" * 20_000}, timeout=10)
        assert too_large.status_code == 413
        assert sign_in(session, base, TOKEN, next_path="/ops/console/apps").headers["location"] == \
            "/ops/console/apps"

        # Behind a TLS-terminating proxy on loopback (which uvicorn trusts) the console's cookies are Secure.
        behind_tls = requests.get(f"{base}/login", headers={"X-Forwarded-Proto": "https"}, timeout=10)
        assert "secure" in behind_tls.headers["set-cookie"].lower()
