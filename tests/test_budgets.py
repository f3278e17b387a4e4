"""Spend budgets on a real Redis: the ledger's reservations and charges (atomic, all or nothing, reclaimed past
their deadline, charged once), the periods of a time zone, and the config that declares budgets."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
import redis

from difyq.worker.budgets import BudgetLedger, JobSubjects, configured_budgets, period_at
from difyq.worker.budgets.gate import Cost
from difyq.worker.budgets.ledger import Claim
from difyq.worker.config import ConfigError, parse_config
from tests.support.waiting import wait_for

APPS = {"support": {"api_key": "app-support-key", "mode": "chat"}, "other": {"api_key": "app-other-key",
                                                                           "mode": "chat"}}


def budgets_of(budgets: dict, **extra) -> list:
    config = parse_config({"apps": APPS, "clients": {"crm": {"token": "crm-token"}}, "budgets": budgets, **extra})
    return configured_budgets(config)


def claims(budgets: list, job: JobSubjects, now: float, first_estimate: int = 0) -> list[Claim]:
    return [Claim(budget, subject, budget.period(now), first_estimate)
            for budget in budgets if (subject := budget.subject(job)) is not None]


@pytest.fixture
def ledger(redis_url: str, namespace: str) -> BudgetLedger:
    return BudgetLedger(redis.Redis.from_url(redis_url, decode_responses=True), namespace)


def test_a_reservation_is_charged_with_the_real_usage_and_released(ledger: BudgetLedger) -> None:
    [budget] = budgets_of({"tokens": {"by": "app", "of": "support", "unit": "tokens", "limit": 1000}})
    now = time.time()
    job = claims([budget], JobSubjects("support", None, "acme"), now, first_estimate=300)
    reservations, shortfalls = ledger.reserve("support", job, now, hold_s=60)
    assert not shortfalls and [r.amount for r in reservations] == [300]
    [(_, _, [figures])] = ledger.status([budget], now)
    assert (figures.subject, figures.spent, figures.reserved) == ("support", 0, 300)
    assert ledger.settle(reservations, [120], {budget.estimate_field("support"): 120}, time.time()) == 1
    assert ledger.settle(reservations, [120], {budget.estimate_field("support"): 120}, time.time()) == 0
    [(_, _, [figures])] = ledger.status([budget], time.time())
    assert (figures.spent, figures.reserved) == (120, 0), "settled twice, charged once"
    reservations, _ = ledger.reserve("support", job, time.time(), hold_s=60)
    assert [r.amount for r in reservations] == [120], "the app's mean real cost replaces the first estimate"


def test_the_job_that_would_cross_the_hard_limit_is_refused(ledger: BudgetLedger) -> None:
    [budget] = budgets_of({"tokens": {"by": "app", "unit": "tokens", "limit": 1000}})
    now = time.time()
    job = claims([budget], JobSubjects("support", None, "acme"), now, first_estimate=400)
    first, _ = ledger.reserve("support", job, now, hold_s=60)
    second, _ = ledger.reserve("support", job, now, hold_s=60)
    third, [shortfall] = ledger.reserve("support", job, now, hold_s=60)
    assert len(first) == len(second) == 1 and third == []
    assert (shortfall.spent, shortfall.reserved, shortfall.estimate) == (0, 800, 400)
    assert "budget 'tokens' (app 'support'" in shortfall.describe()
    other, _ = ledger.reserve("other", claims([budget], JobSubjects("other", None, "acme"), now, 400), now, hold_s=60)
    assert len(other) == 1, "a budget without `of` counts each app on its own"
    ledger.settle(first + second, [500, 600], {}, time.time())
    refused, [shortfall] = ledger.reserve("support", job, time.time(), hold_s=60)
    assert refused == [] and (shortfall.spent, shortfall.reserved) == (1100, 0)


def test_a_budget_smaller_than_one_job_lets_one_job_through(ledger: BudgetLedger) -> None:
    [budget] = budgets_of({"tiny": {"by": "app", "of": "support", "unit": "tokens", "limit": 10}})
    now = time.time()
    job = claims([budget], JobSubjects("support", None, "acme"), now, first_estimate=50)
    admitted, _ = ledger.reserve("support", job, now, hold_s=60)
    refused, shortfalls = ledger.reserve("support", job, now, hold_s=60)
    assert len(admitted) == 1 and refused == [] and len(shortfalls) == 1


def test_every_budget_of_a_job_reserves_or_none_does(ledger: BudgetLedger) -> None:
    budgets = budgets_of({
        "app-tokens": {"by": "app", "of": "support", "unit": "tokens", "limit": 100000},
        "client-tokens": {"by": "client", "of": "crm", "unit": "tokens", "limit": 100},
    })
    now = time.time()
    job = claims(budgets, JobSubjects("support", "crm", "crm"), now, first_estimate=60)
    assert len(job) == 2
    admitted, _ = ledger.reserve("support", job, now, hold_s=60)
    refused, [shortfall] = ledger.reserve("support", job, now, hold_s=60)
    assert len(admitted) == 2 and refused == [] and shortfall.claim.budget.name == "client-tokens"
    figures = {budget.name: [(f.subject, f.reserved) for f in found]
               for budget, _, found in ledger.status(budgets, now)}
    assert figures == {"app-tokens": [("support", 60)], "client-tokens": [("crm", 60)]}, "the refusal reserved nothing"
    hook_job = JobSubjects("support", None, "hook:inbound")
    assert claims(budgets, hook_job, now) == claims(budgets[:1], hook_job, now), "a job without a client"


def test_a_reservation_nobody_renews_is_reclaimed_after_its_deadline(ledger: BudgetLedger) -> None:
    [budget] = budgets_of({"tokens": {"by": "app", "of": "support", "unit": "tokens", "limit": 2000}})
    now = time.time()
    job = claims([budget], JobSubjects("support", None, "acme"), now, first_estimate=700)
    renewed, _ = ledger.reserve("support", job, now, hold_s=1.0)
    abandoned, _ = ledger.reserve("other-app-estimate", [job[0]], now, hold_s=1.0)
    assert abandoned and renewed

    def reserved() -> int:
        ledger.renew(renewed, time.time(), hold_s=1.0)
        return ledger.status([budget], time.time())[0][2][0].reserved

    wait_for(lambda: reserved() == 700, timeout=10, what="the abandoned reservation reclaimed")
    assert ledger.settle(abandoned, [700], {}, time.time()) == 0, "a reclaimed reservation is not charged"
    assert ledger.settle(renewed, [650], {}, time.time()) == 1
    assert ledger.status([budget], time.time())[0][2][0].spent == 650


def test_a_price_budget_counts_its_currency_only() -> None:
    [budget] = budgets_of({"usd": {"by": "app", "limit": 5, "currency": "USD"}})
    assert Cost.of({"total_tokens": 10, "total_price": "0.0012345", "currency": "USD"}).units_for(budget) == 12345
    assert Cost.of({"total_tokens": 10, "total_price": "0.5", "currency": "RMB"}).units_for(budget) == 0
    assert Cost.of({"total_tokens": 10, "total_price": None, "currency": None}).units_for(budget) is None
    assert Cost.of(None).units_for(budget) is None
    assert budget.limit == 5 * 10**7 and budget.amount(12345) == 0.0012345 and budget.unit == "USD"


@pytest.mark.parametrize(("kind", "when", "period", "length_h"), [
    ("day", "2026-03-29T12:00:00+02:00", "2026-03-29", 23),  # spring forward in Berlin
    ("day", "2026-10-25T12:00:00+01:00", "2026-10-25", 25),  # fall back
    ("month", "2026-12-31T23:30:00+01:00", "2026-12", 31 * 24),
    ("hour", "2026-10-25T02:30:00+02:00", "2026-10-25T02+0200", 1),  # the first 02:00 of a fall-back day
    ("hour", "2026-10-25T02:30:00+01:00", "2026-10-25T02+0100", 1),  # and the second
    ("minute", "2026-12-06T09:41:59+01:00", "2026-12-06T0941+0100", 1 / 60),
])
def test_periods_follow_the_calendar_of_the_zone(kind: str, when: str, period: str, length_h: float) -> None:
    found = period_at(kind, ZoneInfo("Europe/Berlin"), datetime.fromisoformat(when).timestamp())
    assert found.id == period
    assert found.end.timestamp() - found.start.timestamp() == pytest.approx(length_h * 3600)
    assert found.start.timestamp() <= datetime.fromisoformat(when).timestamp() < found.end.timestamp()


def test_a_budget_follows_its_own_zone_or_budgets_timezone() -> None:
    own, default = budgets_of({"own": {"by": "app", "limit": 1, "timezone": "Asia/Kathmandu"},
                               "default": {"by": "app", "limit": 1}}, budgets_timezone="America/New_York")
    assert (str(own.zone), str(default.zone)) == ("Asia/Kathmandu", "America/New_York")
    assert default.config.soft_limit == pytest.approx(0.8)


@pytest.mark.parametrize(("budgets", "problem"), [
    ({"b": {"by": "app", "of": "nope", "limit": 1}}, "budgets.b.of: unknown app 'nope'"),
    ({"b": {"by": "client", "of": "support", "limit": 1}}, "budgets.b.of: unknown client 'support'"),
    ({"b": {"by": "app", "limit": 10, "soft": 20}}, "budgets.b: soft (20) is over limit (10)"),
    ({"b": {"by": "app", "limit": 0}}, "budgets.b.limit: Input should be greater than 0"),
    ({"b": {"by": "app", "limit": 1, "period": "week"}}, "budgets.b.period: must be one of"),
    ({"b": {"by": "app", "limit": 1, "currency": "usd"}}, "budgets.b.currency"),
    ({"b": {"by": "app", "limit": 1, "timezone": "Mars/Olympus"}}, "budgets.b.timezone: is not an IANA time zone"),
    ({"a b": {"by": "app", "limit": 1}}, "budgets.a b: a budget name is letters"),
])
def test_bad_budgets_are_named_in_the_config_errors(budgets: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"apps": APPS, "clients": {"crm": {"token": "crm-token"}}, "budgets": budgets})
    assert any(found.startswith(problem) for found in raised.value.problems), raised.value.problems


def test_a_zero_estimate_reserves_nothing_and_still_settles(ledger: BudgetLedger) -> None:
    [budget] = budgets_of({"usd": {"by": "app", "of": "support", "limit": 5}})
    now = time.time()
    job = claims([budget], JobSubjects("support", None, "acme"), now)
    reservations, _ = ledger.reserve("support", job, now, hold_s=60)
    assert [r.amount for r in reservations] == [0]
    assert ledger.settle(reservations, [12345], {budget.estimate_field("support"): 12345}, time.time()) == 1
    [(_, _, [figures])] = ledger.status([budget], time.time())
    assert (figures.spent, figures.reserved) == (12345, 0)


def test_a_tenant_budget_counts_each_tenant_and_lists_those_that_spent(ledger: BudgetLedger) -> None:
    [budget] = budgets_of({"per-tenant": {"by": "tenant", "unit": "tokens", "limit": 100, "on_exhausted": "fail"}})
    now = time.time()
    acme = claims([budget], JobSubjects("support", "crm", "acme"), now, first_estimate=60)
    globex = claims([budget], JobSubjects("other", None, "globex"), now, first_estimate=60)
    assert [claim.subject for claim in acme + globex] == ["acme", "globex"]
    assert [ledger.status([budget], now)[0][2]] == [[]], "no tenant is listed before it spends"
    first, _ = ledger.reserve("support", acme, now, hold_s=60)
    refused, [shortfall] = ledger.reserve("support", acme, now, hold_s=60)
    other, _ = ledger.reserve("other", globex, now, hold_s=60)
    assert first and refused == [] and other and shortfall.claim.subject == "acme"
    ledger.settle(first, [30], {}, time.time())
    figures = [(f.subject, f.spent, f.reserved) for f in ledger.status([budget], time.time())[0][2]]
    assert figures == [("acme", 30, 0), ("globex", 0, 60)]
    [tenant_of] = budgets_of({"one": {"by": "tenant", "of": "acme", "limit": 1}})
    assert tenant_of.subject(JobSubjects("support", None, "globex")) is None


def test_concurrent_reservations_never_take_a_budget_past_its_limit(ledger: BudgetLedger) -> None:
    """Twenty workers reserving 100 at once on a limit of 1,000: exactly ten are admitted."""
    from concurrent.futures import ThreadPoolExecutor

    [budget] = budgets_of({"tokens": {"by": "app", "of": "support", "unit": "tokens", "limit": 1000}})
    now = time.time()
    job = claims([budget], JobSubjects("support", None, "acme"), now, first_estimate=100)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: ledger.reserve("support", job, time.time(), hold_s=60), range(20)))
    assert sum(1 for reservations, _ in answers if reservations) == 10
    assert ledger.status([budget], time.time())[0][2][0].reserved == 1000


def test_the_console_apps_page_shows_each_budget_in_its_period(redis_url: str, namespace: str) -> None:
    """Over real HTTP: an operator signed in to the console sees the budget's figures that Redis holds."""
    import re

    import requests

    from difyq.worker.redis_keys import RedisKeys
    from tests.support.stack import make_runtime, serving_api

    token = "operator-token-budgets-0123456789"
    runtime = make_runtime(redis_url, namespace, APPS, console={"users": {"alice": {"token": token,
                                                                                    "role": "viewer"}}},
                           budgets={"support-tokens": {"by": "app", "of": "support", "unit": "tokens",
                                                       "limit": 1000, "soft": 500}})
    [budget] = configured_budgets(runtime.config)
    period = budget.period(time.time())
    runtime.redis.hset(RedisKeys(namespace).budget_spent("support-tokens", period.id), "support", 640)
    with serving_api(runtime) as api:
        session = requests.Session()
        form = session.get(f"{api}/console/login", timeout=10)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
        session.post(f"{api}/console/login", data={"csrf_token": csrf, "token": token}, timeout=10)
        page = session.get(f"{api}/console/apps", timeout=10)
    assert page.status_code == 200
    row = re.search(r'<tr data-budget="support-tokens" data-subject="support">(.*?)</tr>', page.text, re.S)
    assert row, page.text
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)]
    assert cells[3:8] == ["640 tokens", "0", "360", "500 / 1000", "soft"], cells
    assert period.id in cells[2]


def test_a_job_whose_dify_run_is_under_way_is_not_refused(redis_url: str, namespace: str) -> None:
    """A paused run resumed (or a run a lost worker started) spends at Dify whatever difyq does: the job following
    it reserves and is charged past the limit instead of being deferred or failed."""
    from difyq.worker.budgets import BudgetGate
    from difyq.worker.jobs.schema import JobField
    from tests.support.stack import make_runtime

    runtime = make_runtime(redis_url, namespace, APPS, budgets={
        "tokens": {"by": "app", "of": "support", "unit": "tokens", "limit": 100, "estimate": 60}})
    gate = BudgetGate(runtime.config, BudgetLedger(runtime.limits_redis, namespace), runtime.store, hold_s=60,
                      durably=lambda write: write())
    for job_id, fields in (("job_fresh", {}), ("job_resumed", {JobField.PAUSE: "{}"}),
                           ("job_followed", {JobField.DIFY_RUN_ID: "run-1"})):
        runtime.redis.hset(runtime.store.job_key(job_id), mapping={JobField.SCOPE: "client:full", **fields})
    assert gate.reserve("job_fresh", "support", "full").admitted
    assert not gate.reserve("job_fresh", "support", "full").admitted, "60 + 60 is over 100"
    for job_id in ("job_resumed", "job_followed"):
        hold = gate.reserve(job_id, "support", "full")
        assert hold.admitted and [r.amount for r in hold.reservations] == [60]
    [(_, _, [figures])] = gate.ledger.status(gate.budgets, time.time())
    assert figures.reserved == 180


def test_a_job_a_budget_refuses_takes_no_request_of_its_keys_limits(redis_url: str, namespace: str) -> None:
    """The key's admission comes first; a budget then refusing the job withdraws it whole: the key's request log
    holds the calls made, not the refused job's."""
    from difyq.worker.dify.emulator import EmulatedApp, start_emulator
    from difyq.worker.jobs.model import JobRequest, NewJob
    from difyq.worker.limits import KeyLimiter, key_id
    from tests.support.stack import make_runtime, running_worker, wait_for_final

    chat = EmulatedApp(name="support", key="app-support-key", mode="chat", tokens_per_second=0, answer_tokens=3)
    with start_emulator([chat]) as emulator:
        apps = {"support": {"api_key": chat.key, "mode": "chat", "base_url": emulator.base_url,
                            "limits": {"requests_per_minute": 60}}}
        runtime = make_runtime(redis_url, namespace, apps, budgets={
            "tokens": {"by": "app", "of": "support", "unit": "tokens", "limit": 1, "estimate": 60,
                       "on_exhausted": "fail"}})  # the first job alone goes through (nothing spent yet)
        with running_worker(runtime, threads=1):
            ran, refused = (runtime.store.submit(NewJob(app="support", source="api", request=JobRequest(query=q),
                                                        scope="client:full")).job["id"] for q in ("first", "second"))
            statuses = [wait_for_final(runtime, job_id)["status"] for job_id in (ran, refused)]
    assert statuses == ["succeeded", "failed"]
    assert runtime.store.get(refused)["error"]["code"] == "budget_exhausted"
    request_log = KeyLimiter(runtime.limits_redis, namespace).keys(key_id(chat.key)).req
    assert runtime.limits_redis.zcard(request_log) == 1, "only the call made counts against the key's minute"
