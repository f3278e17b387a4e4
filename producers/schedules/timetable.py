"""When a cron expression fires in an IANA time zone, as UTC instants, with the daylight-saving rules of cron.

croniter walks the zone's wall clock (naive datetimes, so it never sees a DST transition); this module turns each
wall time into the real instants it names. Two kinds of schedule, as Vixie cron and cronie treat them:

* **every-hour** schedules (the hour field is ``*``: ``@hourly``, ``*/15 * * * *``, the six-field ``* * * * * *``)
  follow real time. A wall time the clock skips does not exist and does not fire; a wall time the clock shows
  twice fires twice, once per real hour, so the fires stay evenly spaced.
* **fixed-hour** schedules (anything else: ``30 2 * * *``, ``@daily``, ``0 9 * * 1-5``) keep their wall-clock
  meaning and fire once per matching day. A time the clock skips (02:30 on a spring-forward day) fires once, at
  the instant of the jump (03:00 new time); a time the clock shows twice (02:30 on a fall-back day in Berlin,
  01:30 in New York) fires only the first time.

Six fields are croniter's optional seconds field, which comes last (``* * * * * */5`` = every five seconds).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

from difyq.worker.config import has_random_field

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_ONE_SECOND = timedelta(seconds=1)
_INTERVAL_HORIZON = timedelta(days=8)
_INTERVAL_MIN_GAPS = 12
_INTERVAL_MAX_STEPS = 5000


class Timetable:
    """The fires of one cron expression in one zone: ``fires_after``, ``latest_between``, ``interval_s``."""

    def __init__(self, expression: str, timezone: str):
        normalized = " ".join(expression.split())
        self.expression = ALIASES.get(normalized.lower(), normalized)
        if not croniter.is_valid(self.expression):
            raise ValueError(f"is not a valid cron expression: {expression!r}")
        if has_random_field(self.expression):
            raise ValueError(f"random (R) cron fields would differ between replicas: {expression!r}")
        self.zone = ZoneInfo(timezone)
        hours = croniter(self.expression, datetime(2000, 1, 1)).expanded[1]
        self.every_hour = hours == ["*"]

    def fires_after(self, after: datetime) -> Iterator[datetime]:
        """Every fire strictly after the aware instant ``after``, in UTC and ascending; endless unless the cron
        has no further match (a past year field, 30 February)."""
        after = after.astimezone(UTC)
        wall = after.astimezone(self.zone).replace(tzinfo=None)
        first, second = self._instants(wall)
        if second:
            # ``after`` may be in the first pass of a repeated hour: the second pass of earlier wall times is
            # still ahead of it, so walk the wall clock from the start of that hour.
            wall -= second[0] - first[0]
        latest = after
        for instant in self._instants_from(wall - _ONE_SECOND):
            if instant > latest:  # two wall times can name one instant (the jump), and the walk starts early
                yield instant
                latest = instant

    def latest_between(self, after: datetime, until: datetime) -> datetime | None:
        """The last fire in ``(after, until]``, found by widening a window back from ``until``."""
        span = timedelta(minutes=1)
        while True:
            start = max(after, until - span)
            found = None
            for fire in self.fires_after(start):
                if fire > until:
                    break
                found = fire
            if found is not None or start == after:
                return found
            span *= 2

    def interval_s(self, start: datetime) -> float | None:
        """The longest gap between consecutive fires (wall clock) over the next week or twelve fires, whichever
        is longer: the period a silent-schedule alert must allow. None when the cron fires less than twice."""
        wall = start.astimezone(self.zone).replace(tzinfo=None)
        walls = croniter(self.expression, wall)
        longest: timedelta | None = None
        previous = None
        for step in range(_INTERVAL_MAX_STEPS):
            try:
                current = walls.get_next(datetime)
            except CroniterBadDateError:
                break
            if previous is not None:
                longest = max(longest or current - previous, current - previous)
            previous = current
            if step >= _INTERVAL_MIN_GAPS and current - wall >= _INTERVAL_HORIZON:
                break
        return longest.total_seconds() if longest is not None else None

    def _instants_from(self, wall: datetime) -> Iterator[datetime]:
        """The instants of the cron's wall times after ``wall``, ascending but not yet deduplicated.

        Wall time order is instant order except in a repeated hour, whose second pass comes after the whole
        first pass: second-pass instants wait in a queue until the next first-pass instant is later."""
        walls = croniter(self.expression, wall)
        second_pass: list[datetime] = []
        while True:
            try:
                wall = walls.get_next(datetime)
            except CroniterBadDateError:
                break
            first, second = self._instants(wall)
            for instant in first:
                while second_pass and second_pass[0] < instant:
                    yield second_pass.pop(0)
                yield instant
            second_pass.extend(second)
        yield from second_pass

    def _instants(self, wall: datetime) -> tuple[list[datetime], list[datetime]]:
        """The instants a wall time names: (first pass, second pass of a repeated hour)."""
        early = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        late = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if early == late:
            return [early], []
        if early < late:
            return [early], [late] if self.every_hour else []
        if self.every_hour:
            return [], []
        return [self._jump(late, early)], []

    def _jump(self, before: datetime, after: datetime) -> datetime:
        """The instant the clock jumps forward, between two instants on either side of it (to the second)."""
        offset = after.astimezone(self.zone).utcoffset()
        while after - before > _ONE_SECOND:
            middle = before + timedelta(seconds=(after - before) // _ONE_SECOND // 2)
            if middle.astimezone(self.zone).utcoffset() == offset:
                after = middle
            else:
                before = middle
        return after

