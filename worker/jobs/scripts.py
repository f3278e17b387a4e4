"""The sources of the job scripts in ``lua/``: the schema's preamble (statuses, field names), then the script
itself; one text per script, so each operation is one EVALSHA."""

from __future__ import annotations

from functools import cache

from difyq.worker.jobs.schema import lua_preamble
from difyq.worker.lua_scripts import script_source


@cache
def job_script(name: str) -> str:
    """The full source of ``lua/{name}.lua``."""
    return lua_preamble() + "\n" + script_source("difyq.worker.jobs", None, name)
