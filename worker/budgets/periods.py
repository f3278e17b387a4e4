"""A budget's periods: the calendar minute, hour, day or month of a time zone that a moment falls in."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from difyq.worker.config import BudgetPeriod


@dataclass(frozen=True)
class Period:
    """One period of a budget: ``id`` names it in Redis keys (no ``:``, unique per zone: an hour or minute id
    carries the UTC offset, so the repeated hour of a fall-back day is a period of its own), ``start`` and ``end``
    are aware datetimes in the budget's zone, ``end`` excluded."""

    id: str
    start: datetime
    end: datetime

    def seconds_left(self, now: float) -> float:
        return max(self.end.timestamp() - now, 0.0)


def _offset(moment: datetime) -> str:
    return moment.strftime("%z") or "+0000"


def _midnight(year: int, month: int, day: int, zone: ZoneInfo) -> datetime:
    return datetime(year, month, day, tzinfo=zone)


def period_at(kind: BudgetPeriod, zone: ZoneInfo, now: float) -> Period:
    """The period of ``kind`` in ``zone`` that the Unix time ``now`` falls in. Days and months begin at local
    midnight (a DST day is 23 or 25 hours long); minutes and hours are 60 and 3600 real seconds."""
    local = datetime.fromtimestamp(now, UTC).astimezone(zone)
    if kind == "month":
        start = _midnight(local.year, local.month, 1, zone)
        end = _midnight(local.year + local.month // 12, local.month % 12 + 1, 1, zone)
        return Period(local.strftime("%Y-%m"), start, end)
    if kind == "day":
        start = _midnight(local.year, local.month, local.day, zone)
        following = local.date() + timedelta(days=1)
        end = _midnight(following.year, following.month, following.day, zone)
        return Period(local.strftime("%Y-%m-%d"), start, end)
    unit = timedelta(hours=1) if kind == "hour" else timedelta(minutes=1)
    start = local.replace(minute=local.minute if kind == "minute" else 0, second=0, microsecond=0)
    end = (start.astimezone(UTC) + unit).astimezone(zone)
    label = "%Y-%m-%dT%H" if kind == "hour" else "%Y-%m-%dT%H%M"
    return Period(start.strftime(label) + _offset(start), start, end)
