"""Degradation: what works right now, dependency by dependency, and what that means overall.

PostgreSQL is the one dependency Conveyor cannot work without; Redis is optional (an event fan-out
accelerator, never the source of truth), so Redis being down makes the system ``degraded``, not
``unavailable``, and Redis not configured at all is simply ``not configured``. Each check goes through
its circuit breaker: while one is open the dependency is reported unavailable without being called.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import SecretStr

from conveyor.resilience.circuit_breaker import BreakerState, CircuitBreaker, CircuitOpen

__all__ = ["DependencyStatus", "Overall", "check_dependency", "overall", "redis_status"]

Health = Literal["ok", "unavailable", "not configured"]
Overall = Literal["ok", "degraded", "unavailable"]


@dataclass(frozen=True)
class DependencyStatus:
    name: str
    required: bool
    status: Health
    breaker: BreakerState | None
    latency_ms: float | None = None
    detail: str | None = None  # why it is unavailable (never a URL or a password)


async def check_dependency(
    name: str,
    probe: Callable[[], Awaitable[Any]],
    breaker: CircuitBreaker,
    *,
    required: bool,
    timeout_s: float,
) -> DependencyStatus:
    """Call ``probe()`` through ``breaker`` within ``timeout_s`` seconds and say how it went."""
    started = time.monotonic()
    try:
        await breaker.call(lambda: asyncio.wait_for(probe(), timeout_s))
    except CircuitOpen as exc:
        detail = f"circuit breaker open; next attempt in {exc.retry_after_s:.1f} s"
        return DependencyStatus(name, required, "unavailable", breaker.state, detail=detail)
    except TimeoutError:
        detail = f"no answer within {timeout_s:g} s"
        return DependencyStatus(name, required, "unavailable", breaker.state, detail=detail)
    except Exception as exc:  # any failure of the dependency is a status here, not an error
        return DependencyStatus(name, required, "unavailable", breaker.state, detail=_describe(exc))
    latency_ms = (time.monotonic() - started) * 1000
    return DependencyStatus(name, required, "ok", breaker.state, latency_ms=round(latency_ms, 2))


async def redis_status(url: SecretStr | None, breaker: CircuitBreaker, *, timeout_s: float = 1.0) -> DependencyStatus:
    """PING the configured Redis; ``not configured`` when there is no ``redis_url``."""
    if url is None:
        return DependencyStatus("redis", False, "not configured", None)
    try:
        import redis.asyncio as aioredis
    except ImportError:
        detail = "the redis package is not installed (pip install 'conveyor[redis]')"
        return DependencyStatus("redis", False, "unavailable", None, detail=detail)

    async def ping() -> None:
        client = aioredis.from_url(
            url.get_secret_value(), socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=None
        )
        try:
            await client.ping()
        finally:
            await client.aclose()

    return await check_dependency("redis", ping, breaker, required=False, timeout_s=timeout_s)


def overall(statuses: Sequence[DependencyStatus]) -> Overall:
    """``unavailable`` if a required dependency is, ``degraded`` if an optional one is, else ``ok``."""
    if any(s.required and s.status == "unavailable" for s in statuses):
        return "unavailable"
    if any(s.status == "unavailable" for s in statuses):
        return "degraded"
    return "ok"


def _describe(exc: BaseException) -> str:
    # The class only: driver messages can carry host names, user names or, for some, the whole URL.
    return f"{type(exc).__module__.split('.')[0]}.{type(exc).__name__}"
