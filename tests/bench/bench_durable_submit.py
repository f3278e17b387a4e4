"""What ``redis.durable_submit`` costs a submit: ``POST /v1/jobs`` latency and API CPU with it off and on, against
a primary with one replica (two real redis-servers on loopback, no persistence), open loop at the same rates.

    .venv/bin/python -m tests.bench.bench_durable_submit                    # 100/s and 300/s, 10 s each
    .venv/bin/python -m tests.bench.bench_durable_submit --rates 50 --seconds 5

On loopback the replica's acknowledgement is a round trip of microseconds, so the figures are the floor of the
cost: across hosts each durable submit also waits one network round trip to the replica. It prints one line per
setting and rate, and last one JSON object (``make bench`` reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.bench.bench_api import percentile, start_api
from tests.bench.loadgen import HttpSubmitter, open_loop
from tests.bench.stack import APP, CLIENT_TOKEN, REPO_ROOT, Service, raise_file_limit
from tests.support.sentinel import SentinelDeployment
from tests.support.waiting import wait_for

CALLBACK_URL = "http://127.0.0.1:9/callback"
SETTINGS = {"durable_submit off": False, "durable_submit on": True}


def measure(port: int, api_pid: int, rate: float, seconds: float) -> dict[str, Any]:
    """Offer ``rate`` submits/s for ``seconds``; submit latency, the API's CPU per submit and the cores the rest
    of the machine used meanwhile (other people's runs: a noisy figure is told by it)."""
    api, own = psutil.Process(api_pid), psutil.Process()
    api_before, own_before, machine_before = api.cpu_times(), own.cpu_times(), psutil.cpu_times()
    began = time.monotonic()
    submissions = asyncio.run(open_loop(
        lambda: HttpSubmitter("127.0.0.1", port, CLIENT_TOKEN, APP, CALLBACK_URL), rate, seconds))
    elapsed = time.monotonic() - began
    api_after, own_after, machine_after = api.cpu_times(), own.cpu_times(), psutil.cpu_times()
    latencies = [1000 * (s.accepted - s.intended) for s in submissions if s.accepted is not None]
    api_s = (api_after.user + api_after.system) - (api_before.user + api_before.system)
    own_s = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    machine_s = sum(getattr(machine_after, k) - getattr(machine_before, k) for k in ("user", "system", "nice"))
    return {"rate": rate, "accepted": len(latencies), "errors": len(submissions) - len(latencies),
            "submit_ms_p50": round(percentile(latencies, 0.5), 3),
            "submit_ms_p99": round(percentile(latencies, 0.99), 3),
            "api_cpu_ms_per_submit": round(1000 * api_s / max(len(latencies), 1), 3),
            "other_cores": round(max(machine_s - api_s - own_s, 0.0) / elapsed, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 300.0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds at 50/s for each API before measuring")
    args = parser.parse_args()
    raise_file_limit()
    work = Path(tempfile.mkdtemp(prefix="difyq-bench-durable-"))
    servers = SentinelDeployment(work)
    apis: dict[str, tuple[Service, int]] = {}
    results: dict[str, list[dict[str, Any]]] = {setting: [] for setting in SETTINGS}
    try:
        servers.start_server("a")
        servers.start_server("b", replica_of="a")
        wait_for(lambda: servers.replicas_of("a") == 1, 10, what="the replica connecting")
        url = f"redis://127.0.0.1:{servers.servers['a']}/0"
        for setting, durable in SETTINGS.items():
            log_dir = work / setting.replace(" ", "-")
            log_dir.mkdir()
            apis[setting] = start_api(REPO_ROOT, url, log_dir, {}, {"durable_submit": durable})
            port = apis[setting][1]
            asyncio.run(open_loop(lambda port=port: HttpSubmitter("127.0.0.1", port, CLIENT_TOKEN, APP,
                                                                  CALLBACK_URL), 50.0, args.warmup))
        for rate in args.rates:  # the two settings take turns at each rate, so a noisy moment hits one run only
            for setting, (api, port) in apis.items():
                figures = measure(port, api.pid, rate, args.seconds)
                results[setting].append(figures)
                print(f"{setting:18s} {rate:6.0f}/s  p50 {figures['submit_ms_p50']:6.2f} ms  "
                      f"p99 {figures['submit_ms_p99']:6.2f} ms  api {figures['api_cpu_ms_per_submit']:5.2f} "
                      f"cpu-ms/submit  errors {figures['errors']}  other {figures['other_cores']:4.2f} cores",
                      flush=True)
    finally:
        for api, _ in apis.values():
            api.stop()
        servers.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
