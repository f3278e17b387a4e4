"""In flight per host: how many streamed Dify calls one worker host keeps going, and what each one costs in memory.

Dify answers stream for 10 s (first token at 1 s, then one a second) and for 60 s (first token at 5 s, then one
every 5 s), served by the light stream source (``stream_source.py``; ``difyq emulator`` would itself be the limit
at these concurrencies). For each concurrency C the open-loop rate is C / the answer's nominal time (uniform), so
Little's law says C jobs are in flight; the steady-state throughput divided by that bound (C / nominal: a
source slowed by a saturated machine does not lower the bar) says whether the pipeline keeps them all going.
A ramp stops at the first level below ``GOAL_RATIO``, after one more level between it and the last that held: the
knee. Per level: calls open at the source (mean), worker
memory (RSS, and PSS summed over the worker processes: PSS splits the pages a fork shares) and memory per job in
flight ((PSS at the level - PSS idle) / calls open). The source alone (a near-free asyncio client, no pipeline) is
measured at the top 10 s concurrency first, to show it is not what limits.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.loadgen import emulator_alone
from tests.bench.measure import in_flight, phase_breakdown, run_step, summary
from tests.bench.profile_run import py_spy, tally
from tests.bench.scenarios import BenchConfig, note_commit, pipeline_options, slim, warm_up
from tests.bench.stack import DIFY_KEY, BenchEnvironment, DifyqPipeline, Pipeline, Profile, WorkerShape, tree_memory

STREAM_10S = Profile("10s-stream", ttft_s=1.0, tokens_per_second=1.0, answer_tokens=10)
STREAM_60S = Profile("60s-stream", ttft_s=5.0, tokens_per_second=0.2, answer_tokens=12)
GOAL_CONCURRENCY = 10_000
GOAL_RATIO = 0.9
GOAL_PSS_MIB = 2048.0
# One host's workers: 4 gevent processes whose greenlets are sized to each level, 10 % above C in all. Answers
# that end a little late (a loaded box) keep a few more than C in flight, and with exactly C slots the slots, not
# the pipeline, would cap the ratio; many more than C cost CPU for nothing: an idle Dramatiq worker thread wakes
# every ``dramatiq_worker_timeout`` (1 s), and 10,000 idle greenlets took a third of the workers' samples at
# C=1,000. Four processes of 2,750 held 10,000 streams open where two of 5,500 held about 6,000 on the same box:
# each process has one Dramatiq consumer (fetch and acks) sharing its hub with every greenlet.
PROCESSES = 4
SLOT_HEADROOM = 1.1
# A warm-up waits for its jobs' answers: for longer answers the level's own first answer time is the warm-up (the
# throughput is counted only from one answer time after the first submit).
WARM_UP_MAX_ANSWER_S = 15.0


@dataclass
class InflightMode:
    """One pipeline and the concurrency levels to try on it, lowest first; each level gets its own worker of
    ``processes`` gevent processes with ``SLOT_HEADROOM`` x C greenlets in all."""

    pipeline: str
    levels: list[int]
    processes: int = PROCESSES

    def shape(self, concurrency: int) -> WorkerShape:
        return WorkerShape(self.processes, math.ceil(SLOT_HEADROOM * concurrency / self.processes), gevent=True)

    def label(self) -> str:
        return f"{self.pipeline} {self.processes} gevent processes"


@dataclass
class InflightRun:
    """One answer profile and the modes measured on it."""

    profile: Profile
    modes: list[InflightMode]
    measure_s: float


@dataclass
class InflightConfig:
    """The in-flight scenario's knobs; ``quick()`` is the smoke-run variant."""

    profile_s: float = 15.0
    runs: list[InflightRun] = field(default_factory=lambda: [
        InflightRun(STREAM_10S, [InflightMode("difyq", [2000, 4000, 6000, 8000, GOAL_CONCURRENCY]),
                                 InflightMode("bare", [2000])], measure_s=10.0),
        InflightRun(STREAM_60S, [InflightMode("difyq", [GOAL_CONCURRENCY])], measure_s=20.0),
    ])
    source_alone_concurrency: int = GOAL_CONCURRENCY

    @classmethod
    def quick(cls) -> InflightConfig:
        return cls(runs=[InflightRun(STREAM_10S, [InflightMode("difyq", [200], 2), InflightMode("bare", [200], 2)],
                                     measure_s=3.0)], source_alone_concurrency=0, profile_s=0.0)


def source_alone(bench: BenchEnvironment, concurrency: int, measure_s: float) -> dict[str, Any]:
    """The stream source with no pipeline: ``concurrency`` 10 s streams from a near-free client."""
    with bench.streaming(STREAM_10S) as source:
        answer_s = STREAM_10S.nominal_s
        durations = asyncio.run(emulator_alone("127.0.0.1", source.port, DIFY_KEY, concurrency / answer_s,
                                               answer_s + measure_s))
        stats = source.stats()
        source.take_calls()
    answers = summary(durations, 1.0)
    record = {"concurrency": concurrency, "answer_s": answers, "max_open": stats["max_open"],
              "calls": stats["calls"], "best_ratio": answer_s / (answers["p50"] or answer_s)}
    print(f"  [inflight] stream source alone at C={concurrency}: {stats['max_open']} open at most, answer p50 "
          f"{answers['p50']:.2f} s p99 {answers['p99']:.2f} s", flush=True)
    return record


def run(bench: BenchEnvironment, config: BenchConfig, inflight: InflightConfig) -> dict[str, Any]:
    """Every run's modes, each mode's levels until one falls below ``GOAL_RATIO``."""
    results: dict[str, Any] = {"goal": {"concurrency": GOAL_CONCURRENCY, "ratio": GOAL_RATIO,
                                        "pss_mib": GOAL_PSS_MIB}, "runs": []}
    if inflight.source_alone_concurrency:
        results["source_alone"] = source_alone(bench, inflight.source_alone_concurrency, 10.0)
    for spec in inflight.runs:
        answer_s = spec.profile.nominal_s
        modes: list[dict[str, Any]] = []
        with bench.streaming(spec.profile):
            for mode in spec.modes:
                if mode.pipeline in config.pipelines:
                    modes.append(_mode(bench, config, mode, answer_s, spec.measure_s, inflight.profile_s))
        results["runs"].append({"profile": vars(spec.profile), "answer_s": answer_s, "modes": modes})
    return results


def _mode(bench: BenchEnvironment, config: BenchConfig, mode: InflightMode, answer_s: float,
          measure_s: float, profile_s: float) -> dict[str, Any]:
    """The mode's levels, lowest first, until one falls below ``GOAL_RATIO`` (or loses a job); then one level
    between it and the last that held, or below it when none held (``refinement``), so the knee is known to within
    a step of about 1.2x on a slow day and a fast one alike. The levels are recorded lowest first; only the top one
    keeps its profile."""
    levels: list[dict[str, Any]] = []
    held = 0
    for concurrency in mode.levels:
        level = _mode_level(bench, config, mode, concurrency, answer_s, measure_s, profile_s)
        levels.append(level)
        if level["ratio"] >= GOAL_RATIO and not level["lost"]:
            held = concurrency
            continue
        between = refinement(held, concurrency)
        if between is not None:
            levels.append(_mode_level(bench, config, mode, between, answer_s, measure_s, profile_s))
        break
    levels.sort(key=lambda level: level["concurrency"])
    for level in levels[:-1]:
        level.pop("worker_profile", None)
    return {"pipeline": mode.pipeline, "label": mode.label(), "levels": levels}


def refinement(held: int, failed: int) -> int | None:
    """The level between one that held and the next, which did not: their geometric mean to the nearest 500, when
    that lies strictly between them (None when they are too close). When the lowest level failed, half of it (to
    the 500 below; None under 500): a slow host still reports the level it holds rather than none."""
    if held <= 0:
        return failed // 2 // 500 * 500 or None
    middle = int(round(math.sqrt(held * failed) / 500) * 500)
    return middle if held < middle < failed else None


def _mode_level(bench: BenchEnvironment, config: BenchConfig, mode: InflightMode, concurrency: int, answer_s: float,
                measure_s: float, profile_s: float) -> dict[str, Any]:
    """One level of ``mode`` on a worker started for it."""
    shape = mode.shape(concurrency)
    with bench.pipeline(mode.pipeline, shape, **pipeline_options(config, mode.pipeline)) as pipeline:
        if answer_s <= WARM_UP_MAX_ANSWER_S:
            warm_up(bench, pipeline, config.warmup_jobs_rate)
        idle = tree_memory(pipeline.worker_pids())
        level = _level(bench, pipeline, concurrency, answer_s, measure_s, config.seed,
                       profile_s if mode.pipeline == "difyq" else 0.0)
        note_commit(level, pipeline)
    open_calls = level["dify_in_flight"]["mean"]
    level["shape"] = shape.label()
    level["idle_worker_memory"] = idle
    level["pss_kib_per_job"] = ((level["worker_memory"]["pss_mib"] - idle["pss_mib"]) * 1024 / open_calls
                                if open_calls else None)
    print(f"  [inflight] {mode.pipeline} {shape.label()} {answer_s:.0f} s C={concurrency}: "
          f"{level['throughput']:.1f}/s of {level['little_bound']:.1f}/s ({level['ratio']:.2f}), at Dify "
          f"{open_calls:.0f}, PSS {level['worker_memory']['pss_mib']:.0f} MiB "
          f"({level['pss_kib_per_job'] or 0:.0f} KiB/job), lost {level['lost']}, other load "
          f"{level['cost']['other_load_cores']:.2f}", flush=True)
    return level


def _record_profile(pid: int, delay_s: float, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on the worker's process tree for ``seconds``, from ``delay_s`` on (None: py-spy is missing)."""
    spy = py_spy()
    if spy is None:
        return None
    threading.Event().wait(delay_s)
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "100",
                             "--duration", str(int(seconds)), "--format", "raw", "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _level(bench: BenchEnvironment, pipeline: Pipeline, concurrency: int, answer_s: float, measure_s: float,
           seed: int, profile_s: float) -> dict[str, Any]:
    """One concurrency level; with ``profile_s``, the workers' py-spy profile over that much of the measured
    window is its ``worker_profile`` (the shares of samples by package and by function)."""
    rate = concurrency / answer_s
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

    output = Path(tempfile.mkstemp(prefix="inflight-", suffix=".txt", dir=bench.log_dir)[1])
    spy: list[subprocess.Popen[bytes] | None] = []
    if profile_s:
        threading.Thread(target=lambda: spy.append(_record_profile(
            pipeline.worker_pids()[0], answer_s + 1.0, min(profile_s, measure_s), output)), daemon=True).start()
    step = run_step(bench, pipeline, rate, answer_s + measure_s, grace=answer_s + 40.0, seed=seed, poisson=False,
                    during=sample_memory)
    if spy and spy[0] is not None:
        spy[0].wait()
    start = min(s.intended for s in step.submissions) + answer_s + 1.0
    end = max(s.intended for s in step.submissions)
    window = max(end - start, 1e-9)
    done = sum(1 for t in step.arrivals.values() if start <= t < end)
    calls = list(step.dify_calls.values())
    throughput = done / window
    in_system = [(s.intended, step.arrivals.get(s.job_id or "", math.inf)) for s in step.submissions]
    record = slim(step.describe())
    record.update({
        "concurrency": concurrency,
        "window_s": round(window, 2),
        "throughput": throughput,
        "little_bound": rate,
        "ratio": throughput / rate,
        "answer_s": answer_s,
        "answer_s_measured_p50": summary([e - b for b, e in calls], scale=1.0)["p50"],
        "dify_in_flight": in_flight(calls, start, end),
        "in_system": in_flight(in_system, start, end),
        "worker_memory": peak,
        "queued_max": max(depths, default=0),
    })
    if isinstance(pipeline, DifyqPipeline):
        record["phases_ms"] = phase_breakdown(step, pipeline)
    if output.stat().st_size:
        record["worker_profile"] = tally(output).shares()
    return record
