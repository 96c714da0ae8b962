"""The hot SQL statements, in the driver's own parameter style (``%(name)s``).

They are plain strings so the same text runs on a SQLAlchemy connection (``exec_driver_sql``), on a
caller's SQLAlchemy session or on a caller's raw psycopg connection (transactional enqueue). Every
statement that changes a task's state also appends its history event in the same statement, so the
two can never disagree and each costs one round trip. (Enqueue writes no event row: the task row, with
its immutable ``created_at``, is that record; ``TaskStore.events`` opens the history with it.)

Wake-ups: ``pg_notify`` carries queue names only (never payloads: NOTIFY is limited to 8000 bytes) and
is delivered at commit, so a task enqueued inside a caller's transaction wakes nobody before it exists.
"""

from __future__ import annotations

WAKEUP_CHANNEL = "conveyor_wakeup"

# Enqueue any number of tasks in one round trip. Ids are drawn from the sequence up front so the
# result can be matched to the input by ordinal: rows skipped by ON CONFLICT (an idempotency key
# already used, a unique key held) come back with inserted = false and are resolved by the caller.
ENQUEUE = f"""
WITH input AS (
    SELECT i.*, nextval('conveyor_tasks_id_seq') AS id,
           COALESCE(i.eta, now() + make_interval(secs => COALESCE(i.delay_s, 0))) AS resolved_run_at
    FROM unnest(
        %(names)s::text[], %(queues)s::text[], %(priorities)s::smallint[], %(args)s::text[]::jsonb[],
        %(kwargs)s::text[]::jsonb[], %(metadata)s::text[]::jsonb[], %(max_attempts)s::int[],
        %(timeouts)s::float8[], %(idempotency_keys)s::text[], %(payload_hashes)s::text[],
        %(unique_keys)s::text[], %(delays)s::float8[], %(etas)s::timestamptz[]
    ) WITH ORDINALITY AS i(name, queue, priority, args, kwargs, metadata, max_attempts, timeout_s,
                           idempotency_key, payload_hash, unique_key, delay_s, eta, ord)
),
inserted AS (
    INSERT INTO conveyor_tasks (id, name, queue, state, priority, args, kwargs, metadata, max_attempts,
                                timeout_s, idempotency_key, payload_hash, unique_key, run_at)
    SELECT id, name, queue,
           CASE WHEN resolved_run_at > now() THEN 'scheduled' ELSE 'queued' END,
           priority, args, kwargs, metadata, max_attempts, timeout_s, idempotency_key, payload_hash,
           unique_key, resolved_run_at
    FROM input
    ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id, queue, state
),
woken AS (
    SELECT pg_notify('{WAKEUP_CHANNEL}', queue) FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'queued') q
)
SELECT input.ord, input.id, inserted.state, inserted.id IS NOT NULL AS inserted,
       (SELECT count(*) FROM woken) AS woken
FROM input LEFT JOIN inserted ON inserted.id = input.id
ORDER BY input.ord
"""

# One task with no idempotency or unique key: nothing can conflict, so none of ENQUEUE's machinery
# (unnest of arrays, ids drawn up front, ON CONFLICT's speculative insertion, the join back to the
# input) is needed. This is the single enqueue's path, and its cost falls inside the enqueue-to-start
# latency (created_at is the statement's start, the task is visible at its commit): about 0.1 ms less
# than ENQUEUE for one row.
ENQUEUE_ONE = f"""
WITH inserted AS (
    INSERT INTO conveyor_tasks (name, queue, state, priority, args, kwargs, metadata, max_attempts, timeout_s,
                                run_at)
    SELECT %(name)s, %(queue)s, CASE WHEN r.run_at > now() THEN 'scheduled' ELSE 'queued' END, %(priority)s,
           %(args)s::jsonb, %(kwargs)s::jsonb, %(metadata)s::jsonb, %(max_attempts)s, %(timeout_s)s, r.run_at
    FROM (SELECT COALESCE(%(eta)s::timestamptz, now() + make_interval(secs => COALESCE(%(delay_s)s::float8, 0)))
          AS run_at) r
    RETURNING id, queue, state
)
SELECT id, state, CASE WHEN state = 'queued' THEN pg_notify('{WAKEUP_CHANNEL}', queue) END AS woken FROM inserted
"""

# What a claim returns about each task it took: CLAIM and the limited queues' claim
# (conveyor.db.limit_sql) both return these, read by conveyor.db.limit_store.claimed_task.
CLAIMED_COLUMNS = """t.id, t.name, t.queue, t.priority, t.args, t.kwargs, t.metadata, t.attempt, t.max_attempts,
              t.lease_token::text AS lease_token, t.timeout_s, t.worker_losses"""

# Claim up to %(limit)s tasks for one worker. Per queue (a LATERAL subquery each, so every queue is an
# ordered walk of the partial claim index rather than a sort of all waiting rows), highest priority
# first, then earliest run time; SKIP LOCKED lets many workers claim at once without waiting on each
# other. Each claim bumps the attempt and issues a fresh lease token: the fencing token every later
# write for this attempt must present. Paused queues are left out here, so a pause takes effect at
# every worker's next claim.
CLAIM = f"""
WITH open_queues AS (
    SELECT q.name FROM unnest(%(queues)s::text[]) AS q(name)
    WHERE NOT EXISTS (SELECT 1 FROM conveyor_queues cq WHERE cq.name = q.name AND cq.paused)
),
candidates AS (
    SELECT c.id FROM open_queues
    CROSS JOIN LATERAL (
        SELECT t.id, t.priority, t.run_at FROM conveyor_tasks t
        WHERE t.queue = open_queues.name AND t.state IN ('scheduled', 'queued') AND t.run_at <= now()
        ORDER BY t.priority DESC, t.run_at, t.id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) c
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT %(limit)s
),
claimed AS (
    UPDATE conveyor_tasks t
    SET state = 'running', attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => %(lease_s)s), worker_id = %(worker_id)s::uuid,
        started_at = now(), cancel_requested = false
    FROM candidates WHERE t.id = candidates.id
    RETURNING {CLAIMED_COLUMNS}
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, worker_id)
    SELECT id, 'claimed', attempt, %(worker_id)s::uuid FROM claimed
)
SELECT * FROM claimed ORDER BY priority DESC, id
"""

# Extend the leases a worker still holds and record its heartbeat, in one statement. A lease that is
# no longer ours (rescued, or finished elsewhere) comes back as not `held`: the worker must stop that
# execution. Rows another transaction has locked right now (this worker's own FINISH batch, an
# operator's cancel) are skipped rather than waited for: waiting is how a heartbeat and an ack batch
# locking the same rows in different orders deadlock. They are still reported as held (a plain read
# of the committed row), so nobody is stopped for it, and the next heartbeat renews them.
RENEW = """
WITH held AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS h(id, token)
),
ours AS (
    SELECT t.id FROM conveyor_tasks t JOIN held ON t.id = held.id AND t.lease_token = held.token
    WHERE t.state = 'running'
),
lockable AS (
    SELECT t.id FROM conveyor_tasks t JOIN held ON t.id = held.id AND t.lease_token = held.token
    WHERE t.state = 'running'
    ORDER BY t.id
    FOR UPDATE OF t SKIP LOCKED
),
renewed AS (
    UPDATE conveyor_tasks t SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
    FROM lockable WHERE t.id = lockable.id
    RETURNING t.id, t.cancel_requested
),
beat AS (
    UPDATE conveyor_workers SET last_heartbeat_at = now(), state = %(worker_state)s
    WHERE id = %(worker_id)s::uuid
    RETURNING paused, drain_requested
)
SELECT 'task' AS kind, ours.id, renewed.id IS NOT NULL AS renewed, renewed.cancel_requested,
       NULL::bool AS paused, NULL::bool AS drain
FROM ours LEFT JOIN renewed ON renewed.id = ours.id
UNION ALL
SELECT 'worker', NULL, NULL, NULL, paused, drain_requested FROM beat
"""

# Record how attempts ended, many at once. The guard (same token, still running) is the fence: a
# stale attempt (rescued, cancelled, or already finished) matches nothing and changes nothing.
FINISH = f"""
WITH outcome AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(states)s::text[],
                         %(results)s::text[]::jsonb[], %(errors)s::text[]::jsonb[], %(delays)s::float8[])
        AS o(id, token, state, result, error, delay_s)
),
finished AS (
    UPDATE conveyor_tasks t
    SET state = outcome.state,
        result = outcome.result,
        last_error = COALESCE(outcome.error, t.last_error),
        run_at = CASE WHEN outcome.state IN ('scheduled', 'queued')
                      THEN now() + make_interval(secs => COALESCE(outcome.delay_s, 0)) ELSE t.run_at END,
        finished_at = CASE WHEN outcome.state IN ('succeeded', 'dead', 'cancelled') THEN now() END,
        lease_token = NULL, lease_expires_at = NULL, cancel_requested = false
    FROM outcome
    WHERE t.id = outcome.id AND t.lease_token = outcome.token AND t.state = 'running'
    RETURNING t.id, t.attempt, t.worker_id, t.queue, outcome.state AS new_state, outcome.error, outcome.delay_s
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, worker_id, detail)
    SELECT id,
           CASE new_state WHEN 'succeeded' THEN 'succeeded' WHEN 'cancelled' THEN 'cancelled' ELSE 'failed' END,
           attempt, worker_id,
           CASE WHEN new_state = 'succeeded' THEN NULL
                ELSE jsonb_strip_nulls(jsonb_build_object('error', error, 'next_state', new_state,
                                                          'retry_in_s', delay_s)) END
    FROM finished
),
woken AS (
    SELECT pg_notify('{WAKEUP_CHANNEL}', queue) FROM (SELECT DISTINCT queue FROM finished WHERE new_state = 'queued') q
)
SELECT id, (SELECT count(*) FROM woken) AS woken FROM finished
"""

# A shutting-down worker gives back tasks it could not finish in its grace period. They were not
# failures, so the attempt is handed back too (the next claim issues a fresh token either way).
RELEASE = f"""
WITH held AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS h(id, token)
),
released AS (
    UPDATE conveyor_tasks t
    SET state = 'queued', attempt = GREATEST(t.attempt - 1, 0), run_at = now(),
        lease_token = NULL, lease_expires_at = NULL
    FROM held WHERE t.id = held.id AND t.lease_token = held.token AND t.state = 'running'
    RETURNING t.id, t.attempt, t.worker_id, t.queue
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, worker_id, detail)
    SELECT id, 'released', attempt + 1, worker_id, '{{"reason": "worker shutdown"}}'::jsonb FROM released
),
woken AS (
    SELECT pg_notify('{WAKEUP_CHANNEL}', queue) FROM (SELECT DISTINCT queue FROM released) q
)
SELECT id, (SELECT count(*) FROM woken) AS woken FROM released
"""

# Take back tasks whose lease ran out: their worker died, hung or lost the database. Lease expiry is
# judged on the database clock only, so no host's clock can rescue a task early. The attempt that was
# lost counts; a task that has now lost %(max_losses)s workers is presumed to be what kills them and
# goes to dead rather than crash-looping the fleet. A task whose cancellation was requested is
# cancelled instead of run again. SKIP LOCKED and the state guard make concurrent rescuers harmless.
RESCUE = f"""
WITH expired AS (
    SELECT id FROM conveyor_tasks
    WHERE state = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
rescued AS (
    UPDATE conveyor_tasks t
    SET worker_losses = t.worker_losses + 1,
        state = CASE WHEN t.cancel_requested THEN 'cancelled'
                     WHEN t.worker_losses + 1 >= %(max_losses)s OR t.attempt >= t.max_attempts THEN 'dead'
                     ELSE 'queued' END,
        run_at = now(),
        finished_at = CASE WHEN t.cancel_requested OR t.worker_losses + 1 >= %(max_losses)s
                                OR t.attempt >= t.max_attempts THEN now() END,
        last_error = jsonb_build_object(
            'type', 'conveyor.WorkerLost',
            'message', CASE WHEN t.worker_losses + 1 >= %(max_losses)s
                            THEN 'worker lost ' || (t.worker_losses + 1) || ' times running this task'
                            ELSE 'worker lost (lease expired)' END),
        lease_token = NULL, lease_expires_at = NULL, cancel_requested = false
    FROM expired WHERE t.id = expired.id AND t.state = 'running'
    RETURNING t.id, t.state, t.attempt, t.worker_id, t.queue, t.worker_losses, t.last_error
),
events AS (
    INSERT INTO conveyor_task_events (task_id, kind, attempt, worker_id, detail)
    SELECT id, 'rescued', attempt, worker_id,
           jsonb_build_object('reason', last_error->>'message', 'next_state', state, 'worker_losses', worker_losses)
    FROM rescued
),
woken AS (
    SELECT pg_notify('{WAKEUP_CHANNEL}', queue) FROM (SELECT DISTINCT queue FROM rescued WHERE state = 'queued') q
)
SELECT id, state, (SELECT count(*) FROM woken) AS woken FROM rescued
"""

# Move scheduled tasks whose time has come to queued, so depth statistics tell the truth. Claims do
# not depend on it: they take due scheduled tasks directly.
PROMOTE_DUE = f"""
WITH due AS (
    SELECT id FROM conveyor_tasks WHERE state = 'scheduled' AND run_at <= now()
    ORDER BY run_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
),
promoted AS (
    UPDATE conveyor_tasks t SET state = 'queued' FROM due
    WHERE t.id = due.id AND t.state = 'scheduled' RETURNING t.queue
),
woken AS (
    SELECT pg_notify('{WAKEUP_CHANNEL}', queue) FROM (SELECT DISTINCT queue FROM promoted) q
)
SELECT count(*) AS promoted, (SELECT count(*) FROM woken) AS woken FROM promoted
"""

# The earliest time a scheduled task in these queues becomes due, so an idle worker can sleep exactly
# until then instead of polling blindly.
NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM (min(run_at) - now())) AS due_in_s
FROM conveyor_tasks WHERE state = 'scheduled' AND queue = ANY(%(queues)s::text[])
"""
