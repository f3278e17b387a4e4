"""The floor under two of difyq's phases: how long the Dify emulator and the callback sink take to note a request
that a bare urllib3 client (the transport difyq's worker sends with, keep-alive pools) sends them.

difyq's ``pre_dify`` phase (its start to the emulator noting the call) and ``callback_hop`` (its finish to the sink
noting the callback) hold these times; what is left of each is difyq's own work. Requests go out at the scenario's
rate, each at its due time, from as many threads as the workers have slots per process, so the stand-ins see the
load they see from a pipeline.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3

from tests.bench.loadgen import query_for
from tests.bench.measure import summary
from tests.bench.stack import DIFY_KEY, BenchEnvironment


def hop_floors(bench: BenchEnvironment, rate: float, requests: int, threads: int) -> dict[str, Any]:
    """``requests`` streamed chat calls to the emulator, then as many callbacks to the sink, ``rate`` a second: ms
    from each send to the stand-in's record of it (``dify_call``, ``callback``)."""
    emulator = bench.emulator
    assert emulator is not None
    pool = urllib3.PoolManager(maxsize=threads)

    def dify_call(name: str) -> None:
        body = {"inputs": {}, "query": query_for(name), "response_mode": "streaming", "user": "bench"}
        reply = pool.request("POST", f"{emulator.base_url}/chat-messages", body=json.dumps(body).encode(),
                             headers={"Authorization": f"Bearer {DIFY_KEY}", "Content-Type": "application/json",
                                      "Accept": "text/event-stream"}, preload_content=False)
        reply.read()
        reply.release_conn()

    def callback(name: str) -> None:
        pool.request("POST", bench.sink.url, body=b'{"status": "succeeded"}',
                     headers={"Content-Type": "application/json", "webhook-id": name})

    floors: dict[str, Any] = {"rate": rate, "requests": requests, "threads": threads}
    try:
        for kind, send, noted in (("dify_call", dify_call, _dify_noted), ("callback", callback, _callback_noted)):
            sent = _paced(send, f"floor-{uuid.uuid4().hex[:8]}", rate, requests, threads)
            times = noted(bench, set(sent))
            floors[kind] = summary([times[name] - at for name, at in sent.items() if name in times])
    finally:
        pool.clear()
    return floors


def _paced(send: Callable[[str], None], prefix: str, rate: float, requests: int, threads: int) -> dict[str, float]:
    """``send`` each of ``requests`` names at its due time, ``rate`` a second (open loop, from ``threads``
    threads); when each was sent."""
    start = time.time() + 0.05
    sent: dict[str, float] = {}

    def at_due_time(index: int) -> None:
        threading.Event().wait(max(start + index / rate - time.time(), 0.0))
        name = f"{prefix}-{index}"
        sent[name] = time.time()
        send(name)

    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(at_due_time, range(requests)))
    return sent


def _dify_noted(bench: BenchEnvironment, names: set[str]) -> dict[str, float]:
    assert bench.emulator is not None
    found = {}
    for call in bench.emulator.take_calls():
        name = str((call.get("body") or {}).get("query") or "").removeprefix(query_for(""))
        if name in names:
            found[name] = call["started_at"]
    return found


def _callback_noted(bench: BenchEnvironment, names: set[str]) -> dict[str, float]:
    return bench.sink.wait_for(names, timeout=30.0)
