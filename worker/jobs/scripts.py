"""The sources of the job scripts in ``lua/``: the schema's preamble (statuses, field names), the limiter's
helpers for a Dify key's upstream cooldown when the script reads it, then the script itself; one text per script,
so each operation is one EVALSHA."""

from __future__ import annotations

from functools import cache

from difyq.worker.jobs.schema import lua_preamble
from difyq.worker.lua_scripts import cooldown_source, script_source

# The job scripts that read a Dify key's upstream cooldown: start.lua checks the cooldown of a key without limits.
READ_COOLDOWN = frozenset({"start"})


@cache
def job_script(name: str) -> str:
    """The full source of ``lua/{name}.lua``."""
    cooldown = cooldown_source() + "\n" if name in READ_COOLDOWN else ""
    return lua_preamble() + "\n" + cooldown + script_source("difyq.worker.jobs", None, name)
