"""API keys: how they look, how a request's key is checked, and how guessing keys is slowed down.

A key is ``cvk_`` and 43 URL-safe characters from :mod:`secrets` (256 random bits). The database keeps
only its sha256: with that much entropy a fast hash is enough (nothing to brute-force), and a lookup
by hash is an indexed equality, so no comparison time leaks anything about stored keys.

Checked keys are remembered for at most :attr:`AuthConfig.cache_ttl_s` seconds (2 by default), so a
revoked key stops working everywhere within that time, and at once in the process that revoked it.
A client (by IP address) that presents more than :attr:`AuthConfig.max_failures` bad keys within
:attr:`AuthConfig.failure_window_s` seconds gets ``429`` with ``Retry-After`` until the window has
moved on. A request with no key at all is not a guess and is not counted.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from conveyor.db.api_key_store import ApiKeyRecord, ApiKeyStore
from conveyor.errors import DatabaseError

log = logging.getLogger("conveyor.api.auth")

KEY_PREFIX = "cvk_"
_KEY_PATTERN = re.compile(r"cvk_[A-Za-z0-9_-]{43}")
#: Characters of a key kept in the clear to tell keys apart ("cvk_" and 8 more): 48 bits, useless to guess with.
DISPLAY_PREFIX_LENGTH = 12


class Scope(StrEnum):
    """What a key may do. ``admin`` implies every other scope; ``tasks:write`` implies ``tasks:read``."""

    TASKS_READ = "tasks:read"
    TASKS_WRITE = "tasks:write"
    ADMIN = "admin"


_IMPLIED: dict[Scope, frozenset[Scope]] = {
    Scope.ADMIN: frozenset(Scope),
    Scope.TASKS_WRITE: frozenset({Scope.TASKS_WRITE, Scope.TASKS_READ}),
    Scope.TASKS_READ: frozenset({Scope.TASKS_READ}),
}


def grants(held: Iterable[str], needed: Scope) -> bool:
    """Whether keys holding ``held`` scopes may do what ``needed`` allows."""
    known = {s.value for s in Scope}
    return any(needed in _IMPLIED[Scope(s)] for s in held if s in known)


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once to whoever made it, then never again
    prefix: str
    key_hash: str


def new_key() -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey(key=key, prefix=key[:DISPLAY_PREFIX_LENGTH], key_hash=hash_key(key))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The key a request was made with."""

    key_id: int
    name: str
    scopes: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        return grants(self.scopes, scope)


class AuthError(Exception):
    """A request that cannot be let in: ``status`` 401 or 429, with headers to send back."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str]) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers


@dataclass(frozen=True)
class AuthConfig:
    cache_ttl_s: float = 2.0
    """Seconds a checked key (valid or not) is remembered; bounds how long a revoked key keeps working."""

    max_failures: int = 10
    """Bad keys one client may present within ``failure_window_s`` before it gets 429."""

    failure_window_s: float = 60.0

    touch_interval_s: float = 60.0
    """A key's ``last_used_at`` is written at most this often (it costs a write)."""

    max_tracked: int = 10_000
    """Clients and keys remembered at most, so a flood of distinct values cannot exhaust memory."""


class FailureLimiter:
    """A sliding window of bad-key attempts per client."""

    def __init__(self, max_failures: int, window_s: float, max_clients: int) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after_s(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or ``None`` if it is not blocked."""
        failures = self._failures.get(client)
        if failures is None:
            return None
        now = time.monotonic()
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        if len(failures) < self.max_failures:
            return None
        return max(0.0, failures[0] + self.window_s - now)

    def record_failure(self, client: str) -> None:
        failures = self._failures.get(client)
        if failures is None:
            if len(self._failures) >= self.max_clients:
                self._failures.popitem(last=False)
            failures = self._failures[client] = deque(maxlen=self.max_failures)
        failures.append(time.monotonic())

    def reset(self) -> None:
        self._failures.clear()


@dataclass
class _Cached:
    principal: Principal | None
    expires_at: float


class Authenticator:
    """Turns an ``Authorization`` header into a :class:`Principal`, or refuses it."""

    def __init__(self, config: AuthConfig | None = None) -> None:
        self.config = config or AuthConfig()
        self.limiter = FailureLimiter(self.config.max_failures, self.config.failure_window_s, self.config.max_tracked)
        self._cache: OrderedDict[str, _Cached] = OrderedDict()

    async def authenticate(self, store: ApiKeyStore, authorization: str | None, client: str) -> Principal:
        """Raises :class:`AuthError` (401 or 429); :class:`DatabaseError` if keys cannot be looked up."""
        retry_after = self.limiter.retry_after_s(client)
        if retry_after is not None:
            raise AuthError(
                429,
                "Too Many Requests",
                "too many bad API keys from this client; try again later",
                {"Retry-After": str(max(1, round(retry_after + 0.5)))},
            )
        if authorization is None or not authorization.strip():
            raise _unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not _KEY_PATTERN.fullmatch(token):
            self._failed(client, "malformed")
            raise _unauthorized("the Authorization header must be 'Bearer cvk_...' with a Conveyor API key")
        principal = await self._lookup(store, hash_key(token))
        if principal is None:
            self._failed(client, "unknown or revoked")
            raise _unauthorized("the API key is not valid (unknown or revoked)")
        return principal

    def forget(self, key_id: int) -> None:
        """Drop a key from the cache at once (it was just revoked here)."""
        for key_hash in [h for h, c in self._cache.items() if c.principal and c.principal.key_id == key_id]:
            del self._cache[key_hash]

    async def _lookup(self, store: ApiKeyStore, key_hash: str) -> Principal | None:
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached is not None and cached.expires_at > now:
            return cached.principal
        record = await store.find_active(key_hash)
        principal = None if record is None else Principal(record.id, record.name, frozenset(record.scopes))
        if len(self._cache) >= self.config.max_tracked:
            self._evict(now)
        self._cache[key_hash] = _Cached(principal, now + self.config.cache_ttl_s)
        if record is not None and self._due_for_touch(record):
            try:
                await store.touch(record.id)
            except DatabaseError as exc:  # bookkeeping only: never refuse a request for it
                log.warning("could not record the use of API key %s: %s", record.id, exc)
        return principal

    def _due_for_touch(self, record: ApiKeyRecord) -> bool:
        if record.last_used_at is None:
            return True
        return (datetime.now(UTC) - record.last_used_at).total_seconds() >= self.config.touch_interval_s

    def _evict(self, now: float) -> None:
        for key_hash in [h for h, c in self._cache.items() if c.expires_at <= now]:
            del self._cache[key_hash]
        while len(self._cache) >= self.config.max_tracked:
            self._cache.popitem(last=False)

    def _failed(self, client: str, why: str) -> None:
        # Never log the key, nor any part of it.
        log.info("rejected a %s API key from %s", why, client)
        self.limiter.record_failure(client)


def _unauthorized(detail: str) -> AuthError:
    return AuthError(401, "Unauthorized", detail, {"WWW-Authenticate": 'Bearer realm="conveyor"'})
