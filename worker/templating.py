"""The sandboxed Jinja2 environment that hooks and schedules render their templates in."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_REPEAT = 1_000_000
MAX_POWER = 64


class TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with ``*`` and ``**`` checked so a payload cannot make a template allocate
    gigabytes (``'x' * body.n``)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and right > MAX_POWER:
            raise SecurityError(f"exponent over {MAX_POWER} is not allowed in templates")
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, str | list | tuple) and isinstance(count, int) \
                        and len(sequence) * count > MAX_REPEAT:
                    raise SecurityError(f"repetition over {MAX_REPEAT:,} items is not allowed in templates")
        return super().call_binop(context, operator, left, right)


ENVIRONMENT = TemplateEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


@lru_cache(maxsize=1024)
def compile_template(source: str) -> Template:
    """Compile ``source`` once; raises jinja2.TemplateSyntaxError when it is not a valid template."""
    return ENVIRONMENT.from_string(source)
