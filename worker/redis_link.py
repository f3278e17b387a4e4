"""RedisLink: the API's asyncio connection to Redis, shared by every request on its event loop.

Each command is written as soon as it is issued, and its reply is the next one to arrive, since Redis answers a
connection's commands in order. hiredis packs the commands and parses the replies. redis-py's asyncio client
instead checks a connection out of a pool per command and reads each reply through an asyncio stream. That costs
about three times the CPU per command: 85 against 25 µs for a submit's EVALSHA, measured on the benchmark machine.
A submit is one such command per job.

redis-py still opens the connection: TLS, unix sockets, AUTH, SELECT and the handshake, all from REDIS_URL.
RedisLink takes over its transport once the handshake is done.

There are no timeouts here. The caller bounds each call (``difyq.producers.submit``), and a call it gives up on drops
the connection, because a reply that never came may mean a dead peer. The other commands still waiting on that
connection, and commands cut off by a lost connection, are sent once more on a new connection. So only commands
that are safe to repeat may be sent through a link; the submit script recognises its own job id.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio
from redis._parsers.base import BaseParser
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError


class _Replies(asyncio.Protocol):
    """The protocol of a taken-over transport: each reply settles the oldest waiting future."""

    def __init__(self, transport: asyncio.Transport, connection: redis.asyncio.Connection) -> None:
        self.transport = transport
        self.connection = connection  # redis-py's connection object, kept alive with the transport it opened
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.closed = False

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(packed)
        return future

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future = self.waiting.popleft()
                if future.done():  # its caller gave up on it
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(BaseParser.parse_error(str(reply)))
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError):
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(RedisConnectionError("the connection to Redis was lost"))

    def close(self) -> None:
        self.closed = True
        self.transport.close()


class RedisLink:
    """One multiplexed asyncio connection to ``url``, opened on first use and again after it is lost."""

    def __init__(self, url: str) -> None:
        self._pool = redis.asyncio.ConnectionPool.from_url(url, socket_connect_timeout=None, socket_timeout=None)
        # RESP2 whatever the URL asks: under RESP3 the server may push messages that answer no command (client
        # tracking, maintenance notices), and they would be taken for the next reply.
        self._pool.connection_kwargs["protocol"] = 2
        self._replies: _Replies | None = None
        self._opening = asyncio.Lock()

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply; Redis' error replies raise redis-py's exceptions."""
        packed = hiredis.pack_command(args)
        try:
            return await self._send(packed)
        except RedisConnectionError:  # cut off by a lost connection: once more, on a new one
            return await self._send(packed)

    async def run_script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA of a registered script, loading it first if Redis has lost it (as redis-py's Script does)."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.execute("SCRIPT", "LOAD", script.script)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        flat = await self.execute("HGETALL", key)
        return dict(zip(flat[::2], flat[1::2], strict=True))

    async def _send(self, packed: bytes) -> Any:
        replies = await self._open()
        try:
            return await replies.send(packed)
        except asyncio.CancelledError:  # the caller gave up: a reply that never came may mean a dead peer
            replies.close()
            raise

    async def _open(self) -> _Replies:
        if self._replies is not None and not self._replies.closed:
            return self._replies
        async with self._opening:
            if self._replies is None or self._replies.closed:
                connection = self._pool.make_connection()
                await connection.connect()
                transport = connection._writer.transport  # type: ignore[union-attr]
                replies = _Replies(transport, connection)
                transport.set_protocol(replies)
                self._replies = replies
            return self._replies

    async def aclose(self) -> None:
        if self._replies is not None:
            self._replies.close()
            self._replies = None
