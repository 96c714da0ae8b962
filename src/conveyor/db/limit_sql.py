"""The claim for queues with a concurrency or rate limit (``conveyor_queues``), kept apart from
:data:`conveyor.db.task_sql.CLAIM` so that queues without limits pay nothing for them.

Why two statements in one transaction, and not one statement like CLAIM: under READ COMMITTED a
statement's snapshot is taken when it starts, before any lock it acquires inside. A single statement
that counts a queue's running tasks and claims would count on a snapshot older than the claims of a
concurrent claimer it then waited for, and both would take the last free slot. So:

1. :data:`LOCK_QUEUES` locks the limited queues' rows, always in name order (two workers sharing two
   limited queues then queue up instead of deadlocking). Claimers of one limited queue are serialised
   from here to their commit.
2. :data:`CLAIM_LIMITED`, a second statement and so a fresh snapshot, sees every claim committed by
   the lock's previous holders. It counts running tasks, refills the token bucket, claims at most what
   both allow and spends the tokens, then the transaction commits and the next claimer goes.

Finishing, releasing and rescuing tasks take no queue lock: they only lower the running count, so a
claimer that has not seen one yet merely under-claims until its next try.

Time is ``clock_timestamp()`` read once per claim, after the lock is held, and not ``now()``: that is
the transaction's start, before a wait for the lock, and would run the bucket's clock backwards
against the previous holder's refill. ``started_at`` takes the same value, so starts counted per
window of ``started_at`` obey the bucket exactly.
"""

from __future__ import annotations

from conveyor.db.task_sql import CLAIMED_COLUMNS

# Serialise the claimers of these queues (see the module docstring). Rows are locked in the sorted
# order (ORDER BY is applied before FOR UPDATE), so every claimer takes them in the same order. "C"
# is code-point order, the order of Python's sorted(), which the maintenance pause writes rows in.
LOCK_QUEUES = """
SELECT name FROM conveyor_queues WHERE name = ANY(%(queues)s::text[]) ORDER BY name COLLATE "C" FOR UPDATE
"""

# Claim up to %(limit)s tasks from limited queues, at most what each queue's limits allow:
#   concurrency_limit N: N minus the queue's running tasks (ix_conveyor_tasks_state_queue answers the
#     count from the index; it is small, at most about N rows);
#   rate_limit_per_s R: whole tokens in a bucket of max(1, R) that refills at R per second, starting
#     full. LEAST/GREATEST skip NULLs, so a limit that is not set simply does not bound the allowance.
# One row per claimed task, and one per queue that had none, each carrying its queue's gate: the
# current limits (the worker's cache learns of changes here), whether the concurrency limit is
# reached, when the next token is due, and whether due tasks were left behind (worth coming back
# for). Left-behind tasks are counted on this statement's snapshot, where the ones just claimed still
# look queued, hence "more than the number claimed".
CLAIM_LIMITED = f"""
WITH clock AS MATERIALIZED (
    SELECT clock_timestamp() AS now
),
gates AS MATERIALIZED (
    SELECT q.name, q.paused, q.concurrency_limit, q.rate_limit_per_s,
           CASE WHEN q.concurrency_limit IS NOT NULL THEN
               (SELECT count(*) FROM conveyor_tasks t WHERE t.state = 'running' AND t.queue = q.name)
           END AS running,
           CASE WHEN q.rate_limit_per_s IS NOT NULL THEN
               LEAST(GREATEST(1, q.rate_limit_per_s),
                     COALESCE(q.rate_tokens + q.rate_limit_per_s
                                  * GREATEST(0, EXTRACT(EPOCH FROM clock.now - q.rate_tokens_at))::float8,
                              GREATEST(1, q.rate_limit_per_s)))
           END AS tokens
    FROM conveyor_queues q CROSS JOIN clock
    WHERE q.name = ANY(%(queues)s::text[])
),
allowance AS MATERIALIZED (
    SELECT g.name,
           CASE WHEN g.paused THEN 0
                ELSE GREATEST(0, LEAST(%(limit)s::int, g.concurrency_limit - g.running, floor(g.tokens)))::int
           END AS allowed
    FROM gates g
),
candidates AS (
    SELECT c.id FROM allowance CROSS JOIN clock
    CROSS JOIN LATERAL (
        SELECT t.id, t.priority, t.run_at FROM conveyor_tasks t
        WHERE t.queue = allowance.name AND t.state IN ('scheduled', 'queued') AND t.run_at <= clock.now
        ORDER BY t.priority DESC, t.run_at, t.id
        LIMIT allowance.allowed
        FOR UPDATE OF t SKIP LOCKED
    ) c
    ORDER BY c.priority DESC, c.run_at, c.id
    LIMIT %(limit)s
),
claimed AS (
    UPDATE conveyor_tasks t
    SET state = 'running', attempt = t.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = clock.now + make_interval(secs => %(lease_s)s), worker_id = %(worker_id)s::uuid,
        started_at = clock.now, cancel_requested = false
    FROM candidates CROSS JOIN clock WHERE t.id = candidates.id
    RETURNING {CLAIMED_COLUMNS}
),
events AS (
    INSERT INTO conveyor_task_events (task_id, at, kind, attempt, worker_id)
    SELECT claimed.id, clock.now, 'claimed', claimed.attempt, %(worker_id)s::uuid FROM claimed CROSS JOIN clock
),
tally AS (
    SELECT gates.name, count(claimed.id)::int AS claimed
    FROM gates LEFT JOIN claimed ON claimed.queue = gates.name
    GROUP BY gates.name
),
spent AS (
    UPDATE conveyor_queues q SET rate_tokens = gates.tokens - tally.claimed, rate_tokens_at = clock.now
    FROM gates JOIN tally ON tally.name = gates.name CROSS JOIN clock
    WHERE q.name = gates.name AND gates.tokens IS NOT NULL
),
report AS MATERIALIZED (
    SELECT gates.name AS gate, gates.paused, gates.concurrency_limit, gates.rate_limit_per_s,
           COALESCE(gates.running + tally.claimed >= gates.concurrency_limit, false) AS at_concurrency_limit,
           CASE WHEN gates.tokens - tally.claimed < 1
                THEN (1 - (gates.tokens - tally.claimed)) / gates.rate_limit_per_s END AS next_token_in_s,
           (SELECT count(*) FROM (
                SELECT 1 FROM conveyor_tasks t
                WHERE t.queue = gates.name AND t.state IN ('scheduled', 'queued') AND t.run_at <= clock.now
                LIMIT tally.claimed + 1) due) > tally.claimed AS waiting
    FROM gates JOIN tally ON tally.name = gates.name CROSS JOIN clock
)
SELECT report.*, claimed.* FROM report LEFT JOIN claimed ON claimed.queue = report.gate
ORDER BY claimed.priority DESC, claimed.id
"""

# Which of a worker's queues have limits. Workers re-read it every second or so: that is how a limit
# set over the API reaches them (see conveyor.core.queue_limits).
QUEUE_LIMITS = """
SELECT name, concurrency_limit, rate_limit_per_s FROM conveyor_queues
WHERE name = ANY(%(queues)s::text[]) AND (concurrency_limit IS NOT NULL OR rate_limit_per_s IS NOT NULL)
"""
