"""
Limits per destination key: message and connection rates, a concurrency
cap shared by every destination that rolls up to the same key, and
shaping on the replies the destination gives (KumoMTA's MX rollup and
traffic shaping, in Postfix's parameter style).

- The key (``smtp_destination_limit_key``): ``nexthop`` (the queue
  manager's destination, the default), ``domain`` (the recipient domain
  of the request at the head of the destination's queue) or ``mx`` (the
  destination domain's MX host set).  The name found is then looked up
  in ``smtp_destination_rollup_maps`` (the name itself, then its parent
  domains as ``.parent``: ``.google.com`` matches every host under
  google.com; a ``regexp:`` table sees the name alone): the value is the
  shared key (``google``).  In ``mx`` mode each MX host is looked up in
  preference order and the first that maps gives the key; with none, the
  key is the sorted MX host set joined by commas (KumoMTA's site name).
- Per key: at most ``smtp_destination_concurrency_limit`` deliveries at
  once (counted per key, so every nexthop of a rollup shares it);
  ``smtp_destination_rate_limit`` messages (delivery requests) and
  ``smtp_connection_rate_limit`` new connections per unit of time, each a
  GCRA (``relayagent.qmgr.rates``).  A key over a limit waits: the queue
  manager gets the time the next unit is due and serves other keys.
- Shaping (``smtp_shaping_maps``): each table is a file of lines
  ``[KEY] /REGEX/FLAGS ACTION [VALUE] DURATION`` matched against
  ``"CODE ENHANCED TEXT"`` of a 4xx/5xx reply (``KEY``: only for that
  key; ``*`` or none: any); ``ACTION``: ``suspend``, ``concurrency N`` or
  ``rate N/UNIT``; the first matching rule wins.  The action holds for
  ``DURATION`` (a Postfix time, ``1h``); one log line when it starts and
  one when it ends.  ``builtin:providers`` names the table shipped in
  this package (``relayagent/qmgr/shaping_providers``).

SYNOPSIS

    settings = LimitSettings.from_config(config)
    if limits_wanted(settings): limiter = LocalLimiter(settings, clock)
    keyer = Keyer(settings, mx_hosts=None)        # keyer.key(nexthop, domain) -> Deferred[str]
    grant = limiter.acquire(key)                  # Deferred[Grant]: ok, or the wait
    limiter.release(key, grant, connections=1)
    limiter.shape(key, reply_status)              # a rule's action, logged once
    limiter.reconfigure(new_settings)             # a reload
    rules = load_shaping(settings.smtp_shaping_maps, base_dir)

DIAGNOSTICS: ``LimitSettings`` values that do not parse raise
``ValueError`` (the parameter and the expected form named) from
``LocalLimiter()`` and ``load_shaping`` (file and line named,
``ConfigError``); nothing is raised once running: an MX lookup that
fails keys by the domain.

Owns: default_destination_rate_limit, smtp_destination_rate_limit,
default_connection_rate_limit, smtp_connection_rate_limit,
smtp_destination_limit_key, smtp_destination_rollup_maps,
smtp_shaping_maps.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayagent.common.config import ConfigError, Settings, parse_time
from relayagent.common.maps import MapList, open_maps, read_table_file
from relayagent.common.status import Status
from relayagent.qmgr.interfaces import ILimiter
from relayagent.qmgr.rates import Gcra, Rate

log = Logger(namespace="relayagent.qmgr")

BUILTIN_PROVIDERS = "builtin:providers"
PROVIDERS_FILE = os.path.join(os.path.dirname(__file__), "shaping_providers")

# How long a key with no free slot waits before it asks again when no
# local delivery ends first (another node's slot is freed in Redis, and
# nothing tells this node): short, a round trip costs little.
SLOT_RETRY = 0.05

# How long an MX host set is kept for a domain (the key of mx mode).
MX_CACHE_TIME = 3600.0

# Keys remembered before the idle ones are dropped (a key with a rate
# debt outlives its last delivery until the debt is paid).
KEYS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class LimitSettings(Settings):
    """The limits per destination key, bound once."""

    smtp_destination_rate_limit: str
    smtp_connection_rate_limit: str
    smtp_destination_limit_key: str
    smtp_destination_rollup_maps: tuple[str, ...]
    smtp_shaping_maps: tuple[str, ...]
    smtp_destination_concurrency_limit: int
    base_dir: str | None = None


def limits_wanted(settings: LimitSettings, *, shared: bool = False) -> bool:
    """Whether any limit beyond Postfix's per-destination window is set
    (none: the queue manager keeps its old path, with no call per
    delivery)."""
    return bool(
        shared
        or settings.smtp_destination_rate_limit.strip()
        or settings.smtp_connection_rate_limit.strip()
        or settings.smtp_destination_limit_key != "nexthop"
        or settings.smtp_destination_rollup_maps
        or settings.smtp_shaping_maps
    )


# ---------------------------------------------------------------------------
# Keys


def rollup(maps: MapList, name: str) -> str | None:
    """``name``'s shared key in ``maps``: the name itself, then each parent
    domain as ``.parent`` (``.google.com`` for ``aspmx.l.google.com``)."""
    if not maps:
        return None
    name = name.rstrip(".").lower()
    value = maps.lookup(name)
    if value is not None:
        return value
    labels = name.split(".")
    for start in range(1, len(labels)):
        value = maps.lookup("." + ".".join(labels[start:]))
        if value is not None:
            return value
    return None


MxHosts = Callable[[str], "Deferred[Sequence[str]]"]


class Keyer:
    """The limit key of a destination's next request (module docstring).

    ``mx_hosts(domain)``: a Deferred firing with the domain's MX host
    names in preference order (empty: no MX); needed for ``mx`` mode.
    """

    def __init__(self, settings: LimitSettings, *, mx_hosts: MxHosts | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.mode = settings.smtp_destination_limit_key
        if self.mode not in ("nexthop", "domain", "mx"):
            raise ValueError(f"smtp_destination_limit_key = {self.mode}: expected nexthop, domain or mx")
        if self.mode == "mx" and mx_hosts is None:
            raise ValueError("smtp_destination_limit_key = mx needs an MX resolver")
        self.maps = open_maps(settings.smtp_destination_rollup_maps, base_dir=settings.base_dir)
        self.mx_hosts = mx_hosts
        self.clock = clock
        self._mx_keys: dict[str, tuple[str, float]] = {}

    def key(self, nexthop: str, domain: str) -> Deferred[str]:
        """The key of a request for ``domain`` through ``nexthop``."""
        if self.mode == "nexthop":
            return succeed(self._rolled(nexthop))
        if self.mode == "domain":
            return succeed(self._rolled(domain.lower()))
        return self._mx_key(domain.lower())

    def _rolled(self, name: str) -> str:
        return rollup(self.maps, name) or name

    def _mx_key(self, domain: str) -> Deferred[str]:
        now = self.clock.seconds() if self.clock is not None else 0.0
        cached = self._mx_keys.get(domain)
        if cached is not None and (self.clock is None or cached[1] > now):
            return succeed(cached[0])
        assert self.mx_hosts is not None

        def found(hosts: Sequence[str]) -> str:
            key = self.key_of_hosts(domain, hosts)
            if len(self._mx_keys) >= 10 * KEYS_KEPT:
                self._mx_keys.clear()  # bounded; the next lookups fill it again
            self._mx_keys[domain] = (key, now + MX_CACHE_TIME)
            return key

        def failed(_: object) -> str:
            return self._rolled(domain)  # no MX known: the domain is the key, not cached

        deferred = self.mx_hosts(domain)
        return deferred.addCallbacks(found, failed)

    def key_of_hosts(self, domain: str, hosts: Sequence[str]) -> str:
        """The key of ``domain`` whose MX hosts are ``hosts``."""
        if not hosts:
            return self._rolled(domain)
        for host in hosts:
            value = rollup(self.maps, host)
            if value is not None:
                return value
        return ",".join(sorted({host.rstrip(".").lower() for host in hosts}))


# ---------------------------------------------------------------------------
# Shaping rules


@dataclass(frozen=True)
class ShapingRule:
    """One line of a shaping table."""

    pattern: re.Pattern[str]
    action: str  # suspend, concurrency, rate
    duration: float
    concurrency: int = 0
    rate: Rate | None = None
    key: str | None = None
    source: str = ""

    def matches(self, key: str, text: str) -> bool:
        """Whether this rule applies to ``text`` ("CODE ENHANCED TEXT") for ``key``."""
        return (self.key is None or self.key == key) and self.pattern.search(text) is not None


_SHAPING_LINE = re.compile(r"^(?:(\S+)\s+)??/((?:[^/\\]|\\.)*)/([a-zA-Z]*)\s+(.*)$")


def parse_shaping(text: str, source: str) -> list[ShapingRule]:
    """The rules of one shaping table (module docstring); raises
    ConfigError naming the source and line."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}, line {number}"
        match = _SHAPING_LINE.match(line)
        if match is None:
            raise ConfigError(f"{where}: expected [KEY] /REGEX/FLAGS ACTION [VALUE] DURATION")
        key, pattern, flags, rest = match.groups()
        words = rest.split()
        # Case-insensitive unless "i" toggles it, as in regexp_table(5).
        ignore_case = flags.lower().count("i") % 2 == 0
        try:
            compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ConfigError(f"{where}: bad pattern /{pattern}/: {exc}") from None
        action = words[0].lower() if words else ""
        expected = {"suspend": 2, "concurrency": 3, "rate": 3}.get(action)
        if expected is None or len(words) != expected:
            raise ConfigError(f"{where}: expected suspend DURATION, concurrency N DURATION "
                              "or rate N/UNIT DURATION")
        try:
            duration = parse_time(words[-1])
        except ValueError:
            raise ConfigError(f"{where}: bad duration {words[-1]!r} (a time such as 30m or 1h)") from None
        concurrency, rate = 0, None
        try:
            if action == "concurrency":
                concurrency = int(words[1])
                if concurrency < 1:
                    raise ValueError(words[1])
            elif action == "rate":
                rate = Rate.parse(words[1], name="rate")
        except ValueError:
            raise ConfigError(f"{where}: bad value {words[1]!r} for {action}") from None
        rules.append(ShapingRule(compiled, action, duration, concurrency, rate,
                                 None if key in (None, "*") else key.lower(), where))
    return rules


def load_shaping(specs: Sequence[str], base_dir: str | None = None) -> list[ShapingRule]:
    """Every rule of the tables ``smtp_shaping_maps`` names, in order:
    ``builtin:providers``, or a file (``regexp:/path`` or a bare path)."""
    rules: list[ShapingRule] = []
    for spec in specs:
        if spec.lower() == BUILTIN_PROVIDERS:
            path, text = read_table_file(spec, PROVIDERS_FILE, None)
        else:
            kind, sep, name = spec.partition(":")
            if sep and kind.lower() != "regexp":
                raise ConfigError(f"smtp_shaping_maps: unsupported table {spec!r}: expected "
                                  f"{BUILTIN_PROVIDERS}, regexp:/path or a path")
            path, text = read_table_file(spec, name if sep else spec, base_dir)
        rules.extend(parse_shaping(text, path))
    return rules


def reply_text(status: Status) -> str:
    """What shaping rules match: "CODE ENHANCED TEXT" of a server reply."""
    text = status.reply or status.text
    code = str(status.code) if status.code is not None else ""
    if code and text.startswith(code):
        return text  # the reply as the server sent it
    return f"{code} {status.dsn} {text}".strip()


def short_reply(status: Status, limit: int = 80) -> str:
    """The reply for a log line, at most ``limit`` characters."""
    text = " ".join(reply_text(status).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def duration_text(seconds: float) -> str:
    """``1h``, ``30m``, ``45s``: the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# ---------------------------------------------------------------------------
# The local limiter


@dataclass
class Grant:
    """An answer to ``acquire``: ``ok`` (a slot and a message taken:
    release it when the delivery ends), or the seconds to wait (None:
    until a slot frees, or ``SLOT_RETRY``).  ``lease``: the shared
    limiter's lease member (None for a local grant)."""

    ok: bool
    wait: float | None = None
    lease: str | None = None


@dataclass
class Shape:
    """A shaping action in force for a key, until ``until``."""

    action: str
    until: float
    concurrency: int = 0
    rate: Rate | None = None
    logged: bool = True
    timer: IDelayedCall | None = None


@dataclass
class KeyState:
    """One key's counters and cells."""

    busy: int = 0
    messages: Gcra | None = None
    connections: Gcra | None = None
    shape: Shape | None = None

    @property
    def idle(self) -> bool:
        """Nothing to remember: no delivery, no rate debt, no action."""
        return self.busy == 0 and self.shape is None and all(
            cell is None or cell.idle for cell in (self.messages, self.connections))


def action_text(rule_or_shape: ShapingRule | Shape) -> str:
    """``suspended``, ``concurrency lowered to 2``, ``rate lowered to 50/m``."""
    if rule_or_shape.action == "suspend":
        return "suspended"
    if rule_or_shape.action == "concurrency":
        return f"concurrency lowered to {rule_or_shape.concurrency}"
    return f"rate lowered to {rule_or_shape.rate}"


@implementer(ILimiter)
class LocalLimiter:
    """This process's limits per key (module docstring).  ``share``: the
    fraction of every limit this process may use (1: all of it; a shared
    limiter's fallback sets 1/nodes)."""

    def __init__(self, settings: LimitSettings, clock: IReactorTime, *,
                 rules: Sequence[ShapingRule] | None = None, share: float = 1.0) -> None:
        self.clock = clock
        self.message_rate = Rate.parse(settings.smtp_destination_rate_limit,
                                       name="smtp_destination_rate_limit")
        self.connection_rate = Rate.parse(settings.smtp_connection_rate_limit,
                                          name="smtp_connection_rate_limit")
        self.concurrency_limit = settings.smtp_destination_concurrency_limit
        self.rules = list(rules) if rules is not None else load_shaping(
            settings.smtp_shaping_maps, settings.base_dir)
        self.share = share
        self.keys: dict[str, KeyState] = {}
        self.on_change: Callable[[], None] | None = None  # the queue manager's pump

    def reconfigure(self, settings: LimitSettings, *, rules: Sequence[ShapingRule] | None = None) -> None:
        """A reload's limits from the next decision on: the rates, the
        concurrency limit and the shaping rules (raises ``ValueError`` or
        ``ConfigError`` with nothing changed).  The arrival times earned
        stay, and so do the shaping actions in force until their end."""
        message_rate = Rate.parse(settings.smtp_destination_rate_limit,
                                  name="smtp_destination_rate_limit")
        connection_rate = Rate.parse(settings.smtp_connection_rate_limit,
                                     name="smtp_connection_rate_limit")
        new_rules = list(rules) if rules is not None else load_shaping(
            settings.smtp_shaping_maps, settings.base_dir)
        self.message_rate, self.connection_rate = message_rate, connection_rate
        self.concurrency_limit = settings.smtp_destination_concurrency_limit
        self.rules = new_rules
        for state in self.keys.values():
            rate = self.message_rate_of(state)
            if rate is None:
                state.messages = None
            elif state.messages is None:
                state.messages = Gcra(rate, self.clock)
            else:
                state.messages.set_rate(rate)
            if connection_rate is None:
                state.connections = None
            elif state.connections is None:
                state.connections = Gcra(connection_rate.scaled(self.share), self.clock)
            else:
                state.connections.set_rate(connection_rate.scaled(self.share))

    # -- limits as they are now

    def set_share(self, share: float) -> None:
        """Use ``share`` of every limit from now on (the rates' cells keep
        the arrival time they earned)."""
        if share == self.share:
            return
        self.share = share
        for state in self.keys.values():
            if state.messages is not None:
                rate = self.message_rate_of(state)
                if rate is not None:
                    state.messages.set_rate(rate)
            if state.connections is not None and self.connection_rate is not None:
                state.connections.set_rate(self.connection_rate.scaled(share))

    def message_rate_of(self, state: KeyState) -> Rate | None:
        """The message rate for a key now: this process's share of the
        configured rate, or of a shaping action's if that is slower."""
        shaped = None
        if state.shape is not None and state.shape.action == "rate" and state.shape.rate is not None:
            shaped = state.shape.rate.scaled(self.share)
        if self.message_rate is None:
            return shaped
        rate = self.message_rate.scaled(self.share)
        if shaped is not None and shaped.interval > rate.interval:
            return shaped
        return rate

    def concurrency_of(self, state: KeyState) -> int:
        """The cap on deliveries for a key now (at least 1)."""
        limit = self.concurrency_limit
        if state.shape is not None and state.shape.action == "concurrency":
            limit = min(limit, state.shape.concurrency)
        return max(1, math.floor(limit * self.share))

    def state(self, key: str) -> KeyState:
        """``key``'s counters, made when first asked for."""
        state = self.keys.get(key)
        if state is None:
            if len(self.keys) >= KEYS_KEPT:
                self._forget_idle()
            state = KeyState()
            if self.message_rate is not None:
                state.messages = Gcra(self.message_rate.scaled(self.share), self.clock)
            if self.connection_rate is not None:
                state.connections = Gcra(self.connection_rate.scaled(self.share), self.clock)
            self.keys[key] = state
        return state

    # -- ILimiter

    def acquire(self, key: str) -> Deferred[Grant]:
        """A slot and a message for ``key`` now, or how long to wait."""
        return succeed(self.acquire_now(key))

    def acquire_now(self, key: str) -> Grant:
        """``acquire``, without the Deferred."""
        state = self.state(key)
        now = self.clock.seconds()
        if state.shape is not None and state.shape.action == "suspend":
            return Grant(False, max(0.0, state.shape.until - now))
        if state.busy >= self.concurrency_of(state):
            return Grant(False, None)
        if state.connections is not None:
            wait = state.connections.due()
            if wait > 0:
                return Grant(False, wait)
        if state.messages is not None:
            wait = state.messages.take()
            if wait > 0:
                return Grant(False, wait)
        state.busy += 1
        return Grant(True)

    def release(self, key: str, grant: Grant, connections: int = 0) -> None:
        """The delivery ``grant`` allowed is over; it made ``connections``."""
        state = self.keys.get(key)
        if state is None:
            return
        state.busy = max(0, state.busy - 1)
        if state.connections is not None:
            state.connections.charge(connections)
        self._forget_if_idle(key, state)

    def _forget_idle(self) -> None:
        """Drop the keys with nothing to remember (memory stays bounded by
        the keys in use, not by every key ever seen)."""
        for key in [key for key, state in self.keys.items() if state.idle]:
            del self.keys[key]

    def _forget_if_idle(self, key: str, state: KeyState) -> None:
        if state.idle and self.keys.get(key) is state:
            del self.keys[key]

    def rule_for(self, key: str, status: Status) -> ShapingRule | None:
        """The first rule that matches ``status`` for ``key``, or None."""
        if not self.rules or status.code is None and status.reply is None:
            return None
        text = reply_text(status)
        for rule in self.rules:
            if rule.matches(key, text):
                return rule
        return None

    def shape(self, key: str, status: Status) -> ShapingRule | None:
        """Apply the rule that matches ``status`` (logged when it starts),
        unless an action is in force for ``key`` already; the rule, or None."""
        rule = self.rule_for(key, status)
        if rule is not None:
            self.apply(key, rule, status, until=self.clock.seconds() + rule.duration, log_it=True)
        return rule

    def apply(self, key: str, rule: ShapingRule, status: Status | None, *, until: float,
              log_it: bool) -> bool:
        """Put ``rule``'s action in force for ``key`` until ``until``; False
        when an action is in force already (it stays as it is)."""
        state = self.state(key)
        if state.shape is not None:
            return False
        now = self.clock.seconds()
        shape = Shape(rule.action, until, rule.concurrency, rule.rate, logged=log_it)
        state.shape = shape
        rate = self.message_rate_of(state)
        if rate is not None:
            if state.messages is None:
                state.messages = Gcra(rate, self.clock)
            if rule.action == "rate":
                state.messages.slow_down(rate)  # no burst right after the reply
            else:
                state.messages.set_rate(rate)
        shape.timer = self.clock.callLater(max(0.0, until - now), self._unshape, key, shape)
        if log_it:
            after = f' after "{short_reply(status)}"' if status is not None else ""
            log.info("destination {key}: {action} for {duration}{after}", key=key,
                     action=action_text(rule), duration=duration_text(rule.duration), after=after)
        return True

    def _unshape(self, key: str, shape: Shape) -> None:
        state = self.keys.get(key)
        if state is None or state.shape is not shape:
            return
        state.shape = None
        if state.messages is not None:
            rate = self.message_rate_of(state)
            if rate is not None:
                state.messages.set_rate(rate)
            else:
                state.messages = None
        if shape.logged:
            if shape.action == "suspend":
                back = "resumed"
            elif shape.action == "concurrency":
                back = f"concurrency back to {self.concurrency_of(state)}"
            else:
                back = f"rate back to {self.message_rate.scaled(self.share)}" if self.message_rate else "rate limit lifted"
            log.info("destination {key}: {back}", key=key, back=back)
        self._forget_if_idle(key, state)
        if self.on_change is not None:
            self.on_change()

    def stop(self) -> Deferred[None]:
        """Cancel the timers (service stop)."""
        for state in self.keys.values():
            if state.shape is not None and state.shape.timer is not None and state.shape.timer.active():
                state.shape.timer.cancel()
        return succeed(None)

