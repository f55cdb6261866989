"""The tick computation of schedules (task_job.schedule), without Redis: cron across DST
changes in named zones, Quartz's six fields, interval ticks, the catch-up plan."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from task_job.errors import ProtocolError
from task_job.schedule import Schedule, cron_next, parse_schedule, plan

BERLIN, NEW_YORK = "Europe/Berlin", "America/New_York"


def walls(expr: str, zone: str, start: datetime, n: int) -> list[str]:
    """The next n fire times after `start`, as wall times with their UTC offset."""
    tz = ZoneInfo(zone)
    t = start.replace(tzinfo=tz).timestamp()
    out = []
    for _ in range(n):
        t = cron_next(expr, zone, t)
        out.append(datetime.fromtimestamp(t, tz).isoformat())
    return out


def test_a_fixed_time_in_the_spring_gap_fires_once_right_after_the_gap() -> None:
    # Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    assert walls("30 2 * * *", BERLIN, datetime(2026, 3, 28, 12), 3) == [
        "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]
    # New York, 2026-03-08: 02:00 EST becomes 03:00 EDT.
    assert walls("15 2 * * *", NEW_YORK, datetime(2026, 3, 7, 12), 2) == [
        "2026-03-08T03:00:00-04:00", "2026-03-09T02:15:00-04:00"]


def test_a_fixed_time_in_the_repeated_autumn_hour_fires_once_at_its_first_occurrence() -> None:
    # Berlin, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    assert walls("30 2 * * *", BERLIN, datetime(2026, 10, 24, 12), 3) == [
        "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00", "2026-10-27T02:30:00+01:00"]
    assert walls("0 1 * * *", NEW_YORK, datetime(2026, 10, 31, 12), 2) == [
        "2026-11-01T01:00:00-04:00", "2026-11-02T01:00:00-05:00"]


def test_expressions_with_a_wildcard_minute_or_hour_follow_real_time_through_both_changes() -> None:
    # Hourly: every real hour, so the repeated 02:00 fires twice (an hour apart) ...
    assert walls("0 * * * *", BERLIN, datetime(2026, 10, 25, 0, 30), 4) == [
        "2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00"]
    # ... and the spring gap's 02:00 never happens: 01:00 CET is followed by 03:00 CEST.
    assert walls("0 * * * *", BERLIN, datetime(2026, 3, 29, 0, 30), 3) == [
        "2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"]
    assert walls("*/30 2 * * *", BERLIN, datetime(2026, 10, 25, 1, 45), 4) == [
        "2026-10-25T02:00:00+02:00", "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00", "2026-10-25T02:30:00+01:00"]


def test_quartz_six_fields_with_leading_seconds_and_question_mark() -> None:
    # hetuflow writes "0 0 12 * * ?": noon every day, in the schedule's zone.
    assert walls("0 0 12 * * ?", BERLIN, datetime(2026, 10, 24, 13), 2) == [
        "2026-10-25T12:00:00+01:00", "2026-10-26T12:00:00+01:00"]
    assert walls("*/10 * * * * *", "UTC", datetime(2026, 1, 1, 0, 0, 5), 3) == [
        "2026-01-01T00:00:10+00:00", "2026-01-01T00:00:20+00:00", "2026-01-01T00:00:30+00:00"]


def test_interval_ticks_are_whole_multiples_of_every_since_the_epoch() -> None:
    s = Schedule(name="s", task={"cmdline": "x"}, every=5)
    assert s.next_tick(1000) == 1005 and s.next_tick(1004.9) == 1005
    assert s.ticks(1000, 1020) == [1000, 1005, 1010, 1015, 1020]


@pytest.mark.parametrize(("catch_up", "fired"), [
    ("skip", [1010]), ("one", [1010]), ("all", [1002, 1004, 1006, 1008, 1010])])
def test_catch_up_after_five_missed_ticks(catch_up: str, fired: list[int]) -> None:
    s = Schedule(name="s", task={"cmdline": "x"}, every=2, catch_up=catch_up)
    # first unfired tick 1002; now 1010.5: 1002..1008 were missed, 1010 is on time
    assert plan(s, 1002, 1010.5) == (fired, 1012)
    # all five missed and the last one late beyond misfire_grace: skip fires nothing
    late = Schedule(name="s", task={"cmdline": "x"}, every=2, catch_up=catch_up, misfire_grace=0.2)
    ticks, after = plan(late, 1002, 1010.5)
    assert after == 1012 and ticks == ([] if catch_up == "skip" else fired)


def test_catch_up_window_bounds_what_is_caught_up() -> None:
    s = Schedule(name="s", task={"cmdline": "x"}, every=60, catch_up="all", catch_up_window=300)
    ticks, after = plan(s, 0, 100_000)
    assert ticks == [99_720, 99_780, 99_840, 99_900, 99_960] and after == 100_020


@pytest.mark.parametrize(("spec", "error"), [
    ({"name": "a", "every": 5}, "task"),
    ({"name": "a", "cron": "* * *", "task": {"cmdline": "x"}}, "five fields"),
    ({"name": "a", "cron": "61 * * * *", "task": {"cmdline": "x"}}, "cron"),
    ({"name": "a", "cron": "0 0 30 2 *", "task": {"cmdline": "x"}}, "failed to find next date"),
    ({"name": "a", "cron": "* * * * *", "every": 3, "task": {"cmdline": "x"}}, "exactly one"),
    ({"name": "a b", "every": 3, "task": {"cmdline": "x"}}, "name"),
    ({"name": "a", "every": 3, "timezone": "Mars/Olympus", "task": {"cmdline": "x"}}, "zone"),
    ({"name": "a", "every": 0.5, "task": {"cmdline": "x"}}, "every"),
    ({"name": "a", "every": 3, "overlap": "queue", "task": {"cmdline": "x"}}, "overlap"),
    ({"name": "a", "every": 3, "task": {"cmdline": "x", "delay": 3}}, "jitter"),
    ({"name": "a", "every": 3, "task": {"cmd_args": "x"}}, "task"),
    ({"name": "a", "every": 3, "task": {"cmdline": "x"}, "color": "red"}, "color"),
])
def test_bad_schedules_are_refused_with_the_field_named(spec: dict[str, object], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        parse_schedule(spec)


def test_a_schedule_survives_its_round_trip_through_redis_json() -> None:
    import orjson

    s = parse_schedule({"name": "a", "every": 5, "misfire_grace": 0, "catch_up_window": 0,
                        "jitter": 0, "task": {"cmdline": "x"}}, source="cli")
    back = parse_schedule(orjson.loads(s.to_json()))
    assert back == s and back.misfire_grace == 0 and back.source == "cli"
