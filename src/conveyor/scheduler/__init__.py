"""The periodic-task scheduler: schedules in the database, one fenced leader at a time enqueueing them."""

from conveyor.scheduler.service import Scheduler, SchedulerHealth

__all__ = ["Scheduler", "SchedulerHealth"]
