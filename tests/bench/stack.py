"""The processes a bench run needs, and what they cost: a private Redis, the callback sink, the Dify emulator with
a latency profile, and one pipeline at a time (``difyq``, ``bare`` or ``celery``).

Everything runs as a separate process on loopback, started in its own session so it can be stopped as a group
by its id. ``Accounting`` snapshots CPU time (per role, and the whole machine's, to show what other load shared
the cores), Redis ``INFO commandstats`` and memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis
import yaml

from difyq.worker.embedded_redis import EmbeddedRedis, free_port
from tests.bench.loadgen import HttpSubmitter, Submitter, celery_submitter, dramatiq_submitter
from tests.support.processes import wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]
DIFY_KEY = "app-benchkey0000000000"
CLIENT_TOKEN = "bench-client-token-0123456789"
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
APP = "bench"
# The app of the ``difyq+limits`` pipeline: every limit set, none binding at the bench's rates (requests, tokens and
# concurrency are checked, recorded and released on every job).
LIMITED_APP_LIMITS = {"requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000, "max_concurrency": 10_000}
LIMITED = "difyq+limits"
NAMESPACE = "difyqbench"


@dataclass(frozen=True)
class Profile:
    """How the emulated Dify answers: time to first token, tokens per second (0 = all at once), answer length."""

    name: str
    ttft_s: float
    tokens_per_second: float
    answer_tokens: int

    @property
    def nominal_s(self) -> float:
        """The answer's own duration by construction (the emulator's call records give the measured one)."""
        spacing = (self.answer_tokens - 1) / self.tokens_per_second if self.tokens_per_second else 0.0
        return self.ttft_s + max(spacing, 0.0)


def source_commit(src: Path) -> str:
    """The difyq source's commit, marked ``+changes`` when its work tree differs from it."""
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "worker", "producers"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{src} (not a git checkout)"
    return commit + ("+changes" if dirty else "")


def raise_file_limit() -> None:
    """Thousands of streams in flight need thousands of sockets in the emulator, the workers and Redis."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Service:
    """A process this bench started, in its own session, its output in a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group this service leads, then SIGKILL it if it does not go in ``timeout`` s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants that are alive now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their descendants (reaped children included)."""
    total = 0.0
    for pid in pids:
        for proc in process_tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
                if proc.pid == pid:
                    total += times.children_user + times.children_system
    return total


def tree_memory(pids: list[int]) -> dict[str, float]:
    """RSS and PSS (MiB) summed over the trees, and how many processes they have: PSS splits pages a fork
    shares, so it is the honest total; RSS counts them once per process."""
    rss = pss = 0
    count = 0
    for pid in pids:
        for proc in process_tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                count += 1
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": count}


class Sink:
    """The callback sink process and a reader of its arrivals."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.service = Service("sink", [sys.executable, "-m", "tests.bench.sink", "--port", str(self.port)],
                               log_dir, cwd=REPO_ROOT)
        wait_for_port(self.port, process=self.service.process)
        self._next = 0
        self.arrivals: dict[str, float] = {}
        self.duplicates = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    def poll(self) -> dict[str, float]:
        """Fetch the arrivals since the last poll; returns every arrival seen so far (id to unix time)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_sink/arrivals?from={self._next}",
                                    timeout=30) as reply:
            page = json.loads(reply.read())
        for webhook_id, at in page["arrivals"]:
            self.arrivals[webhook_id] = at
        self._next = page["next"]
        self.duplicates = page["duplicates"]
        return self.arrivals

    def failures(self) -> dict[str, float]:
        """Every id whose callback the ``/fail`` path refused (id to the first attempt's unix time)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_sink/failures?from=0", timeout=30) as reply:
            return dict(json.loads(reply.read())["arrivals"])

    def wait_for(self, ids: set[str], timeout: float, settle: float = 0.0) -> dict[str, float]:
        """Poll until every id has arrived or ``timeout`` passes; then wait ``settle`` s for stragglers."""
        deadline = time.monotonic() + timeout
        while True:
            arrived = self.poll()
            if ids.issubset(arrived.keys()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if settle:
            time.sleep(settle)
            arrived = self.poll()
        return {job_id: arrived[job_id] for job_id in ids if job_id in arrived}


class Emulator:
    """``difyq emulator`` serving one chat app with the given latency profile."""

    def __init__(self, profile: Profile, log_dir: Path) -> None:
        self.profile = profile
        self.port = free_port()
        apps = log_dir / f"emulator-{profile.name}.yaml"
        apps.write_text(yaml.safe_dump({"apps": {APP: {
            "key": DIFY_KEY, "mode": "chat", "time_to_first_token_s": profile.ttft_s,
            "tokens_per_second": profile.tokens_per_second, "answer_tokens": profile.answer_tokens}}}))
        self.service = Service(f"emulator-{profile.name}", [
            sys.executable, "-m", "difyq.producers.cli", "emulator", "--port", str(self.port), "--apps", str(apps)],
            log_dir, env={**os.environ, "DIFYQ_LOG_LEVEL": "WARNING"}, cwd=REPO_ROOT)
        wait_for_port(self.port, process=self.service.process)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def take_calls(self) -> list[dict[str, Any]]:
        """The generation calls served since the last take (then forgotten, so the list stays short)."""
        calls = take_recorded(f"http://127.0.0.1:{self.port}/_emulator/calls")
        return [call for call in calls if call.get("path") == "/v1/chat-messages"]


def take_recorded(url: str) -> list[dict[str, Any]]:
    """The calls a Dify stand-in recorded at ``url`` since the last take, taken and forgotten in one request (a
    ``DELETE`` that answers them), so a call that ends meanwhile is in this take or the next, never lost."""
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=60) as reply:
        return json.loads(reply.read())


class StreamSource:
    """``tests.bench.stream_source`` answering chat streams at a profile's pace, with the ``Emulator``'s interface
    (``base_url``, ``take_calls``, ``service``): the in-flight scenario's Dify, light enough for 10,000 streams."""

    def __init__(self, profile: Profile, log_dir: Path, keys: tuple[str, ...] = (DIFY_KEY,)) -> None:
        self.profile = profile
        self.port = free_port()
        self.service = Service(f"stream-source-{profile.name}", [
            sys.executable, "-m", "tests.bench.stream_source", "--port", str(self.port),
            *(argument for key in keys for argument in ("--key", key)),
            "--ttft", str(profile.ttft_s), "--tokens-per-second", str(profile.tokens_per_second),
            "--answer-tokens", str(profile.answer_tokens)], log_dir, cwd=REPO_ROOT)
        wait_for_port(self.port, process=self.service.process)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def take_calls(self) -> list[dict[str, Any]]:
        """The calls that ended since the last take (``take_recorded``)."""
        return take_recorded(f"http://127.0.0.1:{self.port}/_source/calls")

    def stats(self) -> dict[str, int]:
        """Streams open now, the most open at once, and calls served."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_source/stats", timeout=30) as reply:
            return json.loads(reply.read())


@dataclass
class WorkerShape:
    """How a pipeline's workers run: processes x threads, or greenlets with ``gevent``."""

    processes: int = 2
    threads: int = 32
    gevent: bool = False

    def label(self) -> str:
        return f"{self.processes}x{self.threads}{' gevent' if self.gevent else ' threads'}"


@dataclass
class Pipeline:
    """One system under test, started on the bench's Redis, emulator and sink."""

    name: str
    shape: WorkerShape
    queue_key: str = ""
    services: list[Service] = field(default_factory=list)
    worker_services: list[Service] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [service.pid for service in self.services]

    def worker_pids(self) -> list[int]:
        return [service.pid for service in self.worker_services]

    def check_alive(self) -> None:
        for service in self.services:
            if not service.alive():
                raise RuntimeError(f"{self.name}: {service.name} exited:\n{service.tail()}")

    def submitter(self) -> Submitter:
        raise NotImplementedError

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


class DifyqPipeline(Pipeline):
    """``difyq api`` + ``difyq worker`` from the bench's difyq source tree (the repo, or a scratch copy to try a
    change), with ``extra_env`` added to both processes' environment. ``config`` adds to the bench's difyq config
    section by section (its ``apps`` beside the ``bench`` app, its ``jobs`` settings, ...)."""

    name = "difyq"
    limits: dict[str, int] | None = None

    def __init__(self, shape: WorkerShape, bench: BenchEnvironment, emulator: Emulator | StreamSource,
                 extra_env: dict[str, str] | None = None, config: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(self.name, shape, f"{NAMESPACE}:jobs")
        self.bench = bench
        self.commit = source_commit(bench.difyq_src)
        app = {"api_key": DIFY_KEY, "mode": "chat", "base_url": emulator.base_url,
               **({"limits": self.limits} if self.limits else {})}
        settings: dict[str, dict[str, Any]] = {
            "apps": {APP: app},
            "clients": {"bench": {"token": CLIENT_TOKEN, "apps": ["*"]}},
            "callbacks": {"signing_secret": SIGNING_SECRET, "allow_hosts": ["127.0.0.0/8"]},
            "redis": {"namespace": NAMESPACE},
        }
        for section, values in (config or {}).items():
            settings[section] = {**settings.get(section, {}), **values}
        directory = Path(tempfile.mkdtemp(prefix="difyq-", dir=bench.log_dir))
        config_path = directory / "difyq.yaml"
        config_path.write_text(yaml.safe_dump(settings))
        env = {**os.environ, "DIFYQ_CONFIG": str(config_path), "REDIS_URL": bench.redis.url,
               "PYTHONPATH": bench.import_path, "PYTHONUNBUFFERED": "1",
               "DIFYQ_WORKER_SHUTDOWN_TIMEOUT_MS": "5000", **(extra_env or {})}
        command = [sys.executable, "-m", "difyq.producers.cli"]
        self.api_port = free_port()
        api = Service("difyq-api", [*command, "api", "--port", str(self.api_port)], bench.log_dir, env,
                      cwd=bench.difyq_src)
        self.services.append(api)
        wait_for_port(self.api_port, process=api.process)
        self._worker_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(directory / "prometheus")}
        self._worker_args = [*command, "worker", "--processes", str(shape.processes), "--threads", str(shape.threads),
                             *(["--gevent"] if shape.gevent else [])]
        self.start_worker()

    def start_worker(self) -> None:
        """Start ``difyq worker`` and wait for its metrics port (the processes are up)."""
        metrics_port = free_port()
        worker = Service("difyq-worker", self._worker_args, self.bench.log_dir,
                         {**self._worker_env, "DIFYQ_METRICS_PORT": str(metrics_port)}, cwd=self.bench.difyq_src)
        self.services.append(worker)
        self.worker_services.append(worker)
        wait_for_port(metrics_port, timeout=60, process=worker.process)

    def restart_worker(self) -> None:
        """Stop the worker (SIGTERM, as a deploy does) and start a new one."""
        for worker in self.worker_services:
            worker.stop()
            self.services.remove(worker)
        self.worker_services.clear()
        self.start_worker()

    def submitter(self) -> Submitter:
        return HttpSubmitter("127.0.0.1", self.api_port, CLIENT_TOKEN, APP, self.bench.sink.url)

    def job_times(self, job_ids: list[str]) -> dict[str, tuple[float, float, float]]:
        """(created_at, started_at, finished_at) of each job from its record, for the phase breakdown."""
        client = self.bench.client
        pipe = client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(f"{NAMESPACE}:job:{job_id}", "created_at", "started_at", "finished_at")
        times: dict[str, tuple[float, float, float]] = {}
        for job_id, values in zip(job_ids, pipe.execute(), strict=True):
            if all(values):
                created, started, finished = (float(value) for value in values)
                times[job_id] = (created, started, finished)
        return times


class LimitedDifyqPipeline(DifyqPipeline):
    """``difyq`` on an app with requests, tokens and concurrency limits (``LIMITED_APP_LIMITS``)."""

    name = LIMITED
    limits = LIMITED_APP_LIMITS


class BarePipeline(Pipeline):
    """The ``bare`` baseline: ``dramatiq tests.bench.baseline_bare`` (``dramatiq-gevent`` with gevent)."""

    def __init__(self, shape: WorkerShape, bench: BenchEnvironment, emulator: Emulator | StreamSource) -> None:
        super().__init__("bare", shape, "bare:jobs")
        self.bench = bench
        program = "dramatiq-gevent" if shape.gevent else "dramatiq"
        env = {**os.environ, "REDIS_URL": bench.redis.url, "BENCH_DIFY_URL": emulator.base_url,
               "BENCH_DIFY_KEY": DIFY_KEY, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("dramatiq_worker_timeout", None)
        worker = Service("bare-worker", [str(Path(sys.executable).parent / program), "tests.bench.baseline_bare",
                                         "--processes", str(shape.processes), "--threads", str(shape.threads),
                                         "--worker-shutdown-timeout", "5000"], bench.log_dir, env, cwd=REPO_ROOT)
        self.services.append(worker)
        self.worker_services.append(worker)

    def submitter(self) -> Submitter:
        return dramatiq_submitter(self.bench.redis.url, self.bench.sink.url)


class CeleryPipeline(Pipeline):
    """The ``celery`` baseline: one ``celery worker`` per process, each with a pool of ``threads`` (or gevent)."""

    def __init__(self, shape: WorkerShape, bench: BenchEnvironment, emulator: Emulator | StreamSource) -> None:
        super().__init__("celery", shape, "celery")
        self.bench = bench
        env = {**os.environ, "REDIS_URL": bench.redis.url, "BENCH_DIFY_URL": emulator.base_url,
               "BENCH_DIFY_KEY": DIFY_KEY, "PYTHONPATH": str(REPO_ROOT)}
        celery = str(Path(sys.executable).parent / "celery")
        for index in range(shape.processes):
            worker = Service(f"celery-worker-{index}", [
                celery, "-A", "tests.bench.baseline_celery", "worker", "--loglevel", "WARNING",
                "-P", "gevent" if shape.gevent else "threads", "-c", str(shape.threads),
                "-n", f"bench{index}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"],
                bench.log_dir, env, cwd=REPO_ROOT)
            self.services.append(worker)
            self.worker_services.append(worker)

    def submitter(self) -> Submitter:
        return celery_submitter(self.bench.redis.url, self.bench.sink.url)


PIPELINES = {"difyq": DifyqPipeline, LIMITED: LimitedDifyqPipeline, "bare": BarePipeline, "celery": CeleryPipeline}


@dataclass
class Snapshot:
    """Counters at one instant, to subtract from a later one."""

    at: float
    pipeline_cpu: float
    worker_cpu: float
    redis_cpu: float
    helpers_cpu: float
    machine_busy: float
    commands: dict[str, int]
    command_usec: dict[str, int]
    reads: int  # Redis's reads of client requests (``total_reads_processed``): round trips, a pipeline's once


def import_path(difyq_src: Path, log_dir: Path) -> str:
    """A PYTHONPATH under which ``import difyq`` is the source tree ``difyq_src`` (a directory in ``log_dir``
    holding a ``difyq`` link to it, gone with the run's logs). The tree itself on PYTHONPATH is not enough: it has
    no ``difyq`` directory, so the package would still come from the checkout installed in the venv, whatever tree
    was asked for."""
    linked = Path(tempfile.mkdtemp(prefix="difyq-src-", dir=log_dir)) / "difyq"
    linked.symlink_to(difyq_src.resolve(), target_is_directory=True)
    return str(linked.parent)


class BenchEnvironment:
    """Redis, the sink and a log directory for the whole run; emulators and pipelines come and go."""

    def __init__(self, log_dir: Path, difyq_src: Path) -> None:
        raise_file_limit()
        self.log_dir = log_dir
        self.difyq_src = difyq_src
        (log_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.import_path = import_path(difyq_src, log_dir)
        self.redis = EmbeddedRedis(directory=str(log_dir / "redis")).start()
        self.client = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            self.sink = Sink(log_dir)
        except BaseException:
            self.redis.stop()
            raise
        self.emulator: Emulator | StreamSource | None = None

    @contextlib.contextmanager
    def emulating(self, profile: Profile) -> Iterator[Emulator]:
        emulator = self.emulator = Emulator(profile, self.log_dir)
        try:
            yield emulator
        finally:
            emulator.service.stop()
            self.emulator = None

    @contextlib.contextmanager
    def streaming(self, profile: Profile, keys: tuple[str, ...] = (DIFY_KEY,)) -> Iterator[StreamSource]:
        """Like ``emulating``, with the light stream source (answering ``keys``) in the emulator's place."""
        source = self.emulator = StreamSource(profile, self.log_dir, keys)
        try:
            yield source
        finally:
            source.service.stop()
            self.emulator = None

    @contextlib.contextmanager
    def pipeline(self, name: str, shape: WorkerShape, *, flush: bool = True, **options: Any) -> Iterator[Pipeline]:
        """Start ``name`` on an empty Redis (``flush=False``: beside the pipelines already running, each in its own
        keys); stop it afterwards."""
        assert self.emulator is not None, "start an emulator first"
        if flush:
            self.client.flushall()
        began = time.monotonic()
        started = PIPELINES[name](shape, self, self.emulator, **options)  # type: ignore[arg-type]
        print(f"  started {name} ({shape.label()}) in {time.monotonic() - began:.1f} s", flush=True)
        try:
            yield started
        finally:
            began = time.monotonic()
            started.stop()
            print(f"  stopped {name} in {time.monotonic() - began:.1f} s", flush=True)

    def queue_depth(self, pipeline: Pipeline) -> int:
        """Messages waiting in the pipeline's job queue (not yet fetched by a worker)."""
        return int(self.client.llen(pipeline.queue_key)) if pipeline.queue_key else 0

    def snapshot(self, pipeline: Pipeline) -> Snapshot:
        info = self.client.info("commandstats")
        cpu = self.client.info("cpu")
        reads = int(self.client.info("stats")["total_reads_processed"])
        helpers = [self.sink.service.pid]
        if self.emulator is not None:
            helpers.append(self.emulator.service.pid)
        own = psutil.Process().cpu_times()
        times = psutil.cpu_times()
        busy = times.user + times.system + times.nice + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)
        return Snapshot(
            at=time.time(),
            pipeline_cpu=tree_cpu_seconds(pipeline.pids()),
            worker_cpu=tree_cpu_seconds(pipeline.worker_pids()),
            redis_cpu=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            helpers_cpu=tree_cpu_seconds(helpers) + own.user + own.system,
            machine_busy=busy,
            commands={name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()},
            command_usec={name.removeprefix("cmdstat_"): int(stats["usec"]) for name, stats in info.items()},
            reads=reads,
        )

    def close(self) -> None:
        self.sink.service.stop()
        self.redis.stop()


@contextlib.contextmanager
def scratch_bench(prefix: str, difyq_src: Path = REPO_ROOT) -> Iterator[BenchEnvironment]:
    """A ``BenchEnvironment`` logging into a new temporary directory named ``prefix``..., both gone afterwards: for
    the tools that print what they measured (``profile_run``, ``hop_probe``)."""
    logs = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        bench = BenchEnvironment(logs, difyq_src)
        try:
            yield bench
        finally:
            bench.close()
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def cost_between(before: Snapshot, after: Snapshot, jobs: int) -> dict[str, Any]:
    """CPU and Redis work between two snapshots, in total and per job; ``other_load_cores`` is what processes
    outside the bench used of the machine meanwhile (others' test runs on a shared box)."""
    seconds = max(after.at - before.at, 1e-9)
    commands = {name: after.commands.get(name, 0) - before.commands.get(name, 0) for name in after.commands}
    commands = {name: count for name, count in commands.items() if count > 0 and name not in ("info",)}
    usec = {name: after.command_usec.get(name, 0) - before.command_usec.get(name, 0) for name in commands}
    pipeline_cpu = after.pipeline_cpu - before.pipeline_cpu
    redis_cpu = after.redis_cpu - before.redis_cpu
    helpers_cpu = after.helpers_cpu - before.helpers_cpu
    machine = after.machine_busy - before.machine_busy
    per_job = max(jobs, 1)
    return {
        "seconds": seconds,
        "jobs": jobs,
        "pipeline_cpu_s": pipeline_cpu,
        "worker_cpu_s": after.worker_cpu - before.worker_cpu,
        "cpu_ms_per_job": 1000 * pipeline_cpu / per_job,
        "worker_cpu_ms_per_job": 1000 * (after.worker_cpu - before.worker_cpu) / per_job,
        "redis_cpu_ms_per_job": 1000 * redis_cpu / per_job,
        "redis_commands_per_job": sum(commands.values()) / per_job,
        # the bench's own snapshot (three INFO calls) is one of these reads each; a step holds hundreds of jobs
        "redis_round_trips_per_job": (after.reads - before.reads) / per_job,
        "redis_commands": dict(sorted(commands.items(), key=lambda item: -item[1])),
        "redis_usec": usec,
        "helpers_cores": helpers_cpu / seconds,
        "pipeline_cores": pipeline_cpu / seconds,
        "redis_cores": redis_cpu / seconds,
        "other_load_cores": max(machine - pipeline_cpu - redis_cpu - helpers_cpu, 0.0) / seconds,
    }
