"""Count Redis commands by who sent them: a client's round trip, or a command a Lua script ran inside Redis.

``INFO commandstats`` counts both alike (an ``EVALSHA`` whose script makes six calls counts seven), which says how
much work Redis does but not how many round trips a job costs. ``MONITOR`` tells them apart (``[0 lua]`` is a
script's call), at a price in Redis throughput, so it only runs in a short window of its own.
"""

from __future__ import annotations

import threading
from collections import Counter
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
