"""The statements behind ``/analytics``, in the driver's parameter style (``%(name)s``).

Placeholders in braces are filled from the fixed spellings in :data:`FILTERS` and :data:`BUCKETED`
only, never from request text: each filter combination gets its own statement, so the planner sees
plain equalities it can match to the indexes.
"""

from __future__ import annotations

CLOCK = """
SELECT now() AS now,
       date_bin(make_interval(secs => %(bucket_s)s), now() - make_interval(secs => %(window_s)s),
                TIMESTAMPTZ 'epoch') AS first_bucket
"""

PROGRESS = "SELECT rolled_from, rolled_until FROM conveyor_task_stats_progress WHERE id = 1"

# Rolled-up minutes of one series ('' = all) grouped into buckets. Without a bucket, one total row.
ROLLED = """
SELECT {bucket} AS bucket,
       sum(enqueued)::bigint AS enqueued, sum(succeeded)::bigint AS succeeded, sum(dead)::bigint AS dead,
       sum(cancelled)::bigint AS cancelled, sum(run_count)::bigint AS run_count,
       COALESCE(sum(run_s_sum), 0)::float8 AS run_s_sum, COALESCE(sum(wait_s_sum), 0)::float8 AS wait_s_sum
FROM conveyor_task_stats
WHERE queue = %(queue_key)s AND name = %(name_key)s AND minute >= %(lo)s AND minute < %(hi)s
GROUP BY 1
"""

LIVE_CREATED = """
SELECT {bucket} AS bucket, count(*) AS enqueued
FROM conveyor_tasks
WHERE created_at >= %(lo)s AND created_at < %(hi)s {filters}
GROUP BY 1
"""

LIVE_FINISHED = """
SELECT {bucket} AS bucket,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'dead') AS dead,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       count(started_at) AS run_count,
       COALESCE(sum(EXTRACT(EPOCH FROM finished_at - started_at)::float8), 0) AS run_s_sum,
       COALESCE(sum(GREATEST(EXTRACT(EPOCH FROM started_at - run_at)::float8, 0)), 0) AS wait_s_sum
FROM conveyor_tasks
WHERE finished_at IS NOT NULL AND finished_at >= %(lo)s AND finished_at < %(hi)s {filters}
GROUP BY 1
"""

BUCKETED = "date_bin(make_interval(secs => %(bucket_s)s), {column}, TIMESTAMPTZ 'epoch')"

# The statements come in fixed spellings per filter combination (chosen from these constants, never
# from request text), so the planner sees plain equalities it can match to the indexes.
FILTERS = {
    (False, False): "",
    (True, False): "AND queue = %(queue)s",
    (False, True): "AND name = %(name)s",
    (True, True): "AND queue = %(queue)s AND name = %(name)s",
}

CURRENT = """
SELECT state, count(*) AS n FROM conveyor_tasks
WHERE state IN ('scheduled', 'queued', 'running', 'blocked', 'dead') {filters}
GROUP BY state
"""

OLDEST_WAITING = """
SELECT EXTRACT(EPOCH FROM now() - min(run_at))::float8 AS age_s FROM conveyor_tasks
WHERE state IN ('scheduled', 'queued') AND run_at <= now() {filters}
"""

WORKERS = """
SELECT count(*) FILTER (WHERE state <> 'stopped'
                        AND last_heartbeat_at > now() - make_interval(secs => %(stale_s)s)) AS live,
       count(*) FILTER (WHERE state <> 'stopped'
                        AND last_heartbeat_at <= now() - make_interval(secs => %(stale_s)s)) AS silent,
       COALESCE(sum(concurrency) FILTER (WHERE state <> 'stopped'
                        AND last_heartbeat_at > now() - make_interval(secs => %(stale_s)s)), 0) AS slots
FROM conveyor_workers
"""

PAUSED_QUEUES = "SELECT count(*) AS n FROM conveyor_queues WHERE paused"

# Percentiles of wait time (due -> claimed) and run time (claimed -> finished) over the most recent
# finished tasks in the window: the sample bounds the sort percentile_cont needs.
LATENCY = """
WITH sample AS (
    SELECT GREATEST(EXTRACT(EPOCH FROM started_at - run_at)::float8, 0) AS wait_s,
           GREATEST(EXTRACT(EPOCH FROM finished_at - started_at)::float8, 0) AS run_s
    FROM conveyor_tasks
    WHERE finished_at IS NOT NULL AND finished_at >= now() - make_interval(secs => %(window_s)s)
      AND started_at IS NOT NULL AND state = ANY(%(states)s::text[]) {filters}
    ORDER BY finished_at DESC
    LIMIT %(sample)s
)
SELECT count(*) AS n,
       percentile_cont(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY wait_s) AS wait,
       avg(wait_s) AS wait_avg, max(wait_s) AS wait_max,
       percentile_cont(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY run_s) AS run,
       avg(run_s) AS run_avg, max(run_s) AS run_max
FROM sample
"""

# The most common errors among the most recent dead tasks of the window. Walks dead tasks newest
# first by (state, id) and stops at the sample size, so its cost does not grow with the table.
FAILURES = """
WITH sample AS (
    SELECT id, queue, name, finished_at,
           COALESCE(last_error->>'type', 'unknown') AS error_type,
           left(COALESCE(last_error->>'message', ''), %(message_chars)s) AS message
    FROM conveyor_tasks
    WHERE state = 'dead' AND finished_at >= now() - make_interval(secs => %(window_s)s) {filters}
    ORDER BY id DESC
    LIMIT %(sample)s
)
SELECT error_type, message, count(*) AS n, max(finished_at) AS last_seen, min(finished_at) AS first_seen,
       max(id) AS example_task_id, array_agg(DISTINCT queue) AS queues, array_agg(DISTINCT name) AS names,
       (SELECT count(*) FROM sample) AS sampled
FROM sample
GROUP BY error_type, message
ORDER BY n DESC, last_seen DESC
LIMIT %(limit)s
"""

PER_NAME_ROLLED = """
SELECT name, sum(enqueued)::bigint AS enqueued, sum(succeeded)::bigint AS succeeded, sum(dead)::bigint AS dead,
       sum(cancelled)::bigint AS cancelled, sum(run_count)::bigint AS run_count,
       COALESCE(sum(run_s_sum), 0)::float8 AS run_s_sum, COALESCE(sum(wait_s_sum), 0)::float8 AS wait_s_sum
FROM conveyor_task_stats
WHERE queue = %(queue_key)s AND name <> '' AND minute >= %(lo)s AND minute < %(hi)s
GROUP BY name
"""

PER_NAME_LIVE_CREATED = """
SELECT name, count(*) AS enqueued FROM conveyor_tasks
WHERE created_at >= %(lo)s AND created_at < %(hi)s {filters}
GROUP BY name
"""

PER_NAME_LIVE_FINISHED = """
SELECT name,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'dead') AS dead,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       count(started_at) AS run_count,
       COALESCE(sum(EXTRACT(EPOCH FROM finished_at - started_at)::float8), 0) AS run_s_sum,
       COALESCE(sum(GREATEST(EXTRACT(EPOCH FROM started_at - run_at)::float8, 0)), 0) AS wait_s_sum
FROM conveyor_tasks
WHERE finished_at IS NOT NULL AND finished_at >= %(lo)s AND finished_at < %(hi)s {filters}
GROUP BY name
"""

# Unfinished tasks per name: the backlog only (states with an index on (state, id)), never history.
PER_NAME_CURRENT = """
SELECT name, state, count(*) AS n FROM conveyor_tasks
WHERE state IN ('scheduled', 'queued', 'running', 'blocked') {filters}
GROUP BY name, state
"""

# Run time percentiles per name over the most recent finished tasks of the window.
PER_NAME_RUN = """
WITH sample AS (
    SELECT name, GREATEST(EXTRACT(EPOCH FROM finished_at - started_at)::float8, 0) AS run_s
    FROM conveyor_tasks
    WHERE finished_at IS NOT NULL AND finished_at >= now() - make_interval(secs => %(window_s)s)
      AND started_at IS NOT NULL {filters}
    ORDER BY finished_at DESC
    LIMIT %(sample)s
)
SELECT name, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY run_s) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY run_s) AS p95
FROM sample GROUP BY name
"""
