"""Schedule math: cron (5 and 6 fields), intervals, time zones and DST, misfire policies."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from conveyor.app import App
from conveyor.core.schedule import (
    CronExpression,
    MisfirePolicy,
    ScheduleDefinition,
    Timing,
    due_fire_times,
    fire_times_between,
    latest_fire_at_or_before,
    next_fire_after,
    run_key,
)
from conveyor.handles import Task
from tests.conftest import make_settings

BERLIN = "Europe/Berlin"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(zone: str, year: int, month: int, day: int, hour: int, minute: int = 0, *, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone), fold=fold).astimezone(UTC)


def between(timing: Timing, after: datetime, until: datetime) -> list[datetime]:
    return fire_times_between(timing, after, until)


# -- cron syntax ------------------------------------------------------------------------------------


def test_cron__five_fields_fire_on_the_minute() -> None:
    times = between(Timing(cron="*/15 * * * *"), utc(2026, 1, 1), utc(2026, 1, 1, 1))
    assert times == [utc(2026, 1, 1, 0, 15), utc(2026, 1, 1, 0, 30), utc(2026, 1, 1, 0, 45), utc(2026, 1, 1, 1)]


def test_cron__six_fields_put_seconds_first() -> None:
    every_20_s = between(Timing(cron="*/20 * * * * *"), utc(2026, 1, 1), utc(2026, 1, 1, 0, 1))
    assert every_20_s == [utc(2026, 1, 1, 0, 0, 20), utc(2026, 1, 1, 0, 0, 40), utc(2026, 1, 1, 0, 1)]
    # second 15 of minute 30 of hour 9: read Quartz-style, not as croniter's seconds-last "minute 15, hour 30"
    daily = between(Timing(cron="15 30 9 * * *"), utc(2026, 1, 1), utc(2026, 1, 3))
    assert daily == [utc(2026, 1, 1, 9, 30, 15), utc(2026, 1, 2, 9, 30, 15)]


def test_cron__expression_is_normalised_and_aliases_work() -> None:
    assert Timing(cron="  */5   *  * * * ").cron == "*/5 * * * *"
    assert Timing(cron="@HOURLY").cron == "@hourly"
    assert between(Timing(cron="@daily"), utc(2026, 1, 1), utc(2026, 1, 3)) == [utc(2026, 1, 2), utc(2026, 1, 3)]


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("* * * *", "5 fields"),
        ("* * * * * * *", "5 fields"),
        ("60 * * * *", "invalid cron"),
        ("*/0 * * * *", "invalid cron"),
        ("a b c d e", "invalid cron"),
        ("0 0 30 2 *", "never fires"),
        ("", "5 fields"),
    ],
)
def test_cron__bad_expressions_are_refused_with_the_reason(cron: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Timing(cron=cron)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"cron": "* * * * *", "interval_s": 5},
        {"interval_s": 0},
        {"interval_s": -1},
        {"interval_s": 1.5},
        {"interval_s": True},
        {"cron": "* * * * *", "timezone": "Mars/Olympus"},
        {"cron": "* * * * *", "timezone": ""},
    ],
)
def test_timing__invalid_combinations_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Timing(**kwargs)  # type: ignore[arg-type]


def test_cron__agrees_with_croniter_in_zones_without_dst() -> None:
    # An independent path to the same answer: croniter walking aware datetimes (sound where no DST applies).
    rng = random.Random(20260101)
    expressions = ["*/7 * * * *", "0 */3 * * *", "5,35 8-17 * * MON-FRI", "0 0 1,15 * *", "30 23 * * 0", "@hourly"]
    for zone in ("UTC", "Asia/Kolkata"):
        for expression in expressions:
            start = utc(2026, 1, 1) + timedelta(seconds=rng.randrange(0, 86400 * 300))
            end = start + timedelta(days=5)
            walker = croniter(CronExpression.parse(expression).croniter_form, start.astimezone(ZoneInfo(zone)))
            expected = []
            while (moment := walker.get_next(datetime).astimezone(UTC)) <= end:
                expected.append(moment)
            assert between(Timing(cron=expression, timezone=zone), start, end) == expected, (zone, expression)


# -- time zones and DST ----------------------------------------------------------------------------


def test_timezone__cron_is_wall_clock_time_in_its_zone() -> None:
    times = between(Timing(cron="0 9 * * *", timezone="America/New_York"), utc(2026, 7, 1), utc(2026, 7, 3))
    assert times == [utc(2026, 7, 1, 13), utc(2026, 7, 2, 13)]  # 09:00 EDT


def test_dst_spring_forward__a_skipped_wall_time_fires_once_at_the_jump() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST (01:00 UTC); 02:30 never happens.
    timing = Timing(cron="30 2 * * *", timezone=BERLIN)
    times = between(timing, utc(2026, 3, 27), utc(2026, 3, 31))
    assert times == [
        local(BERLIN, 2026, 3, 27, 2, 30),
        local(BERLIN, 2026, 3, 28, 2, 30),
        utc(2026, 3, 29, 1),  # 03:00 CEST, the moment of the jump
        local(BERLIN, 2026, 3, 30, 2, 30),
    ]


def test_dst_spring_forward__the_skipped_hour_collapses_into_one_run() -> None:
    timing = Timing(cron="*/15 * * * *", timezone=BERLIN)
    times = between(timing, utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1, 30))
    # 01:45 CET, then 02:00-02:45 (which do not exist) and 03:00 CEST are all the same instant.
    assert times == [utc(2026, 3, 29, 0, 45), utc(2026, 3, 29, 1), utc(2026, 3, 29, 1, 15), utc(2026, 3, 29, 1, 30)]


def test_dst_spring_forward__six_field_cron_behaves_the_same() -> None:
    timing = Timing(cron="0 30 2 * * *", timezone=BERLIN)
    assert between(timing, utc(2026, 3, 28, 12), utc(2026, 3, 29, 12)) == [utc(2026, 3, 29, 1)]


def test_dst_fall_back__a_fixed_wall_time_fires_once() -> None:
    # 2026-10-25: 03:00 CEST becomes 02:00 CET (01:00 UTC); 02:30 happens twice.
    timing = Timing(cron="30 2 * * *", timezone=BERLIN)
    times = between(timing, utc(2026, 10, 24, 12), utc(2026, 10, 26, 12))
    assert times == [local(BERLIN, 2026, 10, 25, 2, 30, fold=0), local(BERLIN, 2026, 10, 26, 2, 30)]
    assert times[0] == utc(2026, 10, 25, 0, 30)


def test_dst_fall_back__a_wildcard_hour_fires_in_both_passes() -> None:
    timing = Timing(cron="@hourly", timezone=BERLIN)
    times = between(timing, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 3, 30))
    # Every real hour: 02:00 CEST (00:00Z), 02:00 CET (01:00Z), 03:00 CET (02:00Z), 04:00 CET (03:00Z).
    assert times == [utc(2026, 10, 25, 0), utc(2026, 10, 25, 1), utc(2026, 10, 25, 2), utc(2026, 10, 25, 3)]


def test_dst_fall_back__next_fire_after_the_first_pass_skips_the_repeat() -> None:
    timing = Timing(cron="30 2 * * *", timezone=BERLIN)
    assert next_fire_after(timing, utc(2026, 10, 25, 0, 31)) == utc(2026, 10, 26, 1, 30)
    hourly = Timing(cron="0 * * * *", timezone=BERLIN)
    assert next_fire_after(hourly, utc(2026, 10, 25, 0, 30)) == utc(2026, 10, 25, 1)


def test_dst__half_hour_shift_of_lord_howe() -> None:
    # Australia/Lord_Howe moves its clocks by 30 minutes: 02:00 -> 02:30 on 2026-10-04 (15:00 UTC).
    timing = Timing(cron="*/10 * * * *", timezone="Australia/Lord_Howe")
    times = between(timing, utc(2026, 10, 3, 14, 45), utc(2026, 10, 3, 15, 15))
    assert times == [utc(2026, 10, 3, 14, 50), utc(2026, 10, 3, 15), utc(2026, 10, 3, 15, 10)]


# -- intervals -------------------------------------------------------------------------------------


def test_interval__aligned_to_the_epoch_in_whole_seconds() -> None:
    # 2026-01-01T00:00:00Z is 1767225600 s after the epoch, a multiple of 7 (but not of 11).
    times = between(Timing(interval_s=7), utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 30))
    assert times == [utc(2026, 1, 1, 0, 0, s) for s in (7, 14, 21, 28)]
    assert between(Timing(interval_s=11), utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 20)) == [
        utc(2026, 1, 1, 0, 0, 3),
        utc(2026, 1, 1, 0, 0, 14),
    ]
    assert all(t.microsecond == 0 and t.tzinfo is UTC for t in times)


def test_interval__one_second_and_bounds() -> None:
    timing = Timing(interval_s=1)
    start = utc(2026, 1, 1, 0, 0, 0) + timedelta(microseconds=1)
    assert between(timing, start, utc(2026, 1, 1, 0, 0, 3)) == [utc(2026, 1, 1, 0, 0, s) for s in (1, 2, 3)]
    # after is exclusive, until inclusive
    assert between(timing, utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 1)) == [utc(2026, 1, 1, 0, 0, 1)]
    assert fire_times_between(timing, utc(2026, 1, 1), None, limit=2) == [
        utc(2026, 1, 1, 0, 0, 1),
        utc(2026, 1, 1, 0, 0, 2),
    ]


def test_interval__ignores_the_time_zone() -> None:
    a = between(Timing(interval_s=3600, timezone="Asia/Kolkata"), utc(2026, 1, 1), utc(2026, 1, 1, 3))
    assert a == [utc(2026, 1, 1, 1), utc(2026, 1, 1, 2), utc(2026, 1, 1, 3)]


def test_fire_times__need_aware_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        fire_times_between(Timing(interval_s=1), datetime(2026, 1, 1), utc(2026, 1, 2))


def test_latest_fire_at_or_before__finds_rare_and_frequent_fire_times() -> None:
    yearly = Timing(cron="0 0 1 1 *")
    assert latest_fire_at_or_before(yearly, utc(2026, 6, 1), utc(2020, 1, 1)) == utc(2026, 1, 1)
    assert latest_fire_at_or_before(yearly, utc(2026, 6, 1), utc(2026, 1, 2)) is None
    just_after = utc(2026, 6, 1) + timedelta(microseconds=500)
    assert latest_fire_at_or_before(Timing(cron="* * * * * *"), just_after, utc(2026, 1, 1)) == utc(2026, 6, 1)
    assert latest_fire_at_or_before(Timing(interval_s=10), utc(2026, 1, 1, 0, 0, 15), utc(2026, 1, 1)) == utc(
        2026, 1, 1, 0, 0, 10
    )


# -- misfires --------------------------------------------------------------------------------------

EVERY_SECOND = Timing(interval_s=1)
T0 = utc(2026, 1, 1, 12)


def test_due__nothing_due_keeps_the_cursor() -> None:
    due = due_fire_times(EVERY_SECOND, T0, T0 - timedelta(seconds=0.5), "all")
    assert due.fire_times == () and due.next_fire_at == T0 and not due.missed


def test_due__on_time_fire_times_run_under_every_policy() -> None:
    now = T0 + timedelta(seconds=0.3)
    policies: tuple[MisfirePolicy, ...] = ("skip", "once", "all")
    for policy in policies:
        due = due_fire_times(EVERY_SECOND, T0, now, policy)
        assert due.fire_times == (T0,), policy
        assert due.next_fire_at == T0 + timedelta(seconds=1)
        assert not due.missed


def test_due__a_slow_tick_within_grace_loses_nothing_even_with_skip() -> None:
    now = T0 + timedelta(seconds=1.4)
    due = due_fire_times(EVERY_SECOND, T0, now, "skip", grace_s=2)
    assert due.fire_times == (T0, T0 + timedelta(seconds=1))


# After 60 s with no scheduler: the cursor is 60 s behind; "now" is 0.25 s past the latest fire time.
BEHIND = T0 - timedelta(seconds=60)
NOW = T0 + timedelta(seconds=0.25)


def test_misfire_skip__none_of_the_missed_ticks() -> None:
    due = due_fire_times(EVERY_SECOND, BEHIND, NOW, "skip", grace_s=1)
    assert due.fire_times == (T0,)  # only the current, on-time tick
    assert due.next_fire_at == T0 + timedelta(seconds=1) and due.missed


def test_misfire_skip__of_a_rare_schedule_runs_nothing() -> None:
    hourly = Timing(cron="0 * * * *")
    due = due_fire_times(hourly, T0 - timedelta(hours=3), T0 + timedelta(minutes=10), "skip")
    assert due.fire_times == () and due.next_fire_at == T0 + timedelta(hours=1)


def test_misfire_once__one_catch_up_run_keyed_by_the_latest_fire_time() -> None:
    due = due_fire_times(EVERY_SECOND, BEHIND, NOW, "once", grace_s=1)
    assert due.fire_times == (T0,)
    hourly = Timing(cron="0 * * * *")
    due = due_fire_times(hourly, T0 - timedelta(hours=3), T0 + timedelta(minutes=10), "once")
    assert due.fire_times == (T0,) and due.next_fire_at == T0 + timedelta(hours=1) and due.missed


def test_misfire_all__every_missed_tick_in_order() -> None:
    due = due_fire_times(EVERY_SECOND, BEHIND, NOW, "all")
    assert due.fire_times == tuple(BEHIND + timedelta(seconds=s) for s in range(61))
    assert due.next_fire_at == T0 + timedelta(seconds=1)


def test_misfire_all__up_to_the_maximum_lateness() -> None:
    due = due_fire_times(EVERY_SECOND, BEHIND, NOW, "all", max_lateness_s=10)
    assert due.fire_times == tuple(T0 - timedelta(seconds=s) for s in range(9, -1, -1))


def test_misfire_once__later_than_the_maximum_lateness_runs_nothing() -> None:
    hourly = Timing(cron="0 * * * *")
    due = due_fire_times(hourly, T0 - timedelta(hours=3), T0 + timedelta(minutes=10), "once", max_lateness_s=60)
    assert due.fire_times == () and due.next_fire_at == T0 + timedelta(hours=1)


def test_misfire_all__a_long_backlog_continues_in_batches() -> None:
    first = due_fire_times(EVERY_SECOND, BEHIND, NOW, "all", limit=25)
    assert first.fire_times == tuple(BEHIND + timedelta(seconds=s) for s in range(25))
    assert first.next_fire_at == BEHIND + timedelta(seconds=25)
    rest = due_fire_times(EVERY_SECOND, first.next_fire_at, NOW, "all", limit=1000)
    assert first.fire_times + rest.fire_times == tuple(BEHIND + timedelta(seconds=s) for s in range(61))


def test_misfire__unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="misfire policy"):
        due_fire_times(EVERY_SECOND, T0, NOW, "sometimes")  # type: ignore[arg-type]


# -- definitions and the app API -------------------------------------------------------------------


def test_run_key__is_schedule_and_fire_time_in_utc() -> None:
    assert run_key(7, local(BERLIN, 2026, 1, 1, 1)) == "schedule:7:2026-01-01T00:00:00Z"
    assert run_key(7, utc(2026, 1, 1) + timedelta(microseconds=5)) == "schedule:7:2026-01-01T00:00:00.000005Z"


def test_definition__normalises_arguments_to_json_and_validates() -> None:
    definition = ScheduleDefinition("nightly", "report", Timing(cron="0 3 * * *"), args=((1, 2),), kwargs={"a": (3,)})
    assert definition.args == ([1, 2],) and definition.kwargs == {"a": [3]}
    with pytest.raises(ValueError, match="JSON"):
        ScheduleDefinition("x", "report", Timing(interval_s=5), args=(object(),))
    with pytest.raises(ValueError, match="misfire"):
        ScheduleDefinition("x", "report", Timing(interval_s=5), misfire="never")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_lateness"):
        ScheduleDefinition("x", "report", Timing(interval_s=5), max_lateness_s=0)
    with pytest.raises(ValueError, match="schedule name"):
        ScheduleDefinition("9lives", "report", Timing(interval_s=5))


def _tidy(n: int) -> int:
    return n


def test_app_periodic__registers_the_task_and_the_schedule() -> None:
    app = App(settings=make_settings("postgresql://localhost/unused"))

    tidy = app.periodic(cron="*/5 * * * *", args=(1,), misfire="all", max_lateness=timedelta(minutes=1))(_tidy)

    assert isinstance(tidy, Task) and tidy.name in app.registry
    definition = app.schedules.get(tidy.name)
    assert definition.task_name == tidy.name and definition.timing.cron == "*/5 * * * *"
    assert definition.misfire == "all" and definition.max_lateness_s == 60.0 and definition.args == (1,)

    @app.periodic(interval=timedelta(seconds=30), name="half-minute", queue="cron")
    @app.task(name="ping", priority=5)
    def ping() -> None:
        return None

    assert app.schedules.get("half-minute").timing.interval_s == 30 and app.registry.get("ping").options.priority == 5
    app.schedule("by-name", "elsewhere.task", cron="0 0 * * * *", timezone=BERLIN)
    assert app.schedules.names() == sorted(["by-name", "half-minute", tidy.name])


def test_app_periodic__mistakes_fail_at_import() -> None:
    app = App(settings=make_settings("postgresql://localhost/unused"))
    with pytest.raises(ValueError, match="cron"):
        app.schedule("bad", "t", cron="61 * * * *")
    with pytest.raises(ValueError, match="exactly one"):
        app.schedule("bad", "t")
    with pytest.raises(ValueError, match="whole number"):
        app.schedule("bad", "t", interval=0.5)
    app.schedule("twice", "t", interval=5)
    with pytest.raises(ValueError, match="already declared"):
        app.schedule("twice", "t", interval=6)
