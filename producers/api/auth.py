"""Client bearer tokens for /v1/jobs, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from difyq.producers.api.errors import ApiError
from difyq.worker.config import ClientConfig, Config


def authenticate(config: Config, request: Request) -> tuple[str, ClientConfig]:
    """The client whose token the request carries; 401 otherwise."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <client token>",
                       headers={"WWW-Authenticate": "Bearer"})
    presented = token.strip().encode()
    match: tuple[str, ClientConfig] | None = None
    for name, client in config.clients.items():
        if hmac.compare_digest(presented, client.token.get_secret_value().encode()):
            match = (name, client)
    if match is None:
        raise ApiError(401, "unauthorized", "the client token is not valid", headers={"WWW-Authenticate": "Bearer"})
    return match
