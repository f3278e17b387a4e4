"""One measured step: open-loop load at a rate, wait for the callbacks, and turn timestamps into numbers.

Every latency is measured from the job's ``intended`` submit time. ``e2e`` ends at the callback's arrival at the
sink; ``submit`` at the answer to the submit (HTTP 202 for difyq, the enqueue's return for the baselines);
``overhead`` is ``e2e`` minus the emulator's own time for that job's call (its call record, matched by the token
in the query), so what remains is what the pipeline adds. A job whose callback never came counts as infinitely
late: it fails any percentile it reaches.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tests.bench.loadgen import Submission, open_loop
from tests.bench.stack import BenchEnvironment, DifyqPipeline, Pipeline, cost_between

QUANTILES = (50, 90, 99, 99.9)


def summary(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99/p99.9, mean and max of ``values`` (seconds) in milliseconds; infinities stay infinite."""
    if not values:
        return {"n": 0, **{f"p{q:g}": None for q in QUANTILES}, "mean": None, "max": None}
    data = np.asarray(values, dtype=float)
    finite = data[np.isfinite(data)]
    result: dict[str, float | None] = {"n": len(values)}
    for q in QUANTILES:
        value = float(np.percentile(data, q, method="higher"))
        result[f"p{q:g}"] = value * scale if math.isfinite(value) else math.inf
    result["mean"] = float(finite.mean()) * scale if finite.size else None
    result["max"] = float(data.max()) * scale if math.isfinite(float(data.max())) else math.inf
    return result


def cdf(values: list[float], points: int = 200) -> dict[str, list[float]]:
    """An empirical CDF in milliseconds, thinned to about ``points`` points (for the plots)."""
    data = np.sort(np.asarray([v for v in values if math.isfinite(v)], dtype=float)) * 1000
    if not data.size:
        return {"ms": [], "fraction": []}
    index = np.unique(np.linspace(0, data.size - 1, min(points, data.size)).astype(int))
    fraction = (index + 1) / len(values)
    return {"ms": [round(float(v), 3) for v in data[index]], "fraction": [round(float(f), 5) for f in fraction]}


@dataclass
class StepData:
    """The raw outcome of a step: submissions, arrivals, emulator call times, and the cost snapshot diff."""

    rate: float
    duration: float
    submissions: list[Submission]
    arrivals: dict[str, float]
    dify_calls: dict[str, tuple[float, float]]
    cost: dict[str, Any]

    @property
    def accepted(self) -> list[Submission]:
        return [s for s in self.submissions if s.job_id is not None]

    def e2e(self) -> list[float]:
        """Seconds from due to callback for every submission (inf when refused or never called back)."""
        return [self.arrivals[s.job_id] - s.intended if s.job_id in self.arrivals else math.inf
                for s in self.submissions]

    def submit_latency(self) -> list[float]:
        return [s.accepted - s.intended for s in self.submissions if s.accepted is not None]

    def generator_lateness(self) -> list[float]:
        """Seconds from each job's due time to the start of its submit: the load generator's own delay."""
        return [s.sent - s.intended for s in self.submissions if s.sent is not None]

    def dify_time(self, submission: Submission) -> float | None:
        call = self.dify_calls.get(submission.token)
        return call[1] - call[0] if call else None

    def overhead(self) -> list[float]:
        """e2e minus the emulator's own time; jobs without a matching call count as infinitely late."""
        values = []
        for s in self.submissions:
            dify = self.dify_time(s)
            if s.job_id in self.arrivals and dify is not None:
                values.append(self.arrivals[s.job_id] - s.intended - dify)
            else:
                values.append(math.inf)
        return values

    def completed(self) -> int:
        return sum(1 for s in self.submissions if s.job_id in self.arrivals)

    def lost(self) -> int:
        return len(self.submissions) - self.completed()

    def achieved_rate(self) -> float:
        """Callbacks per second over the span from the first due submit to the last callback."""
        times = [self.arrivals[s.job_id] for s in self.submissions if s.job_id in self.arrivals]
        if not times:
            return 0.0
        span = max(times) - min(s.intended for s in self.submissions)
        return len(times) / span if span > 0 else 0.0

    def pace(self) -> float:
        """Callbacks that arrived in the second half of the offered window per job due in it.

        About 1.0 while the pipeline keeps up, whatever its latency (a callback L seconds late stands for a job due L
        seconds earlier); below 1.0 when it completes fewer jobs than arrive, i.e. its backlog grows. A short step
        can end with p99 under a bound while the backlog grows, and that is not a sustained rate."""
        due = [s.intended for s in self.submissions]
        if not due:
            return 0.0
        middle, last = (min(due) + max(due)) / 2, max(due)
        expected = sum(1 for at in due if at >= middle)
        arrived = sum(1 for s in self.submissions if s.job_id in self.arrivals
                      and middle <= self.arrivals[s.job_id] <= last)
        return arrived / expected

    def describe(self) -> dict[str, Any]:
        """The step as a JSON-ready record."""
        errors = [s.error for s in self.submissions if s.error]
        dify = [d for s in self.submissions if (d := self.dify_time(s)) is not None]
        return {
            "offered_rate": round(self.rate, 2),
            "duration_s": self.duration,
            "submitted": len(self.submissions),
            "completed": self.completed(),
            "lost": self.lost(),
            "submit_errors": len(errors),
            "first_errors": errors[:3],
            "achieved_rate": round(self.achieved_rate(), 2),
            "pace": round(self.pace(), 3),
            "e2e_ms": summary(self.e2e()),
            "overhead_ms": summary(self.overhead()),
            "submit_ms": summary(self.submit_latency()),
            "generator_late_ms": summary(self.generator_lateness()),
            "dify_ms": summary(dify),
            "cost": self.cost,
        }


def pooled(steps: list[StepData]) -> StepData:
    """Steps of one pipeline taken as one sample, their jobs together (rounds interleaved with other pipelines').
    The cost keeps what is the pipeline's own, its processes' CPU, and the other load; Redis's figures are left
    out, as other pipelines used the same Redis between the steps."""
    seconds = sum(step.cost["seconds"] for step in steps)
    jobs = sum(step.cost["jobs"] for step in steps)
    pipeline_cpu = sum(step.cost["pipeline_cpu_s"] for step in steps)
    worker_cpu = sum(step.cost["worker_cpu_s"] for step in steps)
    cost = {
        "seconds": seconds,
        "jobs": jobs,
        "pipeline_cpu_s": pipeline_cpu,
        "worker_cpu_s": worker_cpu,
        "cpu_ms_per_job": 1000 * pipeline_cpu / max(jobs, 1),
        "worker_cpu_ms_per_job": 1000 * worker_cpu / max(jobs, 1),
        "pipeline_cores": pipeline_cpu / seconds,
        "other_load_cores": sum(step.cost["other_load_cores"] * step.cost["seconds"] for step in steps) / seconds,
    }
    return StepData(
        rate=steps[0].rate,
        duration=sum(step.duration for step in steps),
        submissions=[submission for step in steps for submission in step.submissions],
        arrivals={job: at for step in steps for job, at in step.arrivals.items()},
        dify_calls={token: call for step in steps for token, call in step.dify_calls.items()},
        cost=cost,
    )


def after_lead(step: StepData, lead_s: float) -> StepData:
    """``step`` without the jobs due in its first ``lead_s`` seconds (its cost still covers them all)."""
    first = min((s.intended for s in step.submissions), default=0.0)
    return replace(step, submissions=[s for s in step.submissions if s.intended >= first + lead_s])


def run_step(
    bench: BenchEnvironment,
    pipeline: Pipeline,
    rate: float,
    duration: float,
    *,
    grace: float,
    seed: int = 1,
    poisson: bool = True,
    during: Callable[[], Awaitable[Any]] | None = None,
) -> StepData:
    """Offer ``rate`` jobs/s for ``duration`` s, then wait up to ``grace`` s after the last submit for callbacks."""
    assert bench.emulator is not None
    before = bench.snapshot(pipeline)
    submissions = asyncio.run(open_loop(pipeline.submitter, rate, duration, poisson=poisson, seed=seed,
                                        during=during))
    ids = {s.job_id for s in submissions if s.job_id is not None}
    arrivals = bench.sink.wait_for(ids, timeout=grace)
    after = bench.snapshot(pipeline)
    calls = {}
    for call in bench.emulator.take_calls():
        query = str((call.get("body") or {}).get("query") or "")
        if call.get("ended_at") and query.startswith("bench job "):
            calls.setdefault(query.removeprefix("bench job "), (call["started_at"], call["ended_at"]))
    pipeline.check_alive()
    return StepData(rate, duration, submissions, arrivals, calls, cost_between(before, after, len(arrivals)))


def phase_breakdown(step: StepData, pipeline: DifyqPipeline) -> dict[str, Any]:
    """Where difyq's time goes per job, from its job records and the emulator's call records (ms):
    ``submit_to_record`` (due time to the record's created_at: HTTP, validation, before the Lua write),
    ``queue_wait`` (created to started: enqueue, fetch, pick-up), ``pre_dify`` (started to the Dify call's start
    at the emulator), ``dify`` (the emulator's own time), ``post_dify`` (the call's end to finished_at, taken just
    before the outcome's script: the stream's end, aggregation), ``callback_hop`` (finished to arrival at the sink:
    the outcome's round trip, which returns the record, then the body, its signature and the POST, all by the job's
    own worker, ``callbacks.first_attempt_inline``)."""
    accepted = {s.job_id: s for s in step.accepted if s.job_id in step.arrivals}
    times = pipeline.job_times(list(accepted))
    phases: dict[str, list[float]] = {name: [] for name in (
        "submit_to_record", "queue_wait", "pre_dify", "dify", "post_dify", "callback_hop")}
    for job_id, (created, started, finished) in times.items():
        submission = accepted[job_id]
        call = step.dify_calls.get(submission.token)
        if call is None:
            continue
        phases["submit_to_record"].append(created - submission.intended)
        phases["queue_wait"].append(started - created)
        phases["pre_dify"].append(call[0] - started)
        phases["dify"].append(call[1] - call[0])
        phases["post_dify"].append(finished - call[1])
        phases["callback_hop"].append(step.arrivals[job_id] - finished)
    return {name: summary(values) for name, values in phases.items()}


def in_flight(intervals: list[tuple[float, float]], start: float, end: float, every: float = 0.25) -> dict[str, float]:
    """Mean and peak number of open (begin, end) intervals sampled every ``every`` s in [start, end)."""
    if end <= start:
        return {"mean": 0.0, "max": 0.0}
    begins = np.sort(np.asarray([b for b, _ in intervals], dtype=float))
    ends = np.sort(np.asarray([e for _, e in intervals], dtype=float))
    samples = np.arange(start, end, every)
    counts = np.searchsorted(begins, samples, side="right") - np.searchsorted(ends, samples, side="right")
    return {"mean": float(counts.mean()), "max": float(counts.max())}
