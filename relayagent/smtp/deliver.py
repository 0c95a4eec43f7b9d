"""
smtp(8)'s entry point: one delivery request, from the domain to a final
status per recipient (Postfix: smtp.c's deliver_message, smtp_connect.c's
session loop with the connection cache, smtp_chat.c's notify_classes
problems).

The queue manager (``relayagent.qmgr.delivery``) builds an
``SmtpRequest`` (envelope, recipients, domain, backlog) and calls
``SmtpAgent.deliver``; it gets one ``SmtpResult``
(``relayagent.smtp.result``) back.  Nothing here calls back up.  Here:

- route: the nexthop list of the domain (``resolve.NexthopResolver
  .nexthops``, remembered per domain by ``Router``);
- a cached session for the first nexthop (``conncache``), if any, whose
  TLS decision still holds for its server (``SessionSecurity
  .still_holds``: the TLSA records and MTA-STS policy it was made
  under); it is the final server for the request (the destination was
  just working);
  the RSET probe goes in the transaction's first write, and a session
  that fails it delivered nothing and is dropped (the next one, or a new
  connection, is tried);
- else ``connect.Connector.deliver``: the addresses, the fallback across
  them and across the fallback relays, with the transaction step below
  for each session it makes;
- the transaction step: ``session.deliver``, then the session is kept in
  the cache (backlog or ``smtp_connection_cache_destinations``, within
  the reuse limits) or QUIT; each recipient's last transaction
  (connection use, DSN offered, times) and the ``notify_classes``
  problems (with the session's transcript) go into the result;
- ``site_failure``: no session was made and a recipient failed softly
  without a server (the queue manager throttles the destination).

``SessionFactories`` builds one connection's ESMTP session with the
security hook of its nexthop (``security.SecurityPolicy``), made for the
message's TLS demand (``smtp.requiretls``: REQUIRETLS raises the level,
``TLS-Required: No`` lowers it).  The demand also picks the connection
cache's pool: a REQUIRETLS message reuses only sessions checked for
REQUIRETLS, and a session downgraded for ``TLS-Required: No`` carries no
other mail.  A REQUIRETLS message is checked once more before its
transaction (verified TLS, REQUIRETLS offered), whatever session it got.

SYNOPSIS: ``SmtpAgent`` (``from_config``, ``deliver``, ``route``,
``close``), ``SmtpRequest``, ``Router``, ``SessionFactories``; the result
types come from ``relayagent.smtp.result``.

DIAGNOSTICS: ``deliver`` does not fail for a delivery problem; every
recipient gets an outcome: the route's ``DeliveryFailure`` status (no
site failure), 4.3.0 "no nexthop", 4.3.0 "mail system error: no delivery
status for this recipient", or what the connection layer and the session
said.  A queue file found corrupt while the body was sent is
``SmtpResult.corrupt``.  Anything else (a bug) fails the Deferred.
``route`` (the queue manager's) raises ``DeliveryFailure``: the
resolver's, or 4.3.0 "mail transport unavailable".

Owns no parameters: the connection cache's are ``conncache``'s, the
connection's ``connect``'s, the session's ``channel.SessionSettings``;
requiretls_enable and tls_required_enable are ``smtp.requiretls``'s.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.channel import ServerInfo, SessionSettings
from relayagent.smtp.conncache import CachedSession, ConnectionCache
from relayagent.smtp.connect import Connector
from relayagent.smtp.requiretls import RequireTLSSettings, TLSDemand, demand_of, session_problem
from relayagent.smtp.resolve import NexthopResolver
from relayagent.smtp.result import RecipientOutcome, SessionProblem, SmtpResult, Transmission
from relayagent.smtp.security import SecurityPolicy, SessionSecurity
from relayagent.smtp.session import SMTPSession, SMTPSessionFactory
from relayagent.spool import CorruptQueueFile

log = Logger(namespace="relayagent.smtp.deliver")

# Domains whose destination key is remembered (route); an LRU bound.
ROUTE_CACHE_SIZE = 10000


@dataclass(frozen=True)
class SmtpRequest:
    """What smtp needs for one request: the message's envelope (its
    content is read from the queue file), the recipients to try (not
    done yet), their domain (routed here) and ``backlog``, how many more
    requests wait for the destination (the connection cache caches on
    demand)."""

    envelope: Envelope
    domain: str
    recipients: tuple[Recipient, ...]
    backlog: int = 0


class Router:
    """``nexthops(domain)``: the resolver's nexthop list, remembered per
    domain (an LRU): the answer depends only on main.cf and its tables,
    and both the queue manager's route and each request ask."""

    def __init__(self, resolver: NexthopResolver, size: int = ROUTE_CACHE_SIZE) -> None:
        self.resolver = resolver
        self.size = size
        self._known: OrderedDict[str, tuple[Any, ...]] = OrderedDict()

    def nexthops(self, domain: str) -> tuple[Any, ...]:
        """The resolver's nexthops for ``domain``, from the cache when known
        (the least recently used entry is dropped past ``size``).  What the
        resolver raises (a bad domain, a table failure) is raised, and not
        remembered."""
        known = self._known.get(domain)
        if known is not None:
            self._known.move_to_end(domain)
            return known
        # Failures (a bad domain, a table problem) are not remembered.
        known = tuple(self.resolver.nexthops(domain))
        self._known[domain] = known
        if len(self._known) > self.size:
            self._known.popitem(last=False)
        return known


class SessionFactories:
    """``session_factory_for(server)`` for the connector: one security
    hook per nexthop, shared by its sessions."""

    def __init__(self, config: Config, reactor: Any, security: SecurityPolicy | None) -> None:
        self.settings = SessionSettings.from_config(config)
        self.reactor = reactor
        self.security = security
        self._hooks: dict[str, Any] = {}

    def __call__(self, server: ServerInfo, *, plaintext: bool = False,
                 tls_demand: TLSDemand = TLSDemand.POLICY) -> SMTPSessionFactory | Deferred[SMTPSessionFactory]:
        """The factory of one connection to ``server``; with a hook that
        decides before connecting (``security.SessionSecurity.prepare``),
        a Deferred of it, which fails with the hook's ``DeliveryFailure``
        for a server not to connect to."""
        hook = None
        if self.security is not None:
            hook = self._hooks.get(server.nexthop)
            if hook is None:
                hook = self._hooks[server.nexthop] = self.security.for_nexthop(server.nexthop)
            hook = hook.for_demand(tls_demand)
            if plaintext:
                # The retry after a failed handshake at TLS level may.
                hook = hook.plaintext_fallback()
        prepare = getattr(hook, "prepare", None)
        if prepare is None:
            return SMTPSessionFactory(self.settings, self.reactor, server, security=hook)
        # The decision travels with the session, not the hook: a hook
        # that wraps ours (qmgr.transfer's) keeps its own negotiate.
        return prepare(server).addCallback(
            lambda preparation: SMTPSessionFactory(self.settings, self.reactor, server, security=hook,
                                                   preparation=preparation)
        )


class _Job:
    """One request in progress: its recipients by index and the result
    being filled in."""

    def __init__(self, request: SmtpRequest) -> None:
        self.request = request
        self.by_index = {r.index: r for r in request.recipients}
        self.result = SmtpResult()
        self.demand = TLSDemand.POLICY  # what the message asks of TLS (smtp.requiretls)


class SmtpAgent:
    """smtp(8) for the queue manager: built once at start-up.

    ``nexthops(domain)``: the nexthop list (``Router.nexthops``);
    ``connector``: ``connect.Connector`` (or anything with its
    ``deliver(resolver, nexthops, indexes, transact)``); ``resolver``:
    what the connector looks addresses up with; ``cache``: the connection
    cache (None: no caching).
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        nexthops: Callable[[str], Sequence[Any]],
        connector: Any,
        resolver: NexthopResolver | None = None,
        cache: ConnectionCache | None = None,
        requiretls: RequireTLSSettings | None = None,
    ) -> None:
        self.clock = clock
        self.nexthops = nexthops
        self.connector = connector
        self.resolver = resolver
        self.cache = cache
        self.requiretls = requiretls or RequireTLSSettings(requiretls_enable=True, tls_required_enable=True)

    @classmethod
    def from_config(cls, config: Config, reactor: Any, *, resolver: NexthopResolver,
                    security: SecurityPolicy | None = None) -> SmtpAgent:
        """The real thing: resolver, connector over the ESMTP session
        factory and the security policy, connection cache, router."""
        router = Router(resolver)
        return cls(
            reactor,
            nexthops=router.nexthops,
            connector=Connector(reactor, config, SessionFactories(config, reactor, security)),
            resolver=resolver,
            cache=ConnectionCache.from_config(config, reactor),
            requiretls=RequireTLSSettings.from_config(config),
        )

    def route(self, recipient: Recipient) -> str:
        """The queue manager's destination key of ``recipient``: the first
        nexthop of its domain, as written (``[127.0.0.1]:2525``,
        ``example.com``)."""
        try:
            nexthops = self.nexthops(recipient.domain)
        except DeliveryFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - a table problem defers, never crashes the queue
            raise DeliveryFailure(Status("4.3.0", f"mail transport unavailable: {exc}")) from None
        if not nexthops:
            raise DeliveryFailure(Status("4.3.0", "mail transport unavailable: no nexthop"))
        return str(nexthops[0])

    def close(self) -> None:
        """Close the cached sessions (service stop)."""
        if self.cache is not None:
            self.cache.close_all()

    def deliver(self, request: SmtpRequest) -> Deferred[SmtpResult]:
        """Deliver ``request`` (module docstring): one ``SmtpResult``."""
        return Deferred.fromCoroutine(self._deliver(_Job(request)))

    async def _deliver(self, job: _Job) -> SmtpResult:
        request = job.request
        result = job.result
        try:
            nexthops = list(self.nexthops(request.domain))
        except DeliveryFailure as failure:
            return self._all(job, failure.status)
        if not nexthops:
            return self._all(job, Status("4.3.0", "no nexthop"))
        nexthop_key = str(nexthops[0])
        demand = job.demand = demand_of(request.envelope, self.requiretls)

        def transact(session: Any, indexes: list[int]) -> Deferred[dict[int, Status]]:
            entry = self._entry_for(session, nexthop_key, demand)
            return Deferred.fromCoroutine(self._transact(job, entry, [job.by_index[i] for i in indexes]))

        # Only with a demand: a connector without the keyword still works.
        options = {} if demand is TLSDemand.POLICY else {"tls_demand": demand}
        try:
            reused = False
            while self.cache is not None and (cached := self.cache.take(nexthop_key, _pool(demand))) is not None:
                if not await _still_holds(cached.session):
                    # Made under a TLS decision that no longer holds for
                    # its server (TLSA records, an MTA-STS policy).
                    _quit_quietly(cached.session)
                    continue
                # A reused session is the final server for this request
                # (Postfix would try the next MX on a soft error; with a
                # session cached the destination was just working).
                statuses = await self._transact(job, cached, list(request.recipients), probe=True)
                if statuses is None:
                    continue
                server = cached.session.server
                result.outcomes = {
                    index: RecipientOutcome(status.final(), server) for index, status in statuses.items()
                }
                result.sessions = 1
                reused = True
                break
            if not reused:
                part = await self.connector.deliver(self.resolver, nexthops, list(job.by_index), transact, **options)
                result.outcomes = part.outcomes
                result.attempts = part.attempts
                result.sessions = part.sessions
                result.found_myself = part.found_myself
        except CorruptQueueFile as exc:
            result.outcomes = {}
            result.corrupt = exc.reason
            return result
        for recipient in request.recipients:
            outcome = result.outcomes.get(recipient.index)
            if outcome is None:
                outcome = result.outcomes[recipient.index] = RecipientOutcome(
                    Status("4.3.0", "mail system error: no delivery status for this recipient"), None
                )
            if (result.sessions == 0 and outcome.server is None and result.site_failure is None
                    and outcome.status.soft):
                result.site_failure = outcome.status
        return result

    def _all(self, job: _Job, status: Status) -> SmtpResult:
        """Every recipient with ``status`` and no server (not routed)."""
        job.result.outcomes = {r.index: RecipientOutcome(status, None) for r in job.request.recipients}
        return job.result

    def _entry_for(self, session: Any, nexthop_key: str, demand: TLSDemand = TLSDemand.POLICY) -> CachedSession:
        return CachedSession(session, nexthop=nexthop_key, created=self.clock.seconds(), pool=_pool(demand))

    async def _transact(self, job: _Job, entry: CachedSession, recipients: list[Recipient],
                        *, probe: bool = False) -> dict[int, Status] | None:
        """One transaction on a greeted session; keeps or closes it.
        ``probe``: a cached session, RSET first; None when that failed
        (the session is closed and nothing was delivered)."""
        request = job.request
        connected = self.clock.seconds()
        cache = self.cache
        keep = (
            cache is not None
            and cache.wants_caching(entry.nexthop, request.domain, request.backlog)
            and cache.reusable(entry)
            and (cache.reuse_count_limit <= 0 or entry.uses < cache.reuse_count_limit)
        )
        session = entry.session
        if job.demand is TLSDemand.REQUIRETLS and not getattr(session, "requiretls_cleared", False):
            problem = session_problem(session, getattr(session, "tls_outcome", None))
            if problem is not None:
                # Not this server (nothing was sent): the connector tries
                # the next one, and at the last the message is returned.
                _quit_quietly(session)
                return {recipient.index: problem for recipient in recipients}
        try:
            if isinstance(session, SMTPSession):
                # Its coroutine, awaited here: no Deferred of ``deliver``.
                result = await session.run_transaction(request.envelope, recipients, last=not keep, probe=probe)
            else:
                result = await session.deliver(request.envelope, recipients, last=not keep, probe=probe)
        except BaseException:
            _quit_quietly(session)
            raise
        if result.probe_failed:
            _quit_quietly(session)
            return None
        done = self.clock.seconds()
        job.result.problems.extend(_problems(session, result.recipients.values()))
        transmission = Transmission(
            conn_use=entry.uses,
            dsn_offered="DSN" in getattr(session, "extensions", {}),
            connected=connected,
            done=done,
        )
        for recipient in recipients:
            job.result.transmissions[recipient.index] = transmission
        if not (keep and result.session_usable and cache is not None and cache.store(entry)):
            _quit_quietly(session)
        return dict(result.recipients)


def _pool(demand: TLSDemand) -> str:
    """The connection cache pool of a message's sessions: ordinary mail
    in the default one, each TLS demand in its own."""
    return "" if demand is TLSDemand.POLICY else demand.value


def _problems(session: Any, statuses: Any) -> list[SessionProblem]:
    """smtp(8)'s ``notify_classes`` problems of one transaction: the
    first status of each class, by class, with the session transcript."""
    raised: dict[str, Status] = {}
    for status in statuses:
        cls = status.notify_class
        if cls and cls not in raised:
            raised[cls] = status
    if not raised:
        return []
    transcript = tuple(session.transcript.lines())
    namaddr = session.server.namaddr
    return [SessionProblem(cls, status, transcript, namaddr) for cls, status in sorted(raised.items())]


async def _still_holds(session: Any) -> bool:
    """Whether a cached session's security hook (``still_holds``) would
    make the same TLS decision for its server now; True for a hook
    without the check."""
    security = getattr(session, "security", None)
    check = getattr(security, "still_holds", None)
    if check is None:
        return True
    try:
        if isinstance(security, SessionSecurity):
            # Its coroutine, awaited here: no Deferred (once per reuse).
            return await security.still_holds_coroutine(session)
        return bool(await check(session))
    except Exception:  # noqa: BLE001 - a broken check: make a new connection instead
        log.failure("checking the TLS policy of a cached session to {server}", server=str(session.server))
        return False


def _quit_quietly(session: Any) -> None:
    try:
        closing = session.quit()
    except Exception:  # noqa: BLE001 - the session is gone either way
        return
    if isinstance(closing, Deferred):
        closing.addErrback(lambda _failure: None)
