"""The benchmark's scenarios on the emulator, each run on every pipeline against the same emulator and sink (the
in-flight, scale-out and rate-limit scenarios have their own modules: ``inflight``, ``scaleout``, ``ratelimit``).

1. ``throughput``: a 0-latency emulator; offered load rises step by step (x ``factor``) until a step fails
   (p99 end-to-end >= 1 s, a callback missing, or completions falling behind), then bisects between the last pass
   and the fail; the result is the highest offered rate that passed. The pipelines run side by side and their
   searches take turns, one step each, so a drifting machine speed weighs on all of them alike.
2. ``overhead``: a 200 ms emulator (``--dify-latency`` sets another) at one fixed rate (half of difyq's throughput
   result when that ran): e2e minus the emulator's own time per job, the submit latency, and for difyq the
   per-phase breakdown from its records, and what its workers cost Redis while idle.
3. ``latency`` (``realistic_latency``): a 2 s emulator at half of the workers' capacity, the pipelines side by side
   in interleaved rounds.
4. ``cost`` (measured inside ``overhead``'s step): CPU seconds of the pipeline's processes and Redis commands
   (INFO commandstats, which counts commands inside Lua scripts too) per job, plus a MONITOR window that splits
   them into round trips and in-script commands.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.bench.floors import hop_floors
from tests.bench.measure import StepData, after_lead, cdf, phase_breakdown, pooled, run_step, summary
from tests.bench.redis_trace import CommandTrace, ScriptTimes
from tests.bench.stack import (
    LIMITED,
    BenchEnvironment,
    DifyqPipeline,
    Pipeline,
    Profile,
    WorkerShape,
    cost_between,
)

ZERO_LATENCY = Profile("0ms", ttft_s=0.0, tokens_per_second=0.0, answer_tokens=16)
FIXED_200MS = Profile("200ms", ttft_s=0.2, tokens_per_second=0.0, answer_tokens=16)
P99_GOAL_S = 1.0
# A throughput step passes only if its completions kept pace with its arrivals (``StepData.pace``). Just past a
# pipeline's capacity an 8 s step can still end with p99 under 1 s while its backlog grows; such steps measured a
# pace of 0.89-0.96, steps below capacity 0.98-1.01.
PACE_FLOOR = 0.97


@dataclass
class BenchConfig:
    """Every knob of a run; ``quick()`` is the smoke-run variant."""

    pipelines: list[str] = field(default_factory=lambda: ["difyq", "bare", "celery"])
    shape: WorkerShape = field(default_factory=WorkerShape)
    throughput_start: float = 150.0
    throughput_factor: float = 1.3
    throughput_step_s: float = 6.0
    throughput_max_rate: float = 1500.0
    throughput_max_steps: int = 14
    throughput_refine_steps: int = 1
    overhead_rate: float | None = None
    overhead_default_rate: float = 50.0
    overhead_duration_s: float = 15.0
    overhead_profile: Profile = FIXED_200MS
    # Scenario 2 also runs difyq on an app with every limit set (none binding), the Redis ceiling with limits.
    overhead_limits: bool = True
    # The realistic latency scenario: a 2 s Dify at half of the workers' capacity (unless a rate is given), measured
    # for ``latency_duration_s`` per pipeline in ``latency_rounds`` interleaved rounds.
    latency_dify_s: float = 2.0
    latency_rate: float | None = None
    latency_duration_s: float = 24.0
    latency_rounds: int = 3
    # Each round's first second is not counted: its pipeline idled through the other pipelines' rounds, and a real
    # worker at this load never idles so long (kept-alive connections closed by the server, for one).
    latency_lead_s: float = 1.0
    idle_seconds: float = 5.0
    trace_jobs: int = 150
    warmup_jobs_rate: float = 20.0
    seed: int = 1
    difyq_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            throughput_start=100.0, throughput_factor=1.6, throughput_step_s=2.5, throughput_max_steps=4,
            throughput_refine_steps=0, overhead_duration_s=4.0, latency_duration_s=6.0, latency_rounds=2,
            idle_seconds=3.0, trace_jobs=40,
        )


def fixed_latency(seconds: float) -> Profile:
    """A Dify answering in ``seconds`` (unstreamed), for scenario 2."""
    return Profile(f"{seconds * 1000:.0f}ms", ttft_s=seconds, tokens_per_second=0.0, answer_tokens=16)


def pipeline_options(config: BenchConfig, name: str) -> dict[str, Any]:
    return {"extra_env": config.difyq_env} if name in ("difyq", LIMITED) and config.difyq_env else {}


def warm_up(bench: BenchEnvironment, pipeline: Pipeline, rate: float) -> None:
    """A few jobs end to end: the workers are up, connections and caches are warm. Raises if any is lost."""
    step = run_step(bench, pipeline, rate, 1.5, grace=60.0)
    if step.lost() or not step.submissions:
        logs = "\n".join(f"--- {s.name}\n{s.tail()}" for s in pipeline.services)
        raise RuntimeError(f"{pipeline.name}: warm-up lost {step.lost()} of {len(step.submissions)} jobs "
                           f"({[s.error for s in step.submissions if s.error][:3]})\n{logs}")


def note_commit(record: dict[str, Any], pipeline: Pipeline) -> None:
    """The difyq source this pipeline ran (a run can span commits when others commit meanwhile)."""
    if isinstance(pipeline, DifyqPipeline):
        record["difyq_commit"] = pipeline.commit


def slim(step: dict[str, Any]) -> dict[str, Any]:
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
        searches = [ThroughputSearch(bench, pipeline, config) for pipeline in side_by_side(bench, config, running)]
        turns = [search.turns() for search in searches]
        while turns:
            turns = [turn for turn in turns if next(turn, None) is not None]
        for search in searches:
            results["pipelines"][search.pipeline.name] = search.result()
            note_commit(results["pipelines"][search.pipeline.name], search.pipeline)
    return results


def side_by_side(bench: BenchEnvironment, config: BenchConfig, running: contextlib.ExitStack) -> list[Pipeline]:
    """Every pipeline of ``config`` started on an empty Redis, each in its own keys, and warmed up; ``running``
    stops them."""
    bench.client.flushall()
    pipelines = [running.enter_context(bench.pipeline(name, config.shape, flush=False,
                                                      **pipeline_options(config, name)))
                 for name in config.pipelines]
    for pipeline in pipelines:
        warm_up(bench, pipeline, config.warmup_jobs_rate)
    return pipelines


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
        record = slim(step.describe())
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


def overhead(bench: BenchEnvironment, config: BenchConfig, rate: float) -> dict[str, Any]:
    """Scenarios 2 and 4: what each pipeline adds to a Dify call (200 ms unless the config says otherwise) at
    ``rate`` jobs/s, and what a job costs: CPU, Redis CPU and commands, the time Redis spends in each script
    (``ScriptTimes``), round trips (``CommandTrace``), for difyq also on an app with limits; then what the
    pipeline's idle workers cost Redis. One pipeline runs at a time, so Redis's figures are its alone."""
    profile = config.overhead_profile
    results: dict[str, Any] = {"profile": vars(profile), "shape": config.shape.label(), "rate": rate,
                               "pipelines": {}}
    names = [*config.pipelines]
    if config.overhead_limits and "difyq" in names:
        names.insert(names.index("difyq") + 1, LIMITED)
    with bench.emulating(profile):
        for name in names:
            with bench.pipeline(name, config.shape, **pipeline_options(config, name)) as pipeline:
                warm_up(bench, pipeline, config.warmup_jobs_rate)
                step = run_step(bench, pipeline, rate, config.overhead_duration_s, grace=30.0, seed=config.seed)
                record = _latency_record(step, pipeline)
                _measure_cost(bench, pipeline, rate, config, record)
                if name != LIMITED:  # the same processes as difyq's: their idle cost is difyq's
                    record["idle"] = _idle_cost(bench, pipeline, config.idle_seconds)
                results["pipelines"][name] = record
                print(f"  [overhead] {name} at {rate:.1f}/s: overhead p50 {record['overhead_ms']['p50']:.1f} ms p99 "
                      f"{record['overhead_ms']['p99']:.1f} ms, submit p50 {record['submit_ms']['p50']:.1f} ms p99 "
                      f"{record['submit_ms']['p99']:.1f} ms, cpu {record['cost']['cpu_ms_per_job']:.2f} ms/job, "
                      f"redis cpu {record['cost']['redis_cpu_ms_per_job']:.3f} ms/job", flush=True)
    return results


def _latency_record(step: StepData, pipeline: Pipeline) -> dict[str, Any]:
    """A measured step as a record, with the CDFs of its added and submit latency and, for difyq, its phases."""
    record = step.describe()
    record["overhead_ms_cdf"] = cdf(step.overhead())
    record["submit_ms_cdf"] = cdf(step.submit_latency())
    if isinstance(pipeline, DifyqPipeline):
        record["phases_ms"] = phase_breakdown(step, pipeline)
    note_commit(record, pipeline)
    return record


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
    """Scenario 3: what each pipeline adds to a 2 s Dify answer offered at half of the workers' capacity (their
    slots / 2 s), the load real apps put on a worker, where an idle consumer's wait for work shows.

    A difference of a millisecond decides this goal, and this machine's speed drifts by more than that within
    minutes (one step of 25 s per pipeline, run one after the other, put difyq's p50 at 3.2 ms in one run and 5.0
    ms in the next, an hour apart). So the pipelines run side by side, as in the throughput search, and take turns
    in ``latency_rounds`` rounds, each round starting with another pipeline and each pipeline's turn led by
    ``latency_lead_s`` not counted. A pipeline's figures come from the jobs of all its rounds together; the rounds'
    own p50 and p99 show the spread. Each pipeline's processes' CPU per job is its own; Redis's is not reported
    here (the other pipelines idle on it meanwhile): scenario 2 has it. Last, the stand-ins' own share of two of
    difyq's phases (``floors.hop_floors``)."""
    profile = fixed_latency(config.latency_dify_s)
    rate = config.latency_rate or config.shape.processes * config.shape.threads / config.latency_dify_s / 2
    rounds = max(config.latency_rounds, 1)
    seconds = config.latency_duration_s / rounds
    lead = config.latency_lead_s
    results: dict[str, Any] = {"profile": vars(profile), "shape": config.shape.label(), "rate": rate,
                               "rounds": rounds, "round_s": seconds, "lead_s": lead, "interleaved": True,
                               "pipelines": {}}
    with bench.emulating(profile), contextlib.ExitStack() as running:
        pipelines = side_by_side(bench, config, running)
        steps: dict[str, list[StepData]] = {pipeline.name: [] for pipeline in pipelines}
        for turn in range(rounds):
            first = turn % len(pipelines)
            for pipeline in pipelines[first:] + pipelines[:first]:
                measured = run_step(bench, pipeline, rate, lead + seconds, grace=30.0, seed=config.seed + turn)
                step = after_lead(measured, lead)
                steps[pipeline.name].append(step)
                added = summary(step.overhead())
                print(f"  [latency] round {turn + 1} {pipeline.name} at {rate:.1f}/s: added p50 {added['p50']:.1f} ms "
                      f"p99 {added['p99']:.1f} ms, submit p99 {summary(step.submit_latency())['p99']:.1f} ms",
                      flush=True)
        results["floors"] = hop_floors(bench, rate, requests=math.ceil(rate * 4), threads=config.shape.threads)
        for pipeline in pipelines:
            mine = steps[pipeline.name]
            record = _latency_record(pooled(mine), pipeline)
            # one span holds the other pipelines' rounds too: rate and pace are the rounds' own
            record["achieved_rate"] = round(min(step.achieved_rate() for step in mine), 2)
            record["pace"] = round(min(step.pace() for step in mine), 3)
            record["rounds"] = [{"overhead_ms": summary(step.overhead()), "submit_ms": summary(step.submit_latency()),
                                 "pace": round(step.pace(), 3), "other_load_cores": step.cost["other_load_cores"]}
                                for step in mine]
            results["pipelines"][pipeline.name] = record
    return results
