"""register_script(): redis-py Scripts whose direct calls take a short path to Redis.

A direct call (one with no pipeline) sends its EVALSHA on a connection that the calling thread keeps for itself,
and reads the reply there. That skips three layers of redis-py, each paid per command: the Script and
ScriptCommands wrappers, the client's command machinery, and the pool. The pool checks a connection out and back
in, and polls its socket for stray data every time. On the benchmark machine a job-state script took 19 to 28 µs of
client CPU this way, against 51 to 70 µs through redis-py's client. The worker makes three such calls per job.

What a call does is unchanged:
- the client's retry policy, run through the connection's own Retry (the limiter's client retries nothing);
- its health checks and its decoding;
- reloading a script that Redis lost.

A thread's connection is closed whenever a call ends in anything but a reply: a connection error, or an exception
raised into the thread mid-call, such as Dramatiq's time limit. So an unread reply is never left on it for the next
call. Under gevent every greenlet would keep a connection of its own, so there the calls take redis-py's usual
path, as do a process's threads beyond the first 64 per client.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Any

import redis
from redis.commands.core import Script
from redis.connection import AbstractConnection, ConnectionPool
from redis.exceptions import NoScriptError

# Threads per process and pool that keep a connection. A worker's usual 8 to 64 threads all do; one with hundreds of
# threads for slow streams would otherwise hold as many connections, which a small managed Redis may not allow, so
# the threads beyond these take redis-py's pool.
KEPT_PER_POOL = 64
_UNSET = object()


@cache
def _greenlet_threads() -> bool:
    """True when gevent has patched ``threading`` (``difyq worker --gevent``): thread-locals are per greenlet."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("threading"))


class _KeptConnections:
    """One pool's thread-kept connections: at most ``KEPT_PER_POOL`` at a time."""

    def __init__(self) -> None:
        self.of_thread = threading.local()
        self._count = 0
        self._lock = threading.Lock()

    def take_slot(self) -> bool:
        with self._lock:
            if self._count >= KEPT_PER_POOL:
                return False
            self._count += 1
            return True

    def free_slot(self) -> None:
        with self._lock:
            self._count -= 1


class _ThreadConnections:
    """Per pool, the connection each thread keeps for itself; a pool's go when it does."""

    def __init__(self) -> None:
        self._per_pool: weakref.WeakKeyDictionary[ConnectionPool, _KeptConnections] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def of_this_thread(self, pool: ConnectionPool) -> AbstractConnection | None:
        """This thread's connection to ``pool``'s server, or None for a thread beyond the pool's slots."""
        kept = self._per_pool.get(pool)
        if kept is None:
            with self._lock:
                kept = self._per_pool.setdefault(pool, _KeptConnections())
        connection = getattr(kept.of_thread, "connection", _UNSET)
        if connection is _UNSET:
            connection = pool.make_connection() if kept.take_slot() else None
            kept.of_thread.connection = connection
            if connection is not None:
                weakref.finalize(connection, kept.free_slot)  # the thread ended and dropped it
        return connection


_connections: _ThreadConnections | None = None


def _thread_connections() -> _ThreadConnections | None:
    """The registry, made on first use; None under gevent, where the calls go through redis-py's pool."""
    global _connections
    if _connections is None and not _greenlet_threads():
        _connections = _ThreadConnections()
    return _connections


def _forget_connections() -> None:
    """In a forked child (Dramatiq's worker processes): the parent's sockets are not the child's to use."""
    global _connections
    _connections = None


os.register_at_fork(after_in_child=_forget_connections)


class ShortPathScript(Script):
    """A Script whose direct calls run on the calling thread's connection (see the module's docstring)."""

    def __call__(self, keys: Sequence[Any] | None = None, args: Iterable[Any] | None = None,
                 client: Any = None) -> Any:
        target = self.registered_client if client is None else client
        connections = _thread_connections()
        if connections is None or type(target) is not redis.Redis or target.connection is not None:
            return super().__call__(keys, args, client)
        connection = connections.of_this_thread(target.connection_pool)
        if connection is None:
            return super().__call__(keys, args, client)
        keys = tuple(keys or ())
        arguments = (*keys, *(args or ()))
        try:
            return self._evalsha(connection, len(keys), arguments)
        except NoScriptError:
            self.sha = target.script_load(self.script)
            return self._evalsha(connection, len(keys), arguments)

    def _evalsha(self, connection: AbstractConnection, key_count: int, arguments: tuple[Any, ...]) -> Any:
        try:
            return connection.retry.call_with_retry(
                lambda: self._send_and_read(connection, key_count, arguments),
                lambda _error: connection.disconnect(),
            )
        except redis.ResponseError:
            raise
        except BaseException:
            connection.disconnect()
            raise

    def _send_and_read(self, connection: AbstractConnection, key_count: int, arguments: tuple[Any, ...]) -> Any:
        connection.send_command("EVALSHA", self.sha, key_count, *arguments)
        return connection.read_response()


def register_script(client: redis.Redis, source: str) -> ShortPathScript:
    """``client.register_script(source)``, as a ShortPathScript."""
    return ShortPathScript(client, source)
