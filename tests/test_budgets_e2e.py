"""Spend budgets with real difyq processes (the API and the worker) against the emulator: a hard budget defers the
job that would cross it to the next period, where it runs, or fails it `budget_exhausted`; the reservation of a
SIGKILLed worker is reclaimed; `GET /v1/budgets` and the metrics show the figures Redis holds."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from difyq.worker.budgets import period_at
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.embedded_redis import free_port
from difyq.worker.redis_keys import RedisKeys
from tests.support.markdown import DOCS, blocks
from tests.support.processes import difyq_processes, wait_for_port
from tests.support.stack import CLIENT_TOKEN, auth
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

QUERY = "budget"  # the emulator's chat usage: 1 word + 5 prompt tokens, 8 completion tokens
JOB_TOKENS = 14


def quiet_day_zone() -> str:
    """Of two zones twelve hours apart, the one whose day has longer left (no test runs into a day's end)."""
    now = time.time()
    return max(("Etc/GMT+12", "Etc/GMT-12"), key=lambda zone: period_at("day", ZoneInfo(zone), now).seconds_left(now))


def config_for(emulator_url: str, namespace: str) -> dict[str, Any]:
    apps = {name: {"api_key": f"app-{name}-budget-key", "mode": "chat", "base_url": emulator_url}
            for name in ("metered", "strict", "slow", "bounded")}
    return {
        "apps": apps,
        "clients": {"full": {"token": CLIENT_TOKEN, "apps": ["*"]},
                    "strict-only": {"token": "strict-only-token-0123456789", "apps": ["strict"]}},
        "redis": {"namespace": namespace},
        "jobs": {"retry_min_backoff": "0.05s", "retry_max_backoff": "0.2s", "max_attempts": 2, "max_wait": "10m"},
        "budgets_timezone": quiet_day_zone(),
        "budgets": {
            "metered-minute": {"by": "app", "of": "metered", "unit": "tokens", "limit": 1000, "period": "minute",
                               "estimate": 20, "on_exhausted": "defer", "timezone": "Asia/Kathmandu"},
            "strict-daily": {"by": "app", "of": "strict", "unit": "tokens", "limit": 100, "soft": 50,
                             "estimate": 20, "on_exhausted": "fail"},
            "slow-daily": {"by": "app", "of": "slow", "unit": "tokens", "limit": 1000, "estimate": 500},
            "bounded-daily": {"by": "app", "of": "bounded", "unit": "tokens", "limit": 100, "estimate": 20},
            "per-client-usd": {"by": "client", "limit": 5, "currency": "USD"},
            "per-tenant-tokens": {"by": "tenant", "unit": "tokens", "limit": 100000},
        },
    }


def submit(base: str, app: str, **fields: str) -> str:
    response = requests.post(f"{base}/v1/jobs", headers=auth(), timeout=10,
                             json={"app": app, "query": QUERY, **fields})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def job(base: str, job_id: str) -> dict[str, Any]:
    return requests.get(f"{base}/v1/jobs/{job_id}", headers=auth(), timeout=10).json()


def budgets(base: str, token: str = CLIENT_TOKEN) -> dict[tuple[str, str], dict[str, Any]]:
    response = requests.get(f"{base}/v1/budgets", headers=auth(token), timeout=10)
    assert response.status_code == 200, response.text
    return {(row["name"], row["subject"]): row for row in response.json()["budgets"]}


def samples(port: int) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name.startswith("difyq_budget")}


def finished(base: str, job_id: str, timeout: float) -> dict[str, Any]:
    return wait_for(lambda: (found := job(base, job_id))["status"] in ("succeeded", "failed", "canceled") and found,
                    timeout=timeout, what=f"job {job_id} finished")


def test_hard_budgets_defer_or_fail_the_job_that_would_cross_them(tmp_path: Path, redis_url: str,
                                                                  namespace: str) -> None:
    apps = [EmulatedApp(name=name, key=f"app-{name}-budget-key", mode="chat")
            for name in ("metered", "strict", "slow", "bounded")]
    store = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = RedisKeys(namespace)
    with start_emulator(apps) as emulator, \
            difyq_processes(tmp_path, redis_url, config_for(emulator.base_url, namespace)) as difyq:
        worker, metrics_port = difyq.launch_worker(processes=1, threads=4)  # beside the API's start
        base = difyq.start_api()
        wait_for_port(metrics_port, process=worker)

        # on_exhausted: defer, on a minute budget (in a zone 5:45 off UTC): the job waits, holding no worker
        # thread, until the next minute begins, and runs then. It is deferred first, and the other budgets are
        # checked while it waits for its minute.
        wait_for(lambda: period_at("minute", ZoneInfo("Asia/Kathmandu"), time.time()).seconds_left(time.time()) > 5,
                 timeout=45, what="a minute with 5 s left")
        period = period_at("minute", ZoneInfo("Asia/Kathmandu"), time.time())
        store.hset(keys.budget_spent("metered-minute", period.id), "metered", 990)
        deferred_id = submit(base, "metered")
        record = wait_for(lambda: (fields := store.hgetall(keys.job(deferred_id))).get("deferred_by") == "budget"
                          and fields, timeout=30, what="the job deferred by its budget")
        assert record["status"] == "queued" and record["attempts"] == "0"
        assert period.end.timestamp() <= float(record["next_attempt_at"]) <= period.end.timestamp() + 6
        metered = budgets(base)[("metered-minute", "metered")]
        assert (metered["period"]["id"], metered["spent"], metered["remaining"]) == (period.id, 990, 10)
        assert metered["period"]["end"] == period.end.isoformat()

        # on_exhausted: fail. A job that fits runs and is charged its real usage (14 tokens, now the app's mean, which
        # replaces the configured estimate); then the figure is set near the limit, and the job whose estimate would
        # take it over 100 fails at once, without calling Dify.
        first = finished(base, submit(base, "strict", tenant="acme"), timeout=60)
        assert first["status"] == "succeeded" and first["result"]["usage"]["total_tokens"] == JOB_TOKENS
        strict = budgets(base)[("strict-daily", "strict")]
        assert (strict["spent"], strict["reserved"], strict["remaining"], strict["state"]) == (JOB_TOKENS, 0,
                                                                                            100 - JOB_TOKENS, "ok")
        store.hset(keys.budget_spent("strict-daily", strict["period"]["id"]), "strict", 90)

        def strict_calls() -> int:  # the deferred metered job may reach Dify meanwhile: only strict's calls count
            return sum(1 for call in emulator.calls() if call.get("app") == "strict")

        calls_before = strict_calls()
        refused = finished(base, submit(base, "strict"), timeout=60)
        assert refused["status"] == "failed" and refused["error"]["code"] == "budget_exhausted", refused
        assert "budget 'strict-daily'" in refused["error"]["message"] and refused["attempts"] == 0
        assert strict_calls() == calls_before, "a refused job never reaches Dify"
        strict = budgets(base)[("strict-daily", "strict")]
        assert (strict["spent"], strict["reserved"], strict["remaining"], strict["state"]) == (90, 0, 10, "soft")
        example = next(json.loads(block.text) for block in blocks(DOCS / "http-api.md", "json")
                       if '"budgets"' in block.text)["budgets"][0]
        assert (set(example), set(example["period"])) == (set(strict), set(strict["period"])), (
            "docs/http-api.md's budgets example names the fields GET /v1/budgets returns")

        # on_exhausted: defer, but the day's end is further off than jobs.max_wait (10 minutes): failed at once.
        bounded = budgets(base)[("bounded-daily", "bounded")]
        store.hset(keys.budget_spent("bounded-daily", bounded["period"]["id"]), "bounded", 100)
        too_far = finished(base, submit(base, "bounded"), timeout=60)
        assert too_far["status"] == "failed" and too_far["error"]["code"] == "budget_exhausted", too_far
        assert "jobs.max_wait (600s) ends before that" in too_far["error"]["message"]

        # `difyq budgets` prints what GET /v1/budgets shows.
        printed = difyq.run("budgets")
        assert printed.returncode == 0, printed.stderr
        shown = {(row["name"], row["subject"]): row for row in json.loads(printed.stdout)["budgets"]}
        assert shown[("strict-daily", "strict")] == budgets(base)[("strict-daily", "strict")]

        ran = finished(base, deferred_id, timeout=120)
        assert ran["status"] == "succeeded", ran
        assert datetime.fromisoformat(ran["started_at"]).timestamp() >= period.end.timestamp()
        started = period_at("minute", ZoneInfo("Asia/Kathmandu"), datetime.fromisoformat(ran["started_at"]).timestamp())
        assert store.hget(keys.budget_spent("metered-minute", started.id), "metered") == str(JOB_TOKENS), (
            "the new period is charged the job's real usage")

        # Money: each client's USD budget counts Dify's total_price of its jobs.
        usd = budgets(base)[("per-client-usd", "full")]
        price = sum(float(found["result"]["usage"]["total_price"]) for found in (first, ran))
        assert usd["spent"] == pytest.approx(price, abs=1e-7) and usd["unit"] == "USD" and usd["by"] == "client"
        assert ("per-client-usd", "strict-only") in budgets(base), "a client budget lists every configured client"
        assert set(budgets(base, "strict-only-token-0123456789")) == {("strict-daily", "strict"),
                                                                      ("per-client-usd", "strict-only")}
        tenants = {subject: row["spent"] for (name, subject), row in budgets(base).items()
                   if name == "per-tenant-tokens"}
        assert tenants == {"acme": JOB_TOKENS, "full": JOB_TOKENS}, "each tenant that spent, by its own figure"

        # The metrics: the figures of GET /v1/budgets, and the refused jobs by outcome.
        def exported() -> dict[tuple[str, frozenset], float]:
            found = samples(metrics_port)
            strict_labels = frozenset({"budget": "strict-daily", "subject": "strict", "unit": "tokens"}.items())
            return found if found.get(("difyq_budget_spent", strict_labels)) == 90 else {}

        found = wait_for(exported, timeout=30, what="the budget gauges exported")
        strict_labels = {"budget": "strict-daily", "subject": "strict", "unit": "tokens"}
        assert found[("difyq_budget_remaining", frozenset(strict_labels.items()))] == 10
        assert found[("difyq_budget_limit", frozenset({**strict_labels, "threshold": "soft"}.items()))] == 50
        assert found[("difyq_budget_limit", frozenset({**strict_labels, "threshold": "hard"}.items()))] == 100
        assert found[("difyq_budget_refused_total",
                      frozenset({"budget": "strict-daily", "outcome": "failed"}.items()))] == 1
        assert found[("difyq_budget_refused_total",
                      frozenset({"budget": "metered-minute", "outcome": "deferred"}.items()))] >= 1
        usd_labels = frozenset({"budget": "per-client-usd", "subject": "full", "unit": "USD"}.items())
        assert found[("difyq_budget_spent", usd_labels)] == pytest.approx(price, abs=1e-7)


def test_the_reservation_of_a_killed_worker_is_reclaimed(tmp_path: Path, redis_url: str, namespace: str) -> None:
    apps = [EmulatedApp(name="slow", key="app-slow-budget-key", mode="chat", time_to_first_token_s=120)]
    with start_emulator(apps) as emulator, \
            difyq_processes(tmp_path, redis_url, config_for(emulator.base_url, namespace)) as difyq:
        # A 1 s lease: a reservation is held for two leases (2 s) past its worker's last renewal.
        worker = difyq.start("worker", "worker", "--processes", "1", "--threads", "2",
                             env={"DIFYQ_JOB_LEASE": "1s", "DIFYQ_METRICS_PORT": str(free_port()),
                                  "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus")})
        base = difyq.start_api()
        job_id = submit(base, "slow")
        wait_for(lambda: budgets(base)[("slow-daily", "slow")]["reserved"] == 500, timeout=60,
                 what="the slow job's estimate reserved")
        reserved_at = time.monotonic()
        wait_for(lambda: time.monotonic() - reserved_at > 4 and budgets(base)[("slow-daily", "slow")]["reserved"],
                 timeout=30, what="the reservation kept past two holds (2 s each) while its call runs")
        assert job(base, job_id)["status"] == "running"
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        slow = wait_for(lambda: (row := budgets(base)[("slow-daily", "slow")])["reserved"] == 0 and row, timeout=30,
                        what="the killed worker's reservation reclaimed")
        assert (slow["spent"], slow["remaining"]) == (0, 1000)
