"""RedisConnector: where every difyq process gets its Redis clients, from REDIS_URL alone or through Sentinel.

With Sentinel (``redis.sentinel`` in the config, or the ``REDIS_SENTINELS`` environment variable) the clients ask
the sentinels for the current primary whenever they open a connection, so after a failover they find the new
primary by themselves: redis-py's ``redis.sentinel`` (and ``redis.asyncio.sentinel`` for the API's event loop) does
the asking, and drops a connection whose server answers that it has become a replica. REDIS_URL still gives what
the Redis servers need (password, user name, database number, ``rediss://`` for TLS); its host and port are then
not used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from pydantic import ValidationError
from redis.connection import parse_url

from difyq.worker.config import DEFAULT_SENTINEL_MASTER, ConfigError, SentinelConfig

SENTINELS_ENV = "REDIS_SENTINELS"
SENTINEL_MASTER_ENV = "REDIS_SENTINEL_MASTER"
SENTINEL_PASSWORD_ENV = "REDIS_SENTINEL_PASSWORD"
# How long a question to one sentinel may take before the next one is asked.
SENTINEL_TIMEOUT_S = 1.0


def sentinel_settings(configured: SentinelConfig | None, environ: Mapping[str, str] = os.environ,
                      ) -> SentinelConfig | None:
    """The Sentinel settings in force: ``REDIS_SENTINELS`` (``host:port,host:port,...``) replaces the configured
    nodes, ``REDIS_SENTINEL_MASTER`` and ``REDIS_SENTINEL_PASSWORD`` the master name and the sentinels' password.
    ConfigError names the variable that is wrong."""
    nodes = [node.strip() for node in environ.get(SENTINELS_ENV, "").split(",") if node.strip()]
    if not nodes and configured is None:
        return None
    base = configured.model_dump() if configured is not None else {"master": DEFAULT_SENTINEL_MASTER}
    overrides = {"nodes": nodes, "master": environ.get(SENTINEL_MASTER_ENV),
                 "password": environ.get(SENTINEL_PASSWORD_ENV)}
    try:
        return SentinelConfig.model_validate({**base, **{k: v for k, v in overrides.items() if v}})
    except ValidationError as error:
        names = {"nodes": SENTINELS_ENV, "master": SENTINEL_MASTER_ENV, "password": SENTINEL_PASSWORD_ENV}
        problems = [f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg'].removeprefix('Value error, ')}"
                    for e in error.errors()]
        raise ConfigError("redis.sentinel", problems) from None


@dataclass(frozen=True)
class RedisConnector:
    """Makes Redis clients for one process: ``url`` alone, or ``url``'s server settings on the primary that the
    sentinels of ``sentinel`` name."""

    url: str
    sentinel: SentinelConfig | None = None

    @classmethod
    def from_settings(cls, url: str, configured: SentinelConfig | None,
                      environ: Mapping[str, str] = os.environ) -> RedisConnector:
        connector = cls(url, sentinel_settings(configured, environ))
        if connector.sentinel is not None:
            connector.server_options()  # a URL that cannot go with Sentinel fails now, not at first use
        return connector

    def client(self, **options: Any) -> redis.Redis:
        """A client of the primary; ``options`` are redis-py connection options."""
        if self.sentinel is None:
            return redis.Redis.from_url(self.url, **options)
        sentinels = redis.sentinel.Sentinel(self.sentinel.addresses(), sentinel_kwargs=self._sentinel_options())
        return sentinels.master_for(self.sentinel.master, **self.server_options(), **options)

    def async_client(self, **options: Any) -> redis.asyncio.Redis:
        """An asyncio client of the primary, for one event loop."""
        if self.sentinel is None:
            return redis.asyncio.Redis.from_url(self.url, **options)
        sentinels = redis.asyncio.sentinel.Sentinel(self.sentinel.addresses(),
                                                    sentinel_kwargs=self._sentinel_options())
        return sentinels.master_for(self.sentinel.master, **self.server_options(), **options)

    def server_options(self) -> dict[str, Any]:
        """What REDIS_URL says about the Redis servers, less their address (the sentinels give that)."""
        if self.url.startswith("unix:"):
            raise ConfigError("REDIS_URL", ["a unix socket cannot be used with Sentinel: use redis:// or rediss://"])
        options = {key: value for key, value in parse_url(self.url).items()
                   if key not in {"host", "port", "path", "connection_class"}}
        return {**options, "ssl": True} if self.url.startswith("rediss:") else options

    def _sentinel_options(self) -> dict[str, Any]:
        assert self.sentinel is not None
        password = self.sentinel.password.get_secret_value() if self.sentinel.password else None
        return {"password": password, "socket_timeout": SENTINEL_TIMEOUT_S,
                "socket_connect_timeout": SENTINEL_TIMEOUT_S}
