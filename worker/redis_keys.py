"""Every Redis key difyq owns, named in one place (the table of docs/architecture.md); scripts get them in KEYS.

All keys start with the configured namespace. The limiter's keys of one Dify key are ``limits.keys.KeyNames``
(under ``limits``); the queue keys follow the layout of Dramatiq's RedisBroker, which reads and writes them too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dramatiq.common import dq_name, xq_name


@dataclass(frozen=True)
class RedisKeys:
    namespace: str

    def _key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # Jobs
    def job(self, job_id: str) -> str:
        """The job record (a hash of ``jobs.schema.JobField``)."""
        return self._key("job", job_id)

    def index(self, app: str | None = None) -> str:
        """Job ids by creation time (ms): every job's, or one app's; entries past ``jobs.result_ttl`` are trimmed by
        submit.lua and by the reaper's rounds (``JobStore.trim_indexes``)."""
        return self._key("index", "app", app) if app else self._key("index", "all")

    def app_indexes(self) -> str:
        """A ``SCAN`` pattern of every app's index, the apps removed from the config included."""
        return "".join(f"\\{char}" if char in "*?[]\\" else char for char in self._key("index", "app", "")) + "*"

    def idempotency(self, scope: str, key: str) -> str:
        """The claim of an idempotency key within a client's scope (the key itself is hashed)."""
        return self._key("idem", scope, _digest(key))

    def dify_id(self, dify_id: str) -> str:
        """The jobs a Dify conversation, message, workflow run or task id names: job id -> when it was recorded
        (ms); expires ``jobs.result_ttl`` after its last write, as the jobs it names do."""
        return self._key("difyid", dify_id)

    def app_errors(self, app: str, minute: int) -> str:
        """An app's failed attempts of one minute (Unix time // 60) by error code, for the console's last hour."""
        return self._key("errors", "app", app, str(minute))

    def pending_of_app(self, app: str) -> str:
        """The app's unfinished jobs (queued, running, paused): job id -> creation time (ms); its ZCARD is what
        ``apps.<name>.max_pending`` caps."""
        return self._key("pending", "app", app)

    def pending_of_client(self, client: str) -> str:
        """The unfinished jobs an API client submitted, like ``pending_of_app``; ``clients.<name>.max_pending``."""
        return self._key("pending", "client", client)

    # Conversation threads (named by a hash of the thread's name, which may hold any character)
    def thread(self, app: str, thread: str) -> str:
        """A thread's state (a hash of ``jobs.schema.ThreadField``: its Dify conversation and user); expires
        ``threads.ttl`` after its last job."""
        return self._key("thread", app, _digest(thread))

    def thread_line(self, app: str, thread: str) -> str:
        """A thread's unfinished jobs in submit order: the first is the one that runs (or waits to), the others
        hold their message until it finishes."""
        return self._key("thread-line", app, _digest(thread))

    def thread_jobs(self, app: str, thread: str) -> str:
        """A thread's jobs by creation time (ms), for ``GET /v1/threads/{thread}``; expires with the thread."""
        return self._key("thread-jobs", app, _digest(thread))

    @property
    def leases(self) -> str:
        """Running jobs (and finished ones sending their first callback) by lease expiry."""
        return self._key("leases")

    @property
    def paused(self) -> str:
        """Paused jobs (their Dify run waits for human input) by the time they paused (ms), for the paused gauge."""
        return self._key("paused")

    @property
    def reaper(self) -> str:
        """The lock of the process sweeping expired leases."""
        return self._key("reaper")

    def worker_alive(self, worker: str) -> str:
        """A worker process's heartbeat (its ``worker`` id as written on the jobs it runs): the time (ms) of its
        last lease round, expiring two leases later; the reaper leaves an expired lease that round renewed."""
        return self._key("worker-alive", worker)

    @property
    def orphan_sweep(self) -> str:
        """The lock of the process looking for queued jobs without a message (``worker/orphans.py``)."""
        return self._key("orphan-sweep")

    def callback_lock(self, job_id: str) -> str:
        """Held while one callback attempt for the job is under way."""
        return self._key("callback-lock", job_id)

    @property
    def callbacks_due(self) -> str:
        """The jobs whose callback has a message waiting, by when it is due (ms), for the orphan sweep."""
        return self._key("callbacks", "due")

    @property
    def callback_dead_letters(self) -> str:
        """Job ids whose callback ended ``failed``, by time."""
        return self._key("dlq", "callbacks")

    # Budgets
    def budget_spent(self, budget: str, period: str) -> str:
        """What each subject (app, client or tenant) of a budget spent in one period: subject -> amount (tokens, or
        1e-7 of the currency); expires a period after the period ends."""
        return self._key("budget", budget, "spent", period)

    def budget_reserved(self, budget: str) -> str:
        """A budget's live reservations summed by ``{period}|{subject}``."""
        return self._key("budget", budget, "reserved")

    def budget_reservations(self, budget: str) -> str:
        """A budget's live reservations (``{rid}|{amount}|{period}|{subject}``) by deadline (ms): a reservation
        its worker stopped renewing is reclaimed past its deadline."""
        return self._key("budget", budget, "reservations")

    @property
    def budget_estimates(self) -> str:
        """The mean real cost of a job per ``{app}|{unit}`` (tokens, or a currency's 1e-7 units), what a budget
        reserves before a call."""
        return self._key("budget-estimates")

    # Producers
    def hook_delivery(self, hook: str, delivery_id: str) -> str:
        """The job a webhook delivery created, to answer a redelivery with it."""
        return self._key("hookdelivery", hook, delivery_id)

    def hook_recent(self, hook: str) -> str:
        """A hook's last deliveries with their outcome, for the console."""
        return self._key("hookrecent", hook)

    @property
    def scheduler_leader(self) -> str:
        return self._key("scheduler", "leader")

    def schedule_state(self, name: str) -> str:
        return self._key("schedule", "state", name)

    @property
    def schedule_pauses(self) -> str:
        """Paused schedules: name → who paused it and when."""
        return self._key("schedule", "paused")

    def schedule_fire(self, name: str, fire_iso: str) -> str:
        """The guard of one fire of a schedule."""
        return self._key("schedule", "fired", name, fire_iso)

    # Console
    def console_session(self, session_id: str) -> str:
        """A console session, named by a hash of its id (the cookie's value never reaches Redis)."""
        return self._key("console", "session", hashlib.sha256(session_id.encode()).hexdigest())

    def console_actions(self, job_id: str) -> str:
        return self._key("console", "actions", job_id)

    # Dramatiq's queues
    def wake(self, queue_name: str) -> str:
        """The token that wakes an idle consumer of a queue (``worker.wakeup``): one element at most."""
        return self._key("wake", queue_name)

    def express_tail(self, queue_name: str) -> str:
        """The message id of the queue's last job above normal priority: a later one goes right after it, so
        such jobs wait for a worker thread ahead of every normal or low one, in submit order among themselves."""
        return self._key("express-tail", queue_name)

    def low_lane(self, queue_name: str) -> str:
        """The message ids of the queue's jobs below normal priority (their bodies are in the queue's bodies hash),
        in submit order: a worker moves them onto the queue when it finds it empty, as many as it has free threads,
        and one per ``1 / jobs.low_priority_min_share`` messages it fetched (``worker.wakeup``)."""
        return self._key("low-lane", queue_name)

    def queue(self, queue_name: str) -> str:
        """A queue's list of message ids (``queue_name`` may be a delay queue's, ``jobs.DQ``)."""
        return self._key(queue_name)

    def queue_bodies(self, queue_name: str) -> str:
        """A queue's message bodies by message id."""
        return self.queue(queue_name) + ".msgs"

    def delayed_bodies(self, queue_name: str) -> str:
        return self.queue_bodies(dq_name(queue_name))

    def dead_letters(self, queue_name: str) -> str:
        """Dramatiq's dead letters of a queue (a sorted set; bodies in its own ``.msgs``)."""
        return self.queue(xq_name(queue_name))


def _digest(text: str) -> str:
    """A fixed-length, separator-free stand-in for a caller's name in a key."""
    return hashlib.sha256(text.encode()).hexdigest()
