"""Tables of the scheduler (schedules, their runs, leader leases). Schema changes go with migration 0003."""

from __future__ import annotations
