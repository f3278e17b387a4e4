"""Lua script sources shipped in a package's ``lua/`` folder, each prefixed with that folder's shared helpers."""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def script_source(package: str, helpers: str, name: str) -> str:
    """``lua/{helpers}.lua`` of ``package`` followed by ``lua/{name}.lua``: one script, one EVALSHA."""
    folder = files(package).joinpath("lua")
    return (folder.joinpath(f"{helpers}.lua").read_text(encoding="utf-8") + "\n"
            + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8"))
