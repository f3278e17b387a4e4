"""The ``difyq.yaml`` model: loading, ``${ENV}`` interpolation and validation with readable, path-named errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from jinja2 import TemplateSyntaxError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from difyq.worker.durations import Duration
from difyq.worker.templating import compile_template

AppMode = Literal["chat", "agent", "advanced-chat", "completion", "workflow"]
VerifyScheme = Literal["github", "stripe", "standard", "hmac-sha256", "token", "none"]

DEFAULT_CONFIG_PATH = "difyq.yaml"
HttpUrl = Annotated[str, Field(pattern=r"^https?://")]
_RANDOM_CRON_FIELD = re.compile(r"[Rr](\(\d+-\d+\))?(/\d+)?")
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def has_random_field(expression: str) -> bool:
    """True for croniter's random ``R`` fields, which every scheduler replica would resolve differently."""
    return any(_RANDOM_CRON_FIELD.fullmatch(part) for field in expression.split() for part in field.split(","))


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, so a typo never silently does nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DifyDefaults(Strict):
    base_url: HttpUrl = "https://api.dify.ai/v1"
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    idle_read_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    first_event_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    run_poll_interval_s: Annotated[float, Field(gt=0)] = 2.0


PRIORITY_NAMES = {"high": 1, "normal": 0, "low": -1}
Priority = Annotated[int, Field(ge=-10, le=10)] | Literal["high", "normal", "low"]
"""A job's priority: an integer from -10 to 10 (higher first), or ``high`` (1), ``normal`` (0), ``low`` (-1)."""


def priority_level(priority: int | str) -> int:
    """The integer level of a ``Priority``."""
    return PRIORITY_NAMES[priority] if isinstance(priority, str) else priority


DEFAULT_BURST_SHARE = 6
"""Without ``burst``, a sixth of ``requests_per_minute`` (the share of 10 s) is admitted at once before pacing."""


class AppLimits(Strict):
    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    burst: Annotated[int, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[int, Field(gt=0)] | None = None
    max_concurrency: Annotated[int, Field(gt=0)] | None = None
    estimated_tokens_per_call: Annotated[int, Field(ge=0)] = 1000

    @model_validator(mode="after")
    def _burst_within_the_limit(self) -> AppLimits:
        if self.burst is not None and self.requests_per_minute is None:
            raise ValueError("burst needs requests_per_minute")
        if self.burst is not None and self.requests_per_minute is not None and self.burst > self.requests_per_minute:
            raise ValueError(f"burst ({self.burst}) is over requests_per_minute ({self.requests_per_minute})")
        return self

    @property
    def request_burst(self) -> int:
        """Requests admitted at once; beyond them, requests are paced a window/requests_per_minute apart (a burst
        of the full limit: no pacing, the sliding window alone). 0 without a request limit."""
        if self.requests_per_minute is None:
            return 0
        return self.burst or max(1, self.requests_per_minute // DEFAULT_BURST_SHARE)


class TenantLimits(Strict):
    """What one tenant may use of its app's Dify key (within the key's own limits), shared by every worker."""

    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[int, Field(gt=0)] | None = None
    max_concurrency: Annotated[int, Field(gt=0)] | None = None


Fairness = Literal["none", "tenant"]
"""How a Dify key's waiting line is ordered: ``none``, by first wait (moved by priority); ``tenant``, round-robin
across the tenants with jobs waiting."""


FileTransfer = Literal["remote_url", "upload"]


class AppFiles(Strict):
    """How a job's files reach the app: ``upload`` (the worker fetches each URL through the SSRF guard and uploads
    it with ``POST /files/upload``) or ``remote_url`` (Dify fetches the URL itself)."""

    transfer: FileTransfer = "upload"
    allow_hosts: list[str] | None = None  # None: callbacks.allow_hosts
    max_bytes: Annotated[int, Field(gt=0)] | None = None  # None: Dify's limit for the file's type (/parameters)
    fetch_timeout_s: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("allow_hosts")
    @classmethod
    def _valid_allow_hosts(cls, value: list[str] | None) -> list[str] | None:
        from difyq.worker.callbacks.ssrf import AllowList

        if value is not None:
            AllowList.parse(value)
        return value


class AppConfig(Strict):
    api_key: SecretStr
    mode: AppMode
    base_url: HttpUrl | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 600.0
    user: str = "difyq"
    auto_generate_name: bool = False
    limits: AppLimits | None = None
    fairness: Fairness = "none"
    tenant_limits: TenantLimits | None = None
    workflow_id: str | None = Field(default=None, min_length=1, max_length=64)
    on_quota: Literal["fail", "defer"] = "fail"
    max_pending: Annotated[int, Field(gt=0)] | None = None  # unfinished jobs of the app; over it a submit is 429
    files: AppFiles = Field(default_factory=AppFiles)


class ClientConfig(Strict):
    token: SecretStr
    apps: list[str] = Field(default_factory=lambda: ["*"])
    max_pending: Annotated[int, Field(gt=0)] | None = None  # unfinished jobs the client submitted; over it 429
    max_upload_bytes: Annotated[int, Field(gt=0)] | None = None  # a multipart submit's body; None: api's

    def may_use(self, app: str) -> bool:
        return "*" in self.apps or app in self.apps


class HookVerify(Strict):
    scheme: VerifyScheme
    secret: SecretStr | None = None
    header: str | None = None
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    tolerance: Duration = 300.0

    @model_validator(mode="after")
    def _secret_needed(self) -> HookVerify:
        if self.scheme != "none" and not self.secret:
            raise ValueError(f"secret is required for scheme {self.scheme}")
        if self.scheme == "hmac-sha256" and not self.header:
            raise ValueError("header is required for scheme hmac-sha256")
        return self


class Mapping(Strict):
    """What a hook or a schedule turns into a job: every string is a Jinja2 template."""

    app: str
    query: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    user: str | None = None
    conversation_id: str | None = None
    thread: str | None = None
    files: list[dict[str, Any]] | None = None
    callback_url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = 0
    tenant: str | None = None

    def templates(self) -> dict[str, str]:
        """Every template of this mapping by its field path (``inputs.repo``), for compiling and error messages."""
        found: dict[str, str] = {}
        for name in ("query", "user", "conversation_id", "thread", "callback_url", "idempotency_key", "when",
                     "tenant"):
            value = getattr(self, name, None)
            if isinstance(value, str):
                found[name] = value
        sections = {"inputs": self.inputs, "metadata": self.metadata}
        sections.update({f"files[{index}]": file for index, file in enumerate(self.files or [])})
        for section, values in sections.items():
            for key, value in values.items():
                if isinstance(value, str):
                    found[f"{section}.{key}"] = value
        return found


class HookConfig(Mapping):
    verify: HookVerify
    when: str | None = None
    idempotency_key: str | None = None
    max_body_bytes: Annotated[int, Field(gt=0)] | None = None


def iana_zone(value: str) -> str:
    """``value`` when it names an IANA time zone; ValueError naming it otherwise."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"is not an IANA time zone: {value!r}") from exc
    return value


class ScheduleConfig(Mapping):
    cron: str
    timezone: str = "UTC"
    catch_up: Literal["none", "latest"] = "none"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if not croniter.is_valid(value):
            raise ValueError(f"is not a valid cron expression: {value!r}")
        if has_random_field(value):
            raise ValueError("random (R) fields are not allowed: every scheduler replica would pick another time")
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        return iana_zone(value)


class CallbacksConfig(Strict):
    signing_secret: SecretStr | list[SecretStr] | None = None
    allow_hosts: list[str] = Field(default_factory=list)
    retry_schedule: list[Duration] = Field(default_factory=lambda: [5, 300, 1800, 7200, 18000, 36000, 36000])
    timeout: Duration = 15.0
    first_attempt_inline: bool = True

    @field_validator("allow_hosts")
    @classmethod
    def _valid_allow_hosts(cls, value: list[str]) -> list[str]:
        from difyq.worker.callbacks.ssrf import AllowList

        AllowList.parse(value)
        return value

    @field_validator("signing_secret")
    @classmethod
    def _at_most_two(cls, value: SecretStr | list[SecretStr] | None) -> SecretStr | list[SecretStr] | None:
        if isinstance(value, list) and not 1 <= len(value) <= 2:
            raise ValueError("must be one secret, or a list of two during a rotation")
        for secret in value if isinstance(value, list) else [value] if value else []:
            if not secret.get_secret_value().startswith("whsec_"):
                raise ValueError("must start with whsec_ (a Standard Webhooks secret)")
        return value

    def signing_secrets(self) -> list[str]:
        """The secrets to sign with, newest first."""
        if self.signing_secret is None:
            return []
        if isinstance(self.signing_secret, list):
            return [secret.get_secret_value() for secret in self.signing_secret]
        return [self.signing_secret.get_secret_value()]


class JobsConfig(Strict):
    idempotency_ttl: Duration = 86400.0
    result_ttl: Duration = 7 * 86400.0
    max_wait: Duration = 6 * 3600.0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 8
    retry_min_backoff: Duration = 1.0
    retry_max_backoff: Duration = 300.0
    priority_step: Duration = 600.0  # one priority level moves a job this far ahead in a key's waiting line
    # The share of a saturated key's admissions that jobs below normal priority get while they wait (0: none).
    low_priority_min_share: Annotated[float, Field(ge=0, le=0.5)] = 0.1


class ThreadsConfig(Strict):
    ttl: Duration = 30 * 86400.0  # a thread idle this long since its last job is forgotten (its Redis keys expire)


class ApiConfig(Strict):
    max_body_bytes: Annotated[int, Field(gt=0)] = 1_048_576
    max_upload_bytes: Annotated[int, Field(gt=0)] = 16 * 1_048_576  # a multipart submit's body, files included
    max_query_chars: Annotated[int, Field(gt=0)] | None = None  # None: only the body limit bounds a query


class ConsoleUser(Strict):
    """One person who may sign in to the console: a viewer reads, an operator also acts."""

    token: SecretStr
    role: Literal["viewer", "operator"] = "viewer"

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


class ConsoleConfig(Strict):
    """The operator console served by ``difyq api`` at ``{path_prefix}/console``."""

    enabled: bool = True
    path_prefix: Annotated[str, Field(pattern=r"^(/[A-Za-z0-9._~-]+)*$")] = ""
    users: dict[str, ConsoleUser] = Field(default_factory=dict)
    sensitive_inputs: list[str] = Field(default_factory=list)
    session_ttl: Duration = 12 * 3600.0


DEFAULT_SENTINEL_MASTER = "mymaster"
_SENTINEL_NODE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>\d{1,5})$")


def sentinel_address(node: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) as a pair; ValueError naming the node otherwise."""
    match = _SENTINEL_NODE.fullmatch(node.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"{node!r} is not host:port")
    return match["host"].strip("[]"), int(match["port"])


class SentinelConfig(Strict):
    """Redis Sentinel: the sentinels to ask, the name they monitor the primary by, their own password (the Redis
    servers' password and database come from REDIS_URL)."""

    master: Annotated[str, Field(min_length=1)] = DEFAULT_SENTINEL_MASTER
    nodes: Annotated[list[str], Field(min_length=1)]
    password: SecretStr | None = None

    @field_validator("nodes")
    @classmethod
    def _nodes_are_addresses(cls, nodes: list[str]) -> list[str]:
        for node in nodes:
            sentinel_address(node)
        return nodes

    def addresses(self) -> list[tuple[str, int]]:
        return [sentinel_address(node) for node in self.nodes]


class RedisConfig(Strict):
    namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "difyq"
    sentinel: SentinelConfig | None = None
    durable_submit: bool = False
    # Submits answer 503 once used_memory passes this share of maxmemory (no guard without a maxmemory, or None).
    memory_guard: Annotated[float, Field(gt=0, le=1)] | None = 0.9


BUDGET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
BudgetPeriod = Literal["minute", "hour", "day", "month"]
BudgetSubject = Literal["app", "client", "tenant"]
DEFAULT_SOFT_SHARE = 0.8
"""Without ``soft``, a budget warns once this share of its limit is spent."""


class BudgetConfig(Strict):
    """A spend budget: what one app, API client or tenant (``of``; each one its own budget without it) may spend
    per period, in tokens or in Dify's ``total_price`` of one currency."""

    by: BudgetSubject
    of: str | None = Field(default=None, min_length=1)
    unit: Literal["price", "tokens"] = "price"
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    limit: Annotated[float, Field(gt=0)]
    soft: Annotated[float, Field(gt=0)] | None = None
    period: BudgetPeriod = "day"
    timezone: str | None = None
    on_exhausted: Literal["defer", "fail"] = "defer"
    estimate: Annotated[float, Field(ge=0)] | None = None

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str | None) -> str | None:
        return None if value is None else iana_zone(value)

    @model_validator(mode="after")
    def _soft_below_limit(self) -> BudgetConfig:
        if self.soft is not None and self.soft > self.limit:
            raise ValueError(f"soft ({self.soft:g}) is over limit ({self.limit:g})")
        return self

    @property
    def soft_limit(self) -> float:
        """The soft threshold: ``soft``, else ``DEFAULT_SOFT_SHARE`` of the limit."""
        return self.soft if self.soft is not None else self.limit * DEFAULT_SOFT_SHARE

    @property
    def unit_label(self) -> str:
        """What the budget counts in: ``tokens``, or its currency (``USD``)."""
        return "tokens" if self.unit == "tokens" else self.currency


class Config(Strict):
    dify: DifyDefaults = Field(default_factory=DifyDefaults)
    apps: dict[str, AppConfig] = Field(default_factory=dict)
    clients: dict[str, ClientConfig] = Field(default_factory=dict)
    hooks: dict[str, HookConfig] = Field(default_factory=dict)
    schedules: dict[str, ScheduleConfig] = Field(default_factory=dict)
    callbacks: CallbacksConfig = Field(default_factory=CallbacksConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    threads: ThreadsConfig = Field(default_factory=ThreadsConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    budgets: dict[str, BudgetConfig] = Field(default_factory=dict)
    budgets_timezone: str = "UTC"

    @field_validator("budgets_timezone")
    @classmethod
    def _valid_budgets_timezone(cls, value: str) -> str:
        return iana_zone(value)

    def budget_timezone(self, name: str) -> str:
        """The zone a budget's periods follow: its own ``timezone``, else ``budgets_timezone``."""
        return self.budgets[name].timezone or self.budgets_timezone

    def app_base_url(self, app: str) -> str:
        return (self.apps[app].base_url or self.dify.base_url).rstrip("/")

    def file_allow_hosts(self, app: str) -> tuple[str, ...]:
        """The hosts an app's file URLs may be on though private: its ``files.allow_hosts`` when set, else
        ``callbacks.allow_hosts``."""
        own = self.apps[app].files.allow_hosts if app in self.apps else None
        return tuple(self.callbacks.allow_hosts if own is None else own)

    def cross_reference_problems(self) -> list[str]:
        """Problems that span sections: names that must exist, and templates that must compile."""
        problems: list[str] = []
        for name, client in self.clients.items():
            problems += [
                f"clients.{name}.apps: unknown app {app!r}"
                for app in client.apps
                if app != "*" and app not in self.apps
            ]
        for name, budget in self.budgets.items():
            if not BUDGET_NAME.fullmatch(name):
                problems.append(f"budgets.{name}: a budget name is letters, digits, '_', '.' and '-' only")
            known = {"app": self.apps, "client": self.clients}.get(budget.by)
            if budget.of is not None and known is not None and budget.of not in known:
                problems.append(f"budgets.{name}.of: unknown {budget.by} {budget.of!r}")
        for section, mappings in (("hooks", self.hooks), ("schedules", self.schedules)):
            for name, mapping in mappings.items():
                if mapping.app not in self.apps:
                    problems.append(f"{section}.{name}.app: unknown app {mapping.app!r}")
                for path, source in mapping.templates().items():
                    try:
                        compile_template(source)
                    except TemplateSyntaxError as exc:
                        problems.append(f"{section}.{name}.{path}: template error: {exc.message} (line {exc.lineno})")
        return problems


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` lists each one as ``path.in.file: what is wrong``."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        return "\n".join(lines + [f"  {problem}" for problem in self.problems])


def _interpolate(value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {key: _interpolate(item, f"{path}.{key}" if path else str(key), problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, f"{path}[{index}]", problems) for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set")
        return ""

    return _ENV_REFERENCE.sub(substitute, value)


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function-"))
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "literal_error":
        message = f"must be one of {context.get('expected', '').replace(chr(39), '')}"
    elif kind == "extra_forbidden":
        message = "is not a known setting"
    elif kind == "missing":
        message = "is required"
    else:
        message = error["msg"].removeprefix("Value error, ")
    return f"{location}: {message}" if location else message


def parse_config(data: Any, source: str = "difyq.yaml") -> Config:
    """Validate already-parsed YAML ``data``; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["the file must be a mapping of sections (dify, apps, clients, ...)"])
    problems: list[str] = []
    data = _interpolate(data, "", problems)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, problems + [_describe(error) for error in exc.errors()]) from None
    problems += config.cross_reference_problems()
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read the config from ``path``, ``$DIFYQ_CONFIG`` or ``./difyq.yaml``; a missing default file is empty."""
    explicit = path or os.environ.get("DIFYQ_CONFIG")
    file = Path(explicit or DEFAULT_CONFIG_PATH)
    if not file.exists():
        if explicit:
            raise ConfigError(str(file), ["file not found"])
        return parse_config({}, str(file))
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(str(file), [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    return parse_config(data, str(file))
