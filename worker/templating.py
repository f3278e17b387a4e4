"""The sandboxed Jinja2 environment that hooks and schedules render their templates in."""

from __future__ import annotations

from functools import lru_cache

from jinja2 import StrictUndefined, Template
from jinja2.sandbox import ImmutableSandboxedEnvironment

ENVIRONMENT = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


@lru_cache(maxsize=1024)
def compile_template(source: str) -> Template:
    """Compile ``source`` once; raises jinja2.TemplateSyntaxError when it is not a valid template."""
    return ENVIRONMENT.from_string(source)
