"""Lua script sources shipped in a package's ``lua/`` folder, each prefixed with that folder's shared helpers, if
it has any; the helpers for a Dify key's upstream cooldown, which the limiter's scripts and the job start share;
and ``run_together``, which sends several scripts' calls in one round trip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError


@cache
def script_source(package: str, helpers: str | None, name: str) -> str:
    """``lua/{helpers}.lua`` of ``package`` (when given) followed by ``lua/{name}.lua``: one script, one EVALSHA."""
    folder = files(package).joinpath("lua")
    own = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return own if helpers is None else folder.joinpath(f"{helpers}.lua").read_text(encoding="utf-8") + "\n" + own


@cache
def cooldown_source() -> str:
    """``worker/limits/lua/_cooldown.lua``: Redis time (``clock``) and a key's upstream cooldown (``cooldown``), for
    any script that reads the cooldown. Read through ``difyq.worker``, so the job scripts that need it do not import
    the limiter (and its metrics) with them."""
    return files("difyq.worker").joinpath("limits", "lua", "_cooldown.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ScriptCall:
    """One call of a registered script, not sent yet: to go in the same round trip as other calls
    (``run_together``)."""

    script: Script
    keys: list[Any]
    args: list[Any]

    def run(self, client: redis.Redis | None = None) -> Any:
        """Send the call alone (on ``client``, else the script's own client)."""
        return self.script(keys=self.keys, args=self.args, client=client)


def run_together(client: redis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """Send ``calls`` in one round trip (a pipeline without MULTI: each script is atomic on its own, not the set) on
    ``client``'s connection, whichever client the scripts were registered on (they reach the same Redis by sha), and
    return their replies in order. A script Redis no longer knows (restarted, ``SCRIPT FLUSH``) is loaded and its
    call sent again on its own; any other error is raised after every call has run. A redis-py pipeline would ask
    ``SCRIPT EXISTS`` first, a round trip of its own, so the calls go as plain EVALSHAs."""
    if len(calls) == 1:
        return [calls[0].run(client)]
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
    replies = pipe.execute(raise_on_error=False)
    for index, (call, reply) in enumerate(zip(calls, replies, strict=True)):
        if isinstance(reply, NoScriptError):
            replies[index] = call.run(client)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies
