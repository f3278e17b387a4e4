"""``make soak``: the rate limits at twice their demand for 5 minutes, then an hour of realistic load on the stack.

    .venv/bin/python -m tests.bench.soak                                   # 60 minutes (the full soak)
    SOAK_MINUTES=10 SOAK_RESTART_MINUTES=3 SOAK_TTL_MINUTES=2 .venv/bin/python -m tests.bench.soak   # a short one

The mix: answers of 1-10 s (the emulator's 1 s plus ``WAIT<n>``, n uniform in 0-9), Poisson arrivals at half of
the workers' capacity (2 x 32 threads over the mean answer), Dify answering HTTP 500 for 5 % of the time (3 s of
every minute: those calls are retried), 2 % of the jobs calling back a receiver that is down (their callbacks
exhaust a short retry schedule), the worker restarted (SIGTERM, as a deploy) every ``SOAK_RESTART_MINUTES``, and
``result_ttl``/``idempotency_ttl`` of ``SOAK_TTL_MINUTES`` so records expire inside the run. After the load, the
soak waits for every job to end and for the TTLs to pass.

Every 10 s it samples the API's and the worker's RSS, Redis's ``used_memory``, the queue depth and the number of
Redis keys per kind (namespace and first segment). The verdicts: no job lost or stuck (each accepted job's
callback arrived, or, for a receiver that is down, was attempted: the job ended), API RSS and each worker
generation's RSS growth after warm-up (the first fifth) ≤ 5 %, Redis memory back to its baseline (before the
load, 5 % or 1 MiB of slack) once the TTLs have passed, and no key kind with more keys that never expire than
before the load (the bytes per kind before and after say where memory stayed). Writes
``tests/bench/results/soak.json``, ``soak.md`` and ``soak.png`` (memory and queue depth over time);
``SOAK_RATELIMIT_MINUTES`` (default 5, 0 to skip) runs ``ratelimit`` at its full length first.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tests.bench import ratelimit
from tests.bench.loadgen import HttpSubmitter, Submission, open_loop, query_for
from tests.bench.run import RESULTS, machine
from tests.bench.scenarios import BenchConfig, warm_up
from tests.bench.sink import FAILING_PATH
from tests.bench.stack import (
    APP,
    CLIENT_TOKEN,
    REPO_ROOT,
    BenchEnvironment,
    DifyqPipeline,
    Profile,
    WorkerShape,
    process_tree,
    source_commit,
    tree_memory,
)

ANSWER = Profile("soak", ttft_s=1.0, tokens_per_second=0.0, answer_tokens=16)
MAX_WAIT_S = 9
SHAPE = WorkerShape(2, 32)
FAULT_SHARE = 0.05
FAULT_EVERY_S = 60.0
FAILING_CALLBACK_SHARE = 0.02
SAMPLE_EVERY_S = 10.0
GROWTH_GOAL = 0.05
MEMORY_SLACK_BYTES = 2**20


def _minutes(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


class Soak:
    """One soak run: the load, the faults, the restarts and the samples."""

    def __init__(self, bench: BenchEnvironment, pipeline: DifyqPipeline, minutes: float, restart_minutes: float,
                 ttl_s: float) -> None:
        self.bench = bench
        self.pipeline = pipeline
        self.minutes = minutes
        self.restart_s = restart_minutes * 60
        self.ttl_s = ttl_s
        self.rate = 0.5 * SHAPE.processes * SHAPE.threads / (ANSWER.ttft_s + MAX_WAIT_S / 2)
        self.samples: list[dict[str, Any]] = []
        self.restarts: list[float] = []
        self.failing: set[str] = set()
        self.started = time.time()
        self.rng = random.Random(7)

    def query(self, token: str) -> str:
        return f"{query_for(token)} WAIT{self.rng.randint(0, MAX_WAIT_S)}"

    def callback(self, token: str) -> str:
        if self.rng.random() < FAILING_CALLBACK_SHARE:
            self.failing.add(token)
            return f"http://127.0.0.1:{self.bench.sink.port}{FAILING_PATH}/{token}"
        return self.bench.sink.url

    def sample(self, sizes: bool = False) -> dict[str, Any]:
        """One sample; with ``sizes``, also the bytes (``MEMORY USAGE``) of each key kind and how many of its keys
        have no expiry."""
        client = self.bench.client
        kinds: Counter[str] = Counter()
        kind_bytes: Counter[str] = Counter()
        persistent: Counter[str] = Counter()
        for key in client.scan_iter(count=1000):
            kind = ":".join(key.split(":")[:2])
            kinds[kind] += 1
            if sizes:
                kind_bytes[kind] += client.memory_usage(key) or 0
                persistent[kind] += client.ttl(key) == -1
        api = [service.pid for service in self.pipeline.services if service not in self.pipeline.worker_services]
        record = {
            "t": time.time() - self.started,
            "api_rss_mib": tree_memory(api)["rss_mib"],
            "worker_rss_mib": tree_memory(self.pipeline.worker_pids())["rss_mib"],
            "worker_processes": sum(len(process_tree(pid)) for pid in self.pipeline.worker_pids()),
            "redis_used_bytes": int(client.info("memory")["used_memory"]),
            "queued": self.bench.queue_depth(self.pipeline),
            "keys": dict(kinds),
            **({"key_bytes": dict(kind_bytes), "persistent_keys": dict(persistent)} if sizes else {}),
        }
        self.samples.append(record)
        return record

    def fault(self) -> None:
        """Dify answers 500 for the next ``FAULT_SHARE`` of a minute."""
        assert self.bench.emulator is not None
        body = json.dumps({"fault": "http500", "until": time.time() + FAULT_SHARE * FAULT_EVERY_S}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.bench.emulator.port}/_emulator/apps/{APP}",
                                         data=body, method="PUT", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()

    def run(self) -> list[Submission]:
        submissions: list[Submission] = []

        def load() -> None:
            submissions.extend(asyncio.run(open_loop(
                lambda: HttpSubmitter("127.0.0.1", self.pipeline.api_port, CLIENT_TOKEN, APP, self.bench.sink.url,
                                      query=self.query, callback=self.callback),
                self.rate, self.minutes * 60, seed=3)))

        loader = threading.Thread(target=load, name="soak-load", daemon=True)
        self.started = time.time()
        loader.start()
        next_fault = next_restart = self.started
        next_restart += self.restart_s
        while loader.is_alive():
            now = time.time()
            if now >= next_fault:
                self.fault()
                next_fault += FAULT_EVERY_S
            if now >= next_restart:
                self.pipeline.restart_worker()
                self.restarts.append(time.time() - self.started)
                print(f"  [soak] worker restarted at {self.restarts[-1] / 60:.1f} min", flush=True)
                next_restart += self.restart_s
            record = self.sample()
            print(f"  [soak] {record['t'] / 60:5.1f} min: API {record['api_rss_mib']:.0f} MiB, worker "
                  f"{record['worker_rss_mib']:.0f} MiB, Redis {record['redis_used_bytes'] / 2**20:.1f} MiB, queued "
                  f"{record['queued']}", flush=True)
            loader.join(SAMPLE_EVERY_S)
        self.load_s = time.time() - self.started
        return submissions

    def settle(self, submissions: list[Submission]) -> dict[str, float]:
        """Wait for every job to end, then for the TTLs to pass; sample all along. Returns the arrivals."""
        ids = {s.job_id for s in submissions if s.job_id and s.token not in self.failing}
        failing = {s.job_id for s in submissions if s.job_id and s.token in self.failing}
        deadline = time.time() + 600
        arrivals: dict[str, float] = {}
        while time.time() < deadline:
            arrivals = self.bench.sink.wait_for(ids, timeout=SAMPLE_EVERY_S)
            self.sample()
            if len(arrivals) == len(ids) and failing <= self.bench.sink.failures().keys():
                break
        self.ended = time.time() - self.started
        expire_at = time.time() + self.ttl_s + 30
        while time.time() < expire_at:
            self.sample()
            time.sleep(min(SAMPLE_EVERY_S, max(0.0, expire_at - time.time())))
        self.sample(sizes=True)
        return arrivals


def _growth(samples: list[dict[str, Any]], key: str, start: float, end: float) -> float | None:
    """The mean of ``key`` over the last fifth of [start, end) over its mean over the first fifth, minus 1."""
    span = end - start
    head = [s[key] for s in samples if start <= s["t"] < start + span / 5]
    tail = [s[key] for s in samples if end - span / 5 <= s["t"] < end]
    if not head or not tail:
        return None
    return (sum(tail) / len(tail)) / (sum(head) / len(head)) - 1


def verdicts(soak: Soak, submissions: list[Submission], arrivals: dict[str, float]) -> dict[str, Any]:
    accepted = [s for s in submissions if s.job_id]
    missing = [s.job_id for s in accepted if s.token not in soak.failing and s.job_id not in arrivals]
    attempted = soak.bench.sink.failures()
    stuck = [s.job_id for s in accepted if s.token in soak.failing and s.job_id not in attempted]
    # Warm-up: the first fifth of the load (at most 10 minutes) for the API, of each generation for the worker.
    warmup = min(soak.load_s / 5, 600.0)
    api_growth = _growth(soak.samples, "api_rss_mib", warmup, soak.load_s)
    generations = [0.0, *soak.restarts, soak.load_s]
    worker_growth = [growth for begin, end in itertools.pairwise(generations)
                     if (growth := _growth(soak.samples, "worker_rss_mib", begin + (end - begin) / 5, end))
                     is not None]
    before = soak.samples[0]
    after = soak.samples[-1]
    # A kind whose keys all expire is bounded by its TTL; one with more keys that never expire than before is not.
    grown = {kind: (before["persistent_keys"].get(kind, 0), count) for kind, count in after["persistent_keys"].items()
             if count > before["persistent_keys"].get(kind, 0)}
    memory_back = after["redis_used_bytes"] <= max(before["redis_used_bytes"] * (1 + GROWTH_GOAL),
                                                   before["redis_used_bytes"] + MEMORY_SLACK_BYTES)
    return {
        "submitted": len(submissions), "accepted": len(accepted),
        "submit_errors": [s.error for s in submissions if s.error][:5],
        "lost": missing[:20], "lost_count": len(missing), "stuck": stuck[:20], "stuck_count": len(stuck),
        "failing_callbacks": len(soak.failing),
        "api_rss_growth": api_growth, "worker_rss_growth": worker_growth, "warmup_s": warmup,
        "redis_used_before": before["redis_used_bytes"], "redis_used_after": after["redis_used_bytes"],
        "redis_memory_back": memory_back, "keys_grown": grown,
        "key_bytes_grown": {kind: (before["key_bytes"].get(kind, 0), size) for kind, size in after["key_bytes"].items()
                            if size > before["key_bytes"].get(kind, 0)},
        "ok": {
            "no_job_lost_or_stuck": not missing and not stuck and len(accepted) == len(submissions),
            "api_rss_growth": api_growth is not None and api_growth <= GROWTH_GOAL,
            "worker_rss_growth": bool(worker_growth) and max(worker_growth) <= GROWTH_GOAL,
            "redis_memory_back": memory_back,
            "bounded_keys": not grown,
        },
    }


def markdown(results: dict[str, Any]) -> str:
    v = results["verdicts"]
    mark = {True: "met", False: "**not met**"}
    worker = ", ".join(f"{growth:+.1%}" for growth in v["worker_rss_growth"]) or "no generation long enough"
    api = f"{v['api_rss_growth']:+.1%}" if v["api_rss_growth"] is not None else "-"
    lines = [
        f"# difyq soak — {results['finished_at'][:10]}", "",
        f"Machine: {results['machine']['cpu_model']}, {results['machine']['cores']} cores; load average before: "
        f"{results['machine']['load_before']}, after: {results['load_after']}. difyq `{results['difyq_commit']}`. "
        f"{results['minutes']:g} min of load at {results['rate']:.1f} jobs/s (1-10 s answers, Dify 500s "
        f"{FAULT_SHARE:.0%} of the time, {FAILING_CALLBACK_SHARE:.0%} of callbacks to a receiver that is down), "
        f"worker restarted every {results['restart_minutes']:g} min, result/idempotency TTL "
        f"{results['ttl_s'] / 60:g} min.", "",
        "| check | target | measured | verdict |", "|---|---|---|---|",
        f"| jobs lost or stuck | 0 | {v['lost_count']} lost, {v['stuck_count']} stuck of {v['accepted']:,} accepted "
        f"({v['submitted']:,} submitted) | {mark[v['ok']['no_job_lost_or_stuck']]} |",
        f"| API RSS growth after warm-up | ≤ {GROWTH_GOAL:.0%} | {api} | {mark[v['ok']['api_rss_growth']]} |",
        f"| worker RSS growth after warm-up, per worker generation | ≤ {GROWTH_GOAL:.0%} | {worker} | "
        f"{mark[v['ok']['worker_rss_growth']]} |",
        f"| Redis used_memory after the TTLs vs before the load | back to baseline | "
        f"{v['redis_used_after'] / 2**20:.2f} MiB vs {v['redis_used_before'] / 2**20:.2f} MiB | "
        f"{mark[v['ok']['redis_memory_back']]} |",
        f"| Redis key kinds with more keys without expiry than before the load | none | "
        f"{', '.join(f'{k} {a}→{b}' for k, (a, b) in v['keys_grown'].items()) or 'none'} | "
        f"{mark[v['ok']['bounded_keys']]} |",
        "", "Key kinds whose bytes (MEMORY USAGE) grew from before the load to after the TTLs: "
        + (", ".join(f"`{k}` {a:,} → {b:,}" for k, (a, b) in v["key_bytes_grown"].items()) or "none") + ".",
    ]
    limits = results.get("ratelimit")
    if limits:
        from tests.bench.report import ratelimit_section

        lines += ["", *ratelimit_section(limits)]
    lines += ["", "![soak](soak.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    samples = results["samples"]
    minutes = [s["t"] / 60 for s in samples]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(minutes, [s["api_rss_mib"] for s in samples], label="API RSS, MiB")
    left.plot(minutes, [s["worker_rss_mib"] for s in samples], label="worker RSS (all processes), MiB")
    left.plot(minutes, [s["redis_used_bytes"] / 2**20 for s in samples], label="Redis used_memory, MiB")
    right.plot(minutes, [s["queued"] for s in samples], label="jobs queued")
    for axis in (left, right):
        for restart in results["restarts"]:
            axis.axvline(restart / 60, color="grey", linestyle=":", linewidth=0.8)
        axis.axvline(results["load_s"] / 60, color="red", linestyle="--", linewidth=0.8, label="load ends")
        axis.legend(fontsize=8)
    left.set(xlabel="minutes", ylabel="MiB", title="Memory (dotted: worker restarts)")
    right.set(xlabel="minutes", ylabel="messages", title="Queue depth")
    figure.suptitle(f"{results['machine']['cores']} cores, {results['machine']['cpu_model']}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    minutes = _minutes("SOAK_MINUTES", 60)
    restart_minutes = _minutes("SOAK_RESTART_MINUTES", 10)
    ttl_s = _minutes("SOAK_TTL_MINUTES", 10) * 60
    limit_minutes = int(_minutes("SOAK_RATELIMIT_MINUTES", 5))
    out = Path(os.environ.get("SOAK_OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="difyq-soak-"))
    print(f"difyq soak: {minutes:g} min; logs in {logs}", flush=True)
    results: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                               "difyq_commit": source_commit(REPO_ROOT), "minutes": minutes,
                               "restart_minutes": restart_minutes, "ttl_s": ttl_s}
    bench = BenchEnvironment(logs, REPO_ROOT)
    try:
        if limit_minutes:
            results["ratelimit"] = ratelimit.run(bench, BenchConfig(), limit_minutes)
            bench.client.flushall()
        settings = {"jobs": {"result_ttl": ttl_s, "idempotency_ttl": ttl_s, "retry_max_backoff": 10},
                    "callbacks": {"retry_schedule": [2, 10, 30]}}
        with bench.emulating(ANSWER), bench.pipeline("difyq", SHAPE, config=settings) as pipeline:
            assert isinstance(pipeline, DifyqPipeline)
            warm_up(bench, pipeline, 5.0)
            soak = Soak(bench, pipeline, minutes, restart_minutes, ttl_s)
            soak.sample(sizes=True)
            submissions = soak.run()
            arrivals = soak.settle(submissions)
        results.update({"rate": soak.rate, "restarts": soak.restarts, "load_s": soak.load_s,
                        "ended_s": soak.ended, "samples": soak.samples,
                        "verdicts": verdicts(soak, submissions, arrivals)})
    finally:
        bench.close()
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["load_after"] = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    (out / "soak.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "soak.png")
    (out / "soak.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    shutil.rmtree(logs, ignore_errors=True)
    return 0 if all(results["verdicts"]["ok"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
