"""
The connection cache: idle SMTP sessions kept for the next delivery to the
same nexthop (Postfix: scache(8), smtp_reuse.c, the caching half of
smtp_connect.c).

A session whose transaction ended well is stored, idle, under its nexthop
(``[relay.example]:587``, ``example.com``).  Postfix also finds sessions
by server address (smtp_reuse_addr, for unauthenticated sessions); we do
not: a request reuses only its own nexthop's sessions.  Within a nexthop,
sessions are kept in pools (``CachedSession.pool``, default ``""``): a
request takes only from its own pool (``smtp.requiretls``: the TLS demand
a session was negotiated for).

An idle session is closed (QUIT) after ``smtp_connection_cache_time_limit``.
A session is not stored again once it is older than
``smtp_connection_reuse_time_limit`` or, when
``smtp_connection_reuse_count_limit`` is above zero, once it has carried
that many transactions.  Whoever takes a session from the cache probes it
with ``session.reset()`` (RSET) before use; this module only keeps them.

Taking and storing are O(1) (a dict of deques): with many deliveries in
parallel through one relayhost, every transaction does one take and one
store.

SYNOPSIS

    cache = ConnectionCache.from_config(config, reactor)
    if cache.wants_caching(nexthop, destination, backlog): cache.store(entry)
    entry = cache.take(nexthop)            # or cache.take(nexthop, pool)
    cache.close_all()                      # at shutdown

DIAGNOSTICS: none raised.  ``store`` answers False (nothing kept: the
caller closes the session) when the reuse limits say it has served
enough; ``take`` answers None when nothing idle is kept under the key.

Owns: smtp_connection_cache_time_limit, smtp_connection_reuse_time_limit,
smtp_connection_reuse_count_limit, smtp_connection_cache_destinations,
smtp_connection_cache_on_demand (the policy in ``wants_caching``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from relayagent.common.config import Config, Settings

log = Logger(namespace="relayagent.smtp.conncache")


@dataclass(eq=False)
class CachedSession:
    """A session and what the cache must know about it.

    ``created``: when the connection was made (clock seconds).
    ``uses``: how many transactions it has carried, the current one
    included once it is handed out again (the log's ``conn_use``).
    ``pool``: the part of the nexthop's sessions it belongs to (the TLS
    demand it was negotiated for, ``smtp.requiretls``); ``take`` finds it
    only when asked for that pool.
    """

    session: Any
    nexthop: str
    created: float
    uses: int = 1
    pool: str = ""
    _timer: IDelayedCall | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CacheSettings(Settings):
    """The cache's parameters, bound once."""

    smtp_connection_cache_time_limit: float
    smtp_connection_reuse_time_limit: float
    smtp_connection_reuse_count_limit: int
    smtp_connection_cache_destinations: tuple[str, ...]
    smtp_connection_cache_on_demand: bool


class ConnectionCache:
    """Idle sessions by nexthop, each closed when idle too long."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        idle_limit: float,
        reuse_time_limit: float,
        reuse_count_limit: int = 0,
        always_cache: tuple[str, ...] = (),
        on_demand: bool = True,
    ) -> None:
        self.clock = clock
        self.idle_limit = idle_limit
        self.reuse_time_limit = reuse_time_limit
        self.reuse_count_limit = reuse_count_limit
        self.always_cache = frozenset(name.lower() for name in always_cache)
        self.on_demand = on_demand
        self._idle: dict[tuple[str, str], deque[CachedSession]] = {}  # by (nexthop, pool)
        self.stored = 0
        self.reused = 0
        # Lookups that found no usable session (the metrics' cache misses;
        # ``reused`` counts the hits).
        self.missed = 0

    @classmethod
    def from_config(cls, config: Config, clock: IReactorTime) -> ConnectionCache:
        """The cache the ``smtp_connection_cache_*`` parameters describe."""
        settings = CacheSettings.from_config(config)
        return cls(
            clock,
            idle_limit=settings.smtp_connection_cache_time_limit,
            reuse_time_limit=settings.smtp_connection_reuse_time_limit,
            reuse_count_limit=settings.smtp_connection_reuse_count_limit,
            always_cache=settings.smtp_connection_cache_destinations,
            on_demand=settings.smtp_connection_cache_on_demand,
        )

    # -- policy

    def wants_caching(self, nexthop: str, destination: str, backlog: int) -> bool:
        """Whether a session to ``nexthop`` should be kept after its
        transaction: always for ``smtp_connection_cache_destinations``
        (matched against the nexthop as written, its bare host, or the
        recipient domain), on demand when more requests wait for the same
        destination."""
        if self.idle_limit <= 0:
            return False
        if self.always_cache and self._listed(nexthop, destination):
            return True
        return self.on_demand and backlog > 0

    def _listed(self, nexthop: str, destination: str) -> bool:
        bare = nexthop.lower()
        if bare.startswith("["):
            bare = bare[1:].partition("]")[0]
        else:
            bare = bare.rpartition(":")[0] if bare.count(":") == 1 else bare
        return bool({nexthop.lower(), bare, destination.lower()} & self.always_cache)

    def reusable(self, entry: CachedSession) -> bool:
        """Whether a session may carry another transaction (reuse limits)."""
        if self.clock.seconds() - entry.created >= self.reuse_time_limit:
            return False
        if self.reuse_count_limit > 0 and entry.uses >= self.reuse_count_limit:
            return False
        return True

    # -- storing and taking

    def store(self, entry: CachedSession) -> bool:
        """Keep an idle session; False (and nothing kept) when the reuse
        limits say it has served enough: the caller then closes it."""
        if not self.reusable(entry) or self.idle_limit <= 0:
            return False
        key = (entry.nexthop, entry.pool)
        idle = self._idle.get(key)
        if idle is None:
            idle = self._idle[key] = deque()
        idle.append(entry)
        entry._timer = self.clock.callLater(self.idle_limit, self._expire, entry)
        self.stored += 1
        return True

    def take(self, nexthop: str, pool: str = "") -> CachedSession | None:
        """The most recently stored idle session of ``nexthop`` in
        ``pool``, removed from the cache; None when there is none.  Probe
        it with ``session.reset()`` before use."""
        key = (nexthop, pool)
        idle = self._idle.get(key)
        while idle:
            entry = idle.pop()  # the freshest: least likely to be timed out by the server
            if not idle:
                del self._idle[key]
            self._stop_timer(entry)
            if self.reusable(entry):
                entry.uses += 1
                self.reused += 1
                return entry
            self._close(entry)
            idle = self._idle.get(key)
        self.missed += 1
        return None

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close_all(self) -> None:
        """Close every idle session (service stop)."""
        for idle in self._idle.values():
            for entry in idle:
                self._stop_timer(entry)
                self._close(entry)
        self._idle.clear()

    # -- internals

    @staticmethod
    def _stop_timer(entry: CachedSession) -> None:
        if entry._timer is not None and entry._timer.active():
            entry._timer.cancel()
        entry._timer = None

    def _forget(self, entry: CachedSession) -> None:
        self._stop_timer(entry)
        idle = self._idle.get((entry.nexthop, entry.pool))
        if idle is None:
            return
        try:
            idle.remove(entry)  # short: bounded by the destination's concurrency
        except ValueError:
            pass
        if not idle:
            del self._idle[(entry.nexthop, entry.pool)]

    def _expire(self, entry: CachedSession) -> None:
        entry._timer = None
        self._forget(entry)
        self._close(entry)

    @staticmethod
    def _close(entry: CachedSession) -> None:
        try:
            closing = entry.session.quit()
        except Exception:  # noqa: BLE001 - a broken session is simply dropped
            log.failure("closing cached session to {nexthop}", nexthop=entry.nexthop)
            return
        if closing is not None and hasattr(closing, "addErrback"):
            closing.addErrback(lambda _failure: None)
