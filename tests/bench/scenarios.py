"""The four scenarios of the benchmark, each run on every pipeline against the same emulator and sink.

1. ``throughput``: a 0-latency emulator; offered load rises step by step (x ``factor``) until a step fails
   (p99 end-to-end >= 1 s, a callback missing, or completions falling behind), then bisects between the last pass
   and the fail; the result is the highest offered rate that passed. The pipelines run side by side and their
   searches take turns, one step each, so a drifting machine speed weighs on all of them alike.
2. ``overhead``: a 200 ms emulator (``--dify-latency`` sets another) at one fixed rate (half of difyq's throughput
   result when that ran): e2e minus the emulator's own time per job, the submit latency, and for difyq the
   per-phase breakdown from its records.
3. ``inflight``: 10 s streamed answers; open-loop rate = C / 10 s for each concurrency level C, so Little's law
   says C jobs are in flight; the steady-state throughput divided by that bound (C / the answer's nominal 10 s:
   an emulator slowed down by a saturated machine does not lower the bar), worker memory (RSS and PSS).
4. ``cost`` (measured inside ``overhead``'s step): CPU seconds of the pipeline's processes and Redis commands
   (INFO commandstats, which counts commands inside Lua scripts too) per job, plus a MONITOR window that splits
   them into round trips and in-script commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.bench.loadgen import emulator_alone
from tests.bench.measure import StepData, cdf, in_flight, phase_breakdown, run_step, summary
from tests.bench.redis_trace import CommandTrace, ScriptTimes
from tests.bench.stack import (
    DIFY_KEY,
    LIMITED,
    BenchEnvironment,
    DifyqPipeline,
    Pipeline,
    Profile,
    WorkerShape,
    cost_between,
    tree_memory,
)

ZERO_LATENCY = Profile("0ms", ttft_s=0.0, tokens_per_second=0.0, answer_tokens=16)
FIXED_200MS = Profile("200ms", ttft_s=0.2, tokens_per_second=0.0, answer_tokens=16)
STREAM_10S = Profile("10s-stream", ttft_s=1.0, tokens_per_second=1.0, answer_tokens=10)
P99_GOAL_S = 1.0
# A throughput step passes only if its completions kept pace with its arrivals (``StepData.pace``). Just past a
# pipeline's capacity an 8 s step can still end with p99 under 1 s while its backlog grows; such steps measured a
# pace of 0.89-0.96, steps below capacity 0.98-1.01.
PACE_FLOOR = 0.97
# Worker slots per process in the in-flight scenario, for every pipeline: 10 % above 1,000. On a loaded 2-core box
# the emulator's own 10 s answers take 10.4-10.8 s, and Little's law with W = 10.5 s needs 2,100 slots to keep
# C = 2,000 at the bound; with exactly 2 x 1,000 the slots, not the pipeline, cap the throughput near 0.95.
INFLIGHT_SLOTS = 1100


@dataclass
class InflightMode:
    """One worker setup for the in-flight scenario and the concurrency levels to try on it."""

    pipeline: str
    shape: WorkerShape
    levels: list[int]

    def label(self) -> str:
        return f"{self.pipeline} {self.shape.label()}"


@dataclass
class BenchConfig:
    """Every knob of a run; ``quick()`` is the smoke-run variant."""

    pipelines: list[str] = field(default_factory=lambda: ["difyq", "bare", "celery"])
    shape: WorkerShape = field(default_factory=WorkerShape)
    throughput_start: float = 50.0
    throughput_factor: float = 1.3
    throughput_step_s: float = 8.0
    throughput_max_rate: float = 1500.0
    throughput_max_steps: int = 14
    throughput_refine_steps: int = 2
    overhead_rate: float | None = None
    overhead_default_rate: float = 50.0
    overhead_duration_s: float = 25.0
    overhead_profile: Profile = FIXED_200MS
    # Scenario 2 also runs difyq on an app with every limit set (none binding), the Redis ceiling with limits.
    overhead_limits: bool = True
    # The realistic latency scenario: a 2 s Dify at half of the workers' capacity (unless a rate is given).
    latency_dify_s: float = 2.0
    latency_rate: float | None = None
    latency_duration_s: float = 30.0
    idle_seconds: float = 10.0
    trace_jobs: int = 150
    inflight_modes: list[InflightMode] = field(default_factory=lambda: [
        InflightMode("difyq", WorkerShape(2, INFLIGHT_SLOTS, gevent=True), [500, 1000, 2000]),
        InflightMode("difyq", WorkerShape(2, INFLIGHT_SLOTS, gevent=False), [2000]),
        InflightMode("bare", WorkerShape(2, INFLIGHT_SLOTS, gevent=True), [2000]),
    ])
    inflight_measure_s: float = 15.0
    inflight_calibrate: bool = True
    warmup_jobs_rate: float = 20.0
    seed: int = 1
    difyq_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            throughput_start=100.0, throughput_factor=1.6, throughput_step_s=2.5, throughput_max_steps=4,
            throughput_refine_steps=0, overhead_duration_s=4.0, latency_duration_s=6.0, idle_seconds=3.0,
            trace_jobs=40,
            inflight_modes=[InflightMode("difyq", WorkerShape(2, 1000, gevent=True), [200]),
                            InflightMode("bare", WorkerShape(2, 1000, gevent=True), [200])],
            inflight_measure_s=3.0, inflight_calibrate=False,
        )


def fixed_latency(seconds: float) -> Profile:
    """A Dify answering in ``seconds`` (unstreamed), for scenario 2."""
    return Profile(f"{seconds * 1000:.0f}ms", ttft_s=seconds, tokens_per_second=0.0, answer_tokens=16)


def _pipeline_options(config: BenchConfig, name: str) -> dict[str, Any]:
    return {"extra_env": config.difyq_env} if name in ("difyq", LIMITED) and config.difyq_env else {}


def warm_up(bench: BenchEnvironment, pipeline: Pipeline, rate: float) -> None:
    """A few jobs end to end: the workers are up, connections and caches are warm. Raises if any is lost."""
    step = run_step(bench, pipeline, rate, 1.5, grace=60.0)
    if step.lost() or not step.submissions:
        logs = "\n".join(f"--- {s.name}\n{s.tail()}" for s in pipeline.services)
        raise RuntimeError(f"{pipeline.name}: warm-up lost {step.lost()} of {len(step.submissions)} jobs "
                           f"({[s.error for s in step.submissions if s.error][:3]})\n{logs}")


def _note_commit(record: dict[str, Any], pipeline: Pipeline) -> None:
    """The difyq source this pipeline ran (a run can span commits when others commit meanwhile)."""
    if isinstance(pipeline, DifyqPipeline):
        record["difyq_commit"] = pipeline.commit


def _slim(step: dict[str, Any]) -> dict[str, Any]:
    """A step record without the per-command breakdowns (kept only where they are the point)."""
    cost = {key: value for key, value in step["cost"].items() if not isinstance(value, dict)}
    return {**step, "cost": cost}


def _passed(step: StepData) -> bool:
    return step.lost() == 0 and summary(step.e2e())["p99"] < P99_GOAL_S * 1000 and step.pace() >= PACE_FLOOR


def throughput(bench: BenchEnvironment, config: BenchConfig) -> dict[str, Any]:
    """Scenario 1: the highest offered rate each pipeline sustains: no job lost, p99 end-to-end under 1 s and
    completions keeping pace with arrivals.

    The pipelines run side by side (each in its own Redis keys; an idle one costs about 0.01 cores) and their
    searches take turns, one step each: the machine's speed drifts by tens of percent over minutes, and searches
    run one after the other measured each pipeline on a different machine."""
    results: dict[str, Any] = {"profile": vars(ZERO_LATENCY), "shape": config.shape.label(),
                               "p99_goal_ms": P99_GOAL_S * 1000, "interleaved": True, "pipelines": {}}
    with bench.emulating(ZERO_LATENCY), contextlib.ExitStack() as running:
        bench.client.flushall()
        pipelines = [running.enter_context(bench.pipeline(name, config.shape, flush=False,
                                                          **_pipeline_options(config, name)))
                     for name in config.pipelines]
        searches = []
        for pipeline in pipelines:
            warm_up(bench, pipeline, config.warmup_jobs_rate)
            searches.append(ThroughputSearch(bench, pipeline, config))
        turns = [search.turns() for search in searches]
        while turns:
            turns = [turn for turn in turns if next(turn, None) is not None]
        for search in searches:
            results["pipelines"][search.pipeline.name] = search.result()
            _note_commit(results["pipelines"][search.pipeline.name], search.pipeline)
    return results


class ThroughputSearch:
    """Raise the offered rate by ``throughput_factor`` until a step fails, then bisect (geometrically) between the
    last pass and the first failure ``throughput_refine_steps`` times."""

    def __init__(self, bench: BenchEnvironment, pipeline: Pipeline, config: BenchConfig) -> None:
        self.bench = bench
        self.pipeline = pipeline
        self.config = config
        self.steps: list[dict[str, Any]] = []
        self.passed: list[float] = []
        self.drained = True

    def attempt(self, rate: float) -> bool:
        config = self.config
        step = run_step(self.bench, self.pipeline, rate, config.throughput_step_s,
                        grace=max(10.0, config.throughput_step_s), seed=config.seed + len(self.steps))
        ok = _passed(step)
        record = _slim(step.describe())
        record["passed"] = ok
        self.steps.append(record)
        print(f"  [throughput] {self.pipeline.name} {rate:7.1f}/s -> {record['achieved_rate']:7.1f}/s "
              f"p99 {record['e2e_ms']['p99']:.0f} ms pace {record['pace']:.3f} lost {record['lost']} "
              f"{'pass' if ok else 'FAIL'}", flush=True)
        if not ok:
            self.drained = _drain(self.bench, step)
        return ok

    def turns(self) -> Iterator[float]:
        """The search, one step per ``next``: each yields the rate it offered."""
        passed = self.passed
        failed: float | None = None
        rate = self.config.throughput_start
        while rate <= self.config.throughput_max_rate and len(self.steps) < self.config.throughput_max_steps:
            ok = self.attempt(rate)
            yield rate
            if not ok:
                failed = rate
                break
            passed.append(rate)
            rate *= self.config.throughput_factor
        for _ in range(self.config.throughput_refine_steps):
            if not (passed and failed and self.drained and failed / passed[-1] > 1.04):
                break
            middle = math.sqrt(passed[-1] * failed)
            ok = self.attempt(middle)
            yield middle
            if ok:
                passed.append(middle)
            else:
                failed = middle

    def result(self) -> dict[str, Any]:
        return {"max_sustained_rate": round(max(self.passed), 1) if self.passed else 0.0, "steps": self.steps}


def _drain(bench: BenchEnvironment, step: StepData, timeout: float = 30.0) -> bool:
    """After a failed step, wait for its backlog so the next step starts on an empty queue."""
    ids = {s.job_id for s in step.submissions if s.job_id is not None}
    return ids.issubset(bench.sink.wait_for(ids, timeout=timeout).keys())


def overhead(bench: BenchEnvironment, config: BenchConfig, rate: float, profile: Profile | None = None,
             cost: bool = True, duration: float | None = None) -> dict[str, Any]:
    """Scenarios 2 and 4: what each pipeline adds to a Dify call (200 ms unless the config says otherwise) at
    ``rate`` jobs/s, and (``cost``) what a job costs: CPU, Redis CPU and commands, the time Redis spends in each
    script (``ScriptTimes``), round trips (``CommandTrace``), for difyq also on an app with limits."""
    profile = profile or config.overhead_profile
    results: dict[str, Any] = {"profile": vars(profile), "shape": config.shape.label(), "rate": rate,
                               "pipelines": {}}
    names = [*config.pipelines]
    if cost and config.overhead_limits and "difyq" in names:
        names.insert(names.index("difyq") + 1, LIMITED)
    with bench.emulating(profile):
        for name in names:
            with bench.pipeline(name, config.shape, **_pipeline_options(config, name)) as pipeline:
                warm_up(bench, pipeline, config.warmup_jobs_rate)
                step = run_step(bench, pipeline, rate, duration or config.overhead_duration_s, grace=30.0,
                                seed=config.seed)
                record = step.describe()
                record["overhead_ms_cdf"] = cdf(step.overhead())
                record["submit_ms_cdf"] = cdf(step.submit_latency())
                if isinstance(pipeline, DifyqPipeline):
                    record["phases_ms"] = phase_breakdown(step, pipeline)
                if cost:
                    _measure_cost(bench, pipeline, rate, config, record)
                else:
                    record["idle"] = _idle_cost(bench, pipeline, config.idle_seconds)
                _note_commit(record, pipeline)
                results["pipelines"][name] = record
                print(f"  [{'overhead' if cost else 'latency'}] {name} at {rate:.1f}/s: overhead p50 "
                      f"{record['overhead_ms']['p50']:.1f} ms p99 {record['overhead_ms']['p99']:.1f} ms, submit p50 "
                      f"{record['submit_ms']['p50']:.1f} ms p99 {record['submit_ms']['p99']:.1f} ms, cpu "
                      f"{record['cost']['cpu_ms_per_job']:.2f} ms/job, redis cpu "
                      f"{record['cost']['redis_cpu_ms_per_job']:.3f} ms/job", flush=True)
    return results


def _measure_cost(bench: BenchEnvironment, pipeline: Pipeline, rate: float, config: BenchConfig,
                  record: dict[str, Any]) -> None:
    """Two short windows after the measured step: Redis's time per script (the slow log) and the round trips
    (MONITOR); each costs Redis a little per command, so neither runs during the measured step."""
    seconds = config.trace_jobs / rate
    with ScriptTimes(bench.redis.url) as times:
        timed = run_step(bench, pipeline, rate, seconds, grace=30.0, seed=config.seed + 98)
    record["script_times"] = times.per_job(timed.completed())
    with CommandTrace(bench.redis.url) as trace:
        traced = run_step(bench, pipeline, rate, seconds, grace=30.0, seed=config.seed + 99)
    record["trace"] = trace.per_job(traced.completed())


def _idle_cost(bench: BenchEnvironment, pipeline: Pipeline, seconds: float) -> dict[str, Any]:
    """What the pipeline's workers cost Redis with nothing to do, per second: the price of their waiting for work
    (polls, or blocked waits), which every idle worker process of a fleet pays."""
    before = bench.snapshot(pipeline)
    time.sleep(seconds)
    idle = cost_between(before, bench.snapshot(pipeline), 0)
    per_s = {name: count / idle["seconds"] for name, count in idle["redis_commands"].items()}
    return {"seconds": idle["seconds"], "redis_cpu_ms_per_s": 1000 * idle["redis_cores"],
            "redis_commands_per_s": sum(per_s.values()), "redis_commands": per_s,
            "pipeline_cpu_ms_per_s": 1000 * idle["pipeline_cores"]}


def realistic_latency(bench: BenchEnvironment, config: BenchConfig) -> dict[str, Any]:
    """What each pipeline adds to a 2 s Dify answer offered at half of the workers' capacity (their slots / 2 s):
    the load real apps put on a worker, where an idle consumer's wait for work shows."""
    profile = fixed_latency(config.latency_dify_s)
    rate = config.latency_rate or config.shape.processes * config.shape.threads / config.latency_dify_s / 2
    return overhead(bench, config, rate, profile, cost=False, duration=config.latency_duration_s)


def inflight(bench: BenchEnvironment, config: BenchConfig) -> dict[str, Any]:
    """Scenario 3: C jobs in flight on 10 s streams, throughput against Little's-law bound, memory."""
    answer_s = STREAM_10S.nominal_s
    results: dict[str, Any] = {"profile": vars(STREAM_10S), "answer_s": answer_s, "modes": []}
    with bench.emulating(STREAM_10S) as emulator:
        top = max((level for mode in config.inflight_modes for level in mode.levels), default=0)
        if top and config.inflight_calibrate:
            alone = asyncio.run(emulator_alone("127.0.0.1", emulator.port, DIFY_KEY, top / answer_s,
                                               answer_s + config.inflight_measure_s))
            emulator.take_calls()
            results["emulator_alone"] = {"concurrency": top, "answer_ms": summary(alone),
                                         "best_ratio": answer_s / (summary(alone, 1.0)["p50"] or answer_s)}
            print(f"  [inflight] emulator alone at C={top}: answer p50 {summary(alone, 1.0)['p50']:.2f} s", flush=True)
        for mode in config.inflight_modes:
            if mode.pipeline not in config.pipelines:
                continue
            levels: list[dict[str, Any]] = []
            with bench.pipeline(mode.pipeline, mode.shape, **_pipeline_options(config, mode.pipeline)) as pipeline:
                warm_up(bench, pipeline, config.warmup_jobs_rate)
                commit = getattr(pipeline, "commit", None)
                idle_memory = tree_memory(pipeline.worker_pids())
                for concurrency in mode.levels:
                    levels.append(_inflight_level(bench, pipeline, concurrency, answer_s, config))
                    level = levels[-1]
                    print(f"  [inflight] {mode.label()} C={concurrency}: {level['throughput']:.1f}/s of "
                          f"{level['little_bound']:.1f}/s ({level['ratio']:.2f}), at Dify "
                          f"{level['dify_in_flight']['mean']:.0f}, PSS {level['worker_memory']['pss_mib']:.0f} MiB, "
                          f"lost {level['lost']}", flush=True)
            results["modes"].append({"pipeline": mode.pipeline, "shape": mode.shape.label(), "label": mode.label(),
                                     "idle_worker_memory": idle_memory, "levels": levels,
                                     **({"difyq_commit": commit} if commit else {})})
    return results


def _inflight_level(bench: BenchEnvironment, pipeline: Pipeline, concurrency: int, answer_s: float,
                    config: BenchConfig) -> dict[str, Any]:
    rate = concurrency / answer_s
    duration = answer_s + config.inflight_measure_s
    peak: dict[str, float] = {"rss_mib": 0.0, "pss_mib": 0.0, "processes": 0}
    depths: list[int] = []

    async def sample_memory() -> None:
        await asyncio.sleep(answer_s * 0.8)
        while True:
            now = await asyncio.to_thread(tree_memory, pipeline.worker_pids())
            for key in ("rss_mib", "pss_mib", "processes"):
                peak[key] = max(peak[key], now[key])
            depths.append(await asyncio.to_thread(bench.queue_depth, pipeline))
            await asyncio.sleep(2.0)

    step = run_step(bench, pipeline, rate, duration, grace=answer_s + 40.0, seed=config.seed, poisson=False,
                    during=sample_memory)
    start = min(s.intended for s in step.submissions) + answer_s + 1.0
    end = max(s.intended for s in step.submissions)
    window = max(end - start, 1e-9)
    done = sum(1 for t in step.arrivals.values() if start <= t < end)
    calls = list(step.dify_calls.values())
    measured_answer = summary([e - b for b, e in calls], scale=1.0)["p50"]
    throughput = done / window
    bound = concurrency / answer_s
    in_system = [(s.intended, step.arrivals.get(s.job_id or "", math.inf)) for s in step.submissions]
    record = _slim(step.describe())
    record.update({
        "concurrency": concurrency,
        "window_s": round(window, 2),
        "throughput": throughput,
        "little_bound": bound,
        "ratio": throughput / bound if bound else 0.0,
        "answer_s": answer_s,
        "answer_s_measured_p50": measured_answer,
        "dify_in_flight": in_flight(calls, start, end),
        "in_system": in_flight(in_system, start, end),
        "worker_memory": peak,
        "queued_max": max(depths, default=0),
    })
    return record
