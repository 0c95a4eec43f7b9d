"""
Connection fallback across mail exchanger addresses (Postfix: smtp_connect.c,
the fallback rules of smtp_trouble.c).

Given the address list of a nexthop (``relayagent.smtp.resolve``), connect to
each address in turn, with explicit ``TCP4ClientEndpoint`` /
``TCP6ClientEndpoint`` (timeout ``smtp_connect_timeout``, source address
``smtp_bind_address`` / ``smtp_bind_address6``), until a server greets and
finishes EHLO:

- connection refused, timed out or lost before the greeting: 4.4.1/4.4.2,
  the reason is kept ("connect to mx1.example.com[192.0.2.1]:25:
  Connection refused"), next address;
- a 4xx greeting: always the next address (``smtp_skip_4xx_greeting`` is
  fixed to yes, as in Postfix since 2.1);
- a 5xx greeting: the next address as if it were 4xx with
  ``smtp_skip_5xx_greeting = yes``, else it is the outcome (a bounce);
- every other failure before the session is usable (EHLO/HELO refused,
  TLS/AUTH failures) moves on when soft and is the outcome when hard;
- a server that the security hook rules out before the connection
  (``session_factory_for`` gave a Deferred that failed: a TLSA lookup
  error, ``dane-only`` without usable TLSA records, an MX host outside
  an enforced MTA-STS policy; ``smtp.security``'s ``prepare``) is
  skipped unconnected, as Postfix's smtp_connect.c skips it, with that
  reason.

IPv4 and IPv6 side by side (RFC 8305 style, which Postfix does not do):
within one MX preference that has addresses of both families, the family
of the first address gets a head start of ``smtp_connection_attempt_delay``;
if its attempt has not connected by then (or has failed), the other
family's first address is tried beside it.  Each family then goes on down
its own addresses; the first session to greet wins and the others are
cancelled (a connection in progress is dropped, a late greeted session
gets QUIT), and their addresses stay available for a later session.

``deliver_with_fallback`` is the loop smtp(8)'s delivery step
(``relayagent.smtp.deliver``) runs for one nexthop: connect, hand the
session and the pending recipients to its ``transact`` step (the mail
transaction, in the same package), and send the recipients whose status is soft to the
next address while this is not the final server (the last address, or
``smtp_mx_session_limit`` sessions reached).  Hard errors are final at
once.  ``deliver`` runs that over the nexthop list (the destination, then
``smtp_fallback_relay``) with Postfix's rule that a hard failure of
``relayhost`` or a fallback relay that was not reached (not found, no
address) becomes 4.3.5 (deferred as a configuration problem, not
bounced); a relay that answered and refused (5xx HELO) bounces.

A status marked ``hard_when_final`` (REQUIRETLS, ``smtp.requiretls``)
moves on to the next address like any soft one and becomes hard
(``Status.final``) as the outcome of the final server.  ``tls_demand``
(``deliver``, ``deliver_with_fallback``, ``plan``) is what the message
asks of TLS; it is handed to ``session_factory_for(server,
tls_demand=...)`` for each connection.

SYNOPSIS: ``Connector`` (``connect``, ``plan``, ``deliver_with_fallback``,
``deliver``), ``ConnectionPlan``, ``ConnectFailure``, ``Transact``,
``relay_configuration_status``, ``describe_connect_error``.

DIAGNOSTICS: ``connect`` fails with ``ConnectFailure`` (the last
address's status, every skipped address in ``attempts``);
``deliver_with_fallback`` and ``deliver`` never fail for a delivery
problem: an ``SmtpResult`` (``relayagent.smtp.result``) with a status for
every recipient (4.4.1/4.4.2 unreachable, 4.3.5 relay problem, the
server's own status otherwise); an exception of the transaction step
other than ``DeliveryFailure`` (a corrupt queue file) goes through.

Owns (``ConnectSettings``): smtp_connect_timeout, smtp_bind_address,
smtp_bind_address6, smtp_skip_5xx_greeting, smtp_mx_session_limit,
smtp_connection_attempt_delay; smtp_skip_4xx_greeting is fixed to yes.
Each server's ``ServerInfo.policy_domain`` names the recipient domain
whose MTA-STS policy applies to it (``mtasts.sts_policy_domain``: MX
delivery to the domain itself only), for the security hook.
The address list comes already cut to smtp_mx_address_limit
(``smtp.resolve``): every address given is tried.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayagent.common.config import Config, ConfigError, Settings
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.interfaces import IConnector
from relayagent.smtp.mtasts import sts_policy_domain
from relayagent.smtp.resolve import MailExchangerAddress, Nexthop, NexthopResolver
from relayagent.smtp.result import AttemptFailure, RecipientOutcome, SmtpResult

log = Logger(namespace="relayagent.smtp.connect")

# The stage name relayagent.smtp.session gives a refusal in the server greeting.
GREETING_STAGE = "CONNECT"

# session_factory_for(server) builds the factory of one connection; the
# plaintext retry at TLS level may calls session_factory_for(server,
# plaintext=True).
SessionFactoryFor = Callable[..., IProtocolFactory]
# The transaction step of this package (relayagent.smtp.deliver, as
# smtp_connect.c calls smtp_xfer): ``transact(session, indexes) ->
# Deferred[{index: Status}]`` on a greeted session.
Transact = Callable[[Any, list[int]], "Deferred[dict[int, Status]]"]


class ConnectFailure(DeliveryFailure):
    """No address gave a usable session.

    ``status`` is the outcome (the last failure, as in Postfix);
    ``attempts`` holds every skipped address's reason; ``final_server``
    is True when the failure was at a server after which nothing else may
    be tried (a hard greeting or EHLO refusal).
    """

    def __init__(self, status: Status, attempts: Sequence[AttemptFailure], *, final_server: bool = False) -> None:
        super().__init__(status, skip_to_next=not final_server)
        self.attempts = tuple(attempts)
        self.final_server = final_server


def relay_configuration_status(status: Status) -> Status:
    """Postfix's 4.3.5 for a hard failure of relayhost or a fallback relay:
    the text stays, the mail is deferred."""
    if not status.hard:
        return status
    return dataclasses.replace(status, dsn="4.3.5")


def describe_connect_error(reason: BaseException) -> str:
    """The strerror-style text Postfix logs after "connect to host[addr]:port: "."""
    if isinstance(reason, net_error.ConnectionRefusedError):
        return os.strerror(errno.ECONNREFUSED)
    if isinstance(reason, (net_error.TimeoutError, net_error.TCPTimedOutError)):
        return os.strerror(errno.ETIMEDOUT)
    if isinstance(reason, net_error.NoRouteError):
        return os.strerror(errno.EHOSTUNREACH)
    if isinstance(reason, net_error.ConnectError) and isinstance(reason.osError, int):
        return os.strerror(reason.osError)
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


class _Attempt:
    """One connection attempt to one address, until the session greets.

    ``result`` fires with the greeted session or fails with
    ``DeliveryFailure``; after ``cancel()`` it never fires and whatever was
    made is closed.
    """

    def __init__(
        self,
        connector: Connector,
        address: MailExchangerAddress,
        nexthop: Nexthop | str,
        on_connected: Callable[[], None],
        factory_options: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self._factory_options = factory_options or {}
        self.server = ServerInfo(
            address.host, address.address, address.port, str(nexthop),
            policy_domain=sts_policy_domain(nexthop),
            mx_dnssec_valid=address.mx_dnssec_valid, host_dnssec_valid=address.host_dnssec_valid,
        )
        self.result: Deferred[Any] = Deferred()
        self.cancelled = False
        self.session: Any = None
        self._on_connected = on_connected
        self._connector = connector
        self._retried_in_plaintext = False
        self._connecting: Deferred[Any] | None = None
        self._preparing: Deferred[Any] | None = None
        self._begin(connector.session_factory_for(self.server, **self._factory_options))

    def _begin(self, factory: Any) -> None:
        """Connect with ``factory``, or with what a Deferred of one gives:
        the security hook's decision before the connection, whose
        ``DeliveryFailure`` skips this address unconnected."""
        if isinstance(factory, Deferred):
            self._preparing = factory
            factory.addCallbacks(self._prepared, self._prepare_failed)
        else:
            self._start(factory)

    def _prepared(self, factory: Any) -> None:
        self._preparing = None
        if not self.cancelled:
            self._start(factory)

    def _prepare_failed(self, failure: Failure) -> None:
        self._preparing = None
        if self.cancelled:
            return
        if not isinstance(failure.value, DeliveryFailure):
            log.failure("TLS policy decision for {server} failed unexpectedly", failure, server=str(self.server))
            failure = Failure(DeliveryFailure(Status("4.3.0", f"internal error talking to {self.server}")))
        self.result.errback(failure)

    def _start(self, factory: Any) -> None:
        endpoint = self._connector.endpoint_for(self.address)
        self._connecting = endpoint.connect(factory)
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, session: Any) -> None:
        self._connecting = None
        if self.cancelled:
            _close(session)
            return
        self.session = session
        self._on_connected()
        session.greeted.addCallbacks(self._greeted, self._greeting_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.cancelled:
            return
        status = Status("4.4.1", f"connect to {self.server}: {describe_connect_error(failure.value)}")
        self.result.errback(DeliveryFailure(status))

    def _greeted(self, session: Any) -> None:
        if self.cancelled:
            _quit_quietly(session)
            return
        self.result.callback(session)

    def _greeting_failed(self, failure: Failure) -> None:
        if self.cancelled:
            return
        if (
            isinstance(failure.value, DeliveryFailure)
            and failure.value.status.retry_plaintext
            and not self._retried_in_plaintext
        ):
            # Level may: a failed handshake is retried once, on a new
            # connection to the same address, without STARTTLS (as
            # Postfix's smtp_tls_policy "may" does).
            self._retried_in_plaintext = True
            self.session = None
            log.info("{server}: {reason}; trying again in plaintext",
                     server=str(self.server), reason=failure.value.status.text)
            self._begin(self._connector.session_factory_for(self.server, plaintext=True, **self._factory_options))
            return
        if not isinstance(failure.value, DeliveryFailure):
            log.failure("session setup with {server} failed unexpectedly", failure, server=str(self.server))
            failure = Failure(DeliveryFailure(Status("4.3.0", f"internal error talking to {self.server}")))
        self.result.errback(failure)

    def cancel(self) -> None:
        if self.cancelled or self.result.called:
            return
        self.cancelled = True
        if self._preparing is not None:
            self._preparing.cancel()
        elif self._connecting is not None:
            self._connecting.cancel()
        elif self.session is not None:
            _close(self.session)


def _close(session: Any) -> None:
    transport = getattr(session, "transport", None)
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    (abort or transport.loseConnection)()


def _quit_quietly(session: Any) -> None:
    session.quit().addErrback(lambda _failure: None)


class _LevelRace:
    """The attempts within one MX preference: one lane per address family,
    the second lane after a head start of the first (RFC 8305)."""

    def __init__(self, plan: ConnectionPlan, lanes: list[list[tuple[int, MailExchangerAddress]]]) -> None:
        self.plan = plan
        self.lanes = lanes
        self.in_flight: dict[int, tuple[int, _Attempt]] = {}
        self.connected = [False] * len(lanes)
        self.started = [False] * len(lanes)
        self.timer: IDelayedCall | None = None
        self.done = False
        self.result: Deferred[tuple[Any, ServerInfo] | None] = Deferred()

    def run(self) -> Deferred[tuple[Any, ServerInfo] | None]:
        self._next_in_lane(0)
        if len(self.lanes) > 1 and not self.done:
            delay = self.plan.connector.attempt_delay
            self.timer = self.plan.connector.reactor.callLater(delay, self._head_start_over)
        return self.result

    def _head_start_over(self) -> None:
        self.timer = None
        if not self.done and not self.started[1] and not self.connected[0]:
            self._next_in_lane(1)

    def _start_second_lane_now(self) -> None:
        if len(self.lanes) > 1 and not self.started[1]:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None
            self._next_in_lane(1)

    def _next_in_lane(self, lane: int) -> None:
        self.started[lane] = True
        self.connected[lane] = False
        if not self.lanes[lane]:
            self._maybe_exhausted()
            return
        position, address = self.lanes[lane].pop(0)
        self.plan.take(position)

        def connected() -> None:
            self.connected[lane] = True

        attempt = _Attempt(self.plan.connector, address, self.plan.nexthop, connected, self.plan.factory_options)
        self.in_flight[lane] = (position, attempt)
        attempt.result.addCallbacks(self._won, self._lost, callbackArgs=(lane, attempt), errbackArgs=(lane, attempt))

    def _won(self, session: Any, lane: int, attempt: _Attempt) -> None:
        self.in_flight.pop(lane, None)
        if self.done:
            _quit_quietly(session)
            return
        self._finish()
        self.result.callback((session, attempt.server))

    def _lost(self, failure: Failure, lane: int, attempt: _Attempt) -> None:
        self.in_flight.pop(lane, None)
        if self.done:
            return
        if failure.check(CancelledError):  # cancelled from outside
            return
        status: Status = failure.value.status
        skip = status.soft
        if (status.hard and status.stage == GREETING_STAGE and status.code is not None
                and status.code // 100 == 5 and self.plan.connector.skip_5xx_greeting):
            # Postfix: a 5xx greeting is skipped as if it were 4xx (not a
            # 3xx one, whose 5.5.0 stands; nor a refused HELO: final).
            status = dataclasses.replace(status, dsn="4" + status.dsn[1:])
            skip = True
        self.plan.record(attempt.server, status)
        if not skip:
            self._finish()
            self.result.errback(ConnectFailure(status, self.plan.attempts, final_server=True))
            return
        if lane == 0:
            # A failure ends the head start at once.
            self._start_second_lane_now()
        if not self.done:
            self._next_in_lane(lane)

    def _maybe_exhausted(self) -> None:
        if self.done or self.in_flight:
            return
        if any(self.lanes) or not all(self.started):
            return
        self._finish()
        self.result.callback(None)

    def _finish(self) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        for position, attempt in list(self.in_flight.values()):
            attempt.cancel()
            # Not tried to the end: a later session may use it.
            self.plan.give_back(position)
        self.in_flight.clear()


class ConnectionPlan:
    """The addresses of one nexthop still to be tried, and why the tried
    ones were skipped.  ``next_session()`` may be called again after a
    session for the addresses that remain."""

    def __init__(self, connector: Connector, addresses: Sequence[MailExchangerAddress], nexthop: Nexthop | str,
                 tls_demand: Any = None) -> None:
        self.connector = connector
        self.nexthop = nexthop
        # Only when there is a demand: a session_factory_for without the
        # keyword (a test's) keeps working.
        self.factory_options: dict[str, Any] = {} if tls_demand is None else {"tls_demand": tls_demand}
        chosen = list(addresses)
        self.addresses = chosen
        self.remaining: list[int] = list(range(len(chosen)))
        self.attempts: list[AttemptFailure] = []

    @property
    def exhausted(self) -> bool:
        """Whether every address has been taken (none remains to be tried)."""
        return not self.remaining

    def take(self, position: int) -> None:
        """Take the address at ``position`` off the remaining ones (it is being
        tried); ValueError when it is not there."""
        self.remaining.remove(position)

    def give_back(self, position: int) -> None:
        """Put the address at ``position`` back among the remaining ones, in
        order: it was not tried to the end."""
        if position not in self.remaining:
            self.remaining.append(position)
            self.remaining.sort()

    def record(self, server: ServerInfo, status: Status) -> None:
        """Keep why ``server`` was skipped (``status``) and log it, as Postfix
        logs ``connect to ...: Connection refused``."""
        self.attempts.append(AttemptFailure(server, status))
        # Postfix logs each skipped address: "connect to ...: Connection refused".
        log.info("{reason}", reason=status.text, dsn=status.dsn, server=str(server), nexthop=str(self.nexthop))

    def next_session(self) -> Deferred[tuple[Any, ServerInfo]]:
        """The next greeted session and its server, or ``ConnectFailure``."""
        return Deferred.fromCoroutine(self._next_session())

    async def _next_session(self) -> tuple[Any, ServerInfo]:
        while self.remaining:
            preference = self.addresses[self.remaining[0]].preference
            level = [(p, self.addresses[p]) for p in self.remaining if self.addresses[p].preference == preference]
            first_family = level[0][1].family
            lanes = [[item for item in level if item[1].family == first_family]]
            others = [item for item in level if item[1].family != first_family]
            if others:
                lanes.append(others)
            won = await _LevelRace(self, lanes).run()
            if won is not None:
                return won
        if self.attempts:
            status = self.attempts[-1].status
        else:
            status = Status("4.3.0", "server unavailable or unable to receive mail")
        raise ConnectFailure(status, self.attempts)


@implementer(IConnector)
class Connector:
    """Connects to mail exchangers, for one delivery agent.

    ``session_factory_for(server)`` gives the protocol factory of one
    connection, or a Deferred of it (decided before connecting; a
    ``DeliveryFailure`` skips the address without a connection); the
    protocol it builds has ``greeted``, a Deferred that
    fires with the session once greeting and EHLO are done, or fails with
    ``DeliveryFailure``.
    """

    def __init__(self, reactor: Any, config: Config, session_factory_for: SessionFactoryFor) -> None:
        settings = ConnectSettings.from_config(config)
        self.reactor = reactor
        self.session_factory_for = session_factory_for
        self.connect_timeout = settings.smtp_connect_timeout
        self.attempt_delay = settings.smtp_connection_attempt_delay
        self.skip_5xx_greeting = settings.smtp_skip_5xx_greeting
        self.session_limit = settings.smtp_mx_session_limit
        self.bind4 = _bind_address(settings.smtp_bind_address, "smtp_bind_address", 4)
        self.bind6 = _bind_address(settings.smtp_bind_address6, "smtp_bind_address6", 6)

    def endpoint_for(self, address: MailExchangerAddress) -> Any:
        """An explicit endpoint: no name lookup, our timeout and source address."""
        # Postfix: smtp_connect_timeout = 0 leaves the timeout to the system.
        timeout = self.connect_timeout if self.connect_timeout > 0 else None
        if address.family == socket.AF_INET6:
            bind = (self.bind6, 0) if self.bind6 else None
            return TCP6ClientEndpoint(self.reactor, address.address, address.port, timeout=timeout, bindAddress=bind)
        bind4 = (self.bind4, 0) if self.bind4 else None
        return TCP4ClientEndpoint(self.reactor, address.address, address.port, timeout=timeout, bindAddress=bind4)

    def plan(self, addresses: Sequence[MailExchangerAddress], nexthop: Nexthop | str,
             tls_demand: Any = None) -> ConnectionPlan:
        """The addresses of one nexthop to try, for a message with ``tls_demand``."""
        return ConnectionPlan(self, addresses, nexthop, tls_demand)

    def connect(self, addresses: Sequence[MailExchangerAddress], nexthop: Nexthop | str = "") -> Deferred[Any]:
        """The first session that greets, or ``ConnectFailure`` with every
        skipped address's reason."""
        return self.plan(addresses, nexthop).next_session().addCallback(lambda won: won[0])

    def deliver_with_fallback(
        self,
        addresses: Sequence[MailExchangerAddress],
        nexthop: Nexthop,
        recipients: Iterable[int],
        transact: Transact,
        *,
        tls_demand: Any = None,
    ) -> Deferred[SmtpResult]:
        """Deliver ``recipients`` (indexes) through the addresses of one nexthop.

        ``transact(session, indexes)`` runs one mail transaction on a greeted
        session and returns ``{index: Status}``; it owns the session from
        then on (QUIT, or keep it for reuse).  A ``DeliveryFailure`` from
        it counts for every recipient it was given.  Soft statuses go to
        the next address while this is not the final server; the result
        has a final status for every recipient.
        """
        return Deferred.fromCoroutine(
            self._deliver_with_fallback(addresses, nexthop, list(recipients), transact, tls_demand)
        )

    async def _deliver_with_fallback(
        self, addresses: Sequence[MailExchangerAddress], nexthop: Nexthop, pending: list[int], transact: Transact,
        tls_demand: Any = None,
    ) -> SmtpResult:
        plan = self.plan(addresses, nexthop, tls_demand)
        result = SmtpResult(found_myself=bool(getattr(addresses, "found_myself", False)))
        session_limit = self.session_limit
        try:
            while pending:
                try:
                    session, server = await plan.next_session()
                except ConnectFailure as failure:
                    status = failure.status.final()
                    if nexthop.is_relay and not failure.final_server:
                        # A relay that could not be reached is a configuration
                        # problem (4.3.5); one that answered and refused
                        # (5xx HELO, 5xx greeting without the skip) bounces,
                        # as in Postfix, whose smtp_bulk_fail() bounces at once.
                        status = relay_configuration_status(status)
                    # A refusal that ends the delivery names its server
                    # (relay=host[addr]:port); running out of addresses is
                    # relay=none.
                    refused_by = failure.attempts[-1].server if failure.final_server and failure.attempts else None
                    for index in pending:
                        result.outcomes[index] = RecipientOutcome(status, refused_by)
                    return result
                result.sessions += 1
                final_server = plan.exhausted or (session_limit > 0 and result.sessions >= session_limit)
                try:
                    statuses = await transact(session, list(pending))
                except DeliveryFailure as failure:
                    statuses = {index: failure.status for index in pending}
                kept: list[int] = []
                soft_seen: Status | None = None
                for index in pending:
                    status = statuses.get(index)
                    if status is None:
                        status = Status("4.3.0", f"no delivery status for this recipient from {server}")
                    if status.soft and not final_server:
                        kept.append(index)
                        soft_seen = soft_seen or status
                    else:
                        result.outcomes[index] = RecipientOutcome(status.final(), server)
                if soft_seen is not None:
                    plan.record(server, soft_seen)
                pending = kept
            return result
        finally:
            result.attempts = list(plan.attempts)

    def deliver(
        self,
        resolver: NexthopResolver,
        nexthops: Sequence[Nexthop],
        recipients: Iterable[int],
        transact: Transact,
        *,
        tls_demand: Any = None,
    ) -> Deferred[SmtpResult]:
        """Deliver ``recipients`` through a nexthop list (``resolver.nexthops(domain)``).

        Each nexthop's addresses are looked up and delivered to with
        ``deliver_with_fallback``; recipients still soft (or not reached
        because of a lookup failure) go on to the next nexthop (the
        fallback relays), except when this machine is an MX host of the
        nexthop or the mail would loop.  Hard failures without a session
        from ``relayhost`` or a fallback relay become 4.3.5.
        """
        return Deferred.fromCoroutine(self._deliver(resolver, list(nexthops), list(recipients), transact, tls_demand))

    async def _deliver(
        self, resolver: NexthopResolver, nexthops: list[Nexthop], pending: list[int], transact: Transact,
        tls_demand: Any = None,
    ) -> SmtpResult:
        result = SmtpResult()
        leftover: dict[int, RecipientOutcome] = {}
        tried: Nexthop | None = None
        for position, nexthop in enumerate(nexthops):
            if not pending:
                break
            tried = nexthop
            final_nexthop = position == len(nexthops) - 1
            try:
                addresses = await resolver.addresses(nexthop)
            except DeliveryFailure as failure:
                # Not logged here: Postfix has no line for a nexthop that
                # does not resolve but the recipients' (smtp_connect.c).
                result.attempts.append(AttemptFailure(None, failure.status))
                for index in pending:
                    leftover[index] = RecipientOutcome(failure.status, None)
                if not failure.skip_to_next:
                    break  # a loop or a null MX: no fallback relay
                continue
            part = await self.deliver_with_fallback(addresses, nexthop, pending, transact, tls_demand=tls_demand)
            result.attempts.extend(part.attempts)
            result.sessions += part.sessions
            result.found_myself = result.found_myself or part.found_myself
            last_chance = final_nexthop or part.found_myself
            for index, outcome in part.outcomes.items():
                if outcome.status.soft and not last_chance:
                    leftover[index] = outcome
                else:
                    result.outcomes[index] = outcome
            pending = [index for index in pending if index not in result.outcomes]
            if part.found_myself:
                # Postfix: when we are an MX host, no fallback relay.
                break
        relay_problem = tried is not None and (tried.is_fallback or nexthops[0].is_relay)
        for index in pending:
            outcome = leftover.get(index) or RecipientOutcome(
                Status("4.3.0", "server unavailable or unable to receive mail"), None
            )
            if relay_problem and outcome.server is None:
                outcome = RecipientOutcome(relay_configuration_status(outcome.status), None)
            result.outcomes[index] = outcome
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectSettings(Settings):
    """The connector's parameters, bound once."""

    smtp_connect_timeout: float
    smtp_connection_attempt_delay: float
    smtp_skip_5xx_greeting: bool
    smtp_mx_session_limit: int
    smtp_bind_address: str
    smtp_bind_address6: str


def _bind_address(value: str, name: str, version: int) -> str | None:
    value = value.strip()
    if not value:
        return None
    try:
        address = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ConfigError(f"{name} = {value}: expected a numerical IPv{version} address") from None
    if address.version != version:
        raise ConfigError(f"{name} = {value}: expected a numerical IPv{version} address")
    return str(address)
