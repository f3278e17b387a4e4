"""RedisLink against a real Redis: replies matched to concurrent commands, Redis' errors as redis-py's exceptions,
the handshake from the URL, and a new connection after one is lost or given up on."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import uvloop

from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.redis_link import RedisLink

LOOPS = pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                                ids=["asyncio", "uvloop"])


def run_with_link(url: str, loop_factory: Callable[[], asyncio.AbstractEventLoop],
                  scenario: Callable[[RedisLink], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        link = RedisLink(url)
        try:
            return await scenario(link)
        finally:
            await link.aclose()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


@LOOPS
def test_concurrent_commands_each_get_their_own_reply(redis_url: str, namespace: str, loop_factory) -> None:
    big = os.urandom(3_000_000)

    async def scenario(link: RedisLink) -> None:
        await link.execute("SET", f"{namespace}:big", big)
        echoes = [f"value-{n}" * (n % 7 + 1) for n in range(300)]
        replies = await asyncio.gather(*(link.execute("ECHO", text) for text in echoes),
                                       link.execute("GET", f"{namespace}:big"))
        assert replies[:-1] == [text.encode() for text in echoes]
        assert replies[-1] == big
        await link.execute("HSET", f"{namespace}:h", "a", "1", "b", "2")
        assert await link.hgetall(f"{namespace}:h") == {b"a": b"1", b"b": b"2"}
        assert await link.hgetall(f"{namespace}:missing") == {}

    run_with_link(redis_url, loop_factory, scenario)


def test_error_replies_raise_redis_py_exceptions_and_the_link_goes_on(redis_url: str, namespace: str) -> None:
    async def scenario(link: RedisLink) -> None:
        with pytest.raises(redis.exceptions.NoScriptError):
            await link.execute("EVALSHA", "0" * 40, 0)
        await link.execute("SET", f"{namespace}:s", "text")
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            await link.execute("LPUSH", f"{namespace}:s", "x")
        sha = await link.execute("SCRIPT", "LOAD", "return {KEYS[1], ARGV[1], 7}")
        assert await link.execute("EVALSHA", sha, 1, f"{namespace}:k", "arg") == [f"{namespace}:k".encode(), b"arg", 7]

    run_with_link(redis_url, asyncio.new_event_loop, scenario)


def test_a_script_redis_lost_is_loaded_again(redis_url: str, namespace: str) -> None:
    script = redis.Redis.from_url(redis_url).register_script("return {KEYS[1], ARGV[1]}")

    async def scenario(link: RedisLink) -> None:
        await link.execute("SCRIPT", "FLUSH")
        assert await link.run_script(script, [f"{namespace}:k"], ["v"]) == [f"{namespace}:k".encode(), b"v"]
        assert await link.run_script(script, [f"{namespace}:k"], ["w"]) == [f"{namespace}:k".encode(), b"w"]

    run_with_link(redis_url, asyncio.new_event_loop, scenario)


def test_the_url_says_database_and_password() -> None:
    with EmbeddedRedis() as server:
        redis.Redis.from_url(server.url).config_set("requirepass", "s3cret")
        base = server.url.rsplit("/", 1)[0]
        with_password = f"{base.replace('redis://', 'redis://:s3cret@')}/3"
        redis.Redis.from_url(with_password).set("where", "db3")

        async def read(link: RedisLink) -> Any:
            return await link.execute("GET", "where")

        assert run_with_link(with_password, asyncio.new_event_loop, read) == b"db3"
        with pytest.raises(redis.exceptions.AuthenticationError):
            run_with_link(f"{base}/3", asyncio.new_event_loop, read)


@LOOPS
def test_a_killed_connection_is_replaced_and_the_command_sent_again(redis_url: str, namespace: str,
                                                                    loop_factory) -> None:
    admin = redis.Redis.from_url(redis_url)
    key = f"{namespace}:list"

    async def scenario(link: RedisLink) -> None:
        first = await link.execute("CLIENT", "ID")
        admin.client_kill_filter(_id=first)
        await asyncio.sleep(0.05)
        assert await link.execute("PING") == b"PONG"
        second = await link.execute("CLIENT", "ID")
        assert second != first
        # Killed while its command waits for the reply (a BLPOP blocked in Redis): sent again on a new connection.
        waiting = asyncio.ensure_future(link.execute("BLPOP", key, 10))
        await asyncio.sleep(0.2)
        admin.client_kill_filter(_id=second)
        await asyncio.sleep(0.2)
        admin.rpush(key, "x")
        assert await asyncio.wait_for(waiting, 5) == [key.encode(), b"x"]
        assert await link.execute("CLIENT", "ID") not in (first, second)

    run_with_link(redis_url, loop_factory, scenario)


def test_a_call_given_up_on_drops_the_connection_and_the_next_one_reconnects() -> None:
    """A Redis that stops answering: the caller's timeout ends the wait, and once Redis answers again the link
    works on a new connection instead of waiting behind the lost reply."""
    with EmbeddedRedis() as server:

        async def scenario(link: RedisLink) -> tuple[Any, Any]:
            before = await link.execute("CLIENT", "ID")
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(link.execute("PING"), 0.3)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            return before, await asyncio.wait_for(link.execute("CLIENT", "ID"), 5)

        before, after = run_with_link(server.url, asyncio.new_event_loop, scenario)
        assert after != before


def test_a_stopped_redis_is_a_connection_error() -> None:
    with EmbeddedRedis() as server:
        url = server.url

    async def scenario(link: RedisLink) -> Any:
        return await link.execute("PING")

    with pytest.raises(redis.exceptions.ConnectionError):
        run_with_link(url, asyncio.new_event_loop, scenario)
