"""When periodic jobs fire: a 5-field cron expression in a time zone, or a fixed interval.

A schedule maps instants (epoch seconds) to ticks: `after(t)` is the first tick later
than t, `latest(t)` the last one at or before t. Ticks are whole minutes (cron) or whole
multiples of the interval since the epoch, so every process computes the same ticks.

Cron follows Vixie cron: `minute hour day-of-month month day-of-week`, each `*`, a
number, a range `a-b`, a step `*/n` or `a-b/n`, or a comma list of those; day of week
0-7 with 0 and 7 Sunday. If both day fields are restricted (neither starts with `*`), a
day matches when either does; else both must. Wall-clock times are read in the
schedule's zone, across DST changes:

- A time that does not exist (spring forward: 02:30 on the day clocks jump 02:00 → 03:00)
  fires once, shifted by the jump (at 03:30), as PEP 495 reads it with fold=0.
- A time that occurs twice (fall back: 02:30 on the day clocks go 03:00 → 02:00) fires
  once, at its first occurrence.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12),
           ("day of week", 0, 7))
_MINUTE = dt.timedelta(minutes=1)
# Wall time and UTC offset disagree by a DST shift at most this much (2 h is the most
# any zone in use shifts).
_MAX_SHIFT = dt.timedelta(hours=3)
# A schedule that matches no time within this many years never will (Feb 29 repeats
# within 8 years), so it is refused rather than scanned forever.
_HORIZON_YEARS = 9


class Schedule:
    """Ticks of a periodic job: `after(t)` > t and `latest(t)` <= t, in epoch seconds."""

    def after(self, t: float) -> float:
        raise NotImplementedError

    def latest(self, t: float) -> float:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Every(Schedule):
    """Every `seconds`, at whole multiples of it since the epoch (every=300: :00, :05, …
    UTC), so all workers agree on the ticks without talking to each other."""

    seconds: int

    def __post_init__(self) -> None:
        if not (isinstance(self.seconds, int) and self.seconds >= 1):
            raise ValueError(f"every must be a whole number of seconds >= 1, not {self.seconds!r}")

    def after(self, t: float) -> float:
        return float((math.floor(t / self.seconds) + 1) * self.seconds)

    def latest(self, t: float) -> float:
        return float(math.floor(t / self.seconds) * self.seconds)


def _parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if span == "*":
                start, end = low, high
            elif "-" in span:
                first, _, last = span.partition("-")
                start, end = int(first), int(last)
            elif step_text:
                raise ValueError  # "5/15": Vixie cron wants a range or * before a step
            else:
                start = end = int(span)
        except ValueError:
            raise ValueError(f"cron {name} field: cannot read {part!r}") from None
        if not (low <= start <= end <= high) or step < 1:
            raise ValueError(f"cron {name} field: {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclasses.dataclass(frozen=True)
class Cron(Schedule):
    """A 5-field cron expression read in the time zone `tz` (an IANA name)."""

    expression: str
    tz: str = "UTC"
    zone: ZoneInfo = dataclasses.field(init=False, repr=False, compare=False)
    fields: tuple[frozenset[int], ...] = dataclasses.field(init=False, repr=False,
                                                             compare=False)
    either_day: bool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = self.expression.split()
        if len(parts) != 5:
            raise ValueError(f"cron {self.expression!r}: expected 5 fields "
                             "(minute hour day-of-month month day-of-week)")
        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {self.tz!r}") from None
        fields = [_parse_field(part, *spec) for part, spec in zip(parts, _FIELDS, strict=True)]
        if 7 in fields[4]:
            fields[4] = fields[4] - {7} | {0}
        object.__setattr__(self, "zone", zone)
        object.__setattr__(self, "fields", tuple(fields))
        object.__setattr__(self, "either_day", not parts[2].startswith("*")
                           and not parts[4].startswith("*"))
        start = dt.datetime(2000, 1, 1)
        if next(self._scan(start, forward=True), None) is None:
            raise ValueError(f"cron {self.expression!r} matches no date")

    def _day_matches(self, day: dt.datetime) -> bool:
        dom = day.day in self.fields[2]
        dow = day.isoweekday() % 7 in self.fields[4]
        return (dom or dow) if self.either_day else (dom and dow)

    def _scan(self, start: dt.datetime, forward: bool) -> Iterator[dt.datetime]:
        """Naive wall-clock minutes matching the fields, from `start` on (inclusive), in
        either direction; ends after _HORIZON_YEARS without a match."""
        minutes, hours, _, months, _ = self.fields
        at = start.replace(second=0, microsecond=0)
        limit = dt.timedelta(days=366 * _HORIZON_YEARS)
        last_match = at
        while abs(at - last_match) < limit:
            if at.month not in months:  # to the next month's first minute, or the last one's last
                if forward:
                    at = (at.replace(day=28) + dt.timedelta(days=4)).replace(
                        day=1, hour=0, minute=0)
                else:
                    at = at.replace(day=1, hour=0, minute=0) - _MINUTE
            elif not self._day_matches(at):
                at = (at.replace(hour=0, minute=0) + dt.timedelta(days=1) if forward
                      else at.replace(hour=0, minute=0) - _MINUTE)
            elif at.hour not in hours:
                at = (at.replace(minute=0) + dt.timedelta(hours=1) if forward
                      else at.replace(minute=0) - _MINUTE)
            elif at.minute not in minutes:
                at = at + _MINUTE if forward else at - _MINUTE
            else:
                yield at
                last_match = at
                at = at + _MINUTE if forward else at - _MINUTE

    def _instant(self, wall: dt.datetime) -> float:
        # fold=0: a repeated time is its first occurrence, a skipped one is read with the
        # offset before the jump (so shifted past it).
        return wall.replace(tzinfo=self.zone, fold=0).timestamp()

    def _wall(self, t: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(t, self.zone).replace(tzinfo=None)

    def after(self, t: float) -> float:
        # Scanning wall times from the wall time of t: instants of times it passes over
        # (the first occurrence of a repeated hour, after it) are earlier and skipped.
        for wall in self._scan(self._wall(t) + _MINUTE, forward=True):
            if (instant := self._instant(wall)) > t:
                return instant
        raise AssertionError("unreachable: the schedule matched at construction")

    def latest(self, t: float) -> float:
        # Wall times later than t's may still be earlier instants (a repeated hour), so
        # the backward scan starts a DST shift later and finds a tick at or before t;
        # stepping forward from it then finds the last one.
        for wall in self._scan(self._wall(t) + _MAX_SHIFT, forward=False):
            if (tick := self._instant(wall)) <= t:
                while (following := self.after(tick)) <= t:
                    tick = following
                return tick
        raise AssertionError("unreachable: the schedule matched at construction")


def tick_key(tick: float) -> str:
    """The dedup key of the job of one tick, e.g. `tick:2026-11-30T13:05:00Z`."""
    return "tick:" + dt.datetime.fromtimestamp(tick, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
