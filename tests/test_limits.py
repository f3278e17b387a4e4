"""difyq.worker.limits against a real Redis: sliding windows, token reconciliation, leases, cooldown and fairness.

Most tests drive the scripts with the limiter's test-only fake clock (exact and instant); the threaded ones use
Redis TIME with a short window, and assert behaviour, never speed.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from difyq.worker.config import AppConfig, AppLimits
from difyq.worker.limits import (
    Admission,
    KeyLimiter,
    Reservation,
    UpstreamCheck,
    deferral_delay,
    key_id,
    record_deferral,
    shared_limits,
    wait_exceeded,
)
from difyq.worker.lua_scripts import ScriptCall, run_together

EPOCH = 1_750_000_000.0


class FakeClock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self, start: float = EPOCH):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def at(self, offset: float) -> FakeClock:
        self.t = EPOCH + offset
        return self


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(redis_client: redis.Redis, namespace: str, clock: FakeClock) -> KeyLimiter:
    return KeyLimiter(redis_client, namespace, window_s=60.0, grace_s=10.0, clock=clock)


@pytest.fixture
def kid() -> str:
    return key_id(f"app-{uuid.uuid4().hex}")


def take(limiter: KeyLimiter, kid: str, limits: AppLimits | None, ticket: str | None = None, *,
         tokens: int = 0, lease_s: float = 300.0, since: float | None = None) -> Admission:
    return limiter.acquire(kid, limits, estimated_tokens=tokens, lease_s=lease_s,
                           ticket=ticket or uuid.uuid4().hex, waiting_since=since)


def admitted_us(admissions: list[Admission]) -> list[int]:
    return sorted(round(Reservation.parse(a.reservation).admitted_at * 1e6) for a in admissions if a.reservation)


def max_in_any_window(times_us: list[int], window_us: int) -> int:
    """The most admissions inside any half-open window (t - window, t]."""
    best, start = 0, 0
    for end, t in enumerate(times_us):
        while times_us[start] <= t - window_us:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- naming and plumbing -------------------------------------------------------------------------------


def test_key_id_is_a_stable_hash_and_raw_keys_never_reach_redis(
    redis_client: redis.Redis, namespace: str, clock: FakeClock
) -> None:
    limiter = KeyLimiter(redis_client, namespace, clock=clock)
    api_key = "app-SuperSecretKey123"
    kid = limiter.key_id(api_key)
    assert kid == key_id(api_key) and len(kid) == 20 and api_key not in kid
    limits = AppLimits(requests_per_minute=1, tokens_per_minute=10, max_concurrency=1)
    take(limiter, kid, limits, tokens=5)
    take(limiter, kid, limits, tokens=5)
    limiter.report_upstream_limited(kid)
    names = [name.decode() for name in redis_client.scan_iter(match=f"{namespace}:*")]
    assert names and all(name.startswith(f"{namespace}:limits:{kid}:") for name in names)
    assert not any("SuperSecret" in name for name in names)
    assert all(redis_client.pttl(name) > 0 for name in names), "every key has a TTL, so idle keys vanish"


def test_every_key_keeps_a_ttl_when_it_empties_and_comes_back(
    redis_client: redis.Redis, namespace: str, clock: FakeClock
) -> None:
    """The window keys are refreshed together every half slack (not asked their TTL each admission): a key the
    window emptied since, written again, or a state that expired under a held slot, still gets its TTL."""
    limiter = KeyLimiter(redis_client, namespace, window_s=1.0, grace_s=10.0, clock=clock.at(0))
    kid = key_id(f"app-{uuid.uuid4().hex}")
    limits = AppLimits(requests_per_minute=100, tokens_per_minute=10_000, max_concurrency=5)

    def names() -> list[str]:
        return [name.decode() for name in redis_client.scan_iter(match=f"{namespace}:limits:{kid}:*")]

    first = take(limiter, kid, limits, tokens=50)
    assert limiter.release(kid, first.reservation, 40)
    clock.at(2)  # well inside the refreshed TTLs, and the window has emptied req, tok, amt and lease
    again = take(limiter, kid, limits, tokens=50)
    assert again.admitted and len(names()) == 5
    assert all(redis_client.pttl(name) > 0 for name in names()), "a key written again keeps a TTL"
    for name in names():
        if not name.endswith(":lease"):
            redis_client.delete(name)  # the window's keys expired while the slot was held
    assert limiter.release(kid, again.reservation, None)
    assert names() and all(redis_client.pttl(name) > 0 for name in names()), "a state written again keeps a TTL"


def test_an_admission_whose_call_was_never_made_is_withdrawn_whole(limiter: KeyLimiter, kid: str,
                                                                  clock: FakeClock) -> None:
    """A budget refused the job, or its start found it done elsewhere: its request and reserved tokens leave the
    window (the key's and its tenant's) with its slot, and the token estimate learns nothing from it."""
    from difyq.worker.config import TenantLimits

    limits = AppLimits(requests_per_minute=2, tokens_per_minute=1000, max_concurrency=2)
    own = TenantLimits(requests_per_minute=1)

    def ask(ticket: str) -> Admission:
        return limiter.acquire(kid, limits, estimated_tokens=300, lease_s=300.0, ticket=ticket, tenant="A",
                               tenant_limits=own)

    unused = ask("unused")
    assert unused.admitted and not ask("waits").admitted, "the tenant's one request of the minute is taken"
    estimate = limiter.tokens.estimate(kid, limits)
    call = limiter.release_call(kid, unused.reservation, 0, "A", called=False)
    assert call is not None and call.run() == 1
    assert limiter.remaining(kid, limits) == {"requests": 2.0, "tokens": 1000.0, "concurrency": 2.0}
    assert limiter.redis.zcard(limiter.keys(kid).tenant("A").req) == 0
    assert limiter.tokens.estimate(kid, limits) == estimate
    clock.at(0.001)
    assert ask("waits").admitted, "the withdrawn request no longer holds the tenant's minute"
    assert ask("third").limit == "tenant_requests"


def test_survives_a_script_flush(limiter: KeyLimiter, redis_client: redis.Redis, kid: str) -> None:
    redis_client.script_flush()
    assert take(limiter, kid, AppLimits(requests_per_minute=5)).admitted


def test_release_goes_with_another_write_in_one_round_trip(limiter: KeyLimiter, redis_client: redis.Redis,
                                                          redis_url: str, namespace: str, kid: str) -> None:
    """The runner sends the release with the job's finish (``run_together``): on the other client's connection, after
    a SCRIPT FLUSH too (each unknown script loaded and sent again), the replies in order, and an error raised only
    once every call has run."""
    limits = AppLimits(max_concurrency=1, tokens_per_minute=1000)
    admission = take(limiter, kid, limits, tokens=100)
    other = redis_client.register_script("redis.call('SET', KEYS[1], ARGV[1]) return 'set'")
    failing = redis_client.register_script("return redis.error_reply('refused')")
    marker = f"{namespace}:marker"
    release = limiter.release_call(kid, admission.reservation, 40)
    assert release is not None
    redis_client.script_flush()
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        assert run_together(client, [release, ScriptCall(other, [marker], ["1"])]) == [1, "set"]
        assert limiter.remaining(kid, limits) == {"tokens": 960.0, "concurrency": 1.0}
        with pytest.raises(redis.ResponseError, match="refused"):
            run_together(client, [ScriptCall(failing, [], []), ScriptCall(other, [marker], ["2"])])
    assert redis_client.get(marker) == b"2"


def test_works_with_a_decoding_client(redis_url: str, namespace: str, kid: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        limiter = KeyLimiter(client, namespace)
        limits = AppLimits(requests_per_minute=1, tokens_per_minute=100, max_concurrency=1)
        admission = take(limiter, kid, limits, tokens=10)
        assert admission.admitted and isinstance(admission.reservation, str)
        assert take(limiter, kid, limits).limit in ("requests", "concurrency")
        assert limiter.renew(kid, admission.reservation, 5) and limiter.release(kid, admission.reservation, 20)
        assert limiter.remaining(kid, limits) == {"requests": 0.0, "tokens": 80.0, "concurrency": 1.0}
    finally:
        client.close()


def test_app_without_limits_only_respects_the_cooldown(
    limiter: KeyLimiter, redis_client: redis.Redis, namespace: str, kid: str, clock: FakeClock
) -> None:
    admission = take(limiter, kid, None)
    assert admission == Admission(admitted=True, wait_s=0.0, limit=None, reservation=None,
                                  upstream_check=UpstreamCheck(limiter.keys(kid).cool, str(round(clock.t * 1e6))))
    assert limiter.release(kid, None, 10) is False and limiter.renew(kid, None, 5) is True
    assert limiter.remaining(kid, None) == {}
    assert not list(redis_client.scan_iter(match=f"{namespace}:*")), "nothing is written for an unlimited key"
    assert limiter.report_upstream_limited(kid) == 1.0
    assert take(limiter, kid, None).admitted, "the job's start checks the cooldown (test_job_store)"


def test_shared_limits_take_the_strictest_value_per_key() -> None:
    apps = {
        "a": AppConfig(api_key="k1", mode="chat", limits=AppLimits(requests_per_minute=60, max_concurrency=2,
                                                                   estimated_tokens_per_call=10)),
        "b": AppConfig(api_key="k1", mode="chat", limits=AppLimits(requests_per_minute=30, tokens_per_minute=999)),
        "c": AppConfig(api_key="k1", mode="workflow"),
        "d": AppConfig(api_key="k2", mode="chat"),
    }
    shared = shared_limits(apps)
    assert shared["a"] == AppLimits(requests_per_minute=30, tokens_per_minute=999, max_concurrency=2,
                                    estimated_tokens_per_call=10)
    assert shared["b"].requests_per_minute == 30 and shared["b"].estimated_tokens_per_call == 1000
    assert shared["c"] is not None and shared["c"].max_concurrency == 2
    assert shared["d"] is None


def test_shared_limits_keep_a_burst_within_the_strictest_request_limit() -> None:
    apps = {
        "a": AppConfig(api_key="k1", mode="chat", limits=AppLimits(requests_per_minute=60, burst=60)),
        "b": AppConfig(api_key="k1", mode="chat", limits=AppLimits(requests_per_minute=30)),
        "c": AppConfig(api_key="k2", mode="chat", limits=AppLimits(requests_per_minute=60)),
    }
    shared = shared_limits(apps)
    assert (shared["a"].burst, shared["b"].request_burst) == (30, 30)
    assert shared["c"].burst is None and shared["c"].request_burst == 10, "a sixth of the limit by default"


# --- requests: the sliding window ---------------------------------------------------------------------


def test_requests_slide_and_wait_is_exact(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(requests_per_minute=3, burst=3)  # the sliding log alone
    for offset in (0.0, 10.0, 20.0):
        assert take(limiter, kid, limits, "job", lease_s=1).admitted
        clock.at(offset + 10.0)
    clock.at(30.0)
    refused = take(limiter, kid, limits, "late")
    assert (refused.admitted, refused.limit, refused.wait_s) == (False, "requests", 30.0)
    clock.at(59.999999)
    assert not take(limiter, kid, limits, "late").admitted
    clock.at(60.0)
    assert take(limiter, kid, limits, "late").admitted, "admitted exactly at now + wait_s"
    assert limiter.remaining(kid, limits) == {"requests": 0.0}


@pytest.mark.parametrize("burst", [10, None])
def test_no_double_burst_at_a_minute_boundary(limiter: KeyLimiter, kid: str, clock: FakeClock, burst: int | None
                                              ) -> None:
    limits = AppLimits(requests_per_minute=10, burst=burst)
    admitted, ticket = [], "job-0"
    for step in range(800):  # a job tries every 0.1 s from t=55 to t=135, across the boundaries at 60 and 120
        clock.at(55.0 + step * 0.1)
        admission = take(limiter, kid, limits, ticket, lease_s=1)
        if admission.admitted:
            admitted.append(admission)
            ticket = f"job-{step}"
    times = admitted_us(admitted)
    assert max_in_any_window(times, 60_000_000) == 10
    if burst == 10:
        assert len(times) == 20, "ten at once, then nothing until those ten are a full window old"
        assert times[10] - times[0] == 60_000_000
    else:
        assert len(times) == 14, "one at once, then one every 6 s"
        assert all(b - a == 6_000_000 for a, b in itertools.pairwise(times))


def test_a_burst_of_the_full_limit_admits_it_at_once_and_the_window_still_holds(
    limiter: KeyLimiter, kid: str, clock: FakeClock
) -> None:
    limits = AppLimits(requests_per_minute=20, burst=20)
    assert all(take(limiter, kid, limits, f"job-{n}").admitted for n in range(20))
    refused = take(limiter, kid, limits, "job-20")
    assert (refused.admitted, refused.limit, refused.wait_s) == (False, "requests", 60.0)
    clock.at(59.999999)
    assert not take(limiter, kid, limits, "job-20").admitted
    clock.at(60.0)
    assert all(take(limiter, kid, limits, f"job-{n}").admitted for n in range(20, 40))
    assert not take(limiter, kid, limits, "job-40").admitted


def test_a_configured_burst_then_pacing(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(requests_per_minute=20, burst=5)  # five at once, then one every 3 s
    results = [take(limiter, kid, limits, f"job-{n}") for n in range(7)]
    assert [r.admitted for r in results] == [True] * 5 + [False] * 2
    assert [(r.limit, r.wait_s) for r in results[5:]] == [("requests", 3.0), ("requests", 6.0)]
    clock.at(3.0)
    assert take(limiter, kid, limits, "job-5").admitted


def test_pacing_spreads_a_burst_and_keeps_the_rate(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(requests_per_minute=60)  # a burst of 10, then one per second
    results = [take(limiter, kid, limits, f"job-{n}") for n in range(12)]
    assert [r.admitted for r in results] == [True] * 10 + [False] * 2
    assert [(r.limit, r.wait_s) for r in results[10:]] == [("requests", 1.0), ("requests", 2.0)]
    clock.at(1.0)
    assert take(limiter, kid, limits, "job-10").admitted
    assert not take(limiter, kid, limits, "job-11").admitted
    clock.at(2.0)
    assert take(limiter, kid, limits, "job-11").admitted


def test_burst_from_many_threads_never_exceeds_the_window(redis_url: str, namespace: str, kid: str) -> None:
    limit, window = 10, 1.0
    limits = AppLimits(requests_per_minute=limit)
    pool = redis.ConnectionPool.from_url(redis_url, max_connections=32)
    client = redis.Redis(connection_pool=pool)
    limiter = KeyLimiter(client, namespace, window_s=window)
    admissions: list[Admission] = []
    lock = threading.Lock()
    stop = time.monotonic() + 3.2

    def messages() -> None:
        while time.monotonic() < stop:
            ticket, since = uuid.uuid4().hex, None
            while time.monotonic() < stop:
                admission = take(limiter, kid, limits, ticket, lease_s=5, since=since)
                if admission.admitted:
                    limiter.release(kid, admission.reservation, None)
                    with lock:
                        admissions.append(admission)
                    break
                since = since or time.time()
                time.sleep(min(deferral_delay(admission), max(0.0, stop - time.monotonic())))

    threads = [threading.Thread(target=messages) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.disconnect()
    times = admitted_us(admissions)
    assert len(times) >= 2 * limit
    assert max_in_any_window(times, int(window * 1e6)) <= limit
    assert all(times[i + limit] - times[i] >= window * 1e6 for i in range(len(times) - limit))


# --- tokens ----------------------------------------------------------------------------------------------


def test_tokens_reserved_then_reconciled_down_and_up(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(tokens_per_minute=1000)
    first = take(limiter, kid, limits, tokens=400)
    clock.at(1.0)
    second = take(limiter, kid, limits, tokens=400)
    clock.at(2.0)
    refused = take(limiter, kid, limits, "third", tokens=400)
    assert (refused.admitted, refused.limit, refused.wait_s) == (False, "tokens", 58.0)
    assert limiter.release(kid, first.reservation, 100)  # reconciled down: 100 + 400 in the window
    assert limiter.remaining(kid, limits) == {"tokens": 500.0}
    third = take(limiter, kid, limits, "third", tokens=400)
    assert third.admitted, "the tokens given back by reconciliation are admitted"
    clock.at(3.0)
    limiter.release(kid, second.reservation, 700)  # reconciled up: 100 + 700 + 400 = 1200 > 1000
    assert limiter.remaining(kid, limits) == {"tokens": 0.0}
    refused = take(limiter, kid, limits, "fourth", tokens=400)
    # 1200 + 400 - 1000 = 600 must leave: the 100 at t=0, then the 700 at t=1 -> at t=61
    assert (refused.limit, refused.wait_s) == ("tokens", 58.0)
    clock.at(61.0)
    assert take(limiter, kid, limits, "fourth", tokens=400).admitted


def test_usage_reported_after_the_window_charges_the_excess_now(
    limiter: KeyLimiter, kid: str, clock: FakeClock
) -> None:
    limits = AppLimits(tokens_per_minute=1000)
    long_call = take(limiter, kid, limits, tokens=100, lease_s=600)
    clock.at(90.0)
    assert limiter.release(kid, long_call.reservation, 700)
    assert limiter.remaining(kid, limits) == {"tokens": 400.0}, "600 tokens beyond the estimate, charged at t=90"
    assert limiter.release(kid, long_call.reservation, 700) is False
    assert limiter.remaining(kid, limits) == {"tokens": 400.0}, "a second release changes nothing"


def test_a_call_larger_than_the_limit_runs_alone(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(tokens_per_minute=1000)
    small = take(limiter, kid, limits, tokens=10)
    clock.at(5.0)
    big = take(limiter, kid, limits, "big", tokens=5000)
    assert (big.limit, big.wait_s) == ("tokens", 55.0), "waits for an empty window, never forever"
    clock.at(30.0)
    assert not take(limiter, kid, limits, tokens=10).admitted, "newcomers do not overtake it"
    limiter.release(kid, small.reservation, 10)
    clock.at(60.0)
    assert take(limiter, kid, limits, "big", tokens=5000).admitted


def test_token_estimator_learns_from_releases(limiter: KeyLimiter, kid: str) -> None:
    limits = AppLimits(tokens_per_minute=100_000, estimated_tokens_per_call=1000)
    assert limiter.tokens.estimate(kid, limits) == 1000
    for _ in range(6):
        admission = take(limiter, kid, limits, tokens=1000)
        limiter.release(kid, admission.reservation, 300)
    assert limiter.tokens.estimate(kid, limits) == 300


# --- concurrency -----------------------------------------------------------------------------------------


def test_concurrency_never_above_max_from_many_threads(redis_url: str, namespace: str, kid: str) -> None:
    limits = AppLimits(max_concurrency=3)
    pool = redis.ConnectionPool.from_url(redis_url, max_connections=32)
    client = redis.Redis(connection_pool=pool)
    limiter = KeyLimiter(client, namespace, window_s=1.0, poll_s=0.05)
    state = {"running": 0, "peak": 0, "calls": 0, "leases": 0}
    lock = threading.Lock()
    stop = time.monotonic() + 2.0

    def messages(rng: random.Random) -> None:
        while time.monotonic() < stop:
            ticket, since = uuid.uuid4().hex, None
            while time.monotonic() < stop:
                admission = take(limiter, kid, limits, ticket, lease_s=5, since=since)
                if not admission.admitted:
                    since = since or time.time()
                    time.sleep(deferral_delay(admission))
                    continue
                with lock:
                    state["running"] += 1
                    state["calls"] += 1
                    state["peak"] = max(state["peak"], state["running"])
                    state["leases"] = max(state["leases"], client.zcard(limiter.keys(kid).lease))
                try:
                    time.sleep(rng.uniform(0.005, 0.03))
                finally:
                    with lock:
                        state["running"] -= 1
                    limiter.release(kid, admission.reservation, None)
                break

    threads = [threading.Thread(target=messages, args=(random.Random(seed),)) for seed in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.disconnect()
    assert state["calls"] > 10
    assert state["peak"] <= 3 and state["leases"] <= 3
    assert limiter.remaining(kid, limits) == {"concurrency": 3.0}, "every slot was given back"


def test_slot_of_a_dead_holder_is_free_after_its_lease(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(max_concurrency=1)
    assert take(limiter, kid, limits, lease_s=30).admitted  # its worker is SIGKILLed: never released
    clock.at(1.0)
    refused = take(limiter, kid, limits, "next")
    assert refused.limit == "concurrency" and 0 < refused.wait_s <= 29.0
    clock.at(30.0)
    assert take(limiter, kid, limits, "next").admitted, "the lapsed lease was reclaimed inside the script"


def test_dead_holder_with_real_time(redis_client: redis.Redis, namespace: str, kid: str) -> None:
    limiter = KeyLimiter(redis_client, namespace, window_s=1.0)
    limits = AppLimits(max_concurrency=1)
    assert take(limiter, kid, limits, lease_s=0.3).admitted
    refused = take(limiter, kid, limits, "next", lease_s=0.3)
    assert not refused.admitted and refused.wait_s <= 0.3
    time.sleep(refused.wait_s)  # the wait the limiter asks for: the behaviour under test, not a guess
    assert take(limiter, kid, limits, "next", lease_s=0.3).admitted


def test_renew_keeps_a_long_call_and_release_frees_it(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(max_concurrency=1)
    held = take(limiter, kid, limits, lease_s=10)
    clock.at(8.0)
    assert limiter.renew(kid, held.reservation, 10)
    clock.at(15.0)
    assert take(limiter, kid, limits, "other").limit == "concurrency", "the renewed lease still holds"
    assert limiter.release(kid, held.reservation, None)
    assert limiter.release(kid, held.reservation, None) is False, "release is idempotent"
    assert limiter.renew(kid, held.reservation, 10) is False, "a late renewal does not resurrect the slot"
    assert take(limiter, kid, limits, "other").admitted


def test_concurrency_wait_follows_the_mean_hold_time(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(max_concurrency=1)
    first = take(limiter, kid, limits)
    clock.at(2.0)
    limiter.release(kid, first.reservation, None)  # calls on this key take ~2 s
    clock.at(3.0)
    take(limiter, kid, limits)
    clock.at(3.5)
    refused = take(limiter, kid, limits)
    assert (refused.limit, refused.wait_s) == ("concurrency", 1.5)



def test_waiters_for_slots_with_no_hold_seen_yet_look_again_together(limiter: KeyLimiter, kid: str,
                                                                      clock: FakeClock) -> None:
    """Before any hold is known, a waiter's place would say nothing: guessing a poll per place ahead kept a
    backlog of 0.2 s calls one second apart. Every waiter looks again after one poll, when holds are known."""
    limits = AppLimits(max_concurrency=1)
    assert take(limiter, kid, limits, "running").admitted
    waits = [take(limiter, kid, limits, f"waiter-{n}").wait_s for n in range(5)]
    assert waits == [limiter.poll_s] * 5


def test_a_slot_past_its_expected_end_is_looked_at_again_a_tenth_of_a_hold_later(limiter: KeyLimiter, kid: str,
                                                                                clock: FakeClock) -> None:
    limits = AppLimits(max_concurrency=1)
    first = take(limiter, kid, limits)
    clock.at(2.0)
    limiter.release(kid, first.reservation, None)  # calls on this key take ~2 s
    take(limiter, kid, limits)
    clock.at(4.5)  # the holder is half a second past its expected end
    refused = take(limiter, kid, limits, "head")
    assert (refused.limit, refused.wait_s) == ("concurrency", 0.2)
    clock.at(4.7)
    behind = take(limiter, kid, limits, "behind")
    assert (behind.limit, behind.wait_s) == ("concurrency", 2.2), "one hold after the head's slot frees"

# --- upstream cooldown --------------------------------------------------------------------------------


def test_cooldown_doubles_caps_and_resets(
    redis_client: redis.Redis, namespace: str, kid: str, clock: FakeClock
) -> None:
    limiter = KeyLimiter(redis_client, namespace, cooldown_base_s=1.0, cooldown_cap_s=8.0, clock=clock)
    limiter.report_success(kid)
    assert not redis_client.exists(limiter.keys(kid).cool), "nothing to reset: nothing written"
    assert limiter.report_upstream_limited(kid) == 1.0
    clock.t += 0.25
    assert limiter.report_upstream_limited(kid) == 0.75, "a 429 during the cooldown does not double it"
    spans = []
    for _ in range(5):
        clock.t += limiter.cooldown_left(kid)
        spans.append(limiter.report_upstream_limited(kid))
    assert spans == [2.0, 4.0, 8.0, 8.0, 8.0]
    limits = AppLimits(requests_per_minute=100)
    refused = take(limiter, kid, limits, "job")
    assert (refused.limit, refused.wait_s) == ("upstream", 8.0)
    limiter.report_success(kid)
    assert limiter.cooldown_left(kid) == 8.0, "a success does not cut a running cooldown short"
    clock.t += 8.0
    assert take(limiter, kid, limits, "job").admitted
    assert limiter.report_upstream_limited(kid) == 1.0, "the streak was reset by the success"


def test_an_admission_says_whether_its_success_must_end_a_429_streak(
    redis_client: redis.Redis, namespace: str, kid: str, clock: FakeClock
) -> None:
    limiter = KeyLimiter(redis_client, namespace, cooldown_base_s=1.0, cooldown_cap_s=8.0, clock=clock)
    limits = AppLimits(requests_per_minute=100)
    assert not take(limiter, kid, limits, "calm").upstream_streak, "no 429s: a success writes nothing"
    limiter.report_upstream_limited(kid)
    clock.t += limiter.cooldown_left(kid)
    assert take(limiter, kid, limits, "after").upstream_streak
    limiter.report_success(kid)
    assert not take(limiter, kid, limits, "reset").upstream_streak


# --- fairness ------------------------------------------------------------------------------------------


def test_an_old_waiter_is_admitted_before_a_newcomer(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(requests_per_minute=1)
    assert take(limiter, kid, limits, "first").admitted
    clock.at(1.0)
    old = take(limiter, kid, limits, "old")
    assert old.wait_s == 59.0
    clock.at(60.5)  # capacity is back, the old waiter is due but not back yet
    newcomer = take(limiter, kid, limits, "new")
    assert (newcomer.admitted, newcomer.limit) == (False, "requests")
    clock.at(61.0)
    assert take(limiter, kid, limits, "old").admitted
    clock.at(62.0)
    assert not take(limiter, kid, limits, "new").admitted


def test_a_waiter_whose_place_lapsed_gets_it_back_with_waiting_since(
    limiter: KeyLimiter, kid: str, clock: FakeClock
) -> None:
    limits = AppLimits(requests_per_minute=1)
    take(limiter, kid, limits, "first")
    clock.at(1.0)
    take(limiter, kid, limits, "old")
    clock.at(2.0)
    take(limiter, kid, limits, "new")
    clock.at(199.0)  # both stayed away far beyond their grace: their places lapsed
    assert take(limiter, kid, limits, "blocker").admitted
    clock.at(200.0)  # "new" comes back first ...
    assert take(limiter, kid, limits, "new", since=EPOCH + 2.0).wait_s == 59.0
    clock.at(201.0)  # ... but "old", first deferred earlier, is ahead of it again
    assert take(limiter, kid, limits, "old", since=EPOCH + 1.0).wait_s == 58.0
    clock.at(259.0)
    assert not take(limiter, kid, limits, "new", since=EPOCH + 2.0).admitted
    clock.at(259.5)
    assert take(limiter, kid, limits, "old", since=EPOCH + 1.0).admitted


def test_an_abandoned_waiter_holds_nothing(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    limits = AppLimits(max_concurrency=1)
    running = take(limiter, kid, limits)
    assert not take(limiter, kid, limits, "canceled").admitted
    limiter.release(kid, running.reservation, None)
    assert not take(limiter, kid, limits, "new").admitted, "the head of the line holds the free slot"
    limiter.abandon(kid, "canceled")
    assert take(limiter, kid, limits, "new").admitted


@dataclass(order=True)
class _Visit:
    at: float
    arrival: int
    ticket: str = field(compare=False)
    since: float | None = field(default=None, compare=False)


def test_fifo_under_sustained_overload_with_late_returns(
    limiter: KeyLimiter, kid: str, clock: FakeClock
) -> None:
    """Demand at 2x the limit for 6 minutes; deferred jobs come back up to 2 s late. A younger job admitted
    before an older one only ever used capacity the older one did not need: the older one is admitted on its
    very next return. Capacity is used, and a waiter is told when its turn comes rather than polling."""
    rng = random.Random(7)
    limits = AppLimits(requests_per_minute=20)
    visits: list[_Visit] = []
    for arrival in range(240):
        heapq.heappush(visits, _Visit(arrival * 1.5, arrival, f"job-{arrival}"))
    admitted_at: dict[int, float] = {}
    denied_at: dict[int, list[float]] = {}
    while visits:
        visit = heapq.heappop(visits)
        clock.at(visit.at)
        admission = take(limiter, kid, limits, visit.ticket, since=visit.since)
        if admission.admitted:
            admitted_at[visit.arrival] = visit.at
            continue
        denied_at.setdefault(visit.arrival, []).append(visit.at)
        since = visit.since if visit.since is not None else clock.t
        late = rng.uniform(0, 2.0)
        heapq.heappush(visits, _Visit(visit.at + admission.wait_s + late, visit.arrival, visit.ticket, since))
    for older, at in admitted_at.items():
        overtaken = [admitted_at[younger] for younger in admitted_at if younger > older and admitted_at[younger] < at]
        if overtaken:
            assert not [t for t in denied_at.get(older, []) if min(overtaken) < t < at], f"job {older} lost its turn"
    assert max(admitted_at.values()) <= 240 / 20 * 60 * 1.05, "the limit's capacity is used"
    assert sum(map(len, denied_at.values())) < 2 * len(admitted_at)


def test_head_of_line_cannot_starve_behind_a_stream_of_newcomers(
    limiter: KeyLimiter, kid: str, clock: FakeClock
) -> None:
    """Calls end at unpredictable times and jobs keep arriving while the oldest waiter is away (it comes back
    late): the others share what is free, but never the slot it holds, so it runs as soon as it is back."""
    limits = AppLimits(max_concurrency=2)
    rng = random.Random(3)
    events: list[tuple[float, int, str, str | None]] = []  # (time, seq, what, ticket or reservation)
    seq = 0

    def at(when: float, what: str, ref: str | None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (when, seq, what, ref))

    for n in range(2):
        at(EPOCH + n * 0.01, "try", f"early-{n}")
    at(EPOCH + 0.1, "try", "old")
    for n in range(150):
        at(EPOCH + 0.2 + n * 0.1, "try", f"new-{n}")
    running: set[str] = set()
    others_admitted, old_admitted, old_refused = 0, False, 0
    while events and not old_admitted:
        when, _, what, ref = heapq.heappop(events)
        clock.t = when
        if what == "end":
            running.discard(ref)
            limiter.release(kid, ref, None)
            continue
        admission = take(limiter, kid, limits, ref)
        if admission.admitted:
            running.add(admission.reservation)
            assert len(running) <= 2
            at(when + rng.uniform(0.2, 1.5), "end", admission.reservation)
            old_admitted = ref == "old"
            others_admitted += ref != "old"
        else:
            old_refused += ref == "old"
            late = 5.0 if ref == "old" else rng.uniform(0, 0.3)
            at(when + admission.wait_s + late, "try", ref)
    assert old_admitted and old_refused == 1, "admitted on its first return"
    assert others_admitted > 3, "the others did use the slot the old waiter did not hold"


# --- accuracy of wait_s with Redis TIME -----------------------------------------------------------------


def test_wait_s_is_accurate_with_redis_time(redis_client: redis.Redis, namespace: str, kid: str) -> None:
    """With Redis TIME: refused until the moment given (exactness is checked with the fake clock above),
    admitted when the job comes back at it."""
    limiter = KeyLimiter(redis_client, namespace, window_s=1.0)
    limits = AppLimits(requests_per_minute=2, tokens_per_minute=1000, max_concurrency=5)  # paced 0.5 s apart
    assert take(limiter, kid, limits, "first", tokens=100, lease_s=5).admitted
    for ticket, reason in (("second", "pacing"), ("third", "the sliding log")):
        refused = take(limiter, kid, limits, ticket, tokens=100, lease_s=5)
        assert refused.limit == "requests" and 0 < refused.wait_s <= 0.5, reason
        again = take(limiter, kid, limits, ticket, tokens=100, lease_s=5)
        assert not again.admitted and again.wait_s <= refused.wait_s, reason
        time.sleep(again.wait_s)  # the wait the limiter asks for: the behaviour under test, not a guess
        assert take(limiter, kid, limits, ticket, tokens=100, lease_s=5).admitted, f"{reason}: at wait_s"


# --- model-based property ---------------------------------------------------------------------------------


@dataclass
class _Held:
    at: int  # admission time, µs
    estimate: int
    reservation: str
    counted: int  # tokens the window counts for it now
    expiry: int  # lease expiry, µs
    released: bool = False


steps = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=12.0, allow_nan=False),
        st.sampled_from(["new", "new", "retry", "release", "release", "renew", "upstream"]),
        st.integers(min_value=0, max_value=900),
    ),
    min_size=1,
    max_size=50,
)


@pytest.mark.parametrize("burst", [4, 2])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=steps)
def test_no_window_ever_exceeds_any_limit(
    redis_client: redis.Redis, namespace: str, burst: int, plan: list
) -> None:
    """Random arrivals, retries, releases (with real usage), lease renewals and lapses, and 429s, checked
    against an exact model of every limit."""
    clock = FakeClock()
    limiter = KeyLimiter(redis_client, namespace, window_s=20.0, grace_s=5.0, clock=clock)
    kid = key_id(uuid.uuid4().hex)
    rpm, tpm, conc, window, lease = 4, 1500, 2, 20_000_000, 15_000_000
    limits = AppLimits(requests_per_minute=rpm, burst=burst, tokens_per_minute=tpm, max_concurrency=conc)
    held: list[_Held] = []
    extra: list[tuple[int, int]] = []  # usage charged after its reservation had left the window
    waiting: list[tuple[str, float, int]] = []
    cool_until, streak = 0, 0

    def tokens_at(now: int) -> int:
        return sum(h.counted for h in held if h.at > now - window) + sum(n for t, n in extra if t > now - window)

    def slots_at(now: int) -> int:
        return sum(1 for h in held if not h.released and h.expiry > now)

    for gap, action, amount in plan:
        clock.t += gap
        now = round(clock.t * 1e6)
        live = [h for h in held if not h.released]
        if action == "upstream":
            left = limiter.report_upstream_limited(kid)
            if cool_until <= now:
                streak += 1
                cool_until = now + min(60, 2 ** (streak - 1)) * 1_000_000
            assert round(left * 1e6) == cool_until - now
        elif action == "renew" and live:
            renewed = limiter.renew(kid, live[0].reservation, lease / 1e6)
            assert renewed == (live[0].expiry > now)
            if renewed:
                live[0].expiry = now + lease
            else:
                live[0].released = True  # its slot is gone; the call's usage is never reported
        elif action == "release" and live:
            victim = live[0]
            still_held = limiter.release(kid, victim.reservation, amount)
            assert still_held or victim.expiry <= now
            victim.released = True
            if victim.at > now - window:
                victim.counted = amount
            elif amount > victim.estimate:
                extra.append((now, amount - victim.estimate))
        elif action in ("new", "retry"):
            if action == "retry" and waiting:
                ticket, since, estimate = waiting.pop(0)
            else:
                ticket, since, estimate = uuid.uuid4().hex, None, amount
            admission = take(limiter, kid, limits, ticket, tokens=estimate, lease_s=lease / 1e6, since=since)
            if not admission.admitted:
                assert admission.wait_s > 0 and admission.limit in ("requests", "tokens", "concurrency", "upstream")
                if now < cool_until:
                    assert admission.wait_s >= (cool_until - now) / 1e6
                waiting.append((ticket, since or clock.t, estimate))
                continue
            reservation = Reservation.parse(admission.reservation)
            assert round(reservation.admitted_at * 1e6) == now and reservation.tokens == estimate
            assert now >= cool_until, "nothing is admitted during a cooldown"
            assert sum(1 for h in held if h.at > now - window) + 1 <= rpm
            assert slots_at(now) + 1 <= conc
            assert tokens_at(now) + estimate <= tpm or tokens_at(now) == 0
            held.append(_Held(now, estimate, admission.reservation, estimate, now + lease))
    now = round(clock.t * 1e6)
    assert limiter.remaining(kid, limits) == {
        "requests": max(0, rpm - sum(1 for h in held if h.at > now - window)),
        "tokens": max(0, tpm - tokens_at(now)),
        "concurrency": max(0, conc - slots_at(now)),
    }


# --- helpers for the actor -----------------------------------------------------------------------------------


def test_deferral_delay_and_max_wait() -> None:
    rng = random.Random(1)
    for limit in ("requests", "tokens", "concurrency", "upstream"):
        admission = Admission(False, 10.0, limit, None)
        delays = [deferral_delay(admission, rng) for _ in range(200)]
        assert all(10.0 <= delay <= 15.0 for delay in delays)
    assert wait_exceeded(waiting_since=0.0, now=100.0, next_delay_s=60.0, max_wait_s=120.0)
    assert not wait_exceeded(waiting_since=0.0, now=100.0, next_delay_s=10.0, max_wait_s=120.0)


def test_deferrals_are_counted_by_limit() -> None:
    def deferrals() -> float:
        return REGISTRY.get_sample_value("difyq_rate_limited_total", {"app": "limits-test", "limit": "tokens"}) or 0.0

    before = deferrals()
    record_deferral("limits-test", Admission(False, 1.0, "tokens", None))
    record_deferral("limits-test", Admission(True, 0.0, None, "r.1.0"))
    assert deferrals() == before + 1


def test_a_higher_priority_goes_ahead_of_waiters_by_its_offset(limiter: KeyLimiter, kid: str, clock: FakeClock,
                                                              ) -> None:
    """A job's place in line is its first wait moved ahead by its priority offset: a later high-priority job is
    admitted before an earlier normal one, and a low-priority one (a negative offset) is passed over by normal
    ones only while it has waited less than the offset."""
    limits = AppLimits(max_concurrency=1)

    def ask(ticket: str, since: float | None = None, offset: float = 0.0) -> Admission:
        return limiter.acquire(kid, limits, estimated_tokens=0, lease_s=3000.0, ticket=ticket,
                               waiting_since=since, priority_offset_s=offset)

    holder = ask("holder")
    assert holder.admitted
    clock.at(1.0)
    assert not ask("normal").admitted
    clock.at(2.0)
    assert not ask("high", offset=600.0).admitted
    limiter.release(kid, holder.reservation, None)
    clock.at(3.0)
    assert not ask("normal", since=EPOCH + 1.0).admitted, "the high-priority waiter holds the free slot"
    clock.at(4.0)
    high = ask("high", since=EPOCH + 2.0, offset=600.0)
    assert high.admitted
    clock.at(10.0)
    assert not ask("low", offset=-600.0).admitted  # its place: 610 s
    limiter.release(kid, high.reservation, None)
    clock.at(11.0)
    normal = ask("normal", since=EPOCH + 1.0)
    assert normal.admitted
    clock.at(20.0)
    assert not ask("newer", offset=0.0).admitted  # place 20 s: ahead of the low one
    limiter.release(kid, normal.reservation, None)
    clock.at(21.0)
    assert not ask("low", since=EPOCH + 10.0, offset=-600.0).admitted
    newer = ask("newer", since=EPOCH + 20.0)
    assert newer.admitted
    clock.at(690.0)
    assert not ask("low", since=EPOCH + 10.0, offset=-600.0).admitted  # back in line at 610 s, the slot is held
    clock.at(695.0)
    assert not ask("latest").admitted
    limiter.release(kid, newer.reservation, None)
    clock.at(697.0)
    assert not ask("latest", since=EPOCH + 695.0).admitted, "a job newer than the low one's place goes behind it"
    clock.at(698.0)
    assert ask("low", since=EPOCH + 10.0, offset=-600.0).admitted


def test_a_fair_line_serves_a_tenant_with_one_job_within_one_slot_of_a_backlog(limiter: KeyLimiter, kid: str,
                                                                                clock: FakeClock) -> None:
    """With fairness, a key's line is round-robin across tenants: tenant B's one job, joining behind 1,000 of
    tenant A's, is admitted at the next free slot or the one after, not after A's backlog."""
    limits = AppLimits(max_concurrency=1)

    def ask(ticket: str, tenant: str, since: float | None = None) -> Admission:
        return limiter.acquire(kid, limits, estimated_tokens=0, lease_s=3000.0, ticket=ticket, waiting_since=since,
                               tenant=tenant, fair=True)

    holder = ask("a-holder", "A")
    assert holder.admitted
    backlog = [f"a-{n:04d}" for n in range(1000)]
    for ticket in backlog:
        assert not ask(ticket, "A").admitted
    clock.at(1.0)
    b = ask("b-1", "B")
    assert not b.admitted
    assert b.wait_s <= ask("a-0001", "A").wait_s, "B is told a turn no later than A's second waiter"
    served: list[str] = []
    reservation = holder.reservation
    for step in range(3):
        limiter.release(kid, reservation, None)
        clock.at(2.0 + step)
        for ticket in ["b-1", *backlog[:3]]:
            if ticket in served:
                continue
            answer = ask(ticket, "B" if ticket.startswith("b") else "A", since=EPOCH)
            if answer.admitted:
                served.append(ticket)
                reservation = answer.reservation
                break
    assert "b-1" in served[:2], served


def test_a_tenant_limit_holds_its_tenant_back_without_holding_the_key(limiter: KeyLimiter, kid: str,
                                                                      clock: FakeClock) -> None:
    """A tenant at its own limit waits in its own line: the key's capacity goes to other tenants meanwhile, and
    the tenant's slot is freed with the key's on release."""
    from difyq.worker.config import TenantLimits

    limits, own = AppLimits(max_concurrency=3), TenantLimits(max_concurrency=1)

    def ask(ticket: str, tenant: str) -> Admission:
        return limiter.acquire(kid, limits, estimated_tokens=0, lease_s=3000.0, ticket=ticket, tenant=tenant,
                               tenant_limits=own)

    first = ask("a-1", "A")
    assert first.admitted and first.tenant == "A"
    second = ask("a-2", "A")
    assert not second.admitted and second.limit == "tenant_concurrency"
    assert ask("b-1", "B").admitted and ask("c-1", "C").admitted, "A's waiter holds none of the key's slots"
    limiter.release(kid, first.reservation, None, tenant="A")
    clock.at(1.0)
    assert ask("a-2", "A").admitted
    assert limiter.redis.zcard(limiter.keys(kid).tenant("A").lease) == 1


def test_a_tenant_request_limit_tells_each_waiter_its_own_turn(limiter: KeyLimiter, kid: str,
                                                              clock: FakeClock) -> None:
    """A tenant's waiters are told successive moments by their place in its line (no herd at each free slot)."""
    from difyq.worker.config import TenantLimits

    limits, own = AppLimits(requests_per_minute=600), TenantLimits(requests_per_minute=2)
    waits = []
    for n in range(6):
        answer = limiter.acquire(kid, limits, estimated_tokens=0, lease_s=60.0, ticket=f"t-{n}", tenant="A",
                                 tenant_limits=own)
        waits.append(None if answer.admitted else (answer.limit, answer.wait_s))
    assert waits[:2] == [None, None]
    assert [limit for limit, _ in waits[2:]] == ["tenant_requests"] * 4
    assert [wait for _, wait in waits[2:]] == sorted(wait for _, wait in waits[2:])
    assert waits[2][1] == pytest.approx(60.0) and waits[4][1] == pytest.approx(120.0)


@pytest.mark.parametrize("share", [0.0, 0.1, 0.25])
def test_low_priority_gets_its_minimum_share_under_a_flood_of_high(redis_client: redis.Redis, namespace: str,
                                                                   kid: str, share: float) -> None:
    """While low-priority jobs wait behind a flood of high ones, every admission adds the share to what low is
    owed: one low job in about 1/share is admitted, in line order; with no share, none is while high ones wait."""
    clock = FakeClock()
    limiter = KeyLimiter(redis_client, namespace, window_s=60.0, grace_s=30.0, clock=clock)
    limits = AppLimits(max_concurrency=1)
    offsets = {**{f"high-{n:03d}": 600.0 for n in range(120)}, **{f"low-{n:02d}": -600.0 for n in range(40)}}

    def ask(ticket: str) -> Admission:
        return limiter.acquire(kid, limits, estimated_tokens=0, lease_s=3000.0, ticket=ticket, waiting_since=EPOCH,
                               priority_offset_s=offsets[ticket], low_share=share)

    holder = ask("high-000")
    admitted = ["high-000"]
    waiting = [ticket for ticket in offsets if ticket != "high-000"]
    for ticket in waiting:
        assert not ask(ticket).admitted
    rng = random.Random(7)
    for step in range(60):
        limiter.release(kid, holder.reservation, None)
        clock.at(1.0 + step)
        rng.shuffle(waiting)  # every waiter asks, in any order: the owed low job takes the slot however it comes
        for ticket in list(waiting):
            answer = ask(ticket)
            if answer.admitted:
                holder, admitted = answer, [*admitted, ticket]
                waiting.remove(ticket)
                break
        else:
            raise AssertionError(f"nobody admitted at step {step}")
    lows = [ticket for ticket in admitted if ticket.startswith("low")]
    print(f"share {share}: {len(lows)} low of {len(admitted)} admissions")
    assert len(lows) >= int(share * len(admitted)) - 1 and len(lows) <= int(share * len(admitted)) + 2
    assert lows == sorted(lows), "low jobs keep their order"


def test_a_fair_lines_tenants_and_largest_backlog(limiter: KeyLimiter, kid: str, clock: FakeClock) -> None:
    """The fair line's gauges: how many tenants wait, and the rounds the busiest one still holds."""
    from difyq.worker.limits.limiter import FairLine

    limits = AppLimits(max_concurrency=1)

    def ask(ticket: str, tenant: str) -> Admission:
        return limiter.acquire(kid, limits, estimated_tokens=0, lease_s=3000.0, ticket=ticket, tenant=tenant,
                               fair=True)

    assert limiter.fair_line(kid) == FairLine(tenants=0, largest_backlog=0)
    assert ask("holder", "A").admitted
    for n in range(5):
        ask(f"a-{n}", "A")
    ask("b-0", "B")
    ask("c-0", "C")
    assert limiter.fair_line(kid) == FairLine(tenants=3, largest_backlog=5)
