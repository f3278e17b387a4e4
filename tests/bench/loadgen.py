"""The open-loop load generator: jobs are due at fixed (Poisson or uniform) times, whatever the system does.

A closed loop (send, wait, send) slows down when the system does and so hides its queueing; here each job has an
``intended`` send time fixed in advance, and every latency is measured from it, so a generator that falls behind
(or a connection pool that is full) shows up as latency instead of vanishing (no coordinated omission).

The due times are kept by a ticker thread with ``time.sleep`` (tens of microseconds late), which hands each job to
the event loop. An ``asyncio.sleep`` until the due time would be 0.7 ms late at the median even on an idle machine
(the loop rounds its epoll timeout up to the next millisecond), and that lateness would count as every pipeline's
latency. Each submission records when its submit actually started (``sent``), so the generator's own lateness is
reported apart.

Submitters: ``HttpSubmitter`` posts to difyq's ``/v1/jobs`` over a tiny keep-alive HTTP/1.1 client on raw asyncio
streams (a few tens of microseconds per request, so the generator does not eat the machine the system under test
runs on); ``DramatiqSubmitter`` and ``CelerySubmitter`` enqueue straight to Redis for the baselines (which have no
API), on a small thread pool.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Submission:
    """One job of a run: when it was due, when its submit was answered, and the id the sink will see."""

    index: int
    token: str
    intended: float
    sent: float | None = None
    accepted: float | None = None
    job_id: str | None = None
    error: str | None = None


class Submitter(Protocol):
    """Submits one job whose query carries ``token``; returns the id its callback will carry."""

    async def submit(self, token: str) -> str: ...

    async def aclose(self) -> None: ...


def query_for(token: str) -> str:
    """The query text of a bench job: the token lets the emulator's call record be matched to the job."""
    return f"bench job {token}"


class SubmitFailed(Exception):
    """The system refused or failed a submission."""


class HttpClient:
    """A keep-alive HTTP/1.1 client for one loopback host: raw request bytes in, (status, body) out.

    Connections are reused LIFO; a reused connection that the server closed meanwhile (uvicorn's keep-alive
    timeout) is retried once on a fresh one. At most ``max_connections`` are open at once.
    """

    def __init__(self, host: str, port: int, max_connections: int = 256) -> None:
        self.host = host
        self.port = port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        async with self._slots:
            while self._idle:
                reader, writer = self._idle.pop()
                try:
                    return await self._exchange(reader, writer, raw)
                except (ConnectionError, asyncio.IncompleteReadError):
                    writer.close()
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                return await self._exchange(reader, writer, raw)
            except BaseException:
                writer.close()
                raise

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
    ) -> tuple[int, bytes]:
        writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await reader.readexactly(length) if length else b""
        if close:
            writer.close()
        else:
            self._idle.append((reader, writer))
        return status, body

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class HttpSubmitter:
    """``POST /v1/jobs`` to difyq's API with a callback to the sink; the job id comes from the 202. ``query`` and
    ``callback`` choose a job's query text and callback URL from its token (default: ``query_for`` and
    ``callback_url``)."""

    def __init__(self, host: str, port: int, token: str, app: str, callback_url: str, *,
                 query: Callable[[str], str] = query_for, callback: Callable[[str], str] | None = None) -> None:
        self.client = HttpClient(host, port)
        self._head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
                      "Content-Type: application/json\r\n").encode()
        self._app = app
        self._query = query
        self._callback = callback or (lambda _token: callback_url)

    async def submit(self, token: str) -> str:
        body = json.dumps({"app": self._app, "query": self._query(token), "user": "bench",
                           "callback_url": self._callback(token)}).encode()
        status, answer = await self.client.request(
            self._head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        if status != 202:
            raise SubmitFailed(f"HTTP {status}: {answer[:200]!r}")
        return str(json.loads(answer)["id"])

    async def aclose(self) -> None:
        await self.client.aclose()


class ThreadedSubmitter:
    """Runs a blocking ``send(job_id, query)`` on a small thread pool (the baselines' enqueue calls)."""

    def __init__(self, send: Callable[[str, str], None], prefix: str, threads: int = 8) -> None:
        self._send = send
        self._prefix = prefix
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-submit")

    async def submit(self, token: str) -> str:
        job_id = f"{self._prefix}-{token}"
        await asyncio.get_running_loop().run_in_executor(self._pool, self._send, job_id, query_for(token))
        return job_id

    async def aclose(self) -> None:
        self._pool.shutdown(wait=True)


def dramatiq_submitter(redis_url: str, callback_url: str) -> ThreadedSubmitter:
    """Enqueue ``bare``'s actor messages with Dramatiq's own RedisBroker (one Lua dispatch each)."""
    from dramatiq import Message
    from dramatiq.brokers.redis import RedisBroker

    from tests.bench.baseline_bare import ACTOR, NAMESPACE, QUEUE

    broker = RedisBroker(url=redis_url, namespace=NAMESPACE)

    def send(job_id: str, query: str) -> None:
        broker.enqueue(Message(queue_name=QUEUE, actor_name=ACTOR, args=(job_id, query, callback_url),
                               kwargs={}, options={}))

    return ThreadedSubmitter(send, "bare")


def celery_submitter(redis_url: str, callback_url: str) -> ThreadedSubmitter:
    """``send_task`` to the ``celery`` baseline's task."""
    from tests.bench.baseline_celery import TASK, make_app

    app = make_app(redis_url)

    def send(job_id: str, query: str) -> None:
        app.send_task(TASK, args=[job_id, query, callback_url])

    return ThreadedSubmitter(send, "celery")


def arrival_offsets(rate: float, duration: float, *, poisson: bool, seed: int) -> list[float]:
    """Seconds from the start at which jobs are due: a Poisson process (or a uniform grid) at ``rate``/s."""
    rng = random.Random(seed)
    offsets: list[float] = []
    at = 0.0
    while True:
        at += rng.expovariate(rate) if poisson else 1.0 / rate
        if at >= duration:
            return offsets
        offsets.append(at)


async def _submit_one(submitter: Submitter, submission: Submission) -> None:
    submission.sent = time.time()
    try:
        submission.job_id = await submitter.submit(submission.token)
        submission.accepted = time.time()
    except Exception as exc:  # a failed submit is a data point (counted as lost), not a crash of the bench
        submission.error = f"{type(exc).__name__}: {exc}"[:300]


def _tick(loop: asyncio.AbstractEventLoop, due: list[float], fire: Callable[[int], None],
          stop: threading.Event) -> None:
    """Sleep until each due time and hand its index to the loop (``fire``); a thread sleeps to the microsecond."""
    for index, at in enumerate(due):
        delay = at - time.time()
        if delay > 0 and stop.wait(delay):
            return
        loop.call_soon_threadsafe(fire, index)


async def open_loop(
    make_submitter: Callable[[], Submitter],
    rate: float,
    duration: float,
    *,
    poisson: bool = True,
    seed: int = 1,
    during: Callable[[], Awaitable[Any]] | None = None,
) -> list[Submission]:
    """Submit at ``rate`` jobs/s for ``duration`` s; returns every submission once all submits are answered.

    ``during`` is awaited concurrently (e.g. a memory sampler) and cancelled when the submits are done.
    """
    submitter = make_submitter()
    run = uuid.uuid4().hex[:8]
    start = time.time() + 0.05
    submissions = [Submission(index, f"{run}-{index}", start + offset)
                   for index, offset in enumerate(arrival_offsets(rate, duration, poisson=poisson, seed=seed))]
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    all_fired = loop.create_future()

    def fire(index: int) -> None:
        tasks.append(asyncio.create_task(_submit_one(submitter, submissions[index])))
        if len(tasks) == len(submissions) and not all_fired.done():
            all_fired.set_result(None)

    stop = threading.Event()
    ticker = threading.Thread(target=_tick, args=(loop, [s.intended for s in submissions], fire, stop),
                              name="bench-ticker", daemon=True)
    side = asyncio.create_task(during()) if during is not None else None
    try:
        ticker.start()
        if submissions:
            await all_fired
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        if side is not None:
            side.cancel()
        await submitter.aclose()
    return submissions


async def _stream_once(host: str, port: int, key: str, query: str, durations: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"inputs": {}, "query": query, "response_mode": "streaming", "user": "bench"}).encode()
    writer.write(f"POST /v1/chat-messages HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    started = time.time()
    try:
        tail = b""
        while data := await reader.read(65536):
            if b"message_end" in tail + data:
                durations.append(time.time() - started)
                return
            tail = data[-16:]
    finally:
        writer.close()


async def emulator_alone(host: str, port: int, key: str, rate: float, duration: float) -> list[float]:
    """Streaming calls straight to the emulator at ``rate``/s (uniform, open loop), from a client that costs
    next to nothing: each call's full answer time, to calibrate what the emulator itself does at a concurrency."""
    durations: list[float] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.time()
    for index, offset in enumerate(arrival_offsets(rate, duration, poisson=False, seed=0)):
        await asyncio.sleep(max(0.0, start + offset - time.time()))
        tasks.append(asyncio.create_task(_stream_once(host, port, key, f"calibration {index}", durations)))
    await asyncio.gather(*tasks, return_exceptions=True)
    return durations
