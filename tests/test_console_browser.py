"""The operator console in a real headless Chromium against a real API, worker, emulator and Redis: sign in,
a job appears without reload and succeeds, its page shows the answer and usage, cancel from the page, a viewer
cannot act and a forged POST is refused, dead-lettered callbacks replayed by filter, a paused schedule does not
fire; screenshots of the list and a job page are taken (into docs/img/ with ``pytest --update-screenshots``, so a
plain run leaves the checkout unchanged)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
import structlog
from prometheus_client import REGISTRY
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from structlog.testing import capture_logs

from difyq.producers.scheduler import Scheduler
from difyq.producers.scheduler_command import submit_fire_for
from difyq.producers.schedules.pauses import SchedulePauses
from difyq.worker.dify.emulator import EmulatedApp, start_emulator
from difyq.worker.jobs.model import trace_id_for
from difyq.worker.runtime import Runtime
from tests.support.browser import By, click, headless_chromium, text_of, wait_until
from tests.support.receiver import CallbackReceiver
from tests.support.stack import auth, make_runtime, running_worker, serving_api

pytestmark = pytest.mark.e2e

OPERATOR_TOKEN = "operator-token-0123456789abcdef"
VIEWER_TOKEN = "viewer-token-0123456789abcdef"
HOOK_TOKEN = "hook-token-0123456789abcdef"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class Stack:
    runtime: Runtime
    api: str
    browser: WebDriver
    receiver: CallbackReceiver

    @property
    def console(self) -> str:
        return f"{self.api}/console"

    def submit(self, query: str, **extra: object) -> str:
        reply = requests.post(f"{self.api}/v1/jobs", headers=auth(), timeout=10,
                              json={"app": "support", "query": query, "user": "console-test", **extra})
        assert reply.status_code == 202, reply.text
        return reply.json()["id"]

    def sign_in(self, token: str) -> None:
        self.browser.delete_all_cookies()
        self.browser.get(f"{self.console}/jobs")
        wait_until(self.browser, lambda b: "/console/login" in b.current_url)
        field = self.browser.find_element(By.ID, "token")
        field.send_keys(token)
        field.submit()
        wait_until(self.browser, lambda b: b.current_url.endswith("/console/jobs"))

    def usable(self) -> None:
        """The page fits the window (only tables scroll, inside their region) and every control has a label."""
        fits = self.browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        unlabelled = self.browser.execute_script(
            "return [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]"
            ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())"
            ".map(e => e.outerHTML)")
        assert fits and unlabelled == [], (self.browser.current_url, unlabelled)

    def focused_text(self) -> str:
        return self.browser.execute_script("return document.activeElement.textContent.trim()")

    def tab_to(self, text: str, presses: int = 120) -> None:
        """Press Tab from the top of the page until the focused element's text is ``text``."""
        self.browser.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        for _ in range(presses):
            ActionChains(self.browser).send_keys(Keys.TAB).perform()
            if self.focused_text() == text:
                return
        raise AssertionError(f"{presses} presses of Tab never reached {text!r}")

    def press(self, key: str) -> None:
        """Press a key in whatever has the focus."""
        ActionChains(self.browser).send_keys(key).perform()

    def wait_for_live_update(self, element_id: str) -> None:
        """Wait until a live update has replaced the element with this id."""
        self.browser.execute_script(f"document.getElementById('{element_id}').dataset.old = '1'")
        wait_until(self.browser, lambda b: b.execute_script(
            f"const e = document.getElementById('{element_id}'); return e && !e.dataset.old"))

    def jobs_listed(self) -> list[str]:
        """The ids of the jobs the page's table lists, in order, read again when a live update replaced a row."""
        return wait_until(self.browser, lambda b: ([row.get_attribute("data-job") for row in b.find_elements(
            By.CSS_SELECTOR, "tr[data-job]")],))[0]

    def status_on_page(self, job_id: str) -> str | None:
        rows = self.browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')
        return rows[0].get_attribute("data-status") if rows else None


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    namespace = f"difyq-test-{uuid.uuid4().hex[:12]}"
    # "slow" streams its answer over a minute: its task id is known at once, so a cancel stops it at Dify.
    slow = EmulatedApp(name="slow", key="app-slow-key", mode="chat", tokens_per_second=2, answer_tokens=120)
    with start_emulator([EmulatedApp(name="support", key="app-console-key", mode="chat"), slow]) as emulator:
        runtime = make_runtime(
            redis_url, namespace, {"support": {"api_key": "app-console-key", "mode": "chat",
                                               "base_url": emulator.base_url,
                                               "limits": {"requests_per_minute": 6000}},
                                   "slow": {"api_key": "app-slow-key", "mode": "chat", "base_url": emulator.base_url},
                                   "revoked": {"api_key": "app-revoked-key", "mode": "chat",
                                               "base_url": emulator.base_url}},
            console={"users": {"alice": {"token": OPERATOR_TOKEN, "role": "operator"},
                               "victor": {"token": VIEWER_TOKEN, "role": "viewer"}},
                     "sensitive_inputs": ["customer_email"]},
            schedules={"every-second": {"cron": "* * * * * *", "app": "support", "query": "tick {{ fire_time }}"},
                       "tokyo-morning": {"cron": "0 9 * * *", "timezone": "Asia/Tokyo", "app": "support",
                                         "query": "good morning"}},
            hooks={"tickets": {"app": "support", "verify": {"scheme": "token", "secret": HOOK_TOKEN},
                               "when": "{{ body.action == 'opened' }}", "query": "{{ body.title }}"}})
        with running_worker(runtime, threads=4), serving_api(runtime) as api, \
                headless_chromium(1440, 900) as browser, CallbackReceiver() as receiver:
            yield Stack(runtime, api, browser, receiver)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def screenshots(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where the test's screenshots go: docs/img/ with ``--update-screenshots``, else its own tmp_path."""
    return SCREENSHOTS if request.config.getoption("--update-screenshots") else tmp_path


def _screenshot(stack: Stack, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert stack.browser.save_screenshot(str(path)), path
    assert path.read_bytes().startswith(PNG_SIGNATURE), path


def test_sign_in_live_list_and_job_page(stack: Stack, screenshots: Path) -> None:
    stack.sign_in(OPERATOR_TOKEN)
    job_id = stack.submit("Hello from the console test",
                          inputs={"customer_email": "jane@example.com", "db_password": "hunter2", "topic": "billing"})
    assert wait_until(stack.browser, lambda _: stack.status_on_page(job_id) == "succeeded")
    for n in range(3):
        stack.submit(f"Another question {n}")
    wait_until(stack.browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, 'tr[data-status="succeeded"]')) >= 4)
    _screenshot(stack, screenshots / "console-jobs.png")

    click(stack.browser, By.LINK_TEXT, job_id)
    wait_until(stack.browser, lambda b: b.find_elements(By.ID, "answer"))
    assert text_of(stack.browser, By.ID, "answer").strip()
    usage = text_of(stack.browser, By.ID, "usage")
    assert "total tokens" in usage
    page = stack.browser.page_source
    assert "jane@example.com" not in page and "hunter2" not in page and "billing" in page
    assert "app-console-key" not in page and OPERATOR_TOKEN not in page
    assert text_of(stack.browser, By.ID, "trace-id") == trace_id_for(job_id)
    assert text_of(stack.browser, By.ID, "tenant") == stack.runtime.store.get(job_id)["tenant"]
    assert stack.runtime.store.get(job_id)["result"]["message_id"] in text_of(stack.browser, By.ID, "dify-ids")
    timeline = text_of(stack.browser, By.CLASS_NAME, "timeline")
    assert "first token" in timeline and "attempt 1 succeeded after" in timeline
    first = attempt_cells(stack, 1)
    assert first["Outcome"] == "succeeded" and first["Duration"] != "\u2013" and first["First token"] != "\u2013"
    _screenshot(stack, screenshots / "console-job.png")

    for searched in (stack.runtime.store.get(job_id)["result"]["message_id"], job_id):
        stack.browser.get(f"{stack.console}/jobs")
        search = stack.browser.find_element(By.ID, "q")
        search.send_keys(searched)
        search.submit()
        wait_until(stack.browser, lambda b, searched=searched: f"q={searched}" in b.current_url
                   and b.find_elements(By.ID, "search-notice"))
        assert stack.jobs_listed() == [job_id]

    tenant = stack.runtime.store.get(job_id)["tenant"]
    for wanted, shown in ((tenant, True), ("no-such-tenant", False)):
        stack.browser.get(f"{stack.console}/jobs")
        box = stack.browser.find_element(By.ID, "tenant")
        box.send_keys(wanted)
        box.submit()
        wait_until(stack.browser, lambda b, wanted=wanted: f"tenant={wanted}" in b.current_url)
        rows = stack.jobs_listed()
        assert (job_id in rows) is shown and (bool(rows) is shown), rows

    thread = "ticket #7 / console"
    turns = [stack.submit(f"turn {n} of a thread", thread=thread) for n in range(2)]
    stack.browser.get(f"{stack.console}/jobs/{turns[0]}")
    click(stack.browser, By.ID, "thread")  # the job page links to its thread's jobs
    wait_until(stack.browser, lambda _: stack.jobs_listed() == turns[::-1])
    assert stack.browser.find_element(By.ID, "q").get_attribute("value") == thread

    stack.browser.set_window_size(390, 844)  # a phone
    try:
        for path in ("jobs", f"jobs/{job_id}", "dead-letters", "apps", "schedules", "hooks"):
            stack.browser.get(f"{stack.console}/{path}")
            stack.usable()
    finally:
        stack.browser.set_window_size(1440, 900)


def test_the_list_shows_a_new_row_and_its_status_changes_without_a_reload(stack: Stack) -> None:
    stack.sign_in(OPERATOR_TOKEN)
    stack.browser.execute_script("window.loadedOnce = true")  # a reload would drop it
    job_id = stack.submit("WAIT3 silent for three seconds, then an answer")
    first_seen = wait_until(stack.browser, lambda _: stack.status_on_page(job_id))
    assert first_seen in ("queued", "running")
    wait_until(stack.browser, lambda _: stack.status_on_page(job_id) == "succeeded", timeout=40)
    assert stack.browser.execute_script("return window.loadedOnce === true"), "the page was reloaded"


def test_keyboard_only_through_live_updates(stack: Stack) -> None:
    """Tab reaches a job's link in the live list and the cancel button on its live page, and focus stays there
    while the live updates replace them; Enter follows the link and presses the button."""
    stack.sign_in(OPERATOR_TOKEN)
    job_id = stack.submit("a question that takes long, answered by keyboard", app="slow")
    wait_until(stack.browser, lambda _: stack.status_on_page(job_id))
    stack.tab_to(job_id)
    stack.wait_for_live_update("rows")
    assert stack.focused_text() == job_id, "a live update took the focus away"
    stack.press(Keys.ENTER)
    wait_until(stack.browser, lambda b: b.current_url.endswith(f"/jobs/{job_id}"))
    wait_until(stack.browser, lambda b: b.find_element(By.ID, "job-status").text == "running")
    stack.tab_to("Cancel job")
    stack.wait_for_live_update("live")
    assert stack.focused_text() == "Cancel job", "a live update took the focus away"
    stack.press(Keys.ENTER)
    wait_until(stack.browser, lambda b: b.find_element(By.ID, "job-status").text == "canceled")


def test_cancel_a_slow_job_from_its_page(stack: Stack) -> None:
    stack.sign_in(OPERATOR_TOKEN)
    job_id = stack.submit("a question that takes long", app="slow")
    stack.browser.get(f"{stack.console}/jobs/{job_id}")
    wait_until(stack.browser, lambda b: b.find_element(By.ID, "job-status").text == "running")
    task_id = wait_until(stack.browser, lambda _: stack.runtime.store.fields(job_id).get("task_id"))
    wait_until(stack.browser, lambda b: task_id in b.find_element(By.ID, "dify-ids").text)  # shown while it runs
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        click(stack.browser, By.XPATH, "//button[text()='Cancel job']")
        wait_until(stack.browser, lambda b: b.find_element(By.ID, "job-status").text == "canceled")
    logged = [line for line in logs if line["event"] == "console_action"]
    assert [(line["operator"], line["action"], line["job_id"]) for line in logged] == [("alice", "cancel", job_id)]
    assert OPERATOR_TOKEN not in str(logs)
    assert "cancel by alice" in text_of(stack.browser, By.CLASS_NAME, "timeline")
    assert stack.runtime.store.get(job_id)["status"] == "canceled"


def test_a_viewer_cannot_act_and_a_forged_post_is_refused(stack: Stack) -> None:
    job_id = stack.submit("WAIT30 left running")
    stack.sign_in(VIEWER_TOKEN)
    stack.browser.get(f"{stack.console}/jobs/{job_id}")
    wait_until(stack.browser, lambda b: b.find_elements(By.ID, "job-status"))
    assert not stack.browser.find_elements(By.CSS_SELECTOR, "main form button")
    assert stack.browser.find_elements(By.ID, "curl")
    viewer_cookie = {c["name"]: c["value"] for c in stack.browser.get_cookies()}

    stack.sign_in(OPERATOR_TOKEN)
    operator_cookie = {c["name"]: c["value"] for c in stack.browser.get_cookies()}
    for cookies, body in ((operator_cookie, {}), (operator_cookie, {"csrf_token": "forged"}),
                          (viewer_cookie, {})):
        refused = requests.post(f"{stack.console}/jobs/{job_id}/cancel", data=body, cookies=cookies, timeout=10,
                                allow_redirects=False)
        assert refused.status_code == 403, refused.text
    # The same forgery from inside the signed-in page's own origin, without the form's token.
    status = stack.browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('{stack.console}/jobs/{job_id}/cancel', {{method: 'POST', body: new URLSearchParams({{}})}})"
        ".then(r => done(r.status));")
    assert status == 403
    assert stack.runtime.store.get(job_id)["status"] in ("queued", "running")
    stack.runtime.store.cancel(job_id)


def test_dead_lettered_callbacks_are_replayed_by_filter(stack: Stack) -> None:
    stack.receiver.set_default(500)
    failing = [stack.submit(f"callback {n}", callback_url=stack.receiver.url) for n in range(2)]
    for job_id in failing:
        wait_until(stack.browser, lambda _, job_id=job_id: stack.runtime.store.get(job_id)["callback"]["status"]
                   == "failed")
    stack.receiver.set_default(200)
    stack.sign_in(OPERATOR_TOKEN)
    stack.browser.get(f"{stack.console}/jobs/{failing[0]}")
    sent = callback_rows(stack)
    assert sent and {row["Answer"] for row in sent} == {"HTTP 500"}
    assert [row["Outcome"] for row in sent] == ["retry"] * (len(sent) - 1) + ["failed"]  # the last one gave up
    stack.browser.get(f"{stack.console}/dead-letters?kind=callback&code=callback_http_500")
    assert set(stack.jobs_listed()) == set(failing)
    click(stack.browser, By.ID, "replay-matching")
    assert text_of(stack.browser, By.ID, "replay-count") == "2"
    click(stack.browser, By.XPATH, "//button[starts-with(text(), 'Yes, replay')]")
    assert text_of(stack.browser, By.ID, "replayed") == "Replayed 2."
    for job_id in failing:
        wait_until(stack.browser, lambda _, job_id=job_id: stack.runtime.store.get(job_id)["callback"]["status"]
                   == "delivered")
    stack.browser.get(f"{stack.console}/jobs/{failing[0]}")
    assert "replay_dead_letter by alice" in text_of(stack.browser, By.CLASS_NAME, "timeline")
    last = callback_rows(stack)[-1]
    assert (last["Event"], last["Answer"], last["Outcome"]) == ("job.succeeded", "HTTP 200", "delivered")

    delivered = len(stack.receiver.requests)
    click(stack.browser, By.XPATH, "//button[text()='Redeliver callback']")
    stack.receiver.wait_for(delivered + 1)
    assert "redeliver by alice" in text_of(stack.browser, By.CLASS_NAME, "timeline")


def test_retry_a_failed_job_from_its_page(stack: Stack) -> None:
    reply = requests.post(f"{stack.api}/v1/jobs", headers=auth(), timeout=10,
                          json={"app": "revoked", "query": "the key was revoked", "user": "console-test"})
    job_id = reply.json()["id"]
    wait_until(stack.browser, lambda _: stack.runtime.store.get(job_id)["status"] == "failed")
    stack.sign_in(OPERATOR_TOKEN)
    stack.browser.get(f"{stack.console}/jobs/{job_id}")
    click(stack.browser, By.XPATH, "//button[text()='Retry job']")
    wait_until(stack.browser, lambda _: stack.runtime.store.get(job_id)["attempts"] == 2
               and stack.runtime.store.get(job_id)["status"] == "failed")
    timeline = wait_until(stack.browser, lambda b: (t := b.find_element(By.CLASS_NAME, "timeline").text)
                          and "attempt 2 failed after" in t and t)  # the page, too, has caught up
    assert "retry by alice" in timeline and "attempt 1 failed after" in timeline
    for attempt in (1, 2):  # each attempt with Dify's status, code and message, and its own duration
        cells = attempt_cells(stack, attempt)
        assert cells["Dify status"] == "401" and cells["Outcome"] and cells["Message"]
        assert cells["Duration"] != "\u2013" and cells["Started (UTC)"] != "\u2013"


def test_a_schedule_paused_from_the_page_does_not_fire(stack: Stack) -> None:
    runtime, stop = stack.runtime, threading.Event()
    scheduler = Scheduler(runtime.config.schedules, runtime.raw_redis, runtime.namespace, submit_fire_for(runtime),
                          lease_ttl_s=1.0, tick_s=0.1)
    thread = threading.Thread(target=scheduler.run, args=(stop,), daemon=True)
    thread.start()
    try:
        stack.sign_in(OPERATOR_TOKEN)
        wait_until(stack.browser, lambda _: schedule_jobs(stack, "every-second") > 0)
        stack.browser.get(f"{stack.console}/schedules")
        assert stack.browser.find_element(By.CSS_SELECTOR, '[data-schedule="every-second"] td a')  # its last job
        next_fire = text_of(stack.browser, By.CSS_SELECTOR, '[data-schedule="tokyo-morning"] td:nth-child(5)')
        assert next_fire.endswith("T09:00:00+09:00"), next_fire  # in the schedule's zone
        click(stack.browser, By.CSS_SELECTOR, 'button[aria-label="Pause every-second"]')
        wait_until(stack.browser, lambda b: b.find_element(By.CSS_SELECTOR, '[data-schedule="every-second"]')
                   .get_attribute("data-state") == "paused")
        wait_until(stack.browser, lambda _: REGISTRY.get_sample_value("difyq_schedule_paused",
                                                                      {"schedule": "every-second"}) == 1)
        fired = schedule_jobs(stack, "every-second")
        pause_seen = scheduler.store.load(["every-second"])["every-second"].cursor
        # The scheduler goes on ticking (its cursor follows the clock) for three fire times, and fires none.
        wait_until(stack.browser, lambda _: (scheduler.store.load(["every-second"])["every-second"].cursor
                                             - pause_seen).total_seconds() >= 3)
        assert schedule_jobs(stack, "every-second") == fired
        assert SchedulePauses(runtime.raw_redis, runtime.namespace).paused()["every-second"]["by"] == "alice"
        click(stack.browser, By.CSS_SELECTOR, 'button[aria-label="Resume every-second"]')
        wait_until(stack.browser, lambda _: schedule_jobs(stack, "every-second") > fired)
    finally:
        stop.set()
        thread.join(timeout=10)


def table_rows(stack: Stack, table_id: str) -> list[dict[str, str]]:
    """The rows of a table on the page as {column header: cell text}."""
    return wait_until(stack.browser, lambda b: (b.execute_script(
        "const t = document.getElementById(arguments[0]); if (!t) return null;"
        "const heads = [...t.querySelectorAll('thead th')].map(h => h.textContent.trim());"
        "return [...t.querySelectorAll('tbody tr')].map(r => Object.fromEntries("
        "[...r.cells].map((c, i) => [heads[i], c.textContent.trim()])));", table_id),))[0] or []


def attempt_cells(stack: Stack, attempt: int) -> dict[str, str]:
    return next(row for row in table_rows(stack, "attempts") if row["Attempt"] == str(attempt))


def callback_rows(stack: Stack) -> list[dict[str, str]]:
    return table_rows(stack, "callback-attempts")


def schedule_jobs(stack: Stack, name: str) -> int:
    """How many jobs the schedule ``name`` has made (its jobs in the app's index, told by their idempotency key,
    ``schedule:{name}:{fire time}``: the other schedule of the stack fires too, at 00:00 UTC)."""
    index = stack.runtime.store.index_key("support")
    ids = [member.decode() for member in stack.runtime.raw_redis.zrange(index, 0, -1)]
    records = [stack.runtime.store.fields(job_id) or {} for job_id in ids]
    return sum(1 for fields in records if fields.get("idempotency_key", "").startswith(f"schedule:{name}:"))


def test_hook_deliveries_and_app_limits_are_shown(stack: Stack) -> None:
    def deliver(token: str, body: dict[str, str]) -> requests.Response:
        return requests.post(f"{stack.api}/hooks/tickets", json=body, timeout=10,
                             headers={"Authorization": f"Bearer {token}"})

    accepted = deliver(HOOK_TOKEN, {"action": "opened", "title": "Printer on fire"})
    assert accepted.status_code == 202, accepted.text
    assert deliver(HOOK_TOKEN, {"action": "closed", "title": "Old news"}).status_code == 204
    assert deliver("not-the-token", {"action": "opened", "title": "Forged"}).status_code == 401
    stack.sign_in(VIEWER_TOKEN)
    stack.browser.get(f"{stack.console}/hooks")
    outcomes = [row.text for row in stack.browser.find_elements(By.CSS_SELECTOR, "tr[data-outcome] td:nth-child(2)")]
    assert outcomes == ["bad signature", "filtered out", "accepted"]
    assert stack.browser.find_element(By.LINK_TEXT, accepted.json()["id"])
    assert HOOK_TOKEN not in stack.browser.page_source

    revoked = stack.submit("a key Dify no longer knows", app="revoked")
    wait_until(stack.browser, lambda _: stack.runtime.store.get(revoked)["status"] == "failed")
    code = stack.runtime.store.get(revoked)["error"]["code"]
    stack.browser.get(f"{stack.console}/apps")
    row = text_of(stack.browser, By.CSS_SELECTOR, 'tr[data-app="support"]')
    assert "/ 6000" in row and "127.0.0.1" in row
    errors = text_of(stack.browser, By.CSS_SELECTOR, 'tr[data-app="revoked"] td:last-child')
    assert code in errors and errors != "none"
    assert "app-console-key" not in stack.browser.page_source
