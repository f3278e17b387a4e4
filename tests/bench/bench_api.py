"""What one ``POST /v1/jobs`` costs the API process: submit latency and CPU per request, with no worker running.

    .venv/bin/python -m tests.bench.bench_api                        # 100/s and 300/s, 15 s each
    .venv/bin/python -m tests.bench.bench_api --rates 100 --seconds 10 --difyq-src /tmp/difyq-base

It starts a private Redis and ``difyq api`` (from ``--difyq-src``, to compare a copy of another commit) as real
processes, warms the API up, then offers each rate open loop (``loadgen.open_loop``, Poisson arrivals, latency
counted from each request's due time) and prints per rate: submit p50/p99, the API process's user+sys CPU ms per
request (psutil), Redis' CPU ms per request, the load generator's cores and ``other``: the cores the rest of the
machine used meanwhile (other people's runs), to tell a noisy run from a real change.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis
import yaml

from difyq.worker.embedded_redis import EmbeddedRedis, free_port
from tests.bench.loadgen import HttpSubmitter, open_loop
from tests.bench.stack import (
    APP,
    CLIENT_TOKEN,
    DIFY_KEY,
    NAMESPACE,
    REPO_ROOT,
    SIGNING_SECRET,
    Service,
    import_path,
    raise_file_limit,
    source_commit,
)
from tests.support.processes import wait_for_port

# Never called (no worker runs), but every submit takes the SSRF check: of a literal IP by default, of a name
# (a DNS lookup) with --callback-url http://localhost:9/callback.
CALLBACK_URL = "http://127.0.0.1:9/callback"


def start_api(src: Path, redis_url: str, log_dir: Path, extra_env: dict[str, str],
              redis_settings: dict[str, object] | None = None) -> tuple[Service, int]:
    """``difyq api`` from ``src`` on a free port, configured for the bench app and client (``redis_settings``
    added to the config's ``redis`` section)."""
    config = {
        "apps": {APP: {"api_key": DIFY_KEY, "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}},
        "clients": {"bench": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8", "::1"]},
        "redis": {"namespace": NAMESPACE, **(redis_settings or {})},
    }
    config_path = log_dir / "difyq.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "DIFYQ_CONFIG": str(config_path), "REDIS_URL": redis_url,
           "PYTHONPATH": import_path(src, log_dir), "PYTHONUNBUFFERED": "1", **extra_env}
    port = free_port()
    api = Service("difyq-api", [sys.executable, "-m", "difyq.producers.cli", "api", "--port", str(port)], log_dir, env,
                  cwd=src)
    wait_for_port(port, process=api.process)
    return api, port


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_rate(port: int, api_pid: int, client: redis.Redis, rate: float, seconds: float, callback_url: str) -> str:
    """Offer ``rate`` submits/s for ``seconds``; one line of figures."""
    api = psutil.Process(api_pid)
    redis_cpu = client.info("cpu")
    api_before, machine_before, own_before = api.cpu_times(), psutil.cpu_times(), psutil.Process().cpu_times()
    began = time.monotonic()
    submissions = asyncio.run(open_loop(
        lambda: HttpSubmitter("127.0.0.1", port, CLIENT_TOKEN, APP, callback_url), rate, seconds))
    elapsed = time.monotonic() - began
    api_after, machine_after, own_after = api.cpu_times(), psutil.cpu_times(), psutil.Process().cpu_times()
    redis_after = client.info("cpu")
    latencies = [1000 * (s.accepted - s.intended) for s in submissions if s.accepted is not None]
    count = max(len(latencies), 1)
    api_s = (api_after.user + api_after.system) - (api_before.user + api_before.system)
    redis_s = sum(float(redis_after[k]) - float(redis_cpu[k]) for k in ("used_cpu_user", "used_cpu_sys"))
    own_s = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    machine_s = sum(getattr(machine_after, k) - getattr(machine_before, k) for k in ("user", "system", "nice"))
    other_cores = max(machine_s - api_s - redis_s - own_s, 0.0) / elapsed
    errors = [s.error for s in submissions if s.accepted is None]
    return (f"{rate:6.0f}/s  n={len(latencies):5d} err={len(errors):<3d} p50 {percentile(latencies, 0.5):6.2f} ms  "
            f"p99 {percentile(latencies, 0.99):6.2f} ms  api {1000 * api_s / count:5.2f} cpu-ms/req  "
            f"redis {1000 * redis_s / count:5.3f} cpu-ms/req  loadgen {own_s / elapsed:4.2f} cores  "
            f"other {other_cores:4.2f} cores" + (f"\n        first error: {errors[0]}" if errors else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 300.0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at 50/s before the first rate")
    parser.add_argument("--callback-url", default=CALLBACK_URL)
    parser.add_argument("--difyq-src", type=Path, default=REPO_ROOT)
    parser.add_argument("--difyq-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    raise_file_limit()
    src = args.difyq_src.resolve()
    log_dir = Path(tempfile.mkdtemp(prefix="difyq-bench-api-"))
    server = EmbeddedRedis(directory=str(log_dir)).start()
    client = redis.Redis.from_url(server.url)
    api: Service | None = None
    try:
        api, port = start_api(src, server.url, log_dir, dict(item.partition("=")[::2] for item in args.difyq_env))
        print(f"difyq api from {src} ({source_commit(src)}), pid {api.pid}", flush=True)
        asyncio.run(open_loop(lambda: HttpSubmitter("127.0.0.1", port, CLIENT_TOKEN, APP, args.callback_url),
                              50.0, args.warmup))
        for rate in args.rates:
            print(run_rate(port, api.pid, client, rate, args.seconds, args.callback_url), flush=True)
            if not api.alive():
                raise RuntimeError(f"difyq api exited:\n{api.tail()}")
    finally:
        if api is not None:
            api.stop()
        client.close()
        server.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
