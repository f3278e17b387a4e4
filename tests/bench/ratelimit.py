"""Rate-limit efficiency: how fully difyq uses a Dify key's limits when twice as much work waits for it.

Three apps on three keys run side by side through the whole stack (API, workers, Redis, the light stream source):
one with ``limits.requests_per_minute`` (``REQUESTS_PER_MINUTE``), one with ``limits.tokens_per_minute``
(``TOKENS_PER_MINUTE``; every answer reports ``TOKENS_PER_CALL`` total tokens, so the limit is worth
``TOKENS_PER_MINUTE / TOKENS_PER_CALL`` calls a minute) and one with ``limits.max_concurrency`` (``CONCURRENCY``
slots; each call takes the answer's 0.2 s, so the key is worth ``CONCURRENCY / 0.2`` calls a second). Each is
offered twice its limit, open loop, for ``minutes`` minutes. What Dify sees is counted at the source: the calls
(and their tokens) that start in each whole minute from the key's first call, divided by the limit (goal
0.98-1.00), and the most that start in any 60 s span, which must not exceed the limit; for the slots, the time
calls were open in each minute divided by the slots' time (reported: difyq's own work around each call, its start
and its finish, holds the slot too), and the most calls open at once, which must not exceed the slots. The jobs
still waiting when the load ends are dropped with the pipeline.

Before that load, a burst: ``BURST_JOBS`` jobs at once on a fourth key with ``CONCURRENCY`` slots that has never
been used (no hold time known yet, as after an idle spell), and the share of the slots' time its calls were open
from the first call's start to the last one's end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from tests.bench.loadgen import HttpSubmitter, Submission, open_loop
from tests.bench.scenarios import BenchConfig, note_commit, warm_up
from tests.bench.stack import (
    CLIENT_TOKEN,
    BenchEnvironment,
    DifyqPipeline,
    Profile,
    StreamSource,
    WorkerShape,
    cost_between,
)
from tests.support.waiting import wait_for

REQUESTS_PER_MINUTE = 600
TOKENS_PER_MINUTE = 12_000
ANSWER_TOKENS = 12
# What the stream source reports per call: "bench job <token>" is 3 words, + 5 prompt tokens, + the answer.
TOKENS_PER_CALL = 3 + 5 + ANSWER_TOKENS
CONCURRENCY = 4
BURST_JOBS = 60
BURST_KEY = "app-benchburst000000000"
DEMAND = 2.0
GOAL = (0.98, 1.00)
WINDOW_S = 60.0
ANSWER = Profile("ratelimit", ttft_s=0.2, tokens_per_second=0.0, answer_tokens=ANSWER_TOKENS)
APPS = {
    "rpm": ("app-benchrpm00000000000", {"requests_per_minute": REQUESTS_PER_MINUTE}, REQUESTS_PER_MINUTE),
    "tpm": ("app-benchtpm00000000000", {"tokens_per_minute": TOKENS_PER_MINUTE,
                                        "estimated_tokens_per_call": TOKENS_PER_CALL}, TOKENS_PER_MINUTE),
    "slots": ("app-benchslots000000000", {"max_concurrency": CONCURRENCY}, CONCURRENCY),
}
# Calls a minute each key is worth: what twice the demand is offered against.
CALLS_PER_MINUTE = {"rpm": REQUESTS_PER_MINUTE, "tpm": TOKENS_PER_MINUTE / TOKENS_PER_CALL,
                    "slots": CONCURRENCY / ANSWER.ttft_s * WINDOW_S}


def most_in_span(times: Sequence[float], span: float, weights: Sequence[float] | None = None) -> float:
    """The largest total weight (count, without ``weights``) of sorted ``times`` inside any span (t - span, t]."""
    best = total = 0.0
    start = 0
    for end, at in enumerate(times):
        total += weights[end] if weights is not None else 1
        while times[start] <= at - span:
            total -= weights[start] if weights is not None else 1
            start += 1
        best = max(best, total)
    return best


def _usage(calls: list[dict[str, Any]], limit: int, weighted: bool, minutes: int) -> dict[str, Any]:
    calls = sorted(calls, key=lambda call: call["started_at"])
    times = [call["started_at"] for call in calls]
    weights = [float(call["total_tokens"]) for call in calls] if weighted else [1.0] * len(calls)
    if not times:
        return {"limit": limit, "windows": [], "ratio": 0.0, "max_in_any_60s": 0, "ok": False}
    first = times[0]
    windows = [sum(w for t, w in zip(times, weights, strict=True) if first + WINDOW_S * k <= t
                   < first + WINDOW_S * (k + 1)) for k in range(minutes)]
    peak = most_in_span(times, WINDOW_S, weights)
    ratio = sum(windows) / (limit * minutes)
    ok = all(GOAL[0] <= used / limit <= GOAL[1] for used in windows) and peak <= limit
    return {"limit": limit, "windows": windows, "window_ratios": [used / limit for used in windows],
            "ratio": ratio, "max_in_any_60s": peak, "max_ratio": peak / limit, "ok": ok}


def _slot_usage(calls: list[dict[str, Any]], slots: int, minutes: int) -> dict[str, Any]:
    """Per whole minute from the key's first call, the seconds calls were open ÷ the slots' seconds; the most calls
    open at once (a call the client cut counts until its start only)."""
    spans = sorted((call["started_at"], call["ended_at"] or call["started_at"]) for call in calls)
    if not spans:
        return {"limit": slots, "windows": [], "window_ratios": [], "ratio": 0.0, "max_open": 0}
    first = spans[0][0]
    windows = []
    for k in range(minutes):
        low, high = first + WINDOW_S * k, first + WINDOW_S * (k + 1)
        windows.append(sum(max(0.0, min(end, high) - max(start, low)) for start, end in spans))
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    open_now = max_open = 0
    for _, step in edges:
        open_now += step
        max_open = max(max_open, open_now)
    ratios = [busy / (slots * WINDOW_S) for busy in windows]
    return {"limit": slots, "windows": windows, "window_ratios": ratios, "ratio": sum(ratios) / len(ratios),
            "max_open": max_open, "max_ratio": max_open / slots, "ok": max_open <= slots}


def _burst(pipeline: DifyqPipeline, source: StreamSource) -> dict[str, Any]:
    """``BURST_JOBS`` jobs at once on the unused ``burst`` key; the share of its slots' time its calls were open."""
    source.take_calls()
    submitter = HttpSubmitter("127.0.0.1", pipeline.api_port, CLIENT_TOKEN, "burst", pipeline.bench.sink.url)

    async def submit_all() -> None:
        try:
            await asyncio.gather(*(submitter.submit(f"burst-{n}") for n in range(BURST_JOBS)))
        finally:
            await submitter.aclose()

    submitted = time.time()
    asyncio.run(submit_all())
    calls: list[dict[str, Any]] = []
    wait_for(lambda: calls.extend(call for call in source.take_calls() if call["key"] == BURST_KEY)
             or len(calls) >= BURST_JOBS, timeout=120, interval=0.5, what=f"the burst's {BURST_JOBS} calls")
    spans = sorted((call["started_at"], call["ended_at"] or call["started_at"]) for call in calls)
    first, last = spans[0][0], max(end for _, end in spans)
    used = sum(end - start for start, end in spans) / (CONCURRENCY * (last - first))
    print(f"  [ratelimit] burst of {BURST_JOBS} at an unused key of {CONCURRENCY} slots: the slots used {used:.3f} "
          f"from the first call to the last, {last - submitted:.1f} s from the submits", flush=True)
    return {"jobs": BURST_JOBS, "slots": CONCURRENCY, "ratio": used, "first_to_last_s": last - first,
            "submit_to_last_s": last - submitted}


def run(bench: BenchEnvironment, config: BenchConfig, minutes: int) -> dict[str, Any]:
    """A burst at an unused key, then the three keys at twice their limits for ``minutes`` minutes."""
    keys = (*(key for key, _, _ in APPS.values()), BURST_KEY)
    with bench.streaming(ANSWER, keys) as source:
        apps = {name: {"api_key": key, "mode": "chat", "base_url": source.base_url, "limits": limits}
                for name, (key, limits, _) in APPS.items()}
        apps["burst"] = {"api_key": BURST_KEY, "mode": "chat", "base_url": source.base_url,
                         "limits": {"max_concurrency": CONCURRENCY}}
        with bench.pipeline("difyq", WorkerShape(), config={"apps": apps}) as pipeline:
            assert isinstance(pipeline, DifyqPipeline)
            warm_up(bench, pipeline, config.warmup_jobs_rate)
            burst = _burst(pipeline, source)
            before = bench.snapshot(pipeline)
            duration = minutes * WINDOW_S + 5.0
            submitted = asyncio.run(_offer(pipeline, duration))
            after = bench.snapshot(pipeline)
            calls = source.take_calls()
            record: dict[str, Any] = {"minutes": minutes, "demand_x_limit": DEMAND, "answer": vars(ANSWER),
                                      "tokens_per_call": TOKENS_PER_CALL, "goal": list(GOAL), "keys": {},
                                      "burst": burst}
            note_commit(record, pipeline)
            for name, (key, _, limit) in APPS.items():
                mine = [call for call in calls if call["key"] == key]
                slots = name == "slots"
                usage = _slot_usage(mine, limit, minutes) if slots else _usage(mine, limit, name == "tpm", minutes)
                usage["submitted"] = len(submitted[name])
                usage["submit_errors"] = sum(1 for s in submitted[name] if s.error)
                record["keys"][name] = usage
                most = (f"at most {usage['max_open']} open" if slots
                        else f"most in any 60 s {usage['max_in_any_60s']:.0f}")
                print(f"  [ratelimit] {name}: {usage['ratio']:.3f} of the limit over {minutes} min "
                      f"(per minute {', '.join(f'{r:.3f}' for r in usage.get('window_ratios', []))}), {most} of "
                      f"{limit}, submit errors {usage['submit_errors']}", flush=True)
            record["cost"] = cost_between(before, after, len(calls))
    return record


async def _offer(pipeline: DifyqPipeline, duration: float) -> dict[str, list[Submission]]:
    """The apps at ``DEMAND`` times their limit (in calls per second) at once."""
    def submitter(app: str) -> HttpSubmitter:
        return HttpSubmitter("127.0.0.1", pipeline.api_port, CLIENT_TOKEN, app, pipeline.bench.sink.url)

    runs = [open_loop(lambda app=app: submitter(app), DEMAND * CALLS_PER_MINUTE[app] / WINDOW_S, duration,
                      poisson=False, seed=index) for index, app in enumerate(APPS)]
    return dict(zip(APPS, await asyncio.gather(*runs), strict=True))
