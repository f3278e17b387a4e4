"""Scale-out: throughput at a 1 s Dify with 1, 2 and 4 worker processes on the same Redis.

Each process runs ``THREADS`` threads, so with 1 s answers it can finish at most ``THREADS`` jobs a second; the
offered load is ``OVERLOAD`` times the slots of all processes, so the slots stay full and the completion rate is
the capacity. Completions per second per process should not fall as processes are added (goal: within 10 % of
the one-process figure): a fall would be a central bottleneck (a shared lock, a hot key, Redis itself). The
bare Dramatiq pipeline runs the same shapes for comparison. What would stop the line is computed from the largest
shape's costs: this host's cores over the CPU per job of every process on it, and one Redis core over Redis's CPU
per job. The answers come from the light stream source (``stream_source.py``), so the emulator costs nothing
that grows with the processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tests.bench.measure import run_step
from tests.bench.scenarios import BenchConfig, note_commit, pipeline_options, slim, warm_up
from tests.bench.stack import BenchEnvironment, Profile, WorkerShape

ANSWER_1S = Profile("1s", ttft_s=1.0, tokens_per_second=0.0, answer_tokens=16)
THREADS = 24
OVERLOAD = 1.25
GOAL_SPREAD = 0.10


@dataclass
class ScaleoutConfig:
    """The process counts to try, the pipelines, and the measured step's length."""

    processes: list[int] = field(default_factory=lambda: [1, 2, 4])
    pipelines: list[str] = field(default_factory=lambda: ["difyq", "bare"])
    step_s: float = 10.0

    @classmethod
    def quick(cls) -> ScaleoutConfig:
        return cls(processes=[1, 2], pipelines=["difyq"], step_s=4.0)


def run(bench: BenchEnvironment, config: BenchConfig, scaleout: ScaleoutConfig) -> dict[str, Any]:
    """Every pipeline at every process count, one after the other on an emptied Redis."""
    results: dict[str, Any] = {"profile": vars(ANSWER_1S), "threads": THREADS, "overload": OVERLOAD,
                               "goal_spread": GOAL_SPREAD, "pipelines": {}}
    with bench.streaming(ANSWER_1S):
        for name in scaleout.pipelines:
            if name not in config.pipelines:
                continue
            steps = [_shape(bench, config, name, processes, scaleout.step_s) for processes in scaleout.processes]
            single = steps[0]["per_process"]
            spread = max(abs(step["per_process"] / single - 1) for step in steps) if single else None
            results["pipelines"][name] = {"steps": steps, "spread": spread, "limit": _limit(steps[-1])}
    return results


def _shape(bench: BenchEnvironment, config: BenchConfig, name: str, processes: int, step_s: float) -> dict[str, Any]:
    shape = WorkerShape(processes, THREADS)
    rate = OVERLOAD * processes * THREADS / ANSWER_1S.nominal_s
    with bench.pipeline(name, shape, **pipeline_options(config, name)) as pipeline:
        warm_up(bench, pipeline, config.warmup_jobs_rate)
        step = run_step(bench, pipeline, rate, step_s, grace=step_s * OVERLOAD + 30.0, seed=config.seed,
                        poisson=False)
        first = min(s.intended for s in step.submissions)
        start, end = first + ANSWER_1S.nominal_s + 1.0, first + step_s
        done = sum(1 for at in step.arrivals.values() if start <= at < end)
        throughput = done / (end - start)
        record = slim(step.describe())
        record.update({"processes": processes, "shape": shape.label(), "throughput": throughput,
                       "per_process": throughput / processes, "slots_per_s": processes * THREADS,
                       "window_s": end - start})
        note_commit(record, pipeline)
    print(f"  [scaleout] {name} {shape.label()}: {throughput:.1f} jobs/s ({throughput / processes:.1f} per process, "
          f"slots {processes * THREADS}/s), cpu {record['cost']['cpu_ms_per_job']:.2f} ms/job, other load "
          f"{record['cost']['other_load_cores']:.2f}", flush=True)
    return record


def _limit(step: dict[str, Any]) -> dict[str, Any]:
    """What stops the line, from one step's costs: this host's cores over the CPU per job of the pipeline's
    processes (API included), and one Redis core over Redis's CPU per job."""
    cost = step["cost"]
    cores = os.cpu_count() or 1
    host = 1000 * cores / cost["cpu_ms_per_job"] if cost["cpu_ms_per_job"] else None
    redis = 1000 / cost["redis_cpu_ms_per_job"] if cost["redis_cpu_ms_per_job"] else None
    return {"host_cores": cores, "host_jobs_per_s": host, "redis_core_jobs_per_s": redis,
            "first": "host CPU" if host is not None and (redis is None or host < redis) else "Redis CPU"}
