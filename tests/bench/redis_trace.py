"""Count Redis commands by who sent them: a client's round trip, or a command a Lua script ran inside Redis.

``INFO commandstats`` counts both alike (an ``EVALSHA`` whose script makes six calls counts seven), which says how
much work Redis does but not how many round trips a job costs. ``MONITOR`` tells them apart (``[0 lua]`` is a
script's call), at a price in Redis throughput, so it only runs in a short window of its own. ``ScriptTimes``
names the time Redis spends in each script (the slow log at threshold 0), in another window, with the reads of
client requests Redis made meanwhile: the round trips proper, as MONITOR lists each command of a pipeline apart.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from importlib.resources import files
from typing import Any

import redis

_STOP = "bench-trace-stop"


class CommandTrace:
    """``with CommandTrace(url) as trace: ...`` then ``trace.round_trips`` and ``trace.in_scripts`` (by command)."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, decode_responses=True)
        self.round_trips: Counter[str] = Counter()
        self.in_scripts: Counter[str] = Counter()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-redis-monitor", daemon=True)

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            while True:
                entry: dict[str, Any] = monitor.next_command()
                words = str(entry.get("command", "")).split(" ", 2)
                name = words[0].upper()
                if name == "ECHO" and len(words) > 1 and words[1] == _STOP:
                    return
                if entry.get("client_type") == "lua":
                    self.in_scripts[name] += 1
                else:
                    self.round_trips[name] += 1

    def __enter__(self) -> CommandTrace:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.echo(_STOP)
        self._thread.join(timeout=30)
        self._client.close()

    def per_job(self, jobs: int) -> dict[str, Any]:
        """Round trips and in-script commands per job, with the commands that make them up."""
        jobs = max(jobs, 1)
        return {
            "jobs": jobs,
            "round_trips_per_job": sum(self.round_trips.values()) / jobs,
            "script_commands_per_job": sum(self.in_scripts.values()) / jobs,
            "round_trips": {name: round(count / jobs, 2) for name, count in self.round_trips.most_common()},
            "script_commands": {name: round(count / jobs, 2) for name, count in self.in_scripts.most_common()},
        }


def known_scripts() -> dict[str, str]:
    """The SHA1 of every Lua script the pipelines run (difyq's job, limiter and schedule scripts, Dramatiq's
    dispatch), to name the ``EVALSHA`` entries of the slow log."""
    from dramatiq.brokers.redis import RedisBroker

    from difyq.worker.jobs.scripts import job_script
    from difyq.worker.limits.scripts import SCRIPT_NAMES
    from difyq.worker.limits.scripts import script_source as limiter_script
    from difyq.worker.lua_scripts import script_source

    sources: dict[str, str] = {}
    for path in files("difyq.worker.jobs").joinpath("lua").iterdir():
        if path.name.endswith(".lua"):
            sources[path.name.removesuffix(".lua")] = job_script(path.name.removesuffix(".lua"))
    for name in SCRIPT_NAMES:
        sources[f"limits.{name}"] = limiter_script(name)
    for path in files("difyq.producers.schedules").joinpath("lua").iterdir():
        if path.name.endswith(".lua"):
            name = path.name.removesuffix(".lua")
            sources[f"schedules.{name}"] = script_source("difyq.producers.schedules", None, name)
    dispatch = files(RedisBroker.__module__.rpartition(".")[0]).joinpath("redis", "dispatch.lua")
    named = {hashlib.sha1(source.encode()).hexdigest(): name for name, source in sources.items()}
    named[hashlib.sha1(dispatch.read_bytes()).hexdigest()] = "dramatiq.dispatch"
    return named


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class ScriptTimes:
    """``with ScriptTimes(url) as times: ...`` then ``times.per_job(jobs)``: Redis's own execution time of every
    command sent meanwhile, from the slow log with its threshold at 0 (each ``EVALSHA`` named by its script, a
    Dramatiq dispatch by its command; the commands a script runs are in its time), so the expensive scripts are
    visible. ``INFO commandstats`` lumps all
    scripts into ``evalsha``. The log costs Redis a little per command, so it runs in a window of its own."""

    def __init__(self, url: str, max_entries: int = 200_000) -> None:
        self._client = redis.Redis.from_url(url, decode_responses=True)
        self._max_entries = max_entries
        self._saved: dict[str, str] = {}
        self.calls: Counter[str] = Counter()
        self.usec: Counter[str] = Counter()
        self.reads = 0
        self._reads = 0
        self.cpu_s = 0.0
        self._cpu_s = 0.0
        self._names = known_scripts()

    def __enter__(self) -> ScriptTimes:
        for name in ("slowlog-log-slower-than", "slowlog-max-len"):
            self._saved.update(self._client.config_get(name))
        self._client.config_set("slowlog-max-len", self._max_entries)
        self._client.slowlog_reset()
        self._client.config_set("slowlog-log-slower-than", 0)
        self._reads, self._cpu_s = self._reads_processed(), self._redis_cpu_s()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cpu_s = self._redis_cpu_s() - self._cpu_s
        self.reads = self._reads_processed() - self._reads - 2  # less this window's own INFOs
        self._client.config_set("slowlog-log-slower-than", self._saved.get("slowlog-log-slower-than", 10000))
        for entry in self._client.slowlog_get(self._max_entries):
            if _text(entry.get("client_address")) == "?:0":
                continue  # a command a script ran: its time is in the script's
            name = self._name(_text(entry["command"]).split(" "))
            if name is not None:
                self.calls[name] += 1
                self.usec[name] += int(entry["duration"])
        self._client.slowlog_reset()
        self._client.config_set("slowlog-max-len", self._saved.get("slowlog-max-len", 128))
        self._client.close()

    def _reads_processed(self) -> int:
        return int(self._client.info("stats")["total_reads_processed"])

    def _redis_cpu_s(self) -> float:
        """The Redis process's user+sys CPU so far (its slow log's upkeep included)."""
        cpu = self._client.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def _name(self, words: list[str]) -> str | None:
        command = words[0].upper()
        if command in ("CONFIG", "SLOWLOG", "INFO"):
            return None  # the bench's own
        if command != "EVALSHA" or len(words) < 2:
            return command
        name = self._names.get(words[1].lower(), f"script {words[1][:8]}")
        if name == "dramatiq.dispatch" and len(words) > 4:
            name += f" {words[4]}"  # ARGV[1], the dispatch command (after the sha, numkeys and one key)
        return name

    def per_job(self, jobs: int) -> dict[str, Any]:
        """Per command or script: calls per job, usec per call and per job (Redis's execution time, without the
        network I/O that ``used_cpu`` also counts), most expensive first; the reads of client requests Redis
        made per job (``total_reads_processed``): its round trips, where commands sent in one pipeline count once;
        and the Redis process's CPU per job (``used_cpu``: the scripts, the I/O, and the slow log's own upkeep)."""
        jobs = max(jobs, 1)
        return {
            "jobs": jobs,
            "usec_per_job": sum(self.usec.values()) / jobs,
            "reads_per_job": round(self.reads / jobs, 2),
            "redis_cpu_us_per_job": round(1e6 * self.cpu_s / jobs, 1),
            "by_name": {name: {"calls_per_job": round(self.calls[name] / jobs, 2),
                               "usec_per_call": round(usec / self.calls[name], 1),
                               "usec_per_job": round(usec / jobs, 1)}
                        for name, usec in self.usec.most_common()},
        }
