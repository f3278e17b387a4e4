"""What both baselines do for one job: the same streaming Dify call difyq makes, with requests, then POST the
result to the callback URL. No API, idempotency, limits, job records, metrics or signing: the floor.

The emulator's base URL and key come from ``BENCH_DIFY_URL`` and ``BENCH_DIFY_KEY``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import requests

_local = threading.local()


def _session() -> requests.Session:
    """One keep-alive session per worker thread (per greenlet under gevent), as difyq has."""
    session: requests.Session | None = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
    return session


def run_baseline_job(job_id: str, query: str, callback_url: str) -> None:
    """Call the chat app with ``response_mode: streaming``, gather the answer, POST it with a ``webhook-id``."""
    session = _session()
    base_url = os.environ["BENCH_DIFY_URL"].rstrip("/")
    body = {"inputs": {}, "query": query, "response_mode": "streaming", "user": "bench"}
    headers = {"Authorization": f"Bearer {os.environ['BENCH_DIFY_KEY']}", "Accept": "text/event-stream"}
    answer: list[str] = []
    usage: dict[str, Any] | None = None
    with session.post(f"{base_url}/chat-messages", json=body, headers=headers, stream=True,
                      timeout=(5, 120)) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if event.get("event") == "message":
                answer.append(event.get("answer") or "")
            elif event.get("event") == "message_end":
                usage = (event.get("metadata") or {}).get("usage")
    result = {"id": job_id, "status": "succeeded", "answer": "".join(answer), "usage": usage}
    session.post(callback_url, json=result, headers={"webhook-id": job_id}, timeout=15).raise_for_status()
