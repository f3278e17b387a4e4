"""Console sign-in: operators from ``console.users``, sessions in Redis, and the CSRF token each session carries.

A session is ``{ns}:console:session:{sha256 of its id}`` (a hash: ``user``, ``csrf``) that expires after
``console.session_ttl``; the browser holds only the random id, in an HttpOnly, SameSite=Strict cookie. The role is
read from the config on every request, so removing a user or changing a role takes effect at once.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

import redis

from difyq.worker.config import ConsoleConfig
from difyq.worker.redis_keys import RedisKeys

SESSION_COOKIE = "difyq_console"
LOGIN_COOKIE = "difyq_console_login"


@dataclass(frozen=True)
class Operator:
    """The person behind a request: their configured name, role and session's CSRF token."""

    name: str
    role: str
    csrf: str

    @property
    def may_act(self) -> bool:
        return self.role == "operator"


def same_token(presented: str, expected: str) -> bool:
    """Constant-time comparison of two tokens (False when either is empty)."""
    return bool(presented) and bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


class ConsoleSessions:
    """Create, read and end console sessions under ``{namespace}:console:session:``."""

    def __init__(self, client: redis.Redis, namespace: str, config: ConsoleConfig):
        self.redis = client
        self.namespace = namespace
        self.config = config

    def _key(self, session_id: str) -> str:
        return RedisKeys(self.namespace).console_session(session_id)

    def user_for_token(self, token: str) -> str | None:
        """The configured user whose token this is; every user is compared, so timing tells nothing."""
        found = None
        for name, user in self.config.users.items():
            if same_token(token, user.token.get_secret_value()):
                found = name
        return found

    def open(self, user: str) -> str:
        """A new session for ``user``; returns its id (the cookie's value)."""
        session_id = secrets.token_urlsafe(32)
        key = self._key(session_id)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={"user": user, "csrf": secrets.token_urlsafe(32)})
        pipe.expire(key, int(self.config.session_ttl))
        pipe.execute()
        return session_id

    def operator(self, session_id: str | None) -> Operator | None:
        """The operator of a live session whose user is still configured, else None."""
        if not session_id:
            return None
        user, csrf = self.redis.hmget(self._key(session_id), "user", "csrf")
        configured = self.config.users.get(_text(user)) if user else None
        if configured is None or not csrf:
            return None
        return Operator(_text(user), configured.role, _text(csrf))

    def close(self, session_id: str | None) -> None:
        if session_id:
            self.redis.delete(self._key(session_id))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
