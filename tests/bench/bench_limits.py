"""Benchmark the per-key limiter under 2x demand: throughput against the limit, burstiness, time spent waiting.

A small in-process broker stands in for Dramatiq: producer threads enqueue jobs at ``demand`` x the limit,
worker threads take a job, call ``KeyLimiter.acquire`` once and either "call Dify" (release at once) or hand
the job to a delay queue with ``deferral_delay`` (the delayed re-enqueue the actor does), never sleeping on it.
A mover thread re-enqueues delayed jobs when they are due, as Dramatiq's delay queue does.

Run standalone (not part of ``make test``)::

    .venv/bin/python tests/bench/bench_limits.py [--limit 200 --window 4 --windows 5 --workers 8 ...]

Prints one JSON object. ``admitted_over_limit`` is admissions in the measured windows (after a warm-up
window) divided by what the limit allows in them (goal 0.98-1.00); ``largest_burst_1s`` is the most admissions
in any one second; ``worker_thread_seconds_waiting`` is the time workers held a job while neither deciding
(acquire) nor working (goal 0: deferral is computed, nobody sleeps holding a slot).
"""

from __future__ import annotations

import argparse
import heapq
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
from difyq.worker.limits import KeyLimiter, Reservation, deferral_delay, key_id
from tests.bench.ratelimit import most_in_span


class DelayQueue:
    """Jobs waiting for their eta; a mover thread puts them back on the ready queue when due."""

    def __init__(self, ready: queue.Queue):
        self.ready = ready
        self.heap: list[tuple[float, int, tuple[str, float]]] = []
        self.cond = threading.Condition()
        self.seq = 0
        self.stopped = False

    def push(self, eta: float, job: tuple[str, float]) -> None:
        with self.cond:
            self.seq += 1
            heapq.heappush(self.heap, (eta, self.seq, job))
            self.cond.notify()

    def run(self) -> None:
        with self.cond:
            while not self.stopped:
                now = time.monotonic()
                while self.heap and self.heap[0][0] <= now:
                    self.ready.put(heapq.heappop(self.heap)[2])
                timeout = (self.heap[0][0] - now) if self.heap else 0.05
                self.cond.wait(timeout=max(0.0, min(timeout, 0.05)))

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def run(args: argparse.Namespace, url: str) -> dict:
    pool = redis.ConnectionPool.from_url(url, max_connections=args.workers + 8)
    client = redis.Redis(connection_pool=pool)
    namespace = f"difyq-bench-{uuid.uuid4().hex[:8]}"
    limiter = KeyLimiter(client, namespace, window_s=args.window)
    kid = key_id(f"bench-{uuid.uuid4().hex}")
    limits = AppLimits(requests_per_minute=args.limit, burst=args.burst)
    ready: queue.Queue = queue.Queue()
    delayed = DelayQueue(ready)
    stop = threading.Event()
    lock = threading.Lock()
    admitted: list[float] = []
    decide_s: list[float] = []
    totals = {"acquires": 0, "deferrals": 0, "redeferrals": 0, "held_s": 0.0, "decide_s": 0.0, "work_s": 0.0}
    rate = args.demand * args.limit / args.window
    duration = (args.windows + 1) * args.window + 0.5

    def produce(index: int) -> None:
        interval = args.producers / rate
        next_at = time.monotonic() + index * interval / args.producers
        end = time.monotonic() + duration
        while not stop.is_set() and next_at < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            ready.put((uuid.uuid4().hex, 0.0))
            next_at += interval

    def work() -> None:
        while not stop.is_set():
            try:
                ticket, since = ready.get(timeout=0.05)
            except queue.Empty:
                continue
            picked = time.perf_counter()
            admission = limiter.acquire(kid, limits, estimated_tokens=0, lease_s=30.0, ticket=ticket,
                                        waiting_since=since or None)
            decided = time.perf_counter()
            work_s = 0.0
            if admission.admitted:
                if args.call_s:
                    time.sleep(args.call_s)  # the Dify call: work, not waiting
                limiter.release(kid, admission.reservation, None)
                work_s = time.perf_counter() - decided
            else:
                delayed.push(time.monotonic() + deferral_delay(admission), (ticket, since or time.time()))
            handed_off = time.perf_counter()
            with lock:
                totals["acquires"] += 1
                totals["decide_s"] += decided - picked
                totals["work_s"] += work_s
                totals["held_s"] += handed_off - picked
                decide_s.append(decided - picked)
                if admission.admitted:
                    admitted.append(Reservation.parse(admission.reservation).admitted_at)
                else:
                    totals["deferrals"] += 1
                    totals["redeferrals"] += bool(since)  # came back when told, and still had to wait

    threads = [threading.Thread(target=delayed.run, daemon=True)]
    threads += [threading.Thread(target=produce, args=(i,), daemon=True) for i in range(args.producers)]
    threads += [threading.Thread(target=work, daemon=True) for _ in range(args.workers)]
    for thread in threads:
        thread.start()
    time.sleep(duration)
    stop.set()
    delayed.stop()
    for thread in threads:
        thread.join(timeout=5)

    times = sorted(admitted)
    start = times[0]
    measured_from, measured_to = start + args.window, start + args.window * (args.windows + 1)
    measured = [t for t in times if measured_from <= t < measured_to]
    steady = [t for t in times if t >= measured_from]
    for name in list(client.scan_iter(match=f"{namespace}:*")):
        client.delete(name)
    pool.disconnect()
    return {
        "limit_per_window": args.limit,
        "window_s": args.window,
        "demand_x_limit": args.demand,
        "burst": limits.request_burst,
        "workers": args.workers,
        "producers": args.producers,
        "measured_windows": args.windows,
        "admitted_in_measured_windows": len(measured),
        "admitted_over_limit": round(len(measured) / (args.limit * args.windows), 4),
        "max_in_any_window": int(most_in_span(times, args.window)),
        "largest_burst_1s": int(most_in_span(times, 1.0)),
        "largest_burst_1s_after_warmup": int(most_in_span(steady, 1.0)) if steady else 0,
        "limit_rate_per_s": args.limit / args.window,
        "acquires_per_admission": round(totals["acquires"] / max(1, len(times)), 3),
        "deferrals": totals["deferrals"],
        "redeferrals_per_admission": round(totals["redeferrals"] / max(1, len(times)), 3),
        "worker_thread_seconds_waiting": round(totals["held_s"] - totals["decide_s"] - totals["work_s"], 4),
        "worker_thread_seconds_in_acquire": round(totals["decide_s"], 4),
        "acquire_ms_p50": round(statistics.median(decide_s) * 1000, 3),
        "acquire_ms_p99": round(statistics.quantiles(decide_s, n=100)[98] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=200, help="requests per window (requests_per_minute)")
    parser.add_argument("--window", type=float, default=4.0, help="the window in seconds (60 in production)")
    parser.add_argument("--windows", type=int, default=5, help="windows measured after one warm-up window")
    parser.add_argument("--demand", type=float, default=2.0, help="demand as a multiple of the limit")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--call-s", type=float, default=0.0, help="simulated Dify call time")
    parser.add_argument("--burst", type=int, help="requests admitted at once before pacing (default: a sixth of "
                        "--limit; --limit: no pacing)")
    args = parser.parse_args()
    with ExitStack() as stack:
        url = os.environ.get("REDIS_URL") or stack.enter_context(EmbeddedRedis()).url
        print(json.dumps(run(args, url)))


if __name__ == "__main__":
    main()
