"""Benchmark fair shares: how long tenant B's single jobs wait at a saturated key while tenant A has a backlog.

The in-process broker of ``bench_limits.py`` stands in for Dramatiq (worker threads call ``KeyLimiter.acquire``
once per delivery and defer a refused job to its computed moment). Tenant A enqueues ``--backlog`` jobs at once;
after a warm-up second, tenant B enqueues one job every ``--every`` seconds. The key runs at ``--limit`` requests
per ``--window`` (one admission slot = window / limit). Run with ``fairness: tenant`` and without.

Run standalone (not part of ``make test``)::

    .venv/bin/python -m tests.bench.bench_fairness [--backlog 1000 --limit 200 --window 2 ...]

Prints one JSON object: per mode, B's wait (enqueue to admission) in seconds and in slots (A's admissions in
between); the goal with fairness is at most one slot.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import threading
import time
import uuid
from contextlib import ExitStack

import redis

from difyq.worker.config import AppLimits
from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.limits import KeyLimiter, deferral_delay, key_id
from tests.bench.bench_limits import DelayQueue
from tests.support.waiting import wait_for


def run_mode(args: argparse.Namespace, url: str, fair: bool) -> dict:
    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, max_connections=args.workers + 4))
    namespace = f"difyq-bench-{uuid.uuid4().hex[:8]}"
    limiter = KeyLimiter(client, namespace, window_s=args.window)
    kid = key_id(f"bench-{uuid.uuid4().hex}")
    limits = AppLimits(requests_per_minute=args.limit)
    ready: queue.Queue = queue.Queue()
    delayed = DelayQueue(ready)
    stop = threading.Event()
    lock = threading.Lock()
    a_admitted = 0
    b_waits: dict[str, tuple[float, int]] = {}  # ticket -> (enqueued at, A admissions then)
    b_results: list[tuple[float, int]] = []

    def work() -> None:
        nonlocal a_admitted
        while not stop.is_set():
            try:
                ticket, tenant, since = ready.get(timeout=0.05)
            except queue.Empty:
                continue
            admission = limiter.acquire(kid, limits, estimated_tokens=0, lease_s=30.0, ticket=ticket,
                                        waiting_since=since or None, tenant=tenant, fair=fair)
            if not admission.admitted:
                delayed.push(time.monotonic() + deferral_delay(admission), (ticket, tenant, since or time.time()))
                continue
            limiter.release(kid, admission.reservation, None)
            with lock:
                if tenant == "A":
                    a_admitted += 1
                else:
                    enqueued, a_then = b_waits.pop(ticket)
                    b_results.append((time.monotonic() - enqueued, a_admitted - a_then))

    threads = [threading.Thread(target=delayed.run, daemon=True)]
    threads += [threading.Thread(target=work, daemon=True) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    for _ in range(args.backlog):
        ready.put((uuid.uuid4().hex, "A", 0.0))
    wait_for(ready.empty, timeout=args.timeout, interval=0.01, what="every A job taking its place in the line")
    for _ in range(args.b_jobs):
        ticket = uuid.uuid4().hex
        with lock:
            b_waits[ticket] = (time.monotonic(), a_admitted)
        ready.put((ticket, "B", 0.0))
        time.sleep(args.every)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        with lock:
            if not b_waits:
                break
        time.sleep(0.05)
    stop.set()
    delayed.stop()
    for thread in threads:
        thread.join(timeout=5)
    for name in list(client.scan_iter(match=f"{namespace}:*")):
        client.delete(name)
    client.connection_pool.disconnect()
    waits = sorted(wait for wait, _ in b_results)
    slots = sorted(slot for _, slot in b_results)
    return {
        "b_jobs_admitted": len(b_results),
        "b_jobs_still_waiting": len(b_waits),
        "b_wait_s_p50": round(statistics.median(waits), 3) if waits else None,
        "b_wait_s_max": round(waits[-1], 3) if waits else None,
        "b_wait_slots_max": slots[-1] if slots else None,
        "a_backlog_admitted_meanwhile": a_admitted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backlog", type=int, default=1000, help="tenant A's jobs enqueued at once")
    parser.add_argument("--limit", type=int, default=200, help="requests per window (requests_per_minute)")
    parser.add_argument("--window", type=float, default=2.0, help="the window in seconds (60 in production)")
    parser.add_argument("--b-jobs", type=int, default=8, help="tenant B's jobs, one every --every seconds")
    parser.add_argument("--every", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=20.0, help="how long to wait for B's last job")
    args = parser.parse_args()
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        result = {"backlog": args.backlog, "limit_per_window": args.limit, "window_s": args.window,
                  "slot_s": args.window / args.limit, "workers": args.workers,
                  "fair": run_mode(args, url, fair=True), "first_come_first_served": run_mode(args, url, fair=False)}
        print(json.dumps(result))


if __name__ == "__main__":
    main()
