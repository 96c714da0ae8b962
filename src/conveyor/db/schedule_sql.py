"""The scheduler's SQL: the leader lease, the fenced tick and its runs.

Why these statements can neither lose nor double a tick is told once, in
:mod:`conveyor.db.schedule_store`, which runs them; the comments here say what each one does.
"""

from __future__ import annotations

# Take the lease if it is free, expired or already ours; create it if it has never existed. The token
# stays the same only for a renewal of the same term (same holder presenting the current token), so a
# process that re-acquires after losing the lease (even to no one) starts a new term and its own older
# in-flight ticks fail the fence. The UPDATE only locks a row it is allowed to take: a standby polling a
# live lease never waits on the leader's tick.
ACQUIRE = """
WITH taken AS (
    UPDATE conveyor_leases
    SET fencing_token = CASE WHEN holder = %(holder)s AND fencing_token = %(token)s::bigint
                             THEN fencing_token ELSE fencing_token + 1 END,
        acquired_at = CASE WHEN holder = %(holder)s AND fencing_token = %(token)s::bigint
                           THEN acquired_at ELSE now() END,
        holder = %(holder)s,
        renewed_at = now(),
        expires_at = now() + make_interval(secs => %(lease_s)s)
    WHERE name = %(name)s AND (expires_at <= now() OR holder = %(holder)s)
    RETURNING fencing_token, expires_at
),
created AS (
    INSERT INTO conveyor_leases (name, holder, fencing_token, expires_at)
    SELECT %(name)s, %(holder)s, 1, now() + make_interval(secs => %(lease_s)s)
    WHERE NOT EXISTS (SELECT 1 FROM conveyor_leases WHERE name = %(name)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING fencing_token, expires_at
)
-- Always one row: the server's clock feeds the skew check of standbys too, and a standby learns who
-- leads (the holder as of the statement's start: for a refused attempt, the one who refused it).
SELECT granted.fencing_token, granted.expires_at, clock_timestamp() AS db_now,
       (SELECT holder FROM conveyor_leases WHERE name = %(name)s) AS holder
FROM (SELECT 1) AS one
LEFT JOIN (SELECT * FROM taken UNION ALL SELECT * FROM created) AS granted ON true
"""

# A leader stepping down gracefully hands over at once: a standby's next poll finds the lease expired.
RELEASE = """
UPDATE conveyor_leases SET expires_at = now()
WHERE name = %(name)s AND holder = %(holder)s AND fencing_token = %(token)s
RETURNING fencing_token
"""

# The fence (see the module docstring). clock_timestamp(), not now(): the lease must be valid when the
# check runs, not merely when the transaction began.
FENCE = """
SELECT fencing_token FROM conveyor_leases
WHERE name = %(lease)s AND holder = %(holder)s AND fencing_token = %(token)s AND expires_at > clock_timestamp()
FOR SHARE
"""

# Schedules due by the database clock, oldest cursor first, and how long until the next one is due.
DUE = """
SELECT ARRAY(SELECT id FROM conveyor_schedules WHERE enabled AND next_fire_at <= now()
             ORDER BY next_fire_at, id LIMIT %(limit)s) AS due,
       EXTRACT(EPOCH FROM (SELECT min(next_fire_at) FROM conveyor_schedules WHERE enabled AND next_fire_at > now())
                          - now())::float8 AS next_in_s
"""

# The schedule to fire, locked against concurrent edits (pause, update, delete) and other ticks for the
# rest of the tick. The due check is repeated under the lock: an edit that committed meanwhile is seen
# here. NO KEY UPDATE, not UPDATE: the tick changes no key, and this lock leaves foreign-key checks
# (FOR KEY SHARE) alone, so a manual trigger inserting its run does not wait for a tick in flight.
LOCK_DUE = """
SELECT s.*, now() AS db_now FROM conveyor_schedules s
WHERE s.id = %(id)s AND s.enabled AND s.next_fire_at <= now()
FOR NO KEY UPDATE
"""

# A tick's runs, claimed before anything is enqueued: the rows returned are the fire times this
# transaction may enqueue, and no others (a fire time that already has a run was enqueued once already).
# In fire-time order, so that two transactions claiming overlapping ranges wait on each other's index
# entries in the same order and cannot deadlock. task_id stays NULL until the tasks exist (LINK_RUNS, in
# the same transaction: no one else ever sees it NULL before the task is pruned).
CLAIM_RUNS = """
INSERT INTO conveyor_schedule_runs (schedule_id, fire_at, kind, fencing_token)
SELECT %(id)s, f.fire_at, 'schedule', %(token)s
FROM unnest(%(fire_ats)s::timestamptz[]) AS f(fire_at)
ORDER BY f.fire_at
ON CONFLICT (schedule_id, fire_at) DO NOTHING
RETURNING id, fire_at
"""

# A manual run, keyed by the moment the statement runs (to the microsecond). Nothing returned: a run
# already has that exact fire time, and the caller tries again at the next moment.
CLAIM_MANUAL_RUN = """
INSERT INTO conveyor_schedule_runs (schedule_id, fire_at, kind, fencing_token)
VALUES (%(id)s, clock_timestamp(), 'manual', NULL)
ON CONFLICT (schedule_id, fire_at) DO NOTHING
RETURNING id, fire_at, enqueued_at
"""

LINK_RUNS = """
UPDATE conveyor_schedule_runs r SET task_id = l.task_id
FROM unnest(%(run_ids)s::bigint[], %(task_ids)s::bigint[]) AS l(run_id, task_id)
WHERE r.id = l.run_id
"""

# Links the tick's runs to their tasks and moves the cursor in one statement (a data-modifying WITH runs
# to completion whether or not the outer statement reads it). The cursor passes every fire time the tick
# dealt with, claimed or found already run; last_fire_at only ever moves forward.
ADVANCE = f"""
WITH linked AS ({LINK_RUNS})
UPDATE conveyor_schedules
SET next_fire_at = %(next_fire_at)s, last_fire_at = GREATEST(last_fire_at, %(last_fire_at)s::timestamptz)
WHERE id = %(id)s
"""

# is_local = true: the limits end with the transaction and never leak into the pool's next user.
LIMIT_TRANSACTION = """
SELECT set_config('lock_timeout', %(lock)s, true),
       set_config('statement_timeout', %(statement)s, true),
       set_config('idle_in_transaction_session_timeout', %(idle)s, true)
"""
