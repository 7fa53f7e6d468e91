"""The cron parser and schedules of periodic jobs, across DST changes."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobwire.cron import Cron, Every, Schedule, tick_key

PARIS = ZoneInfo("Europe/Paris")


def at(text: str, zone: ZoneInfo = PARIS, fold: int = 0) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=zone, fold=fold).timestamp()


def walls(schedule: Schedule, start: str, n: int, zone: ZoneInfo = PARIS) -> list[str]:
    """The next n ticks after `start`, as local wall times with their UTC offset."""
    t, out = at(start, zone), []
    for _ in range(n):
        t = schedule.after(t)
        out.append(dt.datetime.fromtimestamp(t, zone).isoformat(timespec="minutes"))
    return out


def test_fields_lists_ranges_and_steps() -> None:
    cron = Cron("5,10-12,*/20 9-17/4 * * *", "UTC")
    assert cron.fields[0] == {0, 5, 10, 11, 12, 20, 40}
    assert cron.fields[1] == {9, 13, 17}
    assert walls(cron, "2026-11-30T09:11", 4, ZoneInfo("UTC")) == [
        "2026-11-30T09:12+00:00", "2026-11-30T09:20+00:00", "2026-11-30T09:40+00:00",
        "2026-11-30T13:00+00:00"]


def test_day_of_month_or_day_of_week_like_vixie_cron() -> None:
    utc = ZoneInfo("UTC")
    # Both restricted: the 1st of the month OR a Monday (2026-12-01 is a Tuesday).
    assert walls(Cron("0 0 1 * 1", "UTC"), "2026-11-28T12:00", 3, utc) == [
        "2026-11-30T00:00+00:00", "2026-12-01T00:00+00:00", "2026-12-07T00:00+00:00"]
    # One is *: both must hold, so the other decides; 7 is Sunday like 0.
    assert walls(Cron("0 0 * * 7", "UTC"), "2026-11-28T12:00", 2, utc) == [
        "2026-11-29T00:00+00:00", "2026-12-06T00:00+00:00"]
    assert walls(Cron("0 0 29 2 *", "UTC"), "2026-01-01T00:00", 2, utc) == [
        "2028-02-29T00:00+00:00", "2032-02-29T00:00+00:00"]


@pytest.mark.parametrize(("expression", "error"), [
    ("* * * *", "expected 5 fields"),
    ("60 * * * *", "outside 0-59"),
    ("* 5-2 * * *", "outside 0-23"),
    ("*/0 * * * *", "outside"),
    ("5/15 * * * *", "cannot read '5/15'"),
    ("a * * * *", "cannot read 'a'"),
    ("0 0 31 2 *", "matches no date"),
])
def test_bad_expressions_say_what_is_wrong(expression: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        Cron(expression)


def test_unknown_zone_and_bad_interval_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        Cron("* * * * *", "Mars/Olympus")
    with pytest.raises(ValueError, match="whole number of seconds"):
        Every(0)


def test_spring_forward_runs_a_skipped_time_once_shifted_by_the_jump() -> None:
    # 2026-03-29 in Paris: 02:00 CET becomes 03:00 CEST; 02:30 does not exist.
    assert walls(Cron("30 2 * * *", "Europe/Paris"), "2026-03-28T03:00", 3) == [
        "2026-03-29T03:30+02:00", "2026-03-30T02:30+02:00", "2026-03-31T02:30+02:00"]
    assert walls(Cron("0 * * * *", "Europe/Paris"), "2026-03-29T00:30", 4) == [
        "2026-03-29T01:00+01:00", "2026-03-29T03:00+02:00", "2026-03-29T04:00+02:00",
        "2026-03-29T05:00+02:00"]


def test_fall_back_runs_a_repeated_time_once() -> None:
    # 2026-10-25 in Paris: 03:00 CEST becomes 02:00 CET; 02:00-02:59 happen twice.
    assert walls(Cron("30 2 * * *", "Europe/Paris"), "2026-10-24T03:00", 2) == [
        "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"]
    assert walls(Cron("*/30 * * * *", "Europe/Paris"), "2026-10-25T01:45", 4) == [
        "2026-10-25T02:00+02:00", "2026-10-25T02:30+02:00", "2026-10-25T03:00+01:00",
        "2026-10-25T03:30+01:00"]
    # From inside the second 02:xx, the first one's ticks are past: next is 03:00.
    cron = Cron("*/30 * * * *", "Europe/Paris")
    second = at("2026-10-25T02:10", fold=1)
    assert cron.after(second) == at("2026-10-25T03:00")
    assert cron.latest(second) == at("2026-10-25T02:30")


def test_every_ticks_at_multiples_of_the_interval() -> None:
    every = Every(300)
    assert every.after(1_000_000_000.0) == 1_000_000_200.0
    assert every.latest(1_000_000_200.0) == 1_000_000_200.0
    assert tick_key(1_000_000_200.0) == "tick:2001-09-09T01:50:00Z"


EXPRESSIONS = ["*/7 * * * *", "30 2 * * *", "0 */3 * * 1-5", "15 1 1,15 * 0", "0 0 29 2 *",
               "59 23 31 12 *"]
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Australia/Lord_Howe"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXPRESSIONS), st.sampled_from(ZONES),
       st.floats(1.6e9, 2.2e9), st.sampled_from([0.0, 1.0, 59.999]))
def test_latest_and_after_agree(expression: str, tz: str, t: float, jitter: float) -> None:
    """latest(t) <= t < after(latest(t)), and the tick after `latest` is the next one
    after t: the scheduler's two questions never disagree, DST or not."""
    cron = Cron(expression, tz)
    t = float(int(t)) + jitter
    last = cron.latest(t)
    following = cron.after(t)
    assert last <= t < following
    assert cron.after(last) == following
    assert last % 60 == 0 and following % 60 == 0
