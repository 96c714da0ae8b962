"""Schedule math: when a cron or interval schedule fires, and what a late scheduler must enqueue.

Pure functions of their arguments: no I/O and no clock. The scheduler passes the *database's* ``now()``,
so no host's clock ever decides a fire time (LESSONS 26).

Conventions, chosen once and documented here:

* **Cron** has 5 fields (``minute hour day-of-month month day-of-week``) or 6 with **seconds first**
  (``second minute hour day-of-month month day-of-week``), as in Quartz and Spring. croniter's own
  6-field form puts seconds *last*; :class:`CronExpression` moves the field, so the user's form is the
  only one anyone sees. The ``@hourly``/``@daily``/... aliases are accepted.
* Cron times are **wall-clock times in the schedule's IANA time zone**, and daylight saving time follows
  Vixie/ISC cron:

  - a wall time that does not exist (the clocks jump forward over it) fires once, at the instant of the
    jump: ``30 2 * * *`` in Europe/Berlin fires at 03:00 CEST on the last Sunday of March, and the
    skipped hour of ``*/15 * * * *`` collapses into that single run;
  - a wall time that occurs twice (the clocks go back) fires once, at its first occurrence, unless the
    hour field is a wildcard (``*`` or ``*/n``): such a schedule is about elapsed time, so it fires in
    both passes (``@hourly`` fires twice in the repeated hour, because two hours really pass).

* **Intervals** are whole seconds (at least 1) of elapsed time, aligned to the Unix epoch in UTC:
  ``interval=60`` fires at every minute's second 0, ``interval=3600`` on every UTC hour. The time zone
  does not apply (use cron for wall-clock times). Alignment makes fire times a function of the
  definition alone, so any two schedulers agree on them, and they key each run's idempotency.

Every fire time is a timezone-aware UTC ``datetime`` with whole seconds.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from conveyor.core.task import check_priority, check_queue_name, check_task_name

__all__ = [
    "MISFIRE_POLICIES",
    "CronExpression",
    "DueRuns",
    "MisfirePolicy",
    "ScheduleDefinition",
    "ScheduleRegistry",
    "Timing",
    "check_schedule_name",
    "due_fire_times",
    "fire_times_between",
    "interval_from",
    "latest_fire_at_or_before",
    "next_fire_after",
    "run_key",
]

MisfirePolicy = Literal["skip", "once", "all"]
"""What a scheduler that finds fire times already past (after downtime) enqueues for them:
``skip`` none, ``once`` a single catch-up run, ``all`` every one (up to the maximum lateness)."""

MISFIRE_POLICIES: tuple[MisfirePolicy, ...] = get_args(MisfirePolicy)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)  # turns an inclusive bound into the exclusive one the functions take
_SCHEDULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}$")
_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Offsets are sampled this far either side of an instant. DST never shifts a clock by more than 2 h and
# no zone changes its offset twice within 3 h, so the samples see every offset that applies nearby.
_NEAR = [timedelta(minutes=30 * k) for k in range(-6, 7)]
# How far back latest_fire_at_or_before looks first, growing 32-fold per round: a frequent schedule is
# found in the first window, a rare one in a few rounds, and neither walks more fire times than needed.
_FIRST_LOOKBACK = timedelta(minutes=2)


def check_schedule_name(name: str) -> str:
    if not isinstance(name, str) or not _SCHEDULE_NAME.match(name):
        raise ValueError(f"schedule name {name!r} must start with a letter or '_' and use letters, digits, '_.:-'")
    return name


def _zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise ValueError("timezone must be an IANA name such as 'UTC' or 'Europe/Berlin'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'") from None


@dataclass(frozen=True)
class CronExpression:
    """A validated cron expression in the user's form (see the module docstring for the conventions)."""

    expression: str
    croniter_form: str = field(repr=False, compare=False)
    has_seconds: bool = field(repr=False, compare=False)
    hour_is_wildcard: bool = field(repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> CronExpression:
        if not isinstance(text, str):
            raise ValueError("cron must be a string such as '*/5 * * * *'")
        expression = " ".join(text.split())
        if expression.lower() in _ALIASES:
            expression = expression.lower()
        fields_given = _ALIASES.get(expression, expression).split(" ")
        if len(fields_given) not in (5, 6):
            raise ValueError(
                f"cron {text!r} must have 5 fields (minute hour day month weekday) "
                "or 6 with seconds first (second minute hour day month weekday)"
            )
        has_seconds = len(fields_given) == 6
        # croniter wants the seconds field last.
        croniter_form = " ".join([*fields_given[1:], fields_given[0]] if has_seconds else fields_given)
        hour = fields_given[2 if has_seconds else 1]
        try:
            # A valid expression can still never match (``0 0 30 2 *``): finding one fire time proves it can.
            croniter(croniter_form, datetime(2000, 1, 1)).get_next(datetime)
        except CroniterBadDateError:
            raise ValueError(f"cron {text!r} never fires") from None
        except (CroniterError, ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"invalid cron {text!r}: {exc}") from None
        return cls(expression, croniter_form, has_seconds, hour.startswith("*"))


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: exactly one of ``cron`` and ``interval_s``, and the cron's time zone."""

    cron: str | None = None
    interval_s: int | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("a schedule needs exactly one of cron and interval")
        if self.cron is not None:
            # Stored normalised, so that the same schedule compares equal however it was spaced.
            object.__setattr__(self, "cron", self.parsed_cron.expression)
        if self.interval_s is not None:
            interval = self.interval_s
            if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
                raise ValueError(f"interval must be a whole number of seconds, at least 1 (got {interval!r})")
        _zone(self.timezone)

    @property
    def parsed_cron(self) -> CronExpression:
        assert self.cron is not None
        return _parse_cron(self.cron)

    @property
    def zone(self) -> ZoneInfo:
        return _zone(self.timezone)

    def describe(self) -> str:
        if self.interval_s is not None:
            return f"every {self.interval_s} s"
        return f"cron '{self.cron}' ({self.timezone})"


# Parsing proves an expression fires by walking croniter once, and the scheduler rebuilds every due
# schedule's Timing from its row on every tick: the cache keeps that off the hot path. Bounded, since
# the API lets anyone with the scope send new expressions.
_CRON_CACHE: dict[str, CronExpression] = {}


def _parse_cron(text: str) -> CronExpression:
    cached = _CRON_CACHE.get(text)
    if cached is None:
        cached = CronExpression.parse(text)
        if len(_CRON_CACHE) < 10_000:
            _CRON_CACHE[text] = cached
    return cached


def interval_from(value: float | timedelta) -> int:
    """Whole seconds from ``interval=`` as users write it (``30``, ``timedelta(minutes=5)``)."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    whole = isinstance(seconds, int | float) and not isinstance(seconds, bool) and math.isfinite(seconds)
    if not whole or seconds != int(seconds):
        raise ValueError(f"interval must be a whole number of seconds, at least 1 (got {value!r})")
    return int(seconds)


# -- fire times -------------------------------------------------------------------------------------


def fire_times_between(
    timing: Timing, after: datetime, until: datetime | None, *, limit: int | None = None
) -> list[datetime]:
    """Fire times ``t`` with ``after < t <= until``, in order; the first ``limit`` of them if given.

    ``until=None`` means no upper bound and then ``limit`` is required."""
    _check_aware(after, "after")
    if until is None:
        if limit is None:
            raise ValueError("fire_times_between needs until or limit")
    else:
        _check_aware(until, "until")
        if until <= after:
            return []
    if limit is not None and limit < 1:
        return []
    after, until = after.astimezone(UTC), None if until is None else until.astimezone(UTC)
    if timing.interval_s is not None:
        return _interval_between(timing.interval_s, after, until, limit)
    return _cron_between(timing.parsed_cron, timing.zone, after, until, limit)


def next_fire_after(timing: Timing, moment: datetime) -> datetime:
    """The first fire time strictly after ``moment``."""
    return fire_times_between(timing, moment, None, limit=1)[0]


def latest_fire_at_or_before(timing: Timing, moment: datetime, not_before: datetime) -> datetime | None:
    """The last fire time ``t`` with ``not_before <= t <= moment``, or ``None``."""
    _check_aware(moment, "moment")
    if moment < not_before:
        return None
    if timing.interval_s is not None:
        step = timedelta(seconds=timing.interval_s)
        latest = EPOCH + step * ((moment - EPOCH) // step)
        return latest if latest >= not_before else None
    lookback = _FIRST_LOOKBACK
    while True:
        start = max(not_before - _TICK, moment - lookback)
        found = fire_times_between(timing, start, moment)
        if found:
            return found[-1]
        if start <= not_before - _TICK:
            return None
        lookback *= 32


def _interval_between(interval_s: int, after: datetime, until: datetime | None, limit: int | None) -> list[datetime]:
    step = timedelta(seconds=interval_s)
    # timedelta // timedelta is exact integer arithmetic on microseconds: no float rounding at any range.
    first = (after - EPOCH) // step + 1
    last = first + limit - 1 if limit is not None else None
    if until is not None:
        bound = (until - EPOCH) // step
        last = bound if last is None else min(last, bound)
    assert last is not None
    return [EPOCH + step * k for k in range(first, last + 1)]


def _cron_between(
    cron: CronExpression, zone: ZoneInfo, after: datetime, until: datetime | None, limit: int | None
) -> list[datetime]:
    # croniter walks naive wall-clock times (pure calendar arithmetic, no zone); each wall time is then
    # mapped to the instant(s) it denotes in the zone, which is where the DST rules apply. Wall times
    # are increasing but their instants are not quite (the repeated hour), hence the sorted insert and
    # the offset-based bounds below.
    start_wall = _naive(after + min(_offsets_near(zone, after)))
    walker = croniter(cron.croniter_form, start_wall)
    found: list[datetime] = []
    bound = until
    stop_wall = None if bound is None else _naive(bound + max(_offsets_near(zone, bound)))
    while True:
        wall = walker.get_next(datetime)
        if stop_wall is not None and wall > stop_wall:
            return found
        for instant in _instants(cron, zone, wall):
            if instant > after and (bound is None or instant <= bound):
                index = bisect.bisect_left(found, instant)
                if index == len(found) or found[index] != instant:
                    found.insert(index, instant)
        if limit is not None and len(found) >= limit:
            del found[limit:]
            if bound is None or found[-1] < bound:
                bound = found[-1]
                stop_wall = _naive(bound + max(_offsets_near(zone, bound)))


def _instants(cron: CronExpression, zone: ZoneInfo, wall: datetime) -> list[datetime]:
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first == second:
        return [first]
    if _naive(first.astimezone(zone)) != wall:
        # A wall time inside a forward jump: it fires at the jump (the offsets on either side of the
        # gap bracket that instant; see the module docstring).
        return [_transition(zone, min(first, second), max(first, second))]
    # A wall time the clocks pass twice.
    return [first, second] if cron.hour_is_wildcard else [first]


def _transition(zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The first instant in ``(before, after]`` whose UTC offset differs from ``before``'s (to the second)."""
    old = _offset(zone, before)
    low, high = 0, int((after - before).total_seconds())
    while high - low > 1:
        middle = (low + high) // 2
        if _offset(zone, before + timedelta(seconds=middle)) == old:
            low = middle
        else:
            high = middle
    return before + timedelta(seconds=high)


def _offsets_near(zone: ZoneInfo, moment: datetime) -> list[timedelta]:
    return [_offset(zone, moment + shift) for shift in _NEAR]


def _offset(zone: ZoneInfo, instant: datetime) -> timedelta:
    # Not zone.utcoffset(instant): a tzinfo reads the datetime it is given as a wall time in its zone.
    offset = instant.astimezone(zone).utcoffset()
    assert offset is not None
    return offset


def _naive(moment: datetime) -> datetime:
    return moment.replace(tzinfo=None)


def _check_aware(moment: datetime, what: str) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime")


# -- misfires ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DueRuns:
    """What one pass of the scheduler enqueues for a schedule, and where its cursor moves."""

    fire_times: tuple[datetime, ...]
    """Fire times to enqueue now, oldest first (each is one task)."""

    next_fire_at: datetime
    """The new cursor: every fire time before it has been dealt with (enqueued or deliberately skipped)."""

    missed: bool
    """Whether fire times were late, i.e. this pass is a catch-up after downtime."""


def due_fire_times(
    timing: Timing,
    next_fire: datetime,
    now: datetime,
    policy: MisfirePolicy,
    max_lateness_s: float | None = None,
    *,
    grace_s: float = 1.0,
    limit: int = 1000,
) -> DueRuns:
    """Resolve the fire times due at ``now`` (the database clock) for a schedule whose cursor is ``next_fire``.

    The cursor is the earliest fire time not yet dealt with; everything in ``[next_fire, now]`` is due.
    A fire time more than ``grace_s`` seconds old is *late* (the scheduler was down or failing over; a
    healthy one finds each fire time within a tick or two). On-time fire times are always enqueued;
    the policy decides about late ones:

    * ``skip``: none of them;
    * ``once``: if any fire time is late, the whole backlog becomes one run, keyed by the latest due
      fire time;
    * ``all``: every one, oldest first, at most ``limit`` per call (the cursor then stops after the last
      one returned and the next call carries on).

    ``max_lateness_s`` applies to every policy: a fire time older than that is never enqueued.
    """
    if policy not in MISFIRE_POLICIES:
        raise ValueError(f"misfire policy must be one of {', '.join(MISFIRE_POLICIES)}, got {policy!r}")
    first = next_fire_after(timing, next_fire - _TICK)
    if first > now:
        return DueRuns((), first, False)
    after_now = next_fire_after(timing, now)
    on_time_from = now - timedelta(seconds=grace_s)
    oldest_allowed = first if max_lateness_s is None else max(first, now - timedelta(seconds=max_lateness_s))
    missed = first < on_time_from
    if policy == "all":
        times = fire_times_between(timing, oldest_allowed - _TICK, now, limit=limit)
        if len(times) == limit and times[-1] < now:
            following = next_fire_after(timing, times[-1])
            if following <= now:
                return DueRuns(tuple(times), following, missed)
        return DueRuns(tuple(times), after_now, missed)
    if policy == "skip" or not missed:
        start = max(on_time_from, oldest_allowed)
        return DueRuns(tuple(fire_times_between(timing, start - _TICK, now)), after_now, missed)
    latest = latest_fire_at_or_before(timing, now, first)
    assert latest is not None  # first itself is a candidate
    return DueRuns((latest,) if latest >= oldest_allowed else (), after_now, missed)


# -- definitions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleDefinition:
    """A schedule as declared (``@app.periodic``, ``app.schedule``, the API or the CLI).

    ``queue`` and ``priority`` of ``None`` mean the task's own defaults; ``max_lateness_s`` of ``None``
    means no limit. ``args``/``kwargs`` are stored as JSON and normalised to what JSON gives back.
    """

    name: str
    task_name: str
    timing: Timing
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    misfire: MisfirePolicy = "once"
    max_lateness_s: float | None = None

    def __post_init__(self) -> None:
        check_schedule_name(self.name)
        check_task_name(self.task_name)
        if self.queue is not None:
            check_queue_name(self.queue)
        if self.priority is not None:
            check_priority(self.priority)
        if self.misfire not in MISFIRE_POLICIES:
            raise ValueError(f"misfire must be one of {', '.join(MISFIRE_POLICIES)}, got {self.misfire!r}")
        if self.max_lateness_s is not None:
            lateness = self.max_lateness_s
            if isinstance(lateness, bool) or not isinstance(lateness, int | float) or not 0 < lateness < float("inf"):
                raise ValueError(f"max_lateness must be a positive number of seconds, got {lateness!r}")
            object.__setattr__(self, "max_lateness_s", float(lateness))
        args, kwargs = _json_round_trip(self.args, self.kwargs)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)


def _json_round_trip(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise ValueError("args must be a list or tuple")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError("kwargs must be a mapping with string keys")
    try:
        text = json.dumps([list(args), dict(kwargs)], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"schedule arguments must be JSON-serialisable: {exc}") from None
    decoded_args, decoded_kwargs = json.loads(text)
    return tuple(decoded_args), decoded_kwargs


class ScheduleRegistry:
    """The schedules an app declares in code, by unique name (synchronised into the database at start)."""

    def __init__(self) -> None:
        self._by_name: dict[str, ScheduleDefinition] = {}

    def add(self, definition: ScheduleDefinition) -> None:
        existing = self._by_name.get(definition.name)
        if existing is not None and existing != definition:
            raise ValueError(f"a schedule named {definition.name!r} is already declared")
        self._by_name[definition.name] = definition

    def get(self, name: str) -> ScheduleDefinition:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no schedule named {name!r} is declared") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[ScheduleDefinition]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def names(self) -> list[str]:
        return sorted(self._by_name)


def run_key(schedule_id: int, fire_at: datetime) -> str:
    """The idempotency key of a schedule's run: ``schedule:<id>:<fire time, ISO 8601 UTC>``.

    Whole-second fire times print without a fraction (``schedule:7:2026-01-01T00:00:05Z``)."""
    moment = fire_at.astimezone(UTC)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return f"schedule:{schedule_id}:{text.removesuffix('+00:00')}Z"
