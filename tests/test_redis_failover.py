"""Redis failover through Sentinel, with real processes: a primary, a replica and three sentinels on loopback; two
``difyq api`` processes (one with ``redis.durable_submit``, one without), a ``difyq worker`` and a ``difyq
scheduler``, all given only the sentinels (REDIS_URL points nowhere). Clients submit jobs all along; the primary is
killed (SIGKILL), and later restarted, as a crashed pod would be.

Shown: during the switch the APIs answer 503 with Retry-After, never a 500 and never a hang; every process finds
the new primary by itself; no job the durable API accepted is lost (it answers 202 only once a replica holds the
job, so it answers 503 until the restarted server has joined as the new primary's replica). The figures printed
(switch time, 503s, jobs lost with durable_submit off) are those of loopback, where replication is quicker than a
kill; README.md (Operations) says what can be lost without durable_submit.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import requests

from difyq.worker.config import ConfigError, SentinelConfig
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.redis_connect import RedisConnector, sentinel_settings
from tests.support.processes import DifyqProcesses, difyq_processes
from tests.support.sentinel import MASTER_NAME, SentinelDeployment, sentinel_deployment
from tests.support.stack import CLIENT_TOKEN, make_runtime, serving_api
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

UNUSED_REDIS_URL = "redis://127.0.0.1:1/0"  # with Sentinel only its database number counts: nothing listens here
HEADERS = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
REQUEST_TIMEOUT_S = 10.0
SUBMIT_INTERVAL_S = 0.02


@dataclass
class Submitter:
    """A client submitting jobs to one API in a loop, each with its own idempotency key, retried with the same key
    after a 503 (so a retry of a job that was stored is answered 200 with that job); it records every answer."""

    api: str
    name: str
    accepted: dict[str, float] = field(default_factory=dict)
    unavailable: list[float] = field(default_factory=list)
    retry_after: set[str] = field(default_factory=set)
    other: list[tuple[int, str]] = field(default_factory=list)
    slowest_s: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        session = requests.Session()
        key = uuid.uuid4().hex
        while not self.stop.is_set():
            began = time.monotonic()
            response = session.post(f"{self.api}/v1/jobs", timeout=REQUEST_TIMEOUT_S,
                                    headers={**HEADERS, "Idempotency-Key": key},
                                    json={"app": "support", "query": "failover", "user": self.name})
            self.slowest_s = max(self.slowest_s, time.monotonic() - began)
            if response.status_code in (200, 202):  # 200: the job an earlier attempt with this key stored
                self.accepted[response.json()["id"]] = time.monotonic()
                key = uuid.uuid4().hex
            elif response.status_code == 503:
                self.unavailable.append(time.monotonic())
                self.retry_after.add(response.headers.get("Retry-After", ""))
            else:
                self.other.append((response.status_code, response.text[:300]))
            time.sleep(SUBMIT_INTERVAL_S)

    def accepted_after(self, moment: float) -> int:
        return sum(1 for accepted_at in self.accepted.values() if accepted_at > moment)

    def back_after(self, moment: float) -> float:
        """Seconds from ``moment`` to the first acceptance after the first 503 that followed it."""
        first_refusal = min(refused_at for refused_at in self.unavailable if refused_at > moment)
        return min(accepted_at for accepted_at in self.accepted.values() if accepted_at > first_refusal) - moment


def _config(emulator_url: str, namespace: str, sentinels: list[str], durable: bool) -> dict:
    return {
        "apps": {"support": {"api_key": "app-failover-key-01", "mode": "chat", "base_url": emulator_url}},
        "clients": {"crm": {"token": CLIENT_TOKEN, "apps": ["*"]}},
        "jobs": {"retry_min_backoff": "0.1s", "retry_max_backoff": "0.5s"},
        "redis": {"namespace": namespace, "durable_submit": durable,
                  "sentinel": {"master": MASTER_NAME, "nodes": sentinels}},
        "schedules": {"tick": {"cron": "* * * * * */2", "app": "support", "query": "tick", "user": "scheduler"}},
    }


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    with sentinel_deployment(tmp_path / "redis") as running:
        yield running


def _final_status(api: str, job_id: str) -> str | None:
    response = requests.get(f"{api}/v1/jobs/{job_id}", headers=HEADERS, timeout=REQUEST_TIMEOUT_S)
    if response.status_code == 404:
        return "lost"
    status = response.json()["status"]
    return status if status in ("succeeded", "failed", "canceled") else None


def _scheduled_after(api: str, moment_epoch: float) -> list[dict]:
    response = requests.get(f"{api}/v1/jobs", params={"source": "schedule", "status": "succeeded"}, headers=HEADERS,
                            timeout=REQUEST_TIMEOUT_S)
    return [job for job in response.json()["jobs"]
            if datetime.fromisoformat(job["created_at"].replace("Z", "+00:00")).timestamp() > moment_epoch]


@pytest.mark.slow
def test_failover_503_then_reconnect_and_no_durable_job_lost(tmp_path: Path,
                                                             deployment: SentinelDeployment) -> None:
    namespace = f"difyq-failover-{uuid.uuid4().hex[:8]}"
    emulated = [EmulatedApp(name="support", key="app-failover-key-01", mode="chat", tokens_per_second=0,
                            answer_tokens=3)]
    with start_emulator(emulated) as emulator:
        emulator_url = f"http://127.0.0.1:{emulator.port}/v1"
        (tmp_path / "durable").mkdir()
        (tmp_path / "plain").mkdir()
        with difyq_processes(tmp_path / "durable", UNUSED_REDIS_URL,
                             _config(emulator_url, namespace, deployment.nodes, durable=True)) as durable, \
                difyq_processes(tmp_path / "plain", UNUSED_REDIS_URL,
                                _config(emulator_url, namespace, deployment.nodes, durable=False)) as plain:
            _run_failover(deployment, durable, plain)


def _run_failover(deployment: SentinelDeployment, durable: DifyqProcesses, plain: DifyqProcesses) -> None:
    durable_api, plain_api = durable.start_api(), plain.start_api()
    plain.start_worker(processes=1, threads=4)
    plain.start("scheduler", "scheduler")
    submitters = [Submitter(durable_api, "durable"), Submitter(plain_api, "plain")]
    threads = [threading.Thread(target=submitter.run, daemon=True) for submitter in submitters]
    for thread in threads:
        thread.start()
    durable_submitter, plain_submitter = submitters
    try:
        wait_for(lambda: min(len(s.accepted) for s in submitters) >= 20, 30, what="jobs accepted before the kill")

        killed = deployment.name_of(deployment.primary_port())
        killed_at, killed_epoch = time.monotonic(), time.time()
        deployment.kill(killed)
        wait_for(lambda: deployment.primary_port() != deployment.servers[killed], 30,
                 what="the sentinels promoting the replica")
        promoted_after = time.monotonic() - killed_at
        wait_for(lambda: plain_submitter.accepted_after(killed_at) >= 20, 30,
                 what="the plain API accepting jobs on the new primary")

        # The killed server comes back as the new primary's replica (as a restarted pod asks the sentinels which
        # server to follow); only then does the durable API accept jobs again.
        deployment.start_server(killed, replica_of=deployment.name_of(deployment.primary_port()))
        rejoined = wait_for(lambda: deployment.replicas_of(deployment.name_of(deployment.primary_port())) == 1, 60,
                            what="the restarted server joining as a replica")
        assert rejoined
        wait_for(lambda: durable_submitter.accepted_after(killed_at) >= 20, 30,
                 what="the durable API accepting jobs again")
    finally:
        for submitter in submitters:
            submitter.stop.set()
        for thread in threads:
            thread.join(timeout=30)

    for submitter in submitters:
        assert submitter.other == [], f"{submitter.name} API: answers other than 200, 202 or 503: {submitter.other[:5]}"
        assert submitter.unavailable, f"{submitter.name} API never answered 503 during the switch"
        assert submitter.retry_after == {"5"}, submitter.retry_after

    # Every accepted job is run by the worker, which found the new primary by itself; none is lost. A delivery the
    # switch cut off is retried once the new primary answers; a job whose attempt it cut off comes back like a
    # dead worker's, and one left without a message is found by the orphan sweep: each within the bounds of
    # docs/guarantees.md (three leases, 90 s, for the sweep; with margin here).
    outcomes: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + 150
    for submitter in submitters:
        outcomes[submitter.name] = {
            job_id: wait_for(lambda job_id=job_id: _final_status(plain_api, job_id),
                             max(1.0, deadline - time.monotonic()), what=f"{submitter.name} job {job_id} finishing")
            for job_id in submitter.accepted}
    lost = {name: sum(1 for status in found.values() if status == "lost") for name, found in outcomes.items()}
    assert lost["durable"] == 0, outcomes["durable"]
    assert {status for status in outcomes["durable"].values()} == {"succeeded"}
    assert {status for status in outcomes["plain"].values()} <= {"succeeded", "lost"}
    # The scheduler kept firing on the new primary.
    wait_for(lambda: _scheduled_after(plain_api, killed_epoch + promoted_after), 30,
             what="a scheduled job created and run after the switch")

    plain_switch, durable_switch = plain_submitter.back_after(killed_at), durable_submitter.back_after(killed_at)
    worker_log = plain.logs("worker")
    print(f"\nfailover: replica promoted {promoted_after:.1f} s after the kill; plain API: 202 again after "
          f"{plain_switch:.1f} s, {len(plain_submitter.unavailable)} x 503, {len(plain_submitter.accepted)} accepted, "
          f"{lost['plain']} lost; durable API: 202 again after {durable_switch:.1f} s (a replica back), "
          f"{len(durable_submitter.unavailable)} x 503, {len(durable_submitter.accepted)} accepted, 0 lost; "
          f"slowest answer {max(s.slowest_s for s in submitters):.2f} s; worker: "
          f"{worker_log.count('enqueue_waiting_for_redis')} enqueue(s) waited for the new primary, "
          f"{worker_log.count('queued_job_orphaned')} orphaned job(s) queued again")


def test_durable_submit_answers_503_until_a_replica_holds_the_job(tmp_path: Path) -> None:
    """A primary without a replica: the durable submit stores the job but answers 503 with Retry-After (no replica
    acknowledged it); once a replica is connected, the retry with the same key answers 200 with that same job."""
    servers = SentinelDeployment(tmp_path)
    try:
        servers.start_server("a")
        namespace = f"difyq-durable-{uuid.uuid4().hex[:8]}"
        runtime = make_runtime(f"redis://127.0.0.1:{servers.servers['a']}/0", namespace,
                               {"support": {"api_key": "app-durable-key-01", "mode": "chat"}},
                               redis={"namespace": namespace, "durable_submit": True})
        body = {"app": "support", "query": "keep me", "user": "durable"}
        headers = {**HEADERS, "Idempotency-Key": "durable-1"}
        with serving_api(runtime) as api:
            refused = requests.post(f"{api}/v1/jobs", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "5", refused.text
            stored = runtime.store.list(allowed_apps=None, limit=10)[0]
            assert len(stored) == 1  # on the primary, not yet on any replica
            servers.start_server("b", replica_of="a")
            wait_for(lambda: servers.replicas_of("a") == 1, 10, what="the replica connecting")
            retried = requests.post(f"{api}/v1/jobs", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
            assert retried.status_code == 200, retried.text
            assert retried.json()["id"] == stored[0]["id"]
    finally:
        servers.stop_all()


# ------------------------------------------------------------------------------------------------ the settings


def test_sentinel_settings_from_the_environment() -> None:
    configured = SentinelConfig(master="cache", nodes=["10.0.0.1:26379"], password="from-config")
    assert sentinel_settings(None, {}) is None
    assert sentinel_settings(configured, {}) == configured
    from_env = sentinel_settings(configured, {"REDIS_SENTINELS": "s1:26379, s2:26380,[::1]:26381",
                                              "REDIS_SENTINEL_MASTER": "jobs"})
    assert from_env is not None
    assert from_env.addresses() == [("s1", 26379), ("s2", 26380), ("::1", 26381)]
    assert from_env.master == "jobs" and from_env.password is not None
    assert from_env.password.get_secret_value() == "from-config"
    only_env = sentinel_settings(None, {"REDIS_SENTINELS": "s1:26379", "REDIS_SENTINEL_PASSWORD": "pw"})
    assert only_env is not None and only_env.master == "mymaster"
    with pytest.raises(ConfigError) as error:
        sentinel_settings(None, {"REDIS_SENTINELS": "s1:26379,s2"})
    assert error.value.problems == ["REDIS_SENTINELS: 's2' is not host:port"]
    with pytest.raises(ConfigError, match="unix socket"):
        RedisConnector.from_settings("unix:///run/redis.sock", configured, {})
    server = RedisConnector.from_settings("rediss://user:secret@ignored:1/3", configured, {}).server_options()
    assert server == {"username": "user", "password": "secret", "db": 3, "ssl": True}
