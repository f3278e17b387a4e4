"""The configured budgets as the worker applies them: which subject of a job a budget counts, its periods, and
amounts in the integer units Redis keeps (tokens, or 1e-7 of a currency: Dify's price step)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

from difyq.worker.budgets.periods import Period, period_at
from difyq.worker.config import AppConfig, AppLimits, BudgetConfig, Config
from difyq.worker.jobs.model import client_of_scope
from difyq.worker.jobs.schema import JobField
from difyq.worker.jobs.store import JobStore

PRICE_SCALE = 10**7


@dataclass(frozen=True)
class JobSubjects:
    """What a job is to budgets: its app, the API client that submitted it (None for a hook's, a schedule's or the
    CLI's job) and its tenant; ``run_started``: its Dify run is already under way (a paused run resumed, or a run a
    lost worker had started), so its next attempt follows that run rather than spending anew."""

    app: str
    client: str | None
    tenant: str
    run_started: bool = False

    def of(self, by: str) -> str | None:
        return {"app": self.app, "client": self.client, "tenant": self.tenant}[by]

    @classmethod
    def read(cls, store: JobStore, job_id: str, app: str, tenant: str) -> JobSubjects:
        """A stored job's subjects (one HMGET)."""
        scope, pause, run_id = (value.decode() if isinstance(value, bytes) else value for value in store.redis.hmget(
            store.job_key(job_id), JobField.SCOPE, JobField.PAUSE, JobField.DIFY_RUN_ID))
        return cls(app, client_of_scope(scope) if scope else None, tenant, bool(pause or run_id))


@dataclass(frozen=True)
class Budget:
    """One ``budgets.<name>`` entry, its zone resolved; ``known_subjects`` are shown with their figures even while
    nothing is spent: its ``of``, else every app or client of the config (tenants are known once they spend)."""

    name: str
    config: BudgetConfig
    zone: ZoneInfo
    known_subjects: tuple[str, ...]
    @property
    def unit(self) -> str:
        """``tokens`` or the currency (``USD``): the metrics' ``unit`` label and the API's."""
        return self.config.unit_label

    @property
    def scale(self) -> int:
        return 1 if self.config.unit == "tokens" else PRICE_SCALE

    def units(self, value: float | Decimal | str) -> int:
        """``value`` (tokens, or an amount of the currency) in Redis units, rounded half up."""
        return int((Decimal(str(value)) * self.scale).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    def amount(self, units: int | float) -> float:
        """Redis units as tokens or an amount of the currency."""
        return round(units / self.scale, 7)

    @property
    def limit(self) -> int:
        return self.units(self.config.limit)

    @property
    def soft_limit(self) -> int:
        return self.units(self.config.soft_limit)

    def period(self, now: float) -> Period:
        return period_at(self.config.period, self.zone, now)

    def subject(self, job: JobSubjects) -> str | None:
        """The app, client or tenant of ``job`` this budget counts, or None when the budget does not apply to it."""
        subject = job.of(self.config.by)
        if subject is None or (self.config.of is not None and subject != self.config.of):
            return None
        return subject

    def first_estimate(self, app: AppConfig | None) -> int:
        """What a job of ``app`` reserves before the app has a job with reported usage: ``estimate``, else for a
        token budget the app's ``limits.estimated_tokens_per_call``, else 0."""
        if self.config.estimate is not None:
            return self.units(self.config.estimate)
        if self.config.unit == "tokens":
            return (app.limits if app is not None and app.limits is not None else AppLimits()).estimated_tokens_per_call
        return 0

    def estimate_field(self, app: str) -> str:
        """The field of the estimates hash with the mean cost of ``app``'s jobs in this budget's unit."""
        return f"{app}|{self.unit}"


def configured_budgets(config: Config) -> list[Budget]:
    def known(budget: BudgetConfig) -> tuple[str, ...]:
        if budget.of is not None:
            return (budget.of,)
        return tuple({"app": config.apps, "client": config.clients}.get(budget.by, ()))

    return [Budget(name, budget, ZoneInfo(config.budget_timezone(name)), known(budget))
            for name, budget in config.budgets.items()]
