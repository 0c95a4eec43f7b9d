"""
Limits shared by a fleet through Redis: every node and worker naming the
same ``relayagent_redis`` and ``relayagent_redis_prefix`` shares each
destination key's concurrency, message rate, connection rate and
shaping actions (KumoMTA's shared throttles; the spools stay local).

- Concurrency: a slot is a lease, a member of the sorted set
  ``PREFIX slots:KEY`` scored by its expiry (Redis's clock, ``TIME``).
  Expired members are dropped by the next decision, so a node that dies
  frees its slots within ``relayagent_redis_lease``; a live node renews
  what it holds every third of it.
- Rates: the GCRA's arrival time in ``PREFIX rate:KEY`` and
  ``PREFIX conn:KEY``.  The whole decision (shaping, slot, connection
  rate, message rate) is one Lua script run on the server: one round
  trip, and no read-modify-write race between nodes.  The scripts read
  Redis's clock (``TIME``) before they write, which needs Redis 5 or
  later (scripts replicated by their effects).
- Shaping: ``PREFIX shape:KEY``, a hash with a TTL; the first node that
  sets it logs the action, and every node's decisions obey it.
- Nodes: ``PREFIX nodes``, a sorted set of the live processes (each
  worker is one) scored by expiry, renewed with the leases.
- When Redis cannot be reached (a decision not answered within
  ``relayagent_redis_timeout``), this process falls back to its own
  share of every limit (the limit / the number of nodes last seen) and
  keeps delivering, with one warning line; the renewal keeps asking, and
  one line says when the shared limits are back.

The client is txredisapi: Twisted-native, so it runs on whatever reactor
twistd gives (epoll by default), where redis-py's asyncio client would
need the asyncio reactor installed before anything else imports one;
its ``eval`` sends EVALSHA and falls back to EVAL on NOSCRIPT.

SYNOPSIS

    settings = RedisSettings.from_config(config)       # .wanted
    check_limits(config)                                 # at start-up: parse, connect nowhere
    limiter, keyer = make_limiter(config, reactor, mx_hosts=mx_hosts_from(dns_resolver))
    limiter = SharedLimiter(limit_settings, settings, reactor)
    limiter.start(); limiter.acquire(key); limiter.release(key, grant, n)
    limiter.shape(key, status); d = limiter.stop()
    parse_redis_address("redis://127.0.0.1:6379/0")

DIAGNOSTICS: ``parse_redis_address`` (and so ``SharedLimiter()``) raises
``ValueError`` for an address that is neither ``redis://host:port/db``
nor ``unix:/path``; once running nothing is raised: Redis's failures are
the fallback above.

Owns: relayagent_redis, relayagent_redis_prefix, relayagent_redis_lease,
relayagent_redis_timeout.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayagent.common import maillog as ralog
from relayagent.common.config import Config, Settings
from relayagent.common.status import Status
from relayagent.qmgr.interfaces import ILimiter
from relayagent.qmgr.limits import (
    Grant,
    Keyer,
    LimitSettings,
    LocalLimiter,
    MxHosts,
    ShapingRule,
    limits_wanted,
)
from relayagent.qmgr.rates import BURST

log = Logger(namespace="relayagent.qmgr")

MICRO = 1_000_000

# KEYS: slots, rate, conn, shape.  ARGV: member, lease, limit, message
# interval, connection interval (µs; 0: none), burst.
# Returns {1, 0} (granted), {0, -1} (no slot) or {0, wait in µs}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local interval = tonumber(ARGV[4])
local conn_interval = tonumber(ARGV[5])
local slack = tonumber(ARGV[6]) - 1
local shape = redis.call('HMGET', KEYS[4], 'action', 'value')
if shape[1] == 'suspend' then
  return {0, math.max(1, redis.call('PTTL', KEYS[4])) * 1000}
elseif shape[1] == 'concurrency' then
  limit = math.min(limit, tonumber(shape[2]))
elseif shape[1] == 'rate' then
  interval = math.max(interval, tonumber(shape[2]))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit then
  return {0, -1}
end
if conn_interval > 0 then
  local ctat = tonumber(redis.call('GET', KEYS[3]) or '0')
  if ctat - slack * conn_interval > now then
    return {0, ctat - slack * conn_interval - now}
  end
end
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat - slack * interval > now then
    return {0, tat - slack * interval - now}
  end
  tat = math.max(tat, now) + interval
  redis.call('SET', KEYS[2], string.format('%.0f', tat), 'PX',
             math.ceil((tat - now) / 1000) + 1000)
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) * 2)
return {1, 0}
"""

# KEYS: slots, conn.  ARGV: member, connections made, connection interval.
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
local n = tonumber(ARGV[2])
local interval = tonumber(ARGV[3])
if n > 0 and interval > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local ctat = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now) + n * interval
  redis.call('SET', KEYS[2], string.format('%.0f', ctat), 'PX',
             math.ceil((ctat - now) / 1000) + 1000)
end
return 1
"""

# KEYS: shape, rate.  ARGV: action, value, duration (ms), burst.
# Returns {1, ms} when this call set it, {0, ms left} when an action was
# in force.  A lower rate starts at once: the next message is due one new
# interval from now, with no burst first (as Gcra.slow_down).
SHAPE = """
local left = redis.call('PTTL', KEYS[1])
if left > 0 then
  return {0, left}
end
redis.call('HSET', KEYS[1], 'action', ARGV[1], 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[1] == 'rate' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local interval = tonumber(ARGV[2])
  local tat = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), now + tonumber(ARGV[4]) * interval)
  redis.call('SET', KEYS[2], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return {1, tonumber(ARGV[3])}
"""

# KEYS: nodes, then the slot sets of the leases held.  ARGV: node,
# lease (µs), then each lease's member.  Returns the live nodes.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) * 2)
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[i + 1])
end
return redis.call('ZCARD', KEYS[1])
"""


@dataclass(frozen=True, slots=True)
class RedisSettings(Settings):
    """Where the shared limits are, bound once."""

    relayagent_redis: str
    relayagent_redis_prefix: str
    relayagent_redis_lease: float
    relayagent_redis_timeout: float

    @property
    def wanted(self) -> bool:
        """Whether a Redis server is named."""
        return bool(self.relayagent_redis.strip())


@dataclass(frozen=True)
class RedisAddress:
    """``host``/``port``, or ``path`` for a Unix socket; and the database."""

    host: str | None = None
    port: int = 6379
    path: str | None = None
    db: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_address(text: str) -> RedisAddress:
    """``redis://host[:port][/db]`` or ``unix:/path[?db=N]``."""
    text = text.strip()
    expected = (f"relayagent_redis = {text}: expected redis://host:port/db "
                "or unix:/path/to/redis.sock")
    if text.startswith("unix:"):
        path, _, query = text[len("unix:"):].partition("?")
        db = 0
        if query:
            name, _, value = query.partition("=")
            if name != "db" or not value.isdigit():
                raise ValueError(expected)
            db = int(value)
        if not path.startswith("/"):
            raise ValueError(expected)
        return RedisAddress(path=path, db=db)
    parts = urlsplit(text)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(expected)
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(expected) from None
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(expected)
    return RedisAddress(host=parts.hostname, port=port, db=int(database or 0))


def connect(address: RedisAddress, timeout: float) -> Any:
    """A txredisapi lazy connection that reconnects by itself (within two
    seconds of the server's return)."""
    import txredisapi  # noqa: PLC0415 - only a fleet's processes need it (start-up time)

    if address.path:
        client = txredisapi.lazyUnixConnection(address.path, dbid=address.db, reconnect=True,
                                               connectTimeout=timeout, replyTimeout=timeout)
    else:
        client = txredisapi.lazyConnection(address.host, address.port, dbid=address.db,
                                           reconnect=True, connectTimeout=timeout,
                                           replyTimeout=timeout)
    factory = getattr(client, "_factory", None)
    if factory is not None:
        factory.maxDelay = 2  # back within 2 s of Redis, not its default minute
    return client


@implementer(ILimiter)
class SharedLimiter:
    """The limits of ``relayagent.qmgr.limits``, shared through Redis
    (module docstring).  ``client``: a txredisapi-like object with
    ``eval(script, keys, args)``; made from the settings when None."""

    def __init__(self, settings: LimitSettings, redis: RedisSettings, clock: IReactorTime, *,
                 client: Any = None, node: str | None = None,
                 rules: list[ShapingRule] | None = None) -> None:
        self.address = parse_redis_address(redis.relayagent_redis)
        self.prefix = redis.relayagent_redis_prefix
        self.lease = redis.relayagent_redis_lease
        self.timeout = redis.relayagent_redis_timeout
        self.clock = clock
        self.local = LocalLimiter(settings, clock, rules=rules)
        self._own_client = client is None
        self.client = client if client is not None else connect(self.address, self.timeout)
        self.node = node or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.up = True
        self.nodes_seen = 1
        self.held: dict[str, str] = {}  # lease member -> key
        self._counted_locally: set[str] = set()
        self._renewal: task.LoopingCall | None = None

    # -- life

    def start(self) -> Deferred[None]:
        """Register this node now (the Deferred fires when Redis has
        answered, or not), then renew every third of the lease."""
        self._renewal = task.LoopingCall(self.renew)
        self._renewal.clock = self.clock
        self._renewal.start(max(0.05, self.lease / 3), now=False)
        return self.renew()

    def stop(self) -> Deferred[None]:
        """Stop renewing, give back the slots held (best effort: what is
        not given back expires with its lease) and close the connection."""
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        self.local.stop()
        calls = [self._eval(RELEASE, [self._key("slots", key), self._key("conn", key)],
                            [member, 0, 0]) for member, key in self.held.items()] if self.up else []
        self.held.clear()

        def close(_: Any) -> Any:
            if self._own_client:
                return self.client.disconnect()
            return None

        done = DeferredList(calls, consumeErrors=True).addBoth(close)
        return done.addBoth(lambda _: None)

    def reconfigure(self, settings: LimitSettings, *, rules: list[ShapingRule] | None = None) -> None:
        """A reload's rates, concurrency limit and rules (the local
        limiter's, which the decisions in Redis read too); where Redis is
        and the lease stay until a restart."""
        self.local.reconfigure(settings, rules=rules)

    @property
    def on_change(self) -> Any:
        """The queue manager's pump, called when a local shaping action ends."""
        return self.local.on_change

    @on_change.setter
    def on_change(self, value: Any) -> None:
        """Set by the queue manager."""
        self.local.on_change = value

    # -- Redis

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        deferred = self.client.eval(script, keys, [str(arg) for arg in args])
        deferred.addTimeout(self.timeout, self.clock)
        return deferred

    def _lost(self, failure: Failure) -> None:
        """Redis did not answer: fall back to this node's share, once."""
        if not self.up:
            return
        self.up = False
        self.local.set_share(1.0 / max(1, self.nodes_seen))
        # The slots held in Redis count against the local share until
        # their deliveries end.
        for member, key in self.held.items():
            self.local.state(key).busy += 1
            self._counted_locally.add(member)
        ralog.log_warning(log, f"cannot reach the shared limits at {self.address} "
                          f"({_why(failure, self.timeout)}); using this node's share, "
                          f"1/{self.nodes_seen} of each limit, until it answers again",
                          service="qmgr")

    def _back(self) -> None:
        if self.up:
            return
        self.up = True
        self.local.set_share(1.0)
        log.info("shared limits at {address} reachable again: {nodes} node(s)",
                 address=str(self.address), nodes=self.nodes_seen)

    def renew(self) -> Deferred[None]:
        """Register this node, renew the leases held, count the nodes; a
        node that was cut off comes back here."""
        members = list(self.held)
        keys = [f"{self.prefix}nodes"] + [self._key("slots", self.held[m]) for m in members]
        deferred = self._eval(RENEW, keys, [self.node, int(self.lease * MICRO), *members])

        def counted(nodes: Any) -> None:
            self.nodes_seen = max(1, int(nodes))
            self._back()

        return deferred.addCallbacks(counted, self._lost)

    # -- ILimiter

    def acquire(self, key: str) -> Deferred[Grant]:
        """One decision: one round trip to Redis, or the local share."""
        if not self.up:
            return succeed(self.local.acquire_now(key))
        local = self.local
        message = local.message_rate.interval * MICRO if local.message_rate else 0
        connection = local.connection_rate.interval * MICRO if local.connection_rate else 0
        member = f"{self.node}:{uuid.uuid4().hex[:12]}"
        deferred = self._eval(
            ACQUIRE,
            [self._key(kind, key) for kind in ("slots", "rate", "conn", "shape")],
            [member, int(self.lease * MICRO), local.concurrency_limit, int(message),
             int(connection), BURST],
        )

        def decided(answer: Any) -> Grant:
            granted, wait = int(answer[0]), int(answer[1])
            if granted:
                if self.up:  # (lost meanwhile: not renewed, it expires by itself)
                    self.held[member] = key
                return Grant(True, lease=member)
            return Grant(False, None if wait < 0 else wait / MICRO)

        def failed(failure: Failure) -> Grant:
            self._lost(failure)
            return self.local.acquire_now(key)

        return deferred.addCallbacks(decided, failed)

    def release(self, key: str, grant: Grant, connections: int = 0) -> None:
        """Give the slot back (in Redis, or locally for a local grant)."""
        if grant.lease is None:
            self.local.release(key, grant, connections)
            return
        self.held.pop(grant.lease, None)
        if grant.lease in self._counted_locally:
            self._counted_locally.discard(grant.lease)
            self.local.release(key, grant, connections)
        if not self.up:
            return  # it expires with its lease
        interval = self.local.connection_rate.interval * MICRO if self.local.connection_rate else 0
        self._eval(RELEASE, [self._key("slots", key), self._key("conn", key)],
                   [grant.lease, connections, int(interval)]).addErrback(self._lost)

    def shape(self, key: str, status: Status) -> ShapingRule | None:
        """The matching rule's action, for every node; logged by the node
        that put it in force."""
        rule = self.local.rule_for(key, status)
        if rule is None:
            return None
        now = self.clock.seconds()
        if not self.up:
            self.local.apply(key, rule, status, until=now + rule.duration, log_it=True)
            return rule
        if rule.action == "rate" and rule.rate is not None:
            value: Any = int(rule.rate.interval * MICRO)
        else:
            value = rule.concurrency
        deferred = self._eval(SHAPE, [self._key("shape", key), self._key("rate", key)],
                              [rule.action, value, int(rule.duration * 1000), BURST])

        def set_(answer: Any) -> None:
            fresh, left = int(answer[0]), int(answer[1]) / 1000
            self.local.apply(key, rule, status, until=now + left, log_it=bool(fresh))

        def failed(failure: Failure) -> None:
            self._lost(failure)
            self.local.apply(key, rule, status, until=now + rule.duration, log_it=True)

        deferred.addCallbacks(set_, failed)
        return rule


def _why(failure: Failure, timeout: float) -> str:
    if failure.check(DeferredTimeout, CancelledError):
        return f"no answer within {timeout:g}s"
    text = str(failure.value) or type(failure.value).__name__
    return " ".join(text.split())[:120]


def check_limits(config: Config) -> None:
    """Parse every limit parameter now (start-up), connecting nowhere;
    raises ValueError or ConfigError naming what is wrong."""
    settings = LimitSettings.from_config(config)
    local = LocalLimiter(settings, task.Clock())  # parses the rates and the shaping tables
    del local
    if settings.smtp_destination_limit_key not in ("nexthop", "domain", "mx"):
        raise ValueError(f"smtp_destination_limit_key = {settings.smtp_destination_limit_key}: "
                         "expected nexthop, domain or mx")
    redis = RedisSettings.from_config(config)
    if redis.wanted:
        parse_redis_address(redis.relayagent_redis)


def make_limiter(config: Config, clock: IReactorTime, *, mx_hosts: MxHosts | None = None,
                 client: Any = None) -> tuple[ILimiter | None, Keyer | None]:
    """The limiter and keyer a queue manager needs, or (None, None) when no
    limit beyond Postfix's window is set.  A shared limiter is started."""
    settings = LimitSettings.from_config(config)
    redis = RedisSettings.from_config(config)
    if not limits_wanted(settings, shared=redis.wanted):
        return None, None
    keyer = Keyer(settings, mx_hosts=mx_hosts, clock=clock)
    if redis.wanted:
        shared = SharedLimiter(settings, redis, clock, client=client)
        shared.start()
        return shared, keyer
    return LocalLimiter(settings, clock), keyer


def mx_hosts_from(dns_resolver: Any) -> MxHosts:
    """``mx_hosts(domain)`` over a twisted.names resolver: the MX host
    names in preference order (empty: none)."""
    from twisted.names import dns  # noqa: PLC0415 - only mx mode needs it

    def mx_hosts(domain: str) -> Deferred[list[str]]:
        def names(result: Any) -> list[str]:
            records = sorted((answer.payload.preference, str(answer.payload.name))
                             for answer in result[0] if answer.type == dns.MX)
            return [name for _, name in records]

        return dns_resolver.lookupMailExchange(domain).addCallback(names)

    return mx_hosts
