"""The scheduler service: any number may run; one leads at a time and enqueues what is due.

Three things run side by side on one event loop:

* the **leader loop** takes or renews the leader lease every ``renew_interval_s`` and keeps a local
  estimate of when the term ends, measured on the *monotonic* clock from the moment each renewal was
  sent (so it can only err early). It steps down as soon as a renewal is refused, or when renewals keep
  failing and the term would end before the next one;
* the **tick loop**, while this process leads, asks the database which schedules are due by its own
  ``now()``, and fires each in a fenced transaction (:mod:`conveyor.db.schedule_store`); it sleeps until
  the next fire time is due, at most a tick;
* the **clock check** piggybacks on every lease statement: it compares this host's wall clock with the
  server's and warns (log and :meth:`Scheduler.health`) when they are further apart than
  ``max_clock_skew_s``. Nothing the scheduler decides reads the local wall clock;
* after each lease statement the process **reports itself** in ``conveyor_scheduler_processes`` (one
  short statement, see :mod:`conveyor.db.scheduler_process_store`): leadership, fencing token, skew and
  its warning, so that the API, in another process, can show them (``GET /api/v1/scheduler``);
* the **retention loop**, while this process leads, prunes old schedule runs and the rows of scheduler
  processes that vanished, at most once per ``retention_interval_s``, in small batches of their own
  short transactions (:mod:`conveyor.db.schedule_run_retention`): never inside a tick's transaction,
  and nothing a tick waits for.

The local estimate is an optimisation, never the guarantee: the fence in the database is. A process
that was frozen (SIGSTOP, a long GC pause, a VM migration) wakes up with its monotonic clock past the
term's end and stops itself before it writes; and if it did try, the fence would refuse it.

Every loop logs a database error and carries on; SIGTERM stops ticking, lets the transaction in flight
commit, releases the lease so that a standby takes over at its next poll instead of after expiry, and
deletes this process's row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.app import App
from conveyor.config import SchedulerSettings
from conveyor.core.schedule import due_fire_times
from conveyor.core.schedule_records import LeadershipLost, ScheduleRecord
from conveyor.db.schedule_run_retention import RunPruneReport
from conveyor.db.schedule_store import (
    LEADER_LEASE,
    Fence,
    Firing,
    ScheduleStore,
    TransactionLimits,
)
from conveyor.db.scheduler_process_store import SchedulerProcessStore
from conveyor.errors import DatabaseError
from conveyor.scheduler.reporting import FailureLog, log_fired
from conveyor.scheduler.retention import retention_pass
from conveyor.scheduler.runs import build_run_request
from conveyor.scheduler.sync import sync_code_schedules

log = logging.getLogger("conveyor.scheduler")

#: Schedules fired per pass of the tick loop, and fire times per schedule per transaction (a long
#: catch-up under ``misfire="all"`` continues in the next transaction).
DUE_BATCH = 100
RUNS_PER_TRANSACTION = 1000
# A lasting problem (clock skew, failing health reports) is logged again at most this often.
_REMINDER_S = 300.0
# A process row not refreshed for this many leases is stale: a healthy process refreshes it several
# times per lease, and even one whose statements all run into their timeouts once per lease.
_STALE_AFTER_LEASES = 2.0


@dataclass
class _Term:
    token: int
    valid_until: float  # monotonic: when the lease ends at the latest, as far as this process can tell


@dataclass(frozen=True)
class SchedulerHealth:
    """What a health endpoint or an operator wants to know about one scheduler process."""

    holder: str
    leading: bool
    fencing_token: int | None
    skew_s: float | None  # the database clock minus this host's, when last measured
    skew_ok: bool
    max_clock_skew_s: float
    database_ok: bool  # whether the last lease statement reached the database
    enqueued: int  # runs enqueued by this process since it started
    clock_warning: str | None = None  # set while the skew is beyond the limit (also in its database row)


class Scheduler:
    """One scheduler process (``conveyor scheduler``, or a part of ``conveyor up``).

    ``sync`` synchronises the app's code-declared schedules into the database at start; leave it off
    for a process that loaded no app (it would otherwise disable every code schedule). ``wall_clock``
    is read only to measure clock skew. ``misfire_grace_s`` is how late a fire time may be and still
    count as on time (default: three ticks, at least a second).
    """

    def __init__(
        self,
        app: App,
        settings: SchedulerSettings | None = None,
        *,
        sync: bool = True,
        misfire_grace_s: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.settings = settings or app.settings.scheduler
        self.sync = sync
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.holder = f"{self.host}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.lease_s = self.settings.leader_lease_s
        self.tick_s = self.settings.tick_interval_s
        # Several renewals per lease, so one slow or failed renewal does not cost the leadership.
        self.renew_interval_s = min(self.tick_s, self.lease_s / 3)
        self.misfire_grace_s = misfire_grace_s if misfire_grace_s is not None else max(1.0, 3 * self.tick_s)
        self.limits = TransactionLimits(
            lock_timeout_s=max(0.05, self.lease_s / 4),
            statement_timeout_s=max(0.1, self.lease_s / 2),
            idle_timeout_s=max(0.1, self.lease_s / 2),
        )
        # Reporting this process's row happens between two renewals and must never delay the next one.
        report_s = min(max(0.2, self.renew_interval_s / 2), self.lease_s / 4)
        self.report_limits = TransactionLimits(
            lock_timeout_s=report_s / 2, statement_timeout_s=report_s, idle_timeout_s=report_s
        )
        self._wall_clock = wall_clock
        self._term: _Term | None = None
        self._standing_by_for: str | None = None  # the leader last reported, so it is logged once
        self._store: ScheduleStore | None = None
        self._stop = asyncio.Event()
        self._abort = asyncio.Event()
        self._leadership_changed = asyncio.Event()
        self.skew_s: float | None = None
        self.clock_warning: str | None = None
        self._skew_warned_at: float | None = None
        self._report_failed_at: float | None = None
        self._database_ok = False
        self.enqueued = 0
        self._failures = FailureLog()

    # -- state -----------------------------------------------------------------------------------

    @property
    def store(self) -> ScheduleStore:
        if self._store is None:
            self._store = ScheduleStore(self.app.runtime().engine)
        return self._store

    @property
    def processes(self) -> SchedulerProcessStore:
        return SchedulerProcessStore(self.app.runtime().engine)

    @property
    def leading(self) -> bool:
        """Whether this process may tick now: it holds a term that cannot have ended yet."""
        return self._fence() is not None

    @property
    def fencing_token(self) -> int | None:
        return None if self._term is None else self._term.token

    def _fence(self) -> Fence | None:
        term = self._term
        # The margin leaves a tick time to commit before the lease could lapse.
        if term is None or time.monotonic() >= term.valid_until - self.renew_interval_s:
            return None
        return Fence(LEADER_LEASE, self.holder, term.token)

    def health(self) -> SchedulerHealth:
        skew_ok = self.skew_s is None or abs(self.skew_s) <= self.settings.max_clock_skew_s
        return SchedulerHealth(
            holder=self.holder,
            leading=self.leading,
            fencing_token=self.fencing_token,
            skew_s=self.skew_s,
            skew_ok=skew_ok,
            max_clock_skew_s=self.settings.max_clock_skew_s,
            database_ok=self._database_ok,
            enqueued=self.enqueued,
            clock_warning=self.clock_warning,
        )

    # -- control ---------------------------------------------------------------------------------

    def request_stop(self, *, abort: bool = False) -> None:
        """Stop after the transaction in flight (``abort``, or a second call: roll it back now)."""
        if self._stop.is_set():
            abort = True
        self._stop.set()
        self._leadership_changed.set()
        if abort:
            self._abort.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        log.info("scheduler %s received %s: stopping", self.holder, signal.Signals(sig).name)
        self.request_stop()

    # -- main ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`request_stop`; if a loop dies of a bug, stop rather than run half-blind."""
        log.info(
            "scheduler %s starting (tick %.2f s, lease %.2f s, renew every %.2f s)",
            self.holder,
            self.tick_s,
            self.lease_s,
            self.renew_interval_s,
        )
        if self.sync and not await self._sync_until_done():
            return
        leader = asyncio.create_task(self._leader_loop(), name="scheduler-leader")
        ticker = asyncio.create_task(self._tick_loop(), name="scheduler-ticks")
        retention = asyncio.create_task(self._retention_loop(), name="scheduler-retention")
        stopped = asyncio.create_task(self._stop.wait(), name="scheduler-stop")
        try:
            done, _ = await asyncio.wait({leader, ticker, retention, stopped}, return_when=asyncio.FIRST_COMPLETED)
            for finished in done - {stopped}:
                if not finished.cancelled() and finished.exception() is not None:
                    log.error("scheduler loop %s died: %r; stopping", finished.get_name(), finished.exception())
                elif not self._stop.is_set():
                    log.error("scheduler loop %s ended unexpectedly; stopping", finished.get_name())
                self.request_stop()
        finally:
            await self._shutdown(leader, ticker, retention, stopped)

    async def _sync_until_done(self) -> bool:
        while not self._stop.is_set():
            try:
                await sync_code_schedules(self.store, self.app.schedules)
                return True
            except DatabaseError as exc:
                log.warning("could not synchronise code schedules (%s); retrying in %.1f s", exc, self.tick_s)
                await _wait(self._stop, self.tick_s)
        return False

    async def _shutdown(
        self,
        leader: asyncio.Task[None],
        ticker: asyncio.Task[None],
        retention: asyncio.Task[None],
        stopped: asyncio.Task[bool],
    ) -> None:
        self._stop.set()
        stopped.cancel()
        # A retention batch in flight is simply rolled back: the next leader's pass deletes it again.
        retention.cancel()
        # Both loops see the stop at once; a tick or renewal in flight is let finish (both are bounded),
        # so that the lease released below is the one really held, unless told to abort.
        abort = asyncio.create_task(self._abort.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_s
        pending: set[asyncio.Task[Any]] = {leader, ticker}
        while pending and not self._abort.is_set() and loop.time() < deadline:
            _, pending = await asyncio.wait(
                {*pending, abort}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(abort)
        for task in (leader, ticker, abort):
            task.cancel()
        await asyncio.gather(leader, ticker, retention, stopped, abort, return_exceptions=True)
        await self._release()
        await self._withdraw()
        log.info("scheduler %s stopped after enqueueing %d runs", self.holder, self.enqueued)

    async def _release(self) -> None:
        term, self._term = self._term, None
        if term is None:
            return
        try:
            async with asyncio.timeout(self.lease_s / 2):
                released = await self.store.release(self.holder, term.token)
        except (DatabaseError, TimeoutError) as exc:
            log.warning("could not release the leader lease (%s); a standby takes over when it expires", exc)
            return
        if released:
            log.info("released the leader lease (token %d): a standby can take over now", term.token)

    async def _withdraw(self) -> None:
        try:
            async with asyncio.timeout(self.report_limits.statement_timeout_s * 2):
                await self.processes.withdraw(self.holder, limits=self.report_limits)
        except (DatabaseError, TimeoutError) as exc:
            log.warning(
                "could not remove this scheduler's process row (%s); it will be listed as stale", _describe(exc)
            )

    # -- leadership ------------------------------------------------------------------------------

    async def _leader_loop(self) -> None:
        while not self._stop.is_set():
            await self.renew_once()
            reported_from = time.monotonic()
            await self.report_presence()
            # The report's time comes out of the wait, so renewals keep their cadence.
            await _wait(self._stop, max(0.0, self.renew_interval_s - (time.monotonic() - reported_from)))

    async def report_presence(self) -> bool:
        """Write this process's row (leadership, skew, warning); False if the database did not take it.

        Bounded by :attr:`report_limits` on the server and on this side; a failure is logged (at most
        every few minutes) and the next cycle tries again."""
        try:
            async with asyncio.timeout(self.report_limits.statement_timeout_s * 2):
                await self.processes.report(
                    self.holder,
                    host=self.host,
                    pid=self.pid,
                    stale_after_s=_STALE_AFTER_LEASES * self.lease_s,
                    leading=self.leading,
                    fencing_token=self.fencing_token,
                    clock_skew_s=self.skew_s,
                    warning=self.clock_warning,
                    limits=self.report_limits,
                )
        except (DatabaseError, TimeoutError) as exc:
            now = time.monotonic()
            if self._report_failed_at is None or now - self._report_failed_at >= _REMINDER_S:
                log.warning("could not report this scheduler's health to the database (%s); retrying", _describe(exc))
                self._report_failed_at = now
            return False
        self._report_failed_at = None
        return True

    async def renew_once(self) -> bool:
        """One acquire-or-renew; returns whether this process leads afterwards."""
        term = self._term
        sent_at = time.monotonic()
        wall_before = self._wall_clock()
        try:
            async with asyncio.timeout(self.lease_s / 2):
                attempt = await self.store.acquire(
                    self.holder,
                    None if term is None else term.token,
                    self.lease_s,
                    lock_timeout_s=self.limits.lock_timeout_s,
                )
        except (DatabaseError, TimeoutError) as exc:
            self._database_ok = False
            if term is not None and time.monotonic() + self.renew_interval_s >= term.valid_until:
                log.warning("cannot renew the leader lease (%s) before it ends: stepping down", exc)
                self._step_down()
            else:
                log.warning("leader lease statement failed (%s); retrying", exc)
            return self.leading
        self._database_ok = True
        self._check_skew(attempt.db_now, wall_before, self._wall_clock())
        if attempt.token is None:
            if term is not None:
                log.warning("lost the leader lease (token %d) to another scheduler: stepping down", term.token)
                self._step_down()
            if attempt.holder != self._standing_by_for:
                log.info("standing by: %s leads", attempt.holder)
                self._standing_by_for = attempt.holder
            return False
        self._standing_by_for = None
        if term is None or term.token != attempt.token:
            log.info("scheduler %s leads now (fencing token %d)", self.holder, attempt.token)
            self._leadership_changed.set()
        self._term = _Term(attempt.token, sent_at + self.lease_s)
        return self.leading

    def _step_down(self) -> None:
        self._term = None
        self._leadership_changed.set()

    def _check_skew(self, db_now: datetime, wall_before: float, wall_after: float) -> None:
        # The server read its clock somewhere between our two readings: compare it with their middle,
        # and forgive half the round trip.
        skew = db_now.timestamp() - (wall_before + wall_after) / 2
        self.skew_s = skew
        limit = self.settings.max_clock_skew_s + (wall_after - wall_before) / 2
        now = time.monotonic()
        if abs(skew) <= limit:
            self.clock_warning = None
            if self._skew_warned_at is not None:
                log.info("clock skew back within limits: this host is %+.3f s off the database", -skew)
                self._skew_warned_at = None
            return
        self.clock_warning = (
            f"clock skew: the clock of host {self.host} is {-skew:+.3f} s off the database's (limit "
            f"{self.settings.max_clock_skew_s:g} s); fire times use the database clock, but fix NTP on this host"
        )
        if self._skew_warned_at is None or now - self._skew_warned_at >= _REMINDER_S:
            log.warning(
                "clock skew: this host's clock is %+.3f s off the database's (limit %.1f s); fire times use the "
                "database clock, but fix NTP on this host",
                -skew,
                self.settings.max_clock_skew_s,
            )
            self._skew_warned_at = now

    # -- retention -------------------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        while not self._stop.is_set():
            if not self.leading:
                await _wait(self._stop, self.renew_interval_s)
                continue
            try:
                await self.prune_once()
            except (DatabaseError, TimeoutError) as exc:
                log.warning(
                    "retention pass failed (%s); retrying in %.0f s",
                    _describe(exc),
                    self.settings.retention_interval_s,
                )
            await _wait(self._stop, self.settings.retention_interval_s)

    async def prune_once(self) -> RunPruneReport | None:
        """One retention pass (:func:`~conveyor.scheduler.retention.retention_pass`) if this process leads;
        ``None`` otherwise."""
        if not self.leading:
            return None
        return await retention_pass(
            self.app.runtime().engine,
            self.settings,
            self.limits,
            proceed=lambda: self.leading and not self._stop.is_set(),
        )

    # -- ticks -----------------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while not self._stop.is_set():
            if not self.leading:
                self._leadership_changed.clear()
                await _wait(self._leadership_changed, self.tick_s)
                continue
            wait_s = self.tick_s
            try:
                next_in_s, failures = await self.tick_once()
            except (DatabaseError, TimeoutError) as exc:
                log.warning("scheduler tick failed (%s); retrying in %.2f s", exc, self.tick_s)
            else:
                if next_in_s is not None and not failures:
                    wait_s = min(self.tick_s, max(0.0, next_in_s))
            if wait_s > 0:
                await _wait(self._stop, wait_s)

    async def tick_once(self) -> tuple[float | None, int]:
        """Fire every schedule due now. Returns the seconds until the next fire time (``0.0`` when more are
        due already, ``None`` when nothing is scheduled) and how many schedules failed."""
        async with asyncio.timeout(self.lease_s):
            due, next_in_s = await self.store.due(DUE_BATCH)
        failures = 0
        for schedule_id in due:
            fence = self._fence()
            if fence is None or self._stop.is_set():
                return 0.0, failures
            try:
                async with asyncio.timeout(self.lease_s):
                    result = await self.store.fire(schedule_id, fence, self._decide, self.limits)
            except LeadershipLost as exc:
                log.warning("%s: stepping down without enqueueing", exc)
                if self._term is not None and self._term.token == fence.token:
                    self._step_down()
                return 0.0, failures
            except Exception as exc:  # one broken schedule must not stop the others
                failures += 1
                self._failures.log(schedule_id, exc)
                continue
            if result is not None:
                self.enqueued += len(result.fire_times)
                log_fired(result)
                # DUE counted only schedules not due then: this one's new cursor may be the next fire
                # time of all (the only schedule, say). At or before now: a long catch-up goes on at once.
                ahead_s = max(0.0, (result.next_fire_at - result.db_now).total_seconds())
                next_in_s = ahead_s if next_in_s is None else min(next_in_s, ahead_s)
        if len(due) == DUE_BATCH:
            next_in_s = 0.0
        return next_in_s, failures

    def _decide(self, schedule: ScheduleRecord, now: datetime) -> Firing:
        definition = schedule.definition
        due = due_fire_times(
            definition.timing,
            schedule.next_fire_at,
            now,
            definition.misfire,
            definition.max_lateness_s,
            grace_s=self.misfire_grace_s,
            limit=RUNS_PER_TRANSACTION,
        )
        return Firing(due, [build_run_request(self.app, schedule, fire_at) for fire_at in due.fire_times])


def _describe(exc: Exception) -> str:
    # A TimeoutError says nothing by itself.
    return str(exc) or type(exc).__name__


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
