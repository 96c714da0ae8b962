"""What the operations routes share (search, analytics, dead letters, admin, resilience, debug, events):
their stores, and the pieces that live as long as the API application does.

:func:`install` is called by ``create_app``. It puts on ``api.state``:

* ``breakers``: the :class:`~conveyor.resilience.circuit_breaker.BreakerRegistry` of this process, with
  the ``database`` breaker that :class:`~conveyor.api.db_breaker.DatabaseBreakerMiddleware` applies
  to every request, and the ``redis`` breaker of the degradation check;
* ``recovery``: the :class:`~conveyor.resilience.recovery.RecoveryEngine` (it remembers the last report);
* ``event_hub``: the :class:`~conveyor.api.event_hub.EventHub` behind ``GET /events``;
* ``search_budget``: the :class:`~conveyor.db.search_walk.SearchBudget` of every search (replace it to
  tune how long a search scans before it answers with a partial page).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from conveyor.api.db_breaker import DATABASE_BREAKER, DatabaseBreakerMiddleware
from conveyor.api.deps import PUBLIC_PATHS, conveyor_app
from conveyor.api.event_hub import EventHub
from conveyor.app import App
from conveyor.db.admin_store import AdminStore
from conveyor.db.analytics_store import AnalyticsStore
from conveyor.db.dead_store import DeadStore
from conveyor.db.debug_store import DebugStore
from conveyor.db.search_store import SearchStore
from conveyor.db.search_walk import SearchBudget
from conveyor.db.task_store import TaskStore
from conveyor.resilience.circuit_breaker import BreakerRegistry, CircuitBreaker
from conveyor.resilience.recovery import RecoveryEngine

#: The breaker of the optional Redis.
REDIS_BREAKER = "redis"


def install(api: FastAPI, conveyor_app: App, *, api_prefix: str) -> None:
    """Create the process-wide pieces and add the database breaker's middleware.

    Call it after the authentication middleware is added: middleware added later wraps it, and the
    breaker must refuse requests before their key is checked against the database."""
    settings = conveyor_app.settings
    breakers = BreakerRegistry()
    database = breakers.get_or_create(DATABASE_BREAKER, failure_threshold=5, reset_timeout_s=10.0)
    breakers.get_or_create(REDIS_BREAKER, failure_threshold=3, reset_timeout_s=30.0)
    api.state.breakers = breakers
    api.state.recovery = RecoveryEngine(
        max_worker_losses=settings.worker.max_worker_losses,
        lease_timeout_s=settings.worker.lease_timeout_s,
    )
    api.state.search_budget = SearchBudget(
        page_s=settings.api.search_page_budget_s, count_s=settings.api.search_count_budget_s
    )
    api.state.event_hub = EventHub(conveyor_app, breaker=database, worker_stale_after_s=settings.worker.lease_timeout_s)
    resilience = f"{api_prefix}/resilience"

    def exempt(path: str) -> bool:
        # Probes and the document never touch the database through a route; the resilience routes
        # are how an operator looks at (and resets) an open breaker.
        return path in PUBLIC_PATHS or path == resilience or path.startswith(resilience + "/")

    api.add_middleware(DatabaseBreakerMiddleware, conveyor_app=conveyor_app, breaker=database, exempt=exempt)


def end_streams(api: FastAPI) -> None:
    """End the open event streams at once (each client gets a final ``shutdown`` event) and refuse new
    ones: what a server about to stop calls first, since it waits for open responses to finish before
    the application's shutdown runs (and :func:`close` with it)."""
    hub = getattr(api.state, "event_hub", None)
    if isinstance(hub, EventHub):
        hub.end_streams()


async def close(api: FastAPI) -> None:
    """End the event streams (each client gets a final ``shutdown`` event). Safe to call twice."""
    hub = getattr(api.state, "event_hub", None)
    if isinstance(hub, EventHub):
        await hub.close()


@dataclass(frozen=True)
class Ops:
    """The stores the operations routes work through, bound to this event loop's engine."""

    app: App
    tasks: TaskStore
    search: SearchStore
    analytics: AnalyticsStore
    dead: DeadStore
    admin: AdminStore
    debug: DebugStore
    breakers: BreakerRegistry
    recovery: RecoveryEngine
    events: EventHub

    @property
    def database_breaker(self) -> CircuitBreaker:
        return self.breakers.get_or_create(DATABASE_BREAKER)


async def ops(request: Request) -> Ops:
    app = conveyor_app(request)
    runtime = app.runtime()
    engine = runtime.engine
    state = request.app.state
    return Ops(
        app=app,
        tasks=runtime.tasks,
        search=SearchStore(engine, state.search_budget),
        analytics=AnalyticsStore(engine, worker_stale_after_s=app.settings.worker.lease_timeout_s),
        dead=DeadStore(engine),
        admin=AdminStore(engine),
        debug=DebugStore(engine),
        breakers=state.breakers,
        recovery=state.recovery,
        events=state.event_hub,
    )


OpsDep = Annotated[Ops, Depends(ops)]
