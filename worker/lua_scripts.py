"""Lua script sources shipped in a package's ``lua/`` folder, each prefixed with that folder's shared helpers, if
it has any."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def script_source(package: str, helpers: str | None, name: str) -> str:
    """``lua/{helpers}.lua`` of ``package`` (when given) followed by ``lua/{name}.lua``: one script, one EVALSHA."""
    folder = files(package).joinpath("lua")
    own = folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return own if helpers is None else folder.joinpath(f"{helpers}.lua").read_text(encoding="utf-8") + "\n" + own
