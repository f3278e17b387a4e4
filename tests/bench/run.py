"""``make bench``: run the benchmark scenarios and write ``tests/bench/results/`` (latest.json, latest.md, PNGs).

    .venv/bin/python -m tests.bench.run                      # everything, about 20 minutes on 2 cores
    .venv/bin/python -m tests.bench.run --quick              # a smoke run of every scenario, about 6 minutes
    .venv/bin/python -m tests.bench.run --scenario overhead --overhead-rate 60
    .venv/bin/python -m tests.bench.run --difyq-src /tmp/difyq-try --out /tmp/bench-try   # try a change

A partial run (``--scenario``) writes ``partial.json``/``partial.md`` unless ``--out`` is given, so the committed
``latest.*`` always come from a full run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from tests.bench import inflight, ratelimit, report, scaleout, scenarios
from tests.bench.scenarios import BenchConfig
from tests.bench.stack import REPO_ROOT, BenchEnvironment, WorkerShape, source_commit

RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("throughput", "overhead", "latency", "inflight", "scaleout", "ratelimit", "cost", "limits", "fairness",
             "console", "durable_submit")
# ``make bench`` measures the rate limits over 2 minutes (20 minutes in all would not hold 2 x 5); ``make soak``
# over the full 5.
RATELIMIT_MINUTES = 2


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()}",
        "load_before": ", ".join(f"{value:.2f}" for value in os.getloadavg()),
    }


def _run_script(name: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``tests/bench/{name}`` on its own embedded Redis; its last line of output is one JSON object."""
    script = Path(__file__).resolve().parent / name
    if not script.exists():
        return {"error": f"tests/bench/{name} does not exist"}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("REDIS_URL", None)
    try:
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    try:
        return json.loads((done.stdout.strip().splitlines() or ["no output"])[-1])
    except ValueError:
        return {"error": f"tests/bench/{name} did not end its output with one line of JSON"}


def run_limits(quick: bool) -> dict[str, Any]:
    """The rate-limiter benchmark (tests/bench/bench_limits.py), as an extra section."""
    return _run_script("bench_limits.py", ["--window", "2", "--windows", "2"] if quick else [], 120)


def run_fairness(quick: bool) -> dict[str, Any]:
    """Tenant B's wait at a saturated key while tenant A has a backlog, fair and not (tests/bench/bench_fairness.py)."""
    return _run_script("bench_fairness.py", ["--backlog", "300", "--b-jobs", "4"] if quick else [], 120)


def run_console(quick: bool) -> dict[str, Any]:
    """The console's page weight and time to render over 100,000 jobs (tests/bench/bench_console.py)."""
    return _run_script("bench_console.py", ["--jobs", "5000", "--loads", "3"] if quick else [], 600)


def run_durable_submit(quick: bool) -> dict[str, Any]:
    """Submit latency with redis.durable_submit off and on (tests/bench/bench_durable_submit.py)."""
    return _run_script("bench_durable_submit.py", ["--rates", "100", "--seconds", "3"] if quick else ["--seconds", "6"],
                       300)


def timed(durations: dict[str, float], name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A scenario's or section's results; the seconds it took go to ``durations`` (the results' ``durations_s``:
    what ``make bench``'s 20 minutes go to)."""
    began = time.monotonic()
    result = measure()
    durations[name] = round(time.monotonic() - began, 1)
    return result


def build_config(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig.quick() if args.quick else BenchConfig()
    if args.pipelines:
        config.pipelines = args.pipelines.split(",")
    if args.processes or args.threads:
        config.shape = WorkerShape(args.processes or config.shape.processes, args.threads or config.shape.threads)
    if args.step_seconds:
        config.throughput_step_s = args.step_seconds
    if args.start_rate:
        config.throughput_start = args.start_rate
    if args.overhead_rate:
        config.overhead_rate = args.overhead_rate
    if args.dify_latency is not None:
        config.overhead_profile = scenarios.fixed_latency(args.dify_latency)
    if args.overhead_seconds:
        config.overhead_duration_s = args.overhead_seconds
    if args.latency_rate:
        config.latency_rate = args.latency_rate
    if args.latency_seconds:
        config.latency_duration_s = args.latency_seconds
    for item in args.difyq_env:
        name, _, value = item.partition("=")
        config.difyq_env[name] = value
    return config


def _other_load(results: dict[str, Any]) -> float | None:
    """The mean load from processes outside the bench over all measured steps, in cores."""
    values: list[float] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            cost = node.get("cost")
            if isinstance(cost, dict) and "other_load_cores" in cost:
                values.append(cost["other_load_cores"])
            for child in node.values():
                collect(child)
        elif isinstance(node, list):
            for child in node:
                collect(child)

    collect(results["scenarios"])
    return sum(values) / len(values) if values else None


def _finite(node: Any) -> Any:
    """JSON has no infinity: an infinite latency (a job that never finished) is written as null."""
    if isinstance(node, dict):
        return {key: _finite(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_finite(value) for value in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def merged(previous: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """``previous`` (a latest.json) with the scenarios and sections ``fresh`` measured again in their place; each
    scenario keeps the run it came from (``run``: when, the load before it, difyq's commit)."""
    earlier = {"started_at": previous["started_at"], "load_before": previous["machine"]["load_before"],
               "difyq_commit": previous["difyq_commit"]}
    scenarios = {name: {"run": earlier, **scenario} for name, scenario in previous["scenarios"].items()}
    scenarios.update(fresh["scenarios"])
    again = ", ".join(sorted(fresh["scenarios"]) + [name for name in ("limits", "console", "durable_submit")
                                                    if name in fresh])
    result = {**previous, **{key: fresh[key] for key in ("limits", "console", "durable_submit") if key in fresh},
              "scenarios": scenarios, "durations_s": {**previous.get("durations_s", {}), **fresh["durations_s"]},
              "finished_at": fresh["finished_at"],
              "mode": f"{previous['mode']}; {again} measured again {fresh['started_at'][:16]}"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only these (repeatable); default: all. 'cost' is measured within 'overhead'")
    parser.add_argument("--quick", action="store_true", help="short steps and few levels: a smoke run (about 6 min)")
    parser.add_argument("--pipelines", help="comma-separated subset of difyq,bare,celery")
    parser.add_argument("--processes", type=int, help="worker processes for scenarios 1 and 2 (default 2)")
    parser.add_argument("--threads", type=int, help="threads per worker process for scenarios 1 and 2 (default 16)")
    parser.add_argument("--step-seconds", type=float, help="length of each throughput step")
    parser.add_argument("--start-rate", type=float, help="first offered rate of the throughput search")
    parser.add_argument("--overhead-rate", type=float, help="jobs/s for scenario 2 (default: half of difyq's max)")
    parser.add_argument("--dify-latency", type=float, metavar="SECONDS",
                        help="the emulator's answer time in scenario 2 (default 0.2)")
    parser.add_argument("--overhead-seconds", type=float, help="length of scenario 2's measured step")
    parser.add_argument("--latency-rate", type=float,
                        help="jobs/s of the realistic-latency scenario (default: half of the workers' capacity)")
    parser.add_argument("--latency-seconds", type=float, help="length of the realistic-latency scenario's step")
    parser.add_argument("--ratelimit-minutes", type=int, help=f"minutes of the rate-limit scenario (default "
                        f"{RATELIMIT_MINUTES}, 1 with --quick)")
    parser.add_argument("--difyq-src", type=Path, default=REPO_ROOT,
                        help="run difyq from this source tree (a scratch copy with a change to try)")
    parser.add_argument("--difyq-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for difyq's API and worker, e.g. dramatiq_worker_timeout=10")
    parser.add_argument("--out", type=Path, help="results directory (default tests/bench/results)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (printed path)")
    parser.add_argument("--merge", action="store_true",
                        help="measure the chosen scenarios again into the results directory's latest.* (the other "
                             "scenarios stay as measured; each notes its own run)")
    args = parser.parse_args(argv)

    chosen = set(args.scenario or ("throughput", "overhead", "latency", "inflight", "scaleout", "ratelimit", "limits",
                                   "fairness", "console",
                                   "durable_submit"))
    if "cost" in chosen:
        chosen.add("overhead")
    config = build_config(args)
    full = not args.quick and chosen >= {"throughput", "overhead", "latency", "inflight", "scaleout", "ratelimit"}
    out = args.out or RESULTS
    previous = json.loads((out / "latest.json").read_text()) if args.merge else None
    stem = "latest" if full or args.out or args.merge else "partial"
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="difyq-bench-"))
    started = time.time()
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else ("full" if full else "partial: " + ", ".join(sorted(chosen))),
        "machine": machine(),
        "difyq_commit": source_commit(args.difyq_src),
        "config": {"pipelines": config.pipelines, "shape": config.shape.label(),
                   "difyq_env": config.difyq_env},
        "scenarios": {},
        "durations_s": {},
    }
    durations = results["durations_s"]

    def scenario(name: str, measure: Callable[[], dict[str, Any]]) -> None:
        results["scenarios"][name] = timed(durations, name, measure)

    def section(name: str, measure: Callable[[], dict[str, Any]]) -> None:
        results[name] = timed(durations, name, measure)

    print(f"difyq bench ({results['mode']}); logs in {logs}", flush=True)
    bench = BenchEnvironment(logs, args.difyq_src.resolve())
    try:
        if "throughput" in chosen:
            scenario("throughput", lambda: scenarios.throughput(bench, config))
        if "overhead" in chosen:
            rate = config.overhead_rate
            if rate is None:
                measured = results["scenarios"].get("throughput") or (previous or {}).get("scenarios", {}).get(
                    "throughput", {})
                best = measured.get("pipelines", {}).get("difyq", {})
                rate = best.get("max_sustained_rate", 0) / 2 or config.overhead_default_rate
            scenario("overhead", lambda: scenarios.overhead(bench, config, rate))
        if "latency" in chosen:
            scenario("latency", lambda: scenarios.realistic_latency(bench, config))
        if "inflight" in chosen:
            setup = inflight.InflightConfig.quick() if args.quick else inflight.InflightConfig()
            scenario("inflight", lambda: inflight.run(bench, config, setup))
        if "scaleout" in chosen:
            shapes = scaleout.ScaleoutConfig.quick() if args.quick else scaleout.ScaleoutConfig()
            scenario("scaleout", lambda: scaleout.run(bench, config, shapes))
        if "ratelimit" in chosen:
            minutes = args.ratelimit_minutes or (1 if args.quick else RATELIMIT_MINUTES)
            scenario("ratelimit", lambda: ratelimit.run(bench, config, minutes))
    finally:
        bench.close()
    if "limits" in chosen:
        section("limits", lambda: run_limits(args.quick))
    if "fairness" in chosen:
        section("fairness", lambda: run_fairness(args.quick))
    if "console" in chosen:
        section("console", lambda: run_console(args.quick))
    if "durable_submit" in chosen:
        section("durable_submit", lambda: run_durable_submit(args.quick))
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["duration_s"] = time.time() - started
    run = {"started_at": results["started_at"], "load_before": results["machine"]["load_before"],
           "difyq_commit": results["difyq_commit"]}
    for scenario in results["scenarios"].values():
        scenario.setdefault("run", run)
    if previous is not None:
        results = merged(previous, results)
    results["other_load_cores"] = _other_load(results)
    results["goals"] = report.goals(results)
    figures = report.plots(results, out) if stem == "latest" else []
    (out / f"{stem}.json").write_text(json.dumps(_finite(results), indent=1) + "\n")
    (out / f"{stem}.md").write_text(report.markdown(results, figures))
    print(report.markdown(results, figures), flush=True)
    print(f"wrote {out / stem}.json, {out / stem}.md{', ' if figures else ''}{', '.join(figures)} "
          f"in {results['duration_s']:.0f} s", flush=True)
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
