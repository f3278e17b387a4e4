"""Benchmark the operator console over a large job store: page weight and time to render in headless Chromium.

A private Redis gets ``--jobs`` jobs (100,000 by default) through the job store's own submit; the newest 200 are
finished with a result and usage, so the first page has every column filled. The API (with the console) serves
on loopback; Debian's Chromium signs in and loads each page ``--loads`` times. Per page: the server's answer time
(requests, median and p95 over ``--loads``), the HTML and total page weight (bytes over the wire, static files
included on a cold load), and Chromium's timing from navigation start: DOMContentLoaded and rendered (the first
frame painted after the load event), median and p95 of warm loads.
Pages: the jobs list, the list filtered to a status no job has (the walk stops at its per-page bound), the tenth
page by cursor, a search by the Dify message id of the oldest finished job (a lookup of ``RedisKeys.dify_id``),
and a job's page.

Run standalone (not part of ``make test``)::

    .venv/bin/python tests/bench/bench_console.py [--jobs 100000 --loads 10]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

import requests

from difyq.worker.embedded_redis import EmbeddedRedis
from difyq.worker.jobs.model import JobRequest, NewJob
from difyq.worker.jobs.schema import JobStatus
from tests.support.browser import By, headless_chromium, wait_until
from tests.support.stack import make_runtime, serving_api

TOKEN = "bench-operator-token-0123456789"
FINISHED = 200
# After the load event: the next frame painted (two animation frames) counts as rendered.
_TIMING = """
const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const resources = performance.getEntriesByType('resource');
  done({html_decoded_bytes: nav.decodedBodySize,
        total_bytes: nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0),
        rendered_ms: performance.now(), dom_content_loaded_ms: nav.domContentLoadedEventEnd,
        rows: document.querySelectorAll('tr[data-job]').length});
}));
"""


def fill(runtime: Any, count: int) -> tuple[list[str], list[str], float]:
    """``count`` jobs through the store's submit; the newest FINISHED get a result. Returns ids, the finished
    jobs' message ids (oldest first) and seconds."""
    started = time.perf_counter()
    ids = []
    for n in range(count):
        new = NewJob(app="support", source="api", scope="client:full", idempotency_key=f"bench-{n}",
                     request=JobRequest(query=f"question {n}", inputs={"ticket": n}, user="bench"))
        ids.append(runtime.store.submit(new).job["id"])
    usage = {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200, "total_price": "0.0004",
             "currency": "USD", "latency": 1.2}
    message_ids = []
    for job_id in ids[-FINISHED:]:
        message_ids.append(str(uuid.uuid4()))
        runtime.store.finish(job_id, JobStatus.SUCCEEDED, result={
            "answer": "An answer of a typical length. " * 8, "outputs": None, "conversation_id": str(uuid.uuid4()),
            "message_id": message_ids[-1], "workflow_run_id": None, "usage": usage})
    return ids, message_ids, time.perf_counter() - started


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]}


def measure(browser: Any, session: requests.Session, url: str, loads: int) -> dict[str, Any]:
    served = []
    for _ in range(loads):
        began = time.perf_counter()
        answer = session.get(url, timeout=30)
        served.append((time.perf_counter() - began) * 1000)
        answer.raise_for_status()
    browser.execute_cdp_cmd("Network.clearBrowserCache", {})
    browser.get(url)
    cold = browser.execute_async_script(_TIMING)
    warm = []
    for _ in range(loads):
        browser.get(url)
        warm.append(browser.execute_async_script(_TIMING))
    return {
        "server_ms": _quantiles(served),
        "html_bytes": cold["html_decoded_bytes"], "cold_load_bytes": cold["total_bytes"],
        "rendered_ms": _quantiles([timing["rendered_ms"] for timing in warm]),
        "dom_content_loaded_ms": _quantiles([timing["dom_content_loaded_ms"] for timing in warm]),
        "rows": cold["rows"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args(argv)
    with EmbeddedRedis() as server:
        runtime = make_runtime(server.url, "bench", {"support": {"api_key": "app-bench", "mode": "chat"}},
                               console={"users": {"bench": {"token": TOKEN, "role": "operator"}}})
        ids, message_ids, fill_s = fill(runtime, args.jobs)
        with serving_api(runtime) as api, headless_chromium(1440, 900) as browser:
            console = f"{api}/console"
            browser.get(f"{console}/login")
            field = browser.find_element(By.ID, "token")
            field.send_keys(TOKEN)
            field.submit()
            wait_until(browser, lambda b: b.current_url.endswith("/console/jobs"))
            session = requests.Session()
            for cookie in browser.get_cookies():
                session.cookies.set(cookie["name"], cookie["value"])
            tenth = f"{console}/jobs"
            for _ in range(9):
                tenth = browser.find_element(By.CSS_SELECTOR, "a[rel=next]").get_attribute("href")
                browser.get(tenth)
            pages = {"jobs list": f"{console}/jobs", "filtered, no match": f"{console}/jobs?status=canceled",
                     "tenth page": tenth, "search by Dify message id": f"{console}/jobs?q={message_ids[0]}",
                     "job page": f"{console}/jobs/{ids[-1]}"}
            results = {name: measure(browser, session, url, args.loads) for name, url in pages.items()}
    print(json.dumps({"jobs": args.jobs, "fill_s": round(fill_s, 1), "loads": args.loads, "pages": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
