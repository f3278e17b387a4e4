"""One callback attempt against a real receiver on 127.0.0.1, its classification, metrics, and the retry schedule."""

from __future__ import annotations

import base64
import http.client
import os
import random
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from urllib3.exceptions import (
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from difyq.worker.callbacks import (
    DeliveryAttempt,
    PinnedTransport,
    deliver,
    metric_outcome,
    next_delay,
    record_outcome,
)
from difyq.worker.callbacks.delivery import _describe_failure
from difyq.worker.config import CallbacksConfig
from tests.support.receiver import CallbackReceiver, Reply

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BODY = b'{"type":"job.succeeded","timestamp":"2025-01-01T00:00:00.000Z","data":{"id":"job_1"}}'
SCHEDULE = [5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]


def config(**overrides: object) -> CallbacksConfig:
    settings: dict[str, object] = {"signing_secret": SECRET, "allow_hosts": ["127.0.0.1"], "timeout": 5}
    return CallbacksConfig.model_validate(settings | overrides)


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    with CallbackReceiver() as server:
        yield server


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_2xx_is_delivered_signed(receiver: CallbackReceiver) -> None:
    receiver.script([204])
    attempt = deliver(receiver.url, BODY, "job_ok", config())

    assert (attempt.outcome, attempt.status_code, attempt.error) == ("delivered", 204, None)
    assert attempt.duration_s >= 0
    [request] = receiver.requests
    assert request.method == "POST"
    assert request.body == BODY
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == "difyq-webhooks/1"
    assert receiver.verify(SECRET)[0]["data"]["id"] == "job_1"
    framing = {"host", "content-length", "accept-encoding"}  # added by http.client; nothing else is added
    signed = {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "user-agent"}
    assert set(request.headers) == framing | signed
    assert request.headers["content-length"] == str(len(BODY))


def test_three_failures_then_delivered_with_the_same_webhook_id(receiver: CallbackReceiver) -> None:
    receiver.script([500, 503, 429, 200])
    outcomes = [deliver(receiver.url, BODY, "job_retry", config()).outcome for _ in range(4)]

    assert outcomes == ["retry", "retry", "retry", "delivered"]
    assert [request.webhook_id for request in receiver.wait_for(4)] == ["job_retry"] * 4
    assert receiver.delivered_ids() == ["job_retry"]
    assert receiver.duplicate_ids() == []
    assert len(receiver.verify(SECRET)) == 4


def test_410_means_gone(receiver: CallbackReceiver) -> None:
    receiver.script([410])
    attempt = deliver(receiver.url, BODY, "job_gone", config())

    assert (attempt.outcome, attempt.status_code) == ("gone", 410)
    assert not attempt.retryable
    assert metric_outcome(attempt.outcome, retries_remain=True) == "failed"


def test_a_redirect_is_not_followed_and_counts_as_a_failure(receiver: CallbackReceiver) -> None:
    with CallbackReceiver() as target:
        receiver.script([Reply(302, headers={"Location": target.url})])
        attempt = deliver(receiver.url, BODY, "job_redirect", config())

        assert (attempt.outcome, attempt.status_code) == ("retry", 302)
        assert "redirect not followed" in (attempt.error or "")
        assert len(receiver.requests) == 1
        assert target.requests == []
        assert metric_outcome(attempt.outcome, retries_remain=True) == "retried"
        assert metric_outcome(attempt.outcome, retries_remain=False) == "failed"


@pytest.mark.parametrize("status", [400, 401, 404, 422, 429, 500, 502, 503, 504])
def test_other_statuses_retry(receiver: CallbackReceiver, status: int) -> None:
    receiver.script([status])
    attempt = deliver(receiver.url, BODY, "job_status", config())

    assert (attempt.outcome, attempt.status_code, attempt.error) == ("retry", status, f"HTTP {status}")


def test_a_slow_receiver_times_out_and_retries(receiver: CallbackReceiver) -> None:
    receiver.script([Reply(200, delay_s=5)])
    attempt = deliver(receiver.url, BODY, "job_slow", config(timeout=0.3))

    assert (attempt.outcome, attempt.status_code) == ("retry", None)
    assert attempt.error == "no response within 0.3 s"


def test_a_refused_connection_retries() -> None:
    attempt = deliver(f"http://127.0.0.1:{closed_port()}/callback", BODY, "job_refused", config())

    assert (attempt.outcome, attempt.status_code) == ("retry", None)
    assert attempt.error == "connection failed: Connection refused"


def test_a_connect_timeout_retries() -> None:
    """A listener whose accept queue is full drops the SYN (Linux), so connecting times out."""
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued.connect(listener.getsockname())  # fills the accept queue; nothing accepts
        attempt = deliver(f"http://127.0.0.1:{listener.getsockname()[1]}/cb", BODY, "job_syn", config(timeout=0.3))

    assert (attempt.outcome, attempt.status_code) == ("retry", None)
    assert attempt.error == "connect timed out after 0.3 s"


def test_a_receiver_that_hangs_up_retries() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def hang_up() -> None:
            connection, _ = listener.accept()
            connection.recv(65536)
            connection.close()

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        attempt = deliver(f"http://127.0.0.1:{listener.getsockname()[1]}/cb", BODY, "job_hangup", config())
        thread.join(5)

    assert (attempt.outcome, attempt.status_code) == ("retry", None)
    assert attempt.error == "request failed: RemoteDisconnected: Remote end closed connection without response"


class _Connection:
    """Stands in for the urllib3 connection urllib3's exceptions name (its repr would carry no URL either)."""


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ConnectTimeoutError(_Connection(), "Connection to h timed out"), "connect timed out after 5 s"),
        (ReadTimeoutError(None, "http://h/secret-path", "Read timed out."), "no response within 5 s"),  # type: ignore[arg-type]
        (
            _chained(NewConnectionError(_Connection(), "refused"), ConnectionRefusedError(111, "Connection refused")),  # type: ignore[arg-type]
            "connection failed: Connection refused",
        ),
        (
            _chained(
                NameResolutionError("h", _Connection(), socket.gaierror(-2, "Name or service not known")),  # type: ignore[arg-type]
                socket.gaierror(-2, "Name or service not known"),
            ),
            "connection failed: Name or service not known",
        ),
        (NewConnectionError(_Connection(), "refusing to connect"), "request failed: NewConnectionError"),  # type: ignore[arg-type]
        (SSLError(ssl.SSLError(1, "[SSL] wrong version number")), "TLS failed: SSLError"),
        (
            ProtocolError("Connection aborted.", http.client.RemoteDisconnected("Remote end closed connection")),
            "request failed: RemoteDisconnected: Remote end closed connection",
        ),
        (ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer")),
         "connection failed: Connection reset by peer"),
    ],
)
def test_urllib3_failures_are_described_without_the_url(error: Exception, text: str) -> None:
    assert _describe_failure(error, 5) == text


def test_retry_after_seconds_and_http_date(receiver: CallbackReceiver) -> None:
    fixed = datetime.now(UTC).replace(microsecond=0)
    receiver.script(
        [
            Reply(429, headers={"Retry-After": "120"}),
            Reply(503, headers={"Retry-After": format_datetime(fixed + timedelta(seconds=90), usegmt=True)}),
            Reply(503, headers={"Retry-After": "soon"}),
        ]
    )
    attempts = [deliver(receiver.url, BODY, "job_ra", config(), now=lambda: fixed) for _ in range(3)]

    assert [attempt.retry_after_s for attempt in attempts] == [120.0, 90.0, None]
    assert {request.headers["webhook-timestamp"] for request in receiver.requests} == {str(int(fixed.timestamp()))}


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::1]/",
        "http://localhost/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "ftp://example.com/file",
    ],
)
def test_blocked_at_send_time_is_not_sent_and_not_retried(url: str) -> None:
    attempt = deliver(url, BODY, "job_blocked", config(allow_hosts=[]))

    assert (attempt.outcome, attempt.status_code) == ("blocked", None)
    assert attempt.error
    assert metric_outcome(attempt.outcome, retries_remain=True) == "blocked"


def test_allow_hosts_by_name_pins_and_keeps_the_host_header(receiver: CallbackReceiver) -> None:
    url = f"http://localhost:{receiver.port}/callback"

    assert deliver(url, BODY, "job_name", config(allow_hosts=[])).outcome == "blocked"
    assert deliver(url, BODY, "job_name", config(allow_hosts=["localhost"])).outcome == "delivered"
    assert deliver(url, BODY, "job_name", config(allow_hosts=["127.0.0.0/8"])).outcome == "delivered"
    assert [request.host for request in receiver.requests] == [f"localhost:{receiver.port}"] * 2


def test_without_a_signing_secret_nothing_is_sent(receiver: CallbackReceiver) -> None:
    attempt = deliver(receiver.url, BODY, "job_unsigned", config(signing_secret=None))

    assert attempt.outcome == "failed"
    assert "signing_secret" in (attempt.error or "")
    assert receiver.requests == []


def test_a_reused_pinned_transport(receiver: CallbackReceiver) -> None:
    receiver.script([500])
    with PinnedTransport() as transport:
        outcomes = [deliver(receiver.url, BODY, f"job_s{i}", config(), session=transport).outcome for i in range(3)]

    assert outcomes == ["retry", "delivered", "delivered"]
    assert receiver.delivered_ids() == ["job_s1", "job_s2"]


def test_a_short_reply_body_is_read_so_the_connection_serves_the_next_callback(receiver: CallbackReceiver) -> None:
    receiver.set_default(Reply(200, body=b'{"received": true}'))
    with PinnedTransport() as transport:
        outcomes = [deliver(receiver.url, BODY, f"job_k{i}", config(), session=transport).outcome for i in range(3)]
    assert outcomes == ["delivered"] * 3
    assert len({request.client_port for request in receiver.requests}) == 1


def test_one_connection_serves_every_attempt_whatever_the_answer(receiver: CallbackReceiver) -> None:
    """Empty and short replies, failures and redirects alike leave the kept-alive connection to the next attempt."""
    receiver.script(
        [
            204,
            Reply(500, body=b"oops"),
            Reply(429, headers={"Retry-After": "3"}),
            Reply(302, headers={"Location": "http://example.com/"}),
            410,
            Reply(200, body=b"x" * (64 * 1024)),
            200,
        ]
    )
    with PinnedTransport() as transport:
        attempts = [deliver(receiver.url, BODY, f"job_c{i}", config(), session=transport) for i in range(7)]

    assert [attempt.status_code for attempt in attempts] == [204, 500, 429, 302, 410, 200, 200]
    assert attempts[2].retry_after_s == 3.0
    assert len({request.client_port for request in receiver.requests}) == 1


def test_a_long_reply_closes_its_connection(receiver: CallbackReceiver) -> None:
    """A body over 64 KiB is not read: its connection closes and the next attempt opens a new one."""
    receiver.script([Reply(200, body=b"x" * (64 * 1024 + 1)), 200, 200])
    with PinnedTransport() as transport:
        outcomes = [deliver(receiver.url, BODY, f"job_l{i}", config(), session=transport).outcome for i in range(3)]

    assert outcomes == ["delivered"] * 3
    first, second, third = (request.client_port for request in receiver.requests)
    assert first != second == third


def test_a_timed_out_connection_is_not_reused(receiver: CallbackReceiver) -> None:
    receiver.script([200, Reply(200, delay_s=1), 200])
    with PinnedTransport() as transport:
        attempts = [deliver(receiver.url, BODY, f"job_t{i}", config(timeout=0.3), session=transport) for i in range(3)]

    assert [attempt.outcome for attempt in attempts] == ["delivered", "retry", "delivered"]
    first, second, third = (request.client_port for request in receiver.wait_for(3))
    assert first == second != third


def test_one_transport_is_shared_by_many_threads(receiver: CallbackReceiver) -> None:
    receiver.set_default(Reply(200, body=b"ok"))
    outcomes: list[str] = []
    with PinnedTransport() as transport:

        def send(worker: int) -> None:
            for i in range(10):
                outcomes.append(deliver(receiver.url, BODY, f"job_{worker}x{i}", config(), session=transport).outcome)

        threads = [threading.Thread(target=send, args=(worker,)) for worker in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        assert outcomes == ["delivered"] * 80
        assert len(receiver.delivered_ids()) == 80


def test_metrics(receiver: CallbackReceiver) -> None:
    before = sample("difyq_callback_duration_seconds_count")
    deliver(receiver.url, BODY, "job_metrics", config())
    deliver("http://10.0.0.1/", BODY, "job_metrics", config())  # blocked: no POST, no duration

    assert sample("difyq_callback_duration_seconds_count") == before + 1

    counts = {label: sample("difyq_callback_deliveries_total", outcome=label) for label in ("retried", "failed")}
    assert record_outcome(DeliveryAttempt("retry"), retries_remain=True) == "retried"
    assert record_outcome(DeliveryAttempt("retry"), retries_remain=False) == "failed"
    assert sample("difyq_callback_deliveries_total", outcome="retried") == counts["retried"] + 1
    assert sample("difyq_callback_deliveries_total", outcome="failed") == counts["failed"] + 1


class Extremes:
    """A random source that always answers one end of the range."""

    def __init__(self, high: bool):
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


@pytest.mark.parametrize(("attempt", "step"), list(enumerate(SCHEDULE, start=1)))
def test_delay_is_the_step_with_twenty_percent_jitter(attempt: int, step: float) -> None:
    assert next_delay(attempt, SCHEDULE, None, rng=Extremes(high=False)) == pytest.approx(step * 0.8)
    assert next_delay(attempt, SCHEDULE, None, rng=Extremes(high=True)) == pytest.approx(step * 1.2)


@given(st.integers(1, len(SCHEDULE)), st.randoms(use_true_random=False))
def test_jitter_stays_within_bounds(attempt: int, rng: random.Random) -> None:
    delay = next_delay(attempt, SCHEDULE, None, rng=rng)

    assert delay is not None
    assert SCHEDULE[attempt - 1] * 0.8 <= delay <= SCHEDULE[attempt - 1] * 1.2


def test_the_schedule_runs_out() -> None:
    assert next_delay(len(SCHEDULE) + 1, SCHEDULE, None) is None
    assert next_delay(len(SCHEDULE) + 1, SCHEDULE, 10.0) is None
    assert next_delay(1, [], None) is None
    with pytest.raises(ValueError):
        next_delay(0, SCHEDULE, None)


def test_retry_after_replaces_the_step_and_is_capped_at_the_next_one() -> None:
    low, high = Extremes(high=False), Extremes(high=True)

    assert next_delay(1, SCHEDULE, 60.0, rng=low) == 60.0  # 5 s step, receiver asks 60 s
    assert next_delay(1, SCHEDULE, 60.0, rng=high) == pytest.approx(72.0)  # only ever later than asked
    assert next_delay(1, SCHEDULE, 10_000.0, rng=high) == 300.0  # capped at the next step (5 min)
    assert next_delay(2, SCHEDULE, 1.0, rng=low) == 1.0  # shorter than the step: the receiver is ready sooner
    assert next_delay(len(SCHEDULE), SCHEDULE, 10**9, rng=high) == SCHEDULE[-1]  # last step caps at itself
    assert next_delay(1, SCHEDULE, -3.0, rng=high) == 0.0


@given(st.integers(1, len(SCHEDULE)), st.floats(0, 10**7), st.randoms(use_true_random=False))
def test_retry_after_never_exceeds_the_cap(attempt: int, retry_after: float, rng: random.Random) -> None:
    delay = next_delay(attempt, SCHEDULE, retry_after, rng=rng)
    cap = SCHEDULE[attempt] if attempt < len(SCHEDULE) else SCHEDULE[-1]

    assert delay is not None
    assert min(retry_after, cap) <= delay <= cap
