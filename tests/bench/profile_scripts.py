"""Redis's time per script for one job's hot path, without the bench's load: each job goes submit → Dramatiq's
fetch → admission → start → release with finish (one round trip) → callback recorded → ack, one after another
through difyq's own store, throttle and broker, on a private Redis, with the slow log at threshold 0
(``redis_trace.ScriptTimes``), which also counts Redis's reads of client requests: the job's round trips.

    .venv/bin/python -m tests.bench.profile_scripts --jobs 500             # an app without limits
    .venv/bin/python -m tests.bench.profile_scripts --jobs 500 --limits    # requests, tokens and concurrency

Under the bench's concurrent load the slow log's durations include the Redis process's waits for a core; here
each command runs alone, so the per-call times are the scripts' own. Prints one JSON object (the last line).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.model import JobRequest, NewJob
from tests.bench.redis_trace import ScriptTimes
from tests.bench.stack import LIMITED_APP_LIMITS
from tests.support.job_path import JobPath
from tests.support.stack import make_runtime

RESULT = {"answer": "x" * 64, "outputs": None, "conversation_id": "c" * 36, "message_id": "m" * 36,
          "workflow_run_id": None, "time_to_first_token_s": 0.2,
          "usage": {"prompt_tokens": 10, "completion_tokens": 30, "total_tokens": 40, "total_price": "0.0001",
                    "currency": "USD", "latency": 0.2}}


def profile(jobs: int, limits: bool) -> dict[str, Any]:
    app: dict[str, Any] = {"api_key": "app-profile", "mode": "chat", "base_url": "http://127.0.0.1:9/v1"}
    if limits:
        app["limits"] = LIMITED_APP_LIMITS
    server = EmbeddedRedis().start()
    try:
        runtime = make_runtime(server.url, "profile", {"bench": app})
        path = JobPath(runtime)
        with ScriptTimes(server.url) as times:
            for _ in range(jobs):
                path.through(NewJob(app="bench", source="api", request=JobRequest(query="profile job"),
                                    scope="client:full", callback_url="http://127.0.0.1:9/cb"), RESULT)
        return {"limits": limits, **times.per_job(jobs)}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile_scripts", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--limits", action="store_true", help="the app has every limit (none binding)")
    args = parser.parse_args()
    result = profile(args.jobs, args.limits)
    print(f"{result['reads_per_job']:.2f} round trips (client reads) per job, Redis CPU "
          f"{result['redis_cpu_us_per_job']:.0f} µs per job")
    for name, figures in result["by_name"].items():
        print(f"{name:28} {figures['calls_per_job']:5.2f}/job {figures['usec_per_call']:7.1f} µs/call "
              f"{figures['usec_per_job']:7.1f} µs/job")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
