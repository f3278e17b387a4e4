"""The per-process runtime: config, Redis clients, the job store and the broker, built once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from difyq.worker.config import Config, load_config
from difyq.worker.jobs.store import JobStore, PendingCaps
from difyq.worker.jobs.threads import Threads
from difyq.worker.memory_guard import MemoryGuard
from difyq.worker.redis_connect import RedisConnector

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url_from_env() -> str:
    return os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL

# Connections per client and process. redis-py 8 caps a pool at 100 and then raises instead of waiting; a gevent
# worker runs 1000 greenlets that may all talk to Redis at once (Redis itself allows 10,000 clients).
MAX_CONNECTIONS = 4096


@dataclass
class Runtime:
    """What every difyq process needs; Redis connections are made lazily, on first use, by ``connector``
    (REDIS_URL alone, or the primary that Sentinel names)."""

    config: Config
    redis_url: str
    connector: RedisConnector = field(init=False)
    _clients: dict[str, redis.Redis] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.connector = RedisConnector.from_settings(self.redis_url, self.config.redis.sentinel)

    @property
    def namespace(self) -> str:
        return self.config.redis.namespace

    def _client(self, kind: str, **options: object) -> redis.Redis:
        if kind not in self._clients:
            settings: dict[str, object] = {
                "socket_connect_timeout": 2, "socket_timeout": 2, "health_check_interval": 30,
                "max_connections": MAX_CONNECTIONS, "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
                **options,
            }
            self._clients[kind] = self.connector.client(**settings)
        return self._clients[kind]

    def async_redis(self) -> redis.asyncio.Redis:
        """A new asyncio bytes client for one event loop (the API's), closed by its owner (``aclose``).

        It has no socket timeout: asyncio ones would count the time an overloaded loop takes to get to an answer as
        Redis' silence, so its caller bounds each whole call instead (``difyq.producers.submit``), and a call given
        up on drops its connection (redis-py's asyncio client does that for a cancelled command)."""
        return self.connector.async_client(
            socket_connect_timeout=2, socket_timeout=None, max_connections=MAX_CONNECTIONS,
            retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), 1))

    @property
    def redis(self) -> redis.Redis:
        """A client with decoded string replies, for job records and limits."""
        return self._client("text", decode_responses=True)

    @property
    def limits_redis(self) -> redis.Redis:
        """For the limiter: no retry, so one acquire can never take two reservations."""
        return self._client("limits", decode_responses=True, retry=Retry(NoBackoff(), 0))

    @property
    def raw_redis(self) -> redis.Redis:
        """A bytes client: Dramatiq's message bodies and Lua scripts that write them."""
        return self._client("bytes")

    @cached_property
    def store(self) -> JobStore:
        return JobStore(self.raw_redis, self.namespace, self.config.jobs,
                        durable_submit=self.config.redis.durable_submit, max_pending=PendingCaps.of(self.config),
                        thread_ttl=self.config.threads.ttl)

    @cached_property
    def threads(self) -> Threads:
        return Threads(self.raw_redis, self.namespace, self.config.threads.ttl)

    @cached_property
    def memory_guard(self) -> MemoryGuard:
        """Whether Redis is too full for new jobs (``redis.memory_guard``), shared by this process' submits."""
        return MemoryGuard(self.config.redis.memory_guard)


_current: Runtime | None = None


def current_runtime() -> Runtime:
    """The runtime of this process, from DIFYQ_CONFIG and REDIS_URL."""
    global _current
    if _current is None:
        _current = Runtime(load_config(), redis_url_from_env())
    return _current


def install_runtime(runtime: Runtime) -> None:
    """Use ``runtime`` for this process (tests and ``difyq dev`` build their own)."""
    global _current
    _current = runtime
