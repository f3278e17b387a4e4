"""The limiter's Lua scripts: read from ``lua/*.lua`` with importlib.resources, registered once per client.

Each script is ``lua/_cooldown.lua`` (Redis time and the upstream cooldown's reading, shared with the job start)
and ``lua/_common.lua`` (the limiter's helpers) followed by the script's own file, so every operation is a single
EVALSHA (redis-py loads the script again by itself after a Redis restart or ``SCRIPT FLUSH``).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import redis
from redis.commands.core import Script

from difyq.worker.lua_scripts import cooldown_source
from difyq.worker.lua_scripts import script_source as lua_source

SCRIPT_NAMES = ("acquire", "release", "renew", "upstream", "success", "remaining")


def script_source(name: str) -> str:
    """The full text of script ``name``: the shared helpers, then the script itself."""
    return cooldown_source() + "\n" + lua_source("difyq.worker.limits", "_common", name)


@dataclass(frozen=True)
class Scripts:
    """One registered Script per limiter operation, bound to one Redis client."""

    acquire: Script
    release: Script
    renew: Script
    upstream: Script
    success: Script
    remaining: Script


_registered: weakref.WeakKeyDictionary[redis.Redis, Scripts] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def scripts_for(client: redis.Redis) -> Scripts:
    """The scripts registered on ``client``, registering them the first time this client is seen."""
    with _lock:
        found = _registered.get(client)
        if found is None:
            found = Scripts(**{name: client.register_script(script_source(name)) for name in SCRIPT_NAMES})
            _registered[client] = found
        return found
