"""ShortPathScript against a real Redis: the same replies as redis-py's Script, one connection per thread, the
client's retry policy, no reply left behind by a failed call, fresh connections after a fork, redis-py's path
under gevent."""

from __future__ import annotations

import gc
import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from difyq.worker.redis_scripts import ShortPathScript, register_script

REPO = Path(__file__).resolve().parents[1]
SHAPES = "return {KEYS[1], ARGV[1], 42, {'nested', 7}, redis.call('TIME')[1] ~= nil and 1 or 0}"
PING = "return 'pong'"
BUSY = """
local began = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - began[1]) * 1000000 + (now[2] - began[2]) > tonumber(ARGV[1])
return ARGV[2]
"""


def named_client(url: str, **options: object) -> tuple[redis.Redis, str]:
    name = f"difyq-test-{uuid.uuid4().hex[:12]}"
    return redis.Redis.from_url(url, client_name=name, **options), name


def connection_ids(url: str, name: str) -> list[int]:
    """The ids of the connections open under client name ``name`` whose last command ran a script (those that
    loaded it, and so came from the pool, are left out)."""
    return sorted(int(entry["id"]) for entry in redis.Redis.from_url(url).client_list()
                  if entry["name"] == name and entry["cmd"] == "evalsha")


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "text"])
def test_replies_match_redis_py_scripts(redis_url: str, namespace: str, decode: bool) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=decode)
    keys, args = [f"{namespace}:k"], ["ä-arg"]
    assert register_script(client, SHAPES)(keys=keys, args=args) == client.register_script(SHAPES)(keys=keys,
                                                                                                    args=args)
    with pytest.raises(redis.ResponseError, match="boom"):
        register_script(client, "return redis.error_reply('boom')")()
    assert register_script(client, "return 'still fine'")() in (b"still fine", "still fine")


def test_a_script_redis_lost_is_loaded_again(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    script = register_script(client, "return 'loaded ' .. ARGV[1]")
    assert script(args=["once"]) == b"loaded once"
    client.script_flush()
    assert script(args=["again"]) == b"loaded again"


def test_each_thread_keeps_one_connection(redis_url: str) -> None:
    client, name = named_client(redis_url)
    ping = register_script(client, PING)

    def calls() -> None:
        for _ in range(3):
            assert ping() == b"pong"

    threads = [threading.Thread(target=calls) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(connection_ids(redis_url, name)) == 3


def test_each_client_talks_to_its_own_server_and_database(redis_url: str, namespace: str) -> None:
    """A thread's connection belongs to one client's pool: a client made after another is gone (its pool may get
    the same id) never inherits that client's connection."""
    key = f"{namespace}:where"
    read = "return redis.call('GET', KEYS[1])"
    base = redis_url.rsplit("/", 1)[0]
    for db in (1, 2):
        redis.Redis.from_url(f"{base}/{db}").set(key, f"db{db}")
    try:
        for _ in range(20):
            for db in (1, 2):
                client = redis.Redis.from_url(f"{base}/{db}")
                assert register_script(client, read)(keys=[key]) == f"db{db}".encode()
                del client
                gc.collect()
    finally:
        for db in (1, 2):
            redis.Redis.from_url(f"{base}/{db}").delete(key)


def test_threads_beyond_the_kept_ones_use_the_pool(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("difyq.worker.redis_scripts.KEPT_PER_POOL", 2)
    client, name = named_client(redis_url)
    ping = register_script(client, PING)
    ready, finish = threading.Barrier(6), threading.Event()

    def calls() -> None:
        assert ping() == b"pong"
        ready.wait()
        finish.wait()
        assert ping() == b"pong"

    threads = [threading.Thread(target=calls) for _ in range(5)]
    for thread in threads:
        thread.start()
    ready.wait()
    while_running = connection_ids(redis_url, name)
    finish.set()
    for thread in threads:
        thread.join()
    gc.collect()
    time.sleep(0.2)
    pooled = connection_ids(redis_url, name)
    assert len(while_running) - len(pooled) == 2 and len(pooled) >= 1  # the two kept ones ended with their threads


def test_a_timed_out_call_leaves_no_reply_for_the_next(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=0.1, retry=Retry(NoBackoff(), 0))
    busy = register_script(client, BUSY)
    with pytest.raises(redis.TimeoutError):
        busy(args=[300_000, "late"])
    time.sleep(0.5)  # Redis has finished the busy script and answered on the connection given up on
    assert busy(args=[0, "mine"]) == b"mine"


@pytest.mark.parametrize("retries", [1, 0])
def test_the_clients_retry_policy_decides_after_a_lost_connection(redis_url: str, retries: int) -> None:
    client, name = named_client(redis_url, retry=Retry(NoBackoff(), retries))
    ping = register_script(client, PING)
    assert ping() == b"pong"
    [first] = connection_ids(redis_url, name)
    redis.Redis.from_url(redis_url).client_kill_filter(_id=first)
    if retries:
        assert ping() == b"pong"
    else:
        with pytest.raises(redis.ConnectionError):
            ping()
        assert ping() == b"pong"
    [second] = connection_ids(redis_url, name)
    assert second != first


def _child_ping(ping: ShortPathScript, url: str, name: str, queue: multiprocessing.Queue) -> None:
    queue.put((ping(), len(connection_ids(url, name))))


def test_a_forked_child_makes_its_own_connection(redis_url: str) -> None:
    client, name = named_client(redis_url)
    ping = register_script(client, PING)
    assert ping() == b"pong"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_ping, args=(ping, redis_url, name, queue))
    child.start()
    assert queue.get(timeout=20) == (b"pong", 2)
    child.join(20)
    assert child.exitcode == 0
    assert ping() == b"pong"
    assert len(connection_ids(redis_url, name)) == 1


def test_greenlets_take_redis_pys_path(redis_url: str) -> None:
    program = f"""
from gevent import monkey
monkey.patch_all()
import gevent, redis
from difyq.worker import redis_scripts
client = redis.Redis.from_url({redis_url!r}, max_connections=1000)
echo = redis_scripts.register_script(client, "return ARGV[1]")
jobs = [gevent.spawn(echo, args=[str(n)]) for n in range(200)]
gevent.joinall(jobs, raise_error=True)
assert [job.value for job in jobs] == [str(n).encode() for n in range(200)]
assert redis_scripts._thread_connections() is None
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
