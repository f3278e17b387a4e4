"""Split difyq's time on a job's path into its hops, at the realistic latency scenario's load: ``queue_wait`` (a
job's record written to its attempt's start) and the tail (Dify's answer to the callback's POST), the two parts of
the added latency that are difyq's own:

    .venv/bin/python -m tests.bench.hop_probe --seconds 20

It starts the bench's stack (private Redis, a 2 s emulator, sink, ``difyq api`` and ``difyq worker``) with
``tests/bench/probe_site`` on the difyq processes' PYTHONPATH, whose ``sitecustomize`` notes when each job passes
each hop, offers half of the workers' capacity, and prints each hop's p50 and p99 (ms). ``queue_wait`` runs from
the record's ``created_at`` (just before the API's submit script) to about ``start_call``:

- ``submitted → woken``: the API's submit returned until a consumer took the wake token (negative when the
  worker woke before the API's coroutine resumed);
- ``woken → fetched``: Dramatiq's fetch of the message (one round trip);
- ``fetched → run``: Dramatiq hands the message to a worker thread, its middleware, the actor's call;
- ``run → start_call``: admission and budgets (neither set here: no round trip);
- ``start_call → started``: the start script's round trip, with the job's record in its reply.

The tail, from the Dify call's return to the runner (its stream read to the end) to the callback's POST:

- ``answered → finish_call``: the call's metrics and the outcome built, the call's context left;
- ``finish_call → finished``: the outcome's round trip (finish.lua), with the stored record in its reply;
- ``finished → post``: the callback's body from the record, its signature, the checked destination.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections import defaultdict
from pathlib import Path

from tests.bench.loadgen import open_loop
from tests.bench.measure import summary
from tests.bench.scenarios import fixed_latency, warm_up
from tests.bench.stack import REPO_ROOT, WorkerShape, scratch_bench

PROBE_SITE = REPO_ROOT / "tests" / "bench" / "probe_site"
# The events in the order a job passes them, in two runs (between them: the Dify call).
PATHS = (("submitted", "woken", "fetched", "run", "start_call", "started"),
         ("answered", "finish_call", "finished", "post"))


def job_events(probe_dir: Path) -> dict[str, dict[str, float]]:
    """Per job id, the first time of each event. A ``woken`` line names no job: it goes to the next job its process
    fetched, when that fetch came right after the wake-up."""
    events: dict[str, dict[str, float]] = defaultdict(dict)
    for log in probe_dir.glob("*.log"):
        woken: float | None = None
        for line in log.read_text(encoding="utf-8").splitlines():
            event, at, *named = line.split()
            job_id = named[0] if named else ""
            if event == "woken":
                woken = float(at)
                continue
            if event == "fetched" and woken is not None:
                events[job_id].setdefault("woken", woken)
                woken = None
            events[job_id].setdefault(event, float(at))
    return events


def hop_table(events: dict[str, dict[str, float]]) -> str:
    """The Markdown table of each hop's jobs, p50 and p99 (ms)."""
    rows = ["| hop | jobs | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for earlier, later in (hop for path in PATHS for hop in itertools.pairwise(path)):
        spans = [times[later] - times[earlier] for times in events.values() if earlier in times and later in times]
        figures = summary(spans)
        if figures["n"]:
            rows.append(f"| {earlier} → {later} | {figures['n']} | {figures['p50']:.2f} | {figures['p99']:.2f} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dify-latency", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    args = parser.parse_args()
    profile = fixed_latency(args.dify_latency)
    rate = args.processes * args.threads / args.dify_latency / 2
    with scratch_bench("difyq-hop-probe-") as bench:
        probe_dir = bench.log_dir / "probe"
        probe_dir.mkdir()
        extra_env = {"PYTHONPATH": str(PROBE_SITE), "DIFYQ_HOP_PROBE_DIR": str(probe_dir)}
        with bench.emulating(profile), bench.pipeline(
                "difyq", WorkerShape(args.processes, args.threads), extra_env=extra_env) as pipeline:
            warm_up(bench, pipeline, rate)
            for log in probe_dir.glob("*.log"):
                log.unlink()
            submissions = asyncio.run(open_loop(pipeline.submitter, rate, args.seconds))
            bench.sink.wait_for({s.job_id for s in submissions if s.job_id}, timeout=30 + profile.nominal_s)
        print(f"difyq's queue_wait and tail by hop at {rate:g} jobs/s, {args.dify_latency:g} s Dify, "
              f"{WorkerShape(args.processes, args.threads).label()}:\n")
        print(hop_table(job_events(probe_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
