"""Turn a run's results into the goal table (each figure beside bare's from the same run), the detail tables and
the plots the README shows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tests.bench.scenarios import PACE_FLOOR
from tests.bench.stack import LIMITED

COLORS = {"difyq": "#1f77b4", LIMITED: "#17becf", "bare": "#7f7f7f", "celery": "#2ca02c"}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0 or math.isinf(base) or math.isinf(value):
        return None
    return value / base


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal: difyq's figure, bare's and celery's from the same run, the ratio to bare, the verdict."""
    rows: list[dict[str, Any]] = []
    scenarios = results["scenarios"]
    if "throughput" in scenarios:
        rates = {name: p["max_sustained_rate"] for name, p in scenarios["throughput"]["pipelines"].items()}
        difyq, bare, celery = rates.get("difyq"), rates.get("bare"), rates.get("celery")
        rows.append({"goal": f"Regression guard: max sustained jobs/s: p99 e2e < 1 s, pace ≥ {PACE_FLOOR} (0 ms Dify)",
                     "target": "report (regression guard)", "unit": "jobs/s", "difyq": difyq, "bare": bare,
                     "celery": celery, "ratio": _ratio(difyq, bare), "ok": None})
    if "overhead" in scenarios:
        pipelines = scenarios["overhead"]["pipelines"]
        for key, label, target, limit in (
            ("overhead_ms", "p50", "≤ 5 ms", 5.0), ("overhead_ms", "p99", "≤ 25 ms", 25.0),
            ("submit_ms", "p50", "report", None), ("submit_ms", "p99", "report", None),
        ):
            values = {name: p[key][label] for name, p in pipelines.items()}
            difyq = values.get("difyq")
            what = "added latency (e2e - Dify's own time)" if key == "overhead_ms" else "submit latency (202)"
            rows.append({"goal": f"2. {what} {label} at {scenarios['overhead']['rate']:.0f} jobs/s, "
                                 f"{scenarios['overhead']['profile']['name']} Dify",
                         "target": target, "unit": "ms", "difyq": difyq, "bare": values.get("bare"),
                         "celery": values.get("celery"), "ratio": _ratio(difyq, values.get("bare")),
                         "ok": None if limit is None or difyq is None else difyq <= limit})
        for key, label in (("cpu_ms_per_job", "CPU ms per job (user+sys, all pipeline processes)"),
                           ("redis_commands_per_job", "Redis commands per job (commandstats, incl. in Lua)")):
            values = {name: p["cost"][key] for name, p in pipelines.items()}
            rows.append({"goal": f"4. {label}", "target": "vs bare", "unit": "", "difyq": values.get("difyq"),
                         "bare": values.get("bare"), "celery": values.get("celery"),
                         "ratio": _ratio(values.get("difyq"), values.get("bare")), "ok": None})
        rows.extend(_redis_ceiling_goals(scenarios["overhead"]))
        trips = {name: p["trace"]["round_trips_per_job"] for name, p in pipelines.items()}
        reads = {name: p["cost"].get("redis_round_trips_per_job") for name, p in pipelines.items()}
        for label, values in (("Redis client commands per job (MONITOR; pipelined ones count each)", trips),
                              ("Redis round trips per job (its reads of client requests; a pipeline once)", reads)):
            rows.append({"goal": f"4. {label}", "target": "vs bare", "unit": "", "difyq": values.get("difyq"),
                         "bare": values.get("bare"), "celery": values.get("celery"),
                         "ratio": _ratio(values.get("difyq"), values.get("bare")), "ok": None})
    if "latency" in scenarios:
        rows.extend(_latency_goals(scenarios["latency"]))
    if "inflight" in scenarios:
        rows.extend(_inflight_goals(scenarios["inflight"]))
    if "scaleout" in scenarios:
        rows.extend(_scaleout_goals(scenarios["scaleout"]))
    if "ratelimit" in scenarios:
        rows.extend(_ratelimit_goals(scenarios["ratelimit"]))
    return rows


def _redis_ceiling_goals(overhead: dict[str, Any]) -> list[dict[str, Any]]:
    """Redis's own CPU per job (its process's user+sys over the measured step), difyq with and without limits,
    and the jobs/s one Redis core carries at that cost."""
    pipelines = overhead["pipelines"]
    cpu = {name: p["cost"]["redis_cpu_ms_per_job"] for name, p in pipelines.items()}
    bare, celery = cpu.get("bare"), cpu.get("celery")
    where = f"{overhead['rate']:.0f} jobs/s, {overhead['profile']['name']} Dify"
    rows: list[dict[str, Any]] = []
    for name, label, target, limit in (
        (LIMITED, "app with limits", "≤ 1.3 x bare", 1.3), ("difyq", "app without limits", "vs bare", None),
    ):
        if name not in cpu:
            continue
        ratio = _ratio(cpu[name], bare)
        rows.append({"goal": f"Redis ceiling: Redis CPU ms per job, {label} ({where})", "target": target,
                     "unit": "ms", "difyq": cpu[name], "bare": bare, "celery": celery, "ratio": ratio,
                     "ok": None if limit is None or ratio is None else ratio <= limit})
    per_core = {name: 1000 / value for name, value in cpu.items() if value}
    if LIMITED in per_core:
        rows.append({"goal": "Redis ceiling: jobs/s per Redis core (1000 / Redis CPU ms per job), app with limits",
                     "target": "report", "unit": "jobs/s", "difyq": per_core[LIMITED], "bare": per_core.get("bare"),
                     "celery": per_core.get("celery"), "ratio": _ratio(per_core[LIMITED], per_core.get("bare")),
                     "ok": None})
    return rows


def _latency_goals(latency: dict[str, Any]) -> list[dict[str, Any]]:
    """Added latency and submit latency at a realistic load: below the targets and, at p99, below both baselines."""
    pipelines = latency["pipelines"]
    where = f"{latency['rate']:.0f} jobs/s, {latency['profile']['name']} Dify"
    rows: list[dict[str, Any]] = []
    for key, label, target, limit in (
        ("overhead_ms", "p50", "≤ 5 ms", 5.0), ("overhead_ms", "p99", "≤ 25 ms, < bare, < celery", 25.0),
        ("submit_ms", "p99", "≤ 10 ms", 10.0),
    ):
        values = {name: p[key][label] for name, p in pipelines.items()}
        difyq, bare, celery = values.get("difyq"), values.get("bare"), values.get("celery")
        ok = None if difyq is None else difyq <= limit
        if ok and key == "overhead_ms" and label == "p99":
            ok = all(base is None or difyq < base for base in (bare, celery))
        what = "added latency (e2e - Dify's own time)" if key == "overhead_ms" else "submit latency (202)"
        rows.append({"goal": f"Realistic latency: {what} {label} at {where}", "target": target, "unit": "ms",
                     "difyq": difyq, "bare": bare, "celery": celery, "ratio": _ratio(difyq, bare), "ok": ok})
    return rows


def _row(goal: str, target: str, unit: str, difyq: float | None, bare: float | None, ok: bool | None,
         ) -> dict[str, Any]:
    return {"goal": goal, "target": target, "unit": unit, "difyq": difyq, "bare": bare, "celery": None,
            "ratio": _ratio(difyq, bare), "ok": ok}


def _inflight_goals(inflight: dict[str, Any]) -> list[dict[str, Any]]:
    """In flight: per answer length, the most jobs held at the goal ratio, the ratio and memory at the top level."""
    goal = inflight["goal"]
    rows: list[dict[str, Any]] = []
    alone = inflight.get("source_alone")
    if alone:
        rows.append(_row(f"In flight: stream source alone: streams open at once (C={alone['concurrency']:,}, 10 s)",
                         f"≥ {goal['concurrency']:,}", "streams", alone["max_open"], None,
                         alone["max_open"] >= goal["concurrency"]))
    for run in inflight["runs"]:
        answer = f"{run['answer_s']:.0f} s streams"
        tops = {mode["pipeline"]: mode["levels"][-1] for mode in run["modes"] if mode["levels"]}
        held = {mode["pipeline"]: max((level["concurrency"] for level in mode["levels"]
                                       if level["ratio"] >= goal["ratio"] and not level["lost"]), default=0)
                for mode in run["modes"]}
        if "difyq" not in tops:
            continue
        difyq, bare = tops["difyq"], tops.get("bare")
        same = bare if bare is not None and bare["concurrency"] == difyq["concurrency"] else None
        rows.append(_row(f"In flight: jobs in flight at ≥ {goal['ratio']} of Little's bound, {answer} (gevent)",
                         f"≥ {goal['concurrency']:,}", "jobs", held["difyq"], held.get("bare"),
                         held["difyq"] >= goal["concurrency"]))
        rows.append(_row(f"In flight: throughput ÷ Little's bound at C={difyq['concurrency']:,}, {answer}",
                         f"≥ {goal['ratio']}", "", difyq["ratio"], same["ratio"] if same else None,
                         difyq["ratio"] >= goal["ratio"] and not difyq["lost"]))
        rows.append(_row(f"In flight: worker PSS at C={difyq['concurrency']:,}, {answer}",
                         f"≤ {goal['pss_mib']:,.0f} MiB", "MiB", difyq["worker_memory"]["pss_mib"],
                         same["worker_memory"]["pss_mib"] if same else None,
                         difyq["worker_memory"]["pss_mib"] <= goal["pss_mib"]))
        rows.append(_row(f"In flight: worker PSS per job in flight at C={difyq['concurrency']:,}, {answer}", "report",
                         "KiB", difyq.get("pss_kib_per_job"), same.get("pss_kib_per_job") if same else None, None))
    return rows


def _scaleout_goals(scaleout: dict[str, Any]) -> list[dict[str, Any]]:
    """Scale-out: jobs/s per process at each process count against one process's, and what stops the line."""
    pipelines = scaleout["pipelines"]
    if "difyq" not in pipelines:
        return []
    bare_steps = {step["processes"]: step for step in pipelines.get("bare", {}).get("steps", [])}
    steps = pipelines["difyq"]["steps"]
    single = steps[0]["per_process"]
    rows = []
    for step in steps:
        within = abs(step["per_process"] / single - 1) <= scaleout["goal_spread"] if single else False
        bare = bare_steps.get(step["processes"])
        rows.append(_row(f"Scale-out: jobs/s per process, {step['processes']} process(es) x {scaleout['threads']} "
                         "threads, 1 s Dify", f"within {scaleout['goal_spread']:.0%} of 1 process's", "jobs/s",
                         step["per_process"], bare["per_process"] if bare else None, within))
    limit = pipelines["difyq"]["limit"]
    bare_limit = pipelines.get("bare", {}).get("limit", {})
    rows.append(_row(f"Scale-out: what stops the line first: {limit['first']}; host ceiling "
                     f"({limit['host_cores']} cores ÷ CPU per job)", "report", "jobs/s", limit["host_jobs_per_s"],
                     bare_limit.get("host_jobs_per_s"), None))
    rows.append(_row("Scale-out: jobs/s per Redis core (1 ÷ Redis CPU per job)", "report", "jobs/s",
                     limit["redis_core_jobs_per_s"], bare_limit.get("redis_core_jobs_per_s"), None))
    return rows


def _ratelimit_goals(ratelimit: dict[str, Any]) -> list[dict[str, Any]]:
    """Rate limits: admitted ÷ limit per key at twice the demand, and the most in any 60 s."""
    low, high = ratelimit["goal"]
    rows = []
    for name, label in (("rpm", "requests_per_minute"), ("tpm", "tokens_per_minute")):
        key = ratelimit["keys"].get(name)
        if key is None:
            continue
        ratios = key.get("window_ratios", [])
        rows.append(_row(f"Rate limits: admitted ÷ {label} at {ratelimit['demand_x_limit']:.0f}x demand, "
                         f"{ratelimit['minutes']} min (each minute {low}-{high})", f"{low}-{high}", "",
                         key["ratio"], None, bool(ratios) and all(low <= ratio <= high for ratio in ratios)))
        rows.append(_row(f"Rate limits: most admitted in any 60 s ÷ {label}", f"≤ {high}", "", key.get("max_ratio"),
                         None, key.get("max_ratio") is not None and key["max_ratio"] <= high))
    slots = ratelimit["keys"].get("slots")
    if slots is not None:
        rows.append(_row(f"Rate limits: time calls were open ÷ max_concurrency's ({slots['limit']} slots, 0.2 s calls) "
                         f"at {ratelimit['demand_x_limit']:.0f}x demand", "report", "", slots["ratio"], None, None))
        burst = ratelimit.get("burst")
        if burst is not None:
            rows.append(_row(f"Rate limits: time calls were open ÷ max_concurrency's for a burst of {burst['jobs']} "
                             f"jobs at an unused key ({burst['slots']} slots, 0.2 s calls)", "report", "",
                             burst["ratio"], None, None))
        most = slots.get("max_ratio")
        rows.append(_row("Rate limits: most calls open at once ÷ max_concurrency", f"≤ {high}", "", most, None,
                         most is not None and most <= high))
    return rows


def _commits(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["difyq_commit"]} if isinstance(node.get("difyq_commit"), str) else set()
        return found.union(*(_commits(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_commits(value) for value in node))
    return set()


def _commit_note(results: dict[str, Any]) -> list[str]:
    """A warning line when difyq's source changed during the run (each pipeline start reads the tree anew)."""
    seen = _commits(results["scenarios"]) - {results["difyq_commit"]}
    if not seen:
        return []
    return [f"**The difyq source changed during this run**: some scenarios ran {', '.join(sorted(seen))}; "
            "see `difyq_commit` per pipeline in latest.json.", ""]


def _durations_note(results: dict[str, Any]) -> list[str]:
    """How long each scenario and section took (``run.timed``), when the results say."""
    durations = results.get("durations_s")
    if not durations:
        return []
    return ["Seconds per scenario: " + ", ".join(f"{name} {seconds:,.0f}" for name, seconds in durations.items())
            + ".", ""]


def _runs_note(results: dict[str, Any]) -> list[str]:
    """Which run each scenario came from, when a results file merges runs (``run.py --merge``)."""
    runs = {name: scenario["run"] for name, scenario in results["scenarios"].items() if "run" in scenario}
    if len({run["started_at"] for run in runs.values()}) <= 1:
        return []
    return ["Scenarios measured in different runs: " + "; ".join(
        f"{name} {run['started_at'][:16].replace('T', ' ')} UTC (load average before {run['load_before']}, difyq "
        f"`{run['difyq_commit']}`)" for name, run in runs.items()) + ".", ""]


def markdown(results: dict[str, Any], figures: list[str]) -> str:
    """The Markdown report: machine, goal table, then one table per scenario."""
    machine = results["machine"]
    lines = [
        f"# difyq benchmark — {results['finished_at'][:10]}",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB, "
        f"Python {machine['python']}, {machine['platform']}. Everything (Redis, emulator, sink, load generator, "
        f"pipeline) on this one machine. Load average before the run: {machine['load_before']}; other load "
        f"during the measured steps (processes outside the bench): {_fmt(results.get('other_load_cores'), 2)} "
        f"cores on average. difyq source: `{results['difyq_commit']}`. Mode: {results['mode']}, "
        f"{results['duration_s']:.0f} s.",
        "",
        *_durations_note(results),
        *_commit_note(results),
        *_runs_note(results),
        "| goal | target | difyq | bare | celery | difyq ÷ bare | verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in results["goals"]:
        unit = f" {row['unit']}" if row["unit"] else ""
        digits = 2 if row["unit"] in ("", "ms") else 0 if row["unit"] in ("jobs", "streams") else 1
        lines.append(f"| {row['goal']} | {row['target']} | {_fmt(row['difyq'], digits)}{unit} | "
                     f"{_fmt(row['bare'], digits)} | {_fmt(row['celery'], digits)} | {_fmt(row['ratio'], 2)} | "
                     f"{_verdict(row['ok'])} |")
    scenarios = results["scenarios"]
    if "throughput" in scenarios:
        s1 = scenarios["throughput"]
        lines += ["", f"## 1. Throughput (0 ms Dify, workers {s1['shape']})", "",
                  "A step passes when no job is lost, p99 end-to-end is under 1 s and the completions keep pace "
                  "with the arrivals (pace: callbacks in the second half of the step per job due in it, at least "
                  f"{PACE_FLOOR}; below that the backlog grows, however short the step keeps p99).", "",
                  "| pipeline | offered /s | achieved /s | pace | p50 ms | p99 ms | lost | CPU ms/job | other load "
                  "| pass |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, data in s1["pipelines"].items():
            for step in data["steps"]:
                lines.append(f"| {name} | {step['offered_rate']:.0f} | {step['achieved_rate']:.0f} | "
                             f"{_fmt(step.get('pace'), 3)} | {_fmt(step['e2e_ms']['p50'])} | "
                             f"{_fmt(step['e2e_ms']['p99'])} | {step['lost']} | "
                             f"{_fmt(step['cost']['cpu_ms_per_job'], 2)} | "
                             f"{_fmt(step['cost']['other_load_cores'], 2)} | {'yes' if step['passed'] else 'no'} |")
    if "overhead" in scenarios:
        s2 = scenarios["overhead"]
        lines += ["", f"## 2. Overhead at {s2['rate']:.0f} jobs/s ({s2['profile']['name']} Dify, "
                  f"workers {s2['shape']}) and "
                  "4. cost per job", "",
                  "| pipeline | e2e p50/p99 ms | overhead p50/p99/p99.9 ms | submit p50/p99 ms | generator late "
                  "p50/p99 ms | CPU ms/job | Redis CPU ms/job | Redis cmds/job | client cmds/job | round trips/job | "
                  "in-Lua cmds/job | idle: Redis CPU ms/s | idle: Redis cmds/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, data in s2["pipelines"].items():
            e2e, over, sub, cost = data["e2e_ms"], data["overhead_ms"], data["submit_ms"], data["cost"]
            late = data.get("generator_late_ms") or {"p50": None, "p99": None}
            idle = data.get("idle") or {}
            lines.append(
                f"| {name} | {_fmt(e2e['p50'])} / {_fmt(e2e['p99'])} | {_fmt(over['p50'])} / {_fmt(over['p99'])} / "
                f"{_fmt(over['p99.9'])} | {_fmt(sub['p50'], 2)} / {_fmt(sub['p99'], 2)} | "
                f"{_fmt(late['p50'], 2)} / {_fmt(late['p99'], 2)} | "
                f"{_fmt(cost['cpu_ms_per_job'], 2)} | {_fmt(cost['redis_cpu_ms_per_job'], 3)} | "
                f"{_fmt(cost['redis_commands_per_job'])} | {_fmt(data['trace']['round_trips_per_job'])} | "
                f"{_fmt(cost.get('redis_round_trips_per_job'))} | {_fmt(data['trace']['script_commands_per_job'])} | "
                f"{_fmt(idle.get('redis_cpu_ms_per_s'), 2)} | {_fmt(idle.get('redis_commands_per_s'))} |")
        phases = s2["pipelines"].get("difyq", {}).get("phases_ms")
        if phases:
            lines += ["", "Where difyq's time goes (from its job records and the emulator's call records):", "",
                      "| phase | p50 ms | p99 ms |", "|---|---:|---:|"]
            for phase, values in phases.items():
                lines.append(f"| {phase} | {_fmt(values['p50'], 2)} | {_fmt(values['p99'], 2)} |")
        trace = s2["pipelines"].get("difyq", {}).get("trace")
        if trace:
            top = ", ".join(f"{name} {count}" for name, count in list(trace["round_trips"].items())[:8])
            lines += ["", f"difyq round trips per job by command: {top}."]
        lines += ["", *script_times_section(s2)]
    if "latency" in scenarios:
        lines += ["", *latency_section(scenarios["latency"])]
    if "inflight" in scenarios:
        lines += ["", *inflight_section(scenarios["inflight"])]
    if "scaleout" in scenarios:
        lines += ["", *scaleout_section(scenarios["scaleout"])]
    if "ratelimit" in scenarios:
        lines += ["", *ratelimit_section(scenarios["ratelimit"])]
    if "limits" in results:
        limits = results["limits"]
        lines += ["", "## Rate limiter (tests/bench/bench_limits.py)", ""]
        if "error" in limits:
            lines.append(f"Not run: {limits['error']}")
        else:
            lines += ["| measure | value |", "|---|---:|"]
            lines += [f"| {key} | {value} |" for key, value in limits.items()]
    if "fairness" in results:
        lines += ["", *fairness_section(results["fairness"])]
    if "console" in results:
        lines += ["", *console_section(results["console"])]
    if "durable_submit" in results:
        lines += ["", *durable_submit_section(results["durable_submit"])]
    if figures:
        lines += ["", *[f"![{Path(name).stem}]({name})" for name in figures]]
    return "\n".join(lines) + "\n"


def script_times_section(overhead: dict[str, Any]) -> list[str]:
    """Where Redis's time goes per job, by script and command (the slow log at threshold 0, a window after the
    measured step), for each pipeline."""
    lines = ["Redis's time per job by script or command (µs of execution, network I/O not included; "
             "`INFO commandstats` lumps every script into `evalsha`):", "",
             "| pipeline | script or command | calls/job | µs/call | µs/job |", "|---|---|---:|---:|---:|"]
    for name, data in overhead["pipelines"].items():
        times = data.get("script_times")
        if not times:
            continue
        for script, figures in times["by_name"].items():
            if figures["usec_per_job"] < 0.5:
                continue
            lines.append(f"| {name} | {script} | {figures['calls_per_job']:.2f} | {figures['usec_per_call']:.1f} | "
                         f"{figures['usec_per_job']:.1f} |")
        lines.append(f"| {name} | **total** | | | **{times['usec_per_job']:.1f}** |")
    return lines


def latency_section(latency: dict[str, Any]) -> list[str]:
    """The realistic-latency scenario: each pipeline's added and submit latency over its rounds, each round's own
    p50 and p99, difyq's phases."""
    rounds = latency.get("rounds", 1)
    lines = [f"## Realistic latency at {latency['rate']:.0f} jobs/s ({latency['profile']['name']} Dify, half of "
             f"the workers' {latency['shape']} capacity)", "",
             f"The pipelines ran side by side and took turns: {rounds} rounds of {latency.get('round_s', 0):.0f} s "
             f"each, after {latency.get('lead_s', 0):.0f} s not counted (the pipeline had idled through the others' "
             "rounds). The figures are each pipeline's jobs of all its rounds together; the last column is each "
             "round's own added p50 / p99.", "",
             "| pipeline | e2e p50/p99 ms | added p50/p99/p99.9 ms | submit p50/p99 ms | generator late p50/p99 ms "
             "| CPU ms/job | other load | rounds: added p50 / p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, data in latency["pipelines"].items():
        e2e, over, sub, cost = data["e2e_ms"], data["overhead_ms"], data["submit_ms"], data["cost"]
        late = data.get("generator_late_ms") or {"p50": None, "p99": None}
        spread = ", ".join(f"{_fmt(one['overhead_ms']['p50'])} / {_fmt(one['overhead_ms']['p99'])}"
                           for one in data.get("rounds", []))
        lines.append(
            f"| {name} | {_fmt(e2e['p50'])} / {_fmt(e2e['p99'])} | {_fmt(over['p50'])} / {_fmt(over['p99'])} / "
            f"{_fmt(over['p99.9'])} | {_fmt(sub['p50'], 2)} / {_fmt(sub['p99'], 2)} | "
            f"{_fmt(late['p50'], 2)} / {_fmt(late['p99'], 2)} | {_fmt(cost['cpu_ms_per_job'], 2)} | "
            f"{_fmt(cost['other_load_cores'], 2)} | {spread or '-'} |")
    phases = latency["pipelines"].get("difyq", {}).get("phases_ms")
    if phases:
        floors = latency.get("floors") or {}
        within = {"pre_dify": floors.get("dify_call"), "callback_hop": floors.get("callback")}
        lines += ["", "Where difyq's added time goes, and of that the stand-ins' own share: the time the emulator and "
                  "the sink take to note a request a bare urllib3 client sends them at the same rate "
                  "(tests/bench/floors.py):", "",
                  "| phase | p50 ms | p99 ms | of which the stand-in's, p50 / p99 ms |", "|---|---:|---:|---:|"]
        for phase, values in phases.items():
            if phase == "dify":
                continue
            floor = within.get(phase)
            share = f"{_fmt(floor['p50'], 2)} / {_fmt(floor['p99'], 2)}" if floor else "-"
            lines.append(f"| {phase} | {_fmt(values['p50'], 2)} | {_fmt(values['p99'], 2)} | {share} |")
    return lines


def inflight_section(inflight: dict[str, Any]) -> list[str]:
    """The in-flight levels as a Markdown section."""
    lines = ["## In flight per host (streamed answers from tests/bench/stream_source.py)", ""]
    alone = inflight.get("source_alone")
    if alone:
        lines += [f"The stream source alone (a near-free asyncio client, no pipeline) at C={alone['concurrency']:,} "
                  f"10 s streams: {alone['max_open']:,} open at most, answer p50 {alone['answer_s']['p50']:.2f} s, "
                  f"p99 {alone['answer_s']['p99']:.2f} s (best ratio it allows: {alone['best_ratio']:.2f}).", ""]
    lines += ["| answer | workers | C | offered /s | throughput /s | ÷ Little bound | at Dify (mean) | e2e p99 s | "
              "queue wait p99 s | worker RSS / PSS MiB | PSS KiB/job | CPU ms/job | other load | lost |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in inflight["runs"]:
        for mode in run["modes"]:
            for level in mode["levels"]:
                memory = level["worker_memory"]
                wait = level.get("phases_ms", {}).get("queue_wait", {}).get("p99")
                lines.append(
                    f"| {run['answer_s']:.0f} s | {mode['pipeline']} {level.get('shape') or mode.get('shape')} | "
                    f"{level['concurrency']:,} | "
                    f"{level['offered_rate']:.0f} | {level['throughput']:.1f} | {level['ratio']:.2f} | "
                    f"{level['dify_in_flight']['mean']:,.0f} | "
                    f"{_fmt(level['e2e_ms']['p99'] / 1000 if level['e2e_ms']['p99'] else None, 2)} | "
                    f"{_fmt(wait / 1000 if wait is not None else None, 2)} | "
                    f"{memory['rss_mib']:.0f} / {memory['pss_mib']:.0f} | {_fmt(level.get('pss_kib_per_job'), 0)} | "
                    f"{level['cost']['cpu_ms_per_job']:.2f} | {level['cost']['other_load_cores']:.2f} | "
                    f"{level['lost']} |")
    for run in inflight["runs"]:
        for mode in run["modes"]:
            profile = mode["levels"][-1].get("worker_profile") if mode["levels"] else None
            if profile:
                top = mode["levels"][-1]
                lines += ["", f"Where the CPU of {mode['label']} went at C={top['concurrency']:,} "
                          f"({run['answer_s']:.0f} s; "
                          f"py-spy, {profile['samples']:,} samples, % of samples): by package "
                          + ", ".join(f"{name} {share}" for name, share in profile["self_by_package"][:8])
                          + "; most self time: "
                          + "; ".join(f"`{name}` {share}" for name, share in profile["top_self"][:6]) + "."]
    return lines


def scaleout_section(scaleout: dict[str, Any]) -> list[str]:
    """The scale-out steps as a Markdown section."""
    lines = [f"## Scale-out (1 s Dify, {scaleout['threads']} threads per process, offered "
             f"{scaleout['overload']}x the slots)", "",
             "| pipeline | processes | throughput /s | per process /s | CPU ms/job | Redis CPU ms/job | other load |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, data in scaleout["pipelines"].items():
        for step in data["steps"]:
            cost = step["cost"]
            lines.append(f"| {name} | {step['processes']} | {step['throughput']:.1f} | {step['per_process']:.1f} | "
                         f"{cost['cpu_ms_per_job']:.2f} | {cost['redis_cpu_ms_per_job']:.3f} | "
                         f"{cost['other_load_cores']:.2f} |")
        limit = data["limit"]
        lines.append("")
        lines.append(f"{name}: per-process spread {_fmt((data['spread'] or 0) * 100, 1)} %; the line stops first at "
                     f"{limit['first']}: this host's {limit['host_cores']} cores carry "
                     f"{_fmt(limit['host_jobs_per_s'], 0)} jobs/s of this pipeline, one Redis core "
                     f"{_fmt(limit['redis_core_jobs_per_s'], 0)} jobs/s.")
        lines.append("")
    return lines


def ratelimit_section(ratelimit: dict[str, Any]) -> list[str]:
    """The rate-limit keys as a Markdown section."""
    lines = [f"## Rate-limit efficiency ({ratelimit['demand_x_limit']:.0f}x demand, {ratelimit['minutes']} min, "
             "counted at the stream source)", "",
             "| key | limit / min | used per minute | ÷ limit per minute | most in any 60 s | submitted | errors |",
             "|---|---:|---|---|---:|---:|---:|"]
    slots = None
    for name, key in ratelimit["keys"].items():
        if "max_open" in key:
            slots = (name, key)
            continue
        lines.append(f"| {name} | {key['limit']:,} | {', '.join(f'{used:,.0f}' for used in key['windows'])} | "
                     f"{', '.join(f'{ratio:.3f}' for ratio in key.get('window_ratios', []))} | "
                     f"{key['max_in_any_60s']:,.0f} | {key.get('submitted', 0):,} | {key.get('submit_errors', 0)} |")
    if slots is not None:
        name, key = slots
        lines += ["", "| key | max_concurrency | seconds calls were open per minute | ÷ slots' seconds per minute | "
                  "most open at once | submitted | errors |", "|---|---:|---|---|---:|---:|---:|",
                  f"| {name} | {key['limit']} | {', '.join(f'{busy:,.1f}' for busy in key['windows'])} | "
                  f"{', '.join(f'{ratio:.3f}' for ratio in key['window_ratios'])} | {key['max_open']} | "
                  f"{key.get('submitted', 0):,} | {key.get('submit_errors', 0)} |"]
    burst = ratelimit.get("burst")
    if burst is not None:
        lines += ["", f"A burst of {burst['jobs']} jobs at once at an unused key of {burst['slots']} slots (no hold "
                  f"time known yet): calls open {burst['ratio']:.3f} of the slots' time from the first call's start "
                  f"to the last one's end ({burst['first_to_last_s']:.2f} s; {burst['submit_to_last_s']:.2f} s "
                  "from the submits)."]
    return lines


def fairness_section(fairness: dict[str, Any]) -> list[str]:
    """Tenant B's wait behind tenant A's backlog, with and without fair shares, as a Markdown section."""
    lines = ["## Fair shares (tests/bench/bench_fairness.py)", ""]
    if "error" in fairness:
        return [*lines, f"Not run: {fairness['error']}"]
    lines += [f"Tenant A enqueues {fairness['backlog']} jobs at once on a key admitting {fairness['limit_per_window']} "
              f"per {fairness['window_s']} s (one slot = {fairness['slot_s'] * 1000:.0f} ms); tenant B then enqueues "
              "one job at a time. Goal with `fairness: tenant`: B waits about one slot, not A's backlog.", "",
              "| line | B's jobs admitted | B's wait p50 (s) | B's wait max (s) | A's admissions before B's, max |",
              "|---|---:|---:|---:|---:|"]
    for mode in ("fair", "first_come_first_served"):
        run = fairness[mode]
        admitted = f"{run['b_jobs_admitted']} (+{run['b_jobs_still_waiting']} waiting)"
        lines.append(f"| {mode.replace('_', ' ')} | {admitted} | {_fmt(run['b_wait_s_p50'], 3)} | "
                     f"{_fmt(run['b_wait_s_max'], 3)} | {run['b_wait_slots_max']} |")
    return lines


def durable_submit_section(durable: dict[str, Any]) -> list[str]:
    """What redis.durable_submit costs a submit (tests/bench/bench_durable_submit.py) as a Markdown section."""
    lines = ["## redis.durable_submit (tests/bench/bench_durable_submit.py)", ""]
    if "error" in durable:
        return [*lines, f"Not run: {durable['error']}"]
    lines += ["POST /v1/jobs on a primary with one replica on loopback, open loop; the two settings take turns.", "",
              "| setting | offered /s | submit p50 ms | submit p99 ms | API CPU ms/submit | errors | other load |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for setting, runs in durable.items():
        lines += [f"| {setting} | {run['rate']:.0f} | {_fmt(run['submit_ms_p50'], 2)} | "
                  f"{_fmt(run['submit_ms_p99'], 2)} | {_fmt(run['api_cpu_ms_per_submit'], 2)} | {run['errors']} | "
                  f"{_fmt(run['other_cores'], 2)} |" for run in runs]
    return lines


def console_section(console: dict[str, Any]) -> list[str]:
    """The console's pages over a large job store (tests/bench/bench_console.py) as a Markdown section."""
    lines = ["## Console pages (tests/bench/bench_console.py)", ""]
    if "error" in console:
        return [*lines, f"Not run: {console['error']}"]
    lines += [f"{console['jobs']:,} jobs in Redis; medians (p95) of {console['loads']} loads in headless Chromium.",
              "", "| page | rows | server ms | HTML KiB | cold load KiB | DOMContentLoaded ms | rendered ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, page in console["pages"].items():
        lines.append(
            f"| {name} | {page['rows']} | {page['server_ms']['p50']:.0f} ({page['server_ms']['p95']:.0f}) | "
            f"{page['html_bytes'] / 1024:.1f} | {page['cold_load_bytes'] / 1024:.1f} | "
            f"{page['dom_content_loaded_ms']['p50']:.0f} | {page['rendered_ms']['p50']:.0f} "
            f"({page['rendered_ms']['p95']:.0f}) |")
    return lines


def _save(figure: Any, machine: str, path: Path) -> str:
    """Give every panel its legend and the figure the machine line, write the PNG; returns its file name."""
    for axis in figure.axes:
        axis.legend(fontsize=8)
    figure.suptitle(machine, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def plots(results: dict[str, Any], directory: Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    written: list[str] = []
    scenarios = results["scenarios"]
    machine = f"{results['machine']['cores']} cores, {results['machine']['cpu_model']}"
    if "throughput" in scenarios:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        top = 0.0
        for name, data in scenarios["throughput"]["pipelines"].items():
            offered = [s["offered_rate"] for s in data["steps"]]
            order = sorted(range(len(offered)), key=offered.__getitem__)
            offered = [offered[i] for i in order]
            achieved = [data["steps"][i]["achieved_rate"] for i in order]
            p99 = [min(data["steps"][i]["e2e_ms"]["p99"], 1e5) for i in order]
            top = max(top, *offered)
            label = f"{name} (max {data['max_sustained_rate']:.0f}/s)"
            left.plot(offered, achieved, "o-", color=COLORS.get(name), label=label)
            right.plot(offered, p99, "o-", color=COLORS.get(name), label=name)
        left.plot([0, top], [0, top], ":", color="black", linewidth=0.8, label="offered")
        left.set(xlabel="offered jobs/s", ylabel="achieved jobs/s", title="Throughput vs offered load (0 ms Dify)")
        right.axhline(1000, color="red", linestyle="--", linewidth=0.8, label="1 s goal")
        right.set(xlabel="offered jobs/s", ylabel="p99 end-to-end, ms", yscale="log", title="p99 vs offered load")
        written.append(_save(figure, machine, directory / "throughput.png"))
    for scenario, file in (("overhead", "latency.png"), ("latency", "latency-realistic.png")):
        if scenario not in scenarios:
            continue
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, data in scenarios[scenario]["pipelines"].items():
            for axis, key in ((left, "overhead_ms"), (right, "submit_ms")):
                cdf = data.get(f"{key}_cdf")
                if cdf:
                    axis.plot(cdf["ms"], cdf["fraction"], color=COLORS.get(name), label=name)
        rate = scenarios[scenario]["rate"]
        left.axvline(5, color="red", linestyle="--", linewidth=0.8, label="p50 goal 5 ms")
        left.axvline(25, color="red", linestyle=":", linewidth=0.8, label="p99 goal 25 ms")
        left.set(xscale="log", xlabel="e2e - Dify's own time, ms", ylabel="fraction of jobs",
                 title=f"Added latency, CDF ({rate:.0f} jobs/s, {scenarios[scenario]['profile']['name']} Dify)")
        right.set(xscale="log", xlabel="submit latency, ms", ylabel="fraction of jobs", title="Submit latency, CDF")
        written.append(_save(figure, machine, directory / file))
    if "inflight" in scenarios:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        goal = scenarios["inflight"]["goal"]
        for run in scenarios["inflight"]["runs"]:
            for mode in run["modes"]:
                levels = mode["levels"]
                label = f"{mode['label']}, {run['answer_s']:.0f} s"
                xs = [level["concurrency"] for level in levels]
                left.plot(xs, [level["ratio"] for level in levels], "o-", label=label)
                right.plot(xs, [level["worker_memory"]["pss_mib"] for level in levels], "o-", label=label)
        left.axhline(goal["ratio"], color="red", linestyle="--", linewidth=0.8, label=f"goal {goal['ratio']}")
        left.axvline(goal["concurrency"], color="red", linestyle=":", linewidth=0.8, label="10,000 in flight")
        right.axhline(goal["pss_mib"], color="red", linestyle="--", linewidth=0.8, label="2 GiB goal")
        left.set(xlabel="jobs in flight (C)", ylabel="throughput ÷ Little's-law bound", ylim=(0, 1.1),
                 title="Streams held vs offered in-flight jobs")
        right.set(xlabel="jobs in flight (C)", ylabel="worker PSS, MiB", title="Worker memory")
        written.append(_save(figure, machine, directory / "inflight.png"))
    return written
