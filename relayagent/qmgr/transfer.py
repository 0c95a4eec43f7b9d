"""
Moving queued mail to another relayagent node: ``relayagent transfer``
(a node drained before it is retired, or a queue that outgrew its node).

It does what the queue manager does for one message, with one fixed
nexthop, the other node's listener: claim the message, hand the
recipients not yet done to smtp's one entry point (``SmtpAgent.deliver``),
cross off each recipient the other node took, remove the file when none
is left.  The other node queues the message with its original envelope:
sender, every recipient with its ORCPT and NOTIFY, RET, ENVID (RFC 3461,
which our listener offers), and the first arrival time, through our
listener's XRELAYAGENT-ARRIVAL extension (``ARRIVAL=<unix-time>`` on
MAIL FROM, docs/fleet.rst), so that maximal_queue_lifetime and the delay
warnings go on counting from the first arrival.

Claiming.  A message is taken by renaming it into ``hold/`` (one atomic
rename, as ``postsuper -h`` does): a running daemon never touches hold/,
and of the daemon's rename into ``active/`` and ours exactly one wins.  So
the daemon may keep running; a message in ``active/`` is in its hands and
is left alone (with a stopped daemon, ``active/`` holds stale claims and
is taken as well, the spool lock held so that no daemon starts
meanwhile).  One message at a time, so that a transfer killed
midway leaves at most one message in ``hold/`` (its line says so;
``relayagent postsuper -H ID`` releases it, or a transfer naming its id
moves it).  A message that could not be handed over goes back to the
queue it came from, as it was.

Authenticated only.  The other node must take us as an authenticated
peer, by SASL or by our client certificate: the transfer needs a
``smtp_sasl_password_maps`` entry for the target (its host, or
``[host]:port``; it then runs with ``smtp_sasl_auth_enable = yes``), or
a client certificate (``smtp_tls_cert_file``, ``smtp_tls_key_file``)
whose fingerprint the other node lists in ``relay_clientcerts``.  It
says EHLO again after STARTTLS and AUTH and hands nothing over unless
the reply names XRELAYAGENT-ARRIVAL, which our listener offers to
authenticated clients only.  Without it the arrival time would be lost,
and mail would go through whatever relays for our address.

TLS (``transfer_tls_level``): STARTTLS when the other node offers it
(``may``); required (``encrypt``) with a client certificate; with
``smtp_tls_CAfile``, the other node's certificate must chain to it and
match the ``--to`` host (``verify``), and REQUIRETLS messages then go
too (they need a verified session that offers REQUIRETLS, which our
listener does after STARTTLS).  A stronger ``smtp_tls_security_level``
is kept; a ``smtp_tls_policy_maps`` entry for the target wins.

Outcomes, per recipient (Postfix's rule for a relay, except one):

- 250 to the DATA: crossed off here (the mark is on disk before the
  file is removed), logged ``status=sent (transferred: 250 ... queued as
  NEWID)``; only a crash between the other node's 250 and our mark can
  repeat a message (at-least-once, as everywhere in relayagent);
- refused, temporarily or permanently: left queued here, logged
  ``status=deferred (not transferred, kept in the local queue: ...)``.
  Postfix would bounce a 5xx from a relay; but the other node is one of
  ours and accepts any recipient it relays for, so its 5xx is a
  configuration problem of the fleet (relaying denied, a size limit),
  not a verdict on the recipient: this node can still deliver it itself,
  and a bounce would tell the sender a lie.
- the other node unreachable, or AUTH refused: nothing is handed over,
  the message goes back, and the run stops at once (the next messages
  would fail the same way).

SYNOPSIS

    transfer = Transfer(spool, agent, nexthop, clock=reactor, destination=None)
    report = await transfer.run(["4B3F2A1C0D", ...])   # None: ALL
    transfer.stop()                                      # after the message in flight
    agent = make_agent(config, reactor, nexthop)         # SmtpAgent with PeerSecurity
    transfer_tls_level(config)                           # may, encrypt or verify
    configure_parser(parser);  run_command(context, args)   # the command

DIAGNOSTICS: per message, Postfix-format lines (``log_delivery``,
``removed``, warnings).  ``run`` returns a ``TransferReport``; the
command exits 0 when every selected recipient went, 75 (EX_TEMPFAIL)
when some were kept, the other node could not be reached or a signal
stopped the run (after the message in flight: ``Transfer.stop``), 77
(EX_NOPERM) when it refused our AUTH or did not offer
XRELAYAGENT-ARRIVAL, 78 (EX_CONFIG) with neither a password for the
target nor a client certificate, or with a TLS setting that cannot be
used (one line), 64 for bad usage.

Owns no parameters.  Reads, through smtp's phases, smtp_sasl_* and the
session and connection parameters; queue_directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ReactorNotRunning
from twisted.logger import FilteringLogObserver, Logger, PredicateResult

from relayagent.common import maillog as ralog
from relayagent.common.config import Config, ConfigError, Settings
from relayagent.common.envelope import Recipient
from relayagent.common.maps import open_maps
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.conncache import ConnectionCache
from relayagent.smtp.connect import Connector
from relayagent.smtp.deliver import SessionFactories, SmtpAgent, SmtpRequest
from relayagent.smtp.resolve import Nexthop, NexthopResolver, make_dns_resolver, parse_nexthop
from relayagent.smtp.sasl import AUTH_STAGE, PasswordLookup
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.setup import hello
from relayagent.smtp.transaction import ARRIVAL_KEYWORD
from relayagent.spool import CorruptQueueFile, Spool, is_queue_id
from relayagent.spool.spool import ACTIVE, DEFERRED, HOLD, INCOMING
from relayagent.spool.trigger import DaemonRunning, lock_spool, trigger

log = Logger(namespace="relayagent.qmgr.transfer")

# sysexits(3)
EX_OK = 0
EX_USAGE = 64
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

# The queues ALL and --destination take from (active/ only when no daemon
# runs: then its files are stale claims, not deliveries in progress).
_QUEUES = (INCOMING, DEFERRED)
# Status.stage of a reply to the mail transaction itself (channel.STAGES).
_TRANSACTION_STAGES = frozenset({"MAIL FROM", "RCPT TO", "DATA", "end of DATA"})


@dataclass(frozen=True)
class TransferSettings(Settings):
    """What the command reads of main.cf itself (smtp's phases read the rest)."""

    queue_directory: str
    smtp_sasl_password_maps: tuple[str, ...]
    smtp_tls_security_level: str
    smtp_tls_cert_file: str
    smtp_tls_CAfile: str
    maillog_file: str
    base_dir: str | None = None


@dataclass
class TransferReport:
    """What one run did: messages whose every selected recipient went
    (``moved``), recipients handed over, messages with recipients left
    here (``kept``), messages not taken (``skipped``: gone, in a running
    daemon's hands, nothing selected), and why the run stopped early
    (``stopped``: the other node's failure) with ``auth_refused`` when
    that was AUTH."""

    moved: int = 0
    recipients: int = 0
    kept: int = 0
    skipped: int = 0
    stopped: Status | None = None
    auth_refused: bool = False
    held: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        """The command's sysexits code for this outcome."""
        if self.auth_refused:
            return EX_NOPERM
        if self.stopped is not None or self.kept or self.interrupted:
            return EX_TEMPFAIL
        return EX_OK


# ---------------------------------------------------------------------------
# The session's security: AUTH, then EHLO again, then XRELAYAGENT-ARRIVAL


class PeerSecurity:
    """``SecurityPolicy`` for the other node: its hooks (STARTTLS, AUTH),
    then EHLO again, which must name XRELAYAGENT-ARRIVAL (our listener
    offers it to authenticated clients only); else the session fails
    with 4.7.0 at stage AUTH and nothing is handed over."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def for_nexthop(self, nexthop: str) -> PeerSessionSecurity:
        """The hook for sessions to ``nexthop``."""
        return PeerSessionSecurity(self.policy.for_nexthop(nexthop))


class PeerSessionSecurity:
    """One nexthop's hook (``PeerSecurity``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def plaintext_fallback(self) -> PeerSessionSecurity:
        """The inner hook's plaintext retry, with the same checks after it."""
        return PeerSessionSecurity(self.inner.plaintext_fallback())

    def for_demand(self, demand: Any) -> PeerSessionSecurity:
        """The inner hook for a message's TLS demand (REQUIRETLS), with
        the same checks after it."""
        hook = self.inner.for_demand(demand)
        return self if hook is self.inner else PeerSessionSecurity(hook)

    def __getattr__(self, name: str) -> Any:
        # Whatever else the connection layer asks of a hook (its TLS
        # level, its demand) is the inner hook's.
        return getattr(self.inner, name)

    def negotiate(self, session: Any) -> Deferred[None]:
        """STARTTLS and AUTH as configured, EHLO again, the keyword check."""
        return Deferred.fromCoroutine(self._negotiate(session))

    async def _negotiate(self, session: Any) -> None:
        await self.inner.negotiate(session)
        if session.broken is not None:
            return
        refused = await hello(session, use_ehlo=True)
        if refused is not None:
            raise DeliveryFailure(refused, skip_to_next=False)
        if not session.has(ARRIVAL_KEYWORD):
            raise DeliveryFailure(
                Status(
                    dsn="4.7.0",
                    text=f"host {session.namaddr} did not take us as an authenticated relayagent "
                    f"node (no {ARRIVAL_KEYWORD} after AUTH)",
                    stage=AUTH_STAGE,
                    remote_mta=session.server.host,
                ),
                skip_to_next=False,
            )


# The levels a transfer may run at, weakest first.
_LEVEL_ORDER = ("", "none", "may", "encrypt", "verify", "secure")


def transfer_tls_level(config: Config) -> str:
    """The TLS level of a transfer: ``verify`` with ``smtp_tls_CAfile``,
    ``encrypt`` with a client certificate, else ``may``; a stronger
    ``smtp_tls_security_level`` is kept."""
    settings = TransferSettings.from_config(config)
    wanted = "verify" if settings.smtp_tls_CAfile else "encrypt" if settings.smtp_tls_cert_file else "may"
    configured = settings.smtp_tls_security_level
    if configured in _LEVEL_ORDER and _LEVEL_ORDER.index(configured) > _LEVEL_ORDER.index(wanted):
        return configured
    return wanted


def make_agent(config: Config, reactor: Any, nexthop: Nexthop) -> SmtpAgent:
    """smtp's entry point with one route, ``nexthop``, for every domain,
    AUTH on when there are passwords, STARTTLS at ``transfer_tls_level``,
    and ``PeerSecurity``; sessions are cached between messages (the
    backlog asks for it)."""
    settings = TransferSettings.from_config(config)
    config = config.replace(
        smtp_sasl_auth_enable="yes" if settings.smtp_sasl_password_maps else "no",
        smtp_tls_security_level=transfer_tls_level(config),
    )
    resolver = NexthopResolver(config, make_dns_resolver(config, reactor), reactor)
    security = PeerSecurity(SecurityPolicy(config))
    return SmtpAgent(
        reactor,
        nexthops=lambda domain: [nexthop],
        connector=Connector(reactor, config, SessionFactories(config, reactor, security)),
        resolver=resolver,
        cache=ConnectionCache.from_config(config, reactor),
    )


def parse_target(text: str) -> Nexthop:
    """``--to``: ``HOST:PORT``, ``[HOST]:PORT``, ``[IPV6]:PORT`` or
    ``HOST`` (port 25), never looked up as MX.  Raises ValueError."""
    written = text.strip()
    if not written:
        raise ValueError("empty --to")
    if not written.startswith("["):
        host, colon, port = written.rpartition(":")
        if not colon:
            host, port = written, ""
        if ":" in host:
            raise ValueError(f"bad --to {text!r}: write an IPv6 address as [address]:port")
        written = f"[{host}]" + (f":{port}" if port else "")
    try:
        return parse_nexthop(written, destination="", default_port=25, mx_lookup_allowed=False,
                             is_relay=True, where="--to")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------
# The transfer


class Transfer:
    """Hands queued messages to the other node, one at a time (module
    docstring).  ``agent`` has ``deliver(SmtpRequest) -> Deferred[SmtpResult]``
    and ``close()``; ``destination``: only the recipients of that domain;
    ``take_active``: no daemon runs, so ``active/`` is taken as well."""

    def __init__(self, spool: Spool, agent: Any, nexthop: Nexthop | str, *, clock: Any,
                 destination: str | None = None, take_active: bool = False) -> None:
        self.spool = spool
        self.agent = agent
        self.nexthop = str(nexthop)
        self.clock = clock
        self.destination = destination.lower().rstrip(".") if destination else None
        self.queues = (ACTIVE, *_QUEUES) if take_active else _QUEUES
        # The message in hold/ being handed over, if any (a run stopped
        # by a signal names it).
        self.in_flight: str | None = None
        self._stopping = False
        self._running = False
        self._stopped_waiters: list[Deferred[None]] = []

    def candidates(self, ids: Sequence[str] | None) -> Iterator[tuple[str, str]]:
        """(queue id, queue) of each message to try: the named ones
        (also from ``hold/``; from ``active/`` only when it is taken), or
        every one in the queues taken."""
        if ids is None:
            for queue in self.queues:
                for queue_id in self.spool.queue_ids(queue):
                    yield queue_id, queue
            return
        for queue_id in dict.fromkeys(ids):
            queue = self.spool.find(queue_id, (*self.queues, HOLD, ACTIVE))
            if queue is None:
                ralog.log_warning(log, "no such message in the queue; not transferred", queue_id=queue_id)
            elif queue == ACTIVE and ACTIVE not in self.queues:
                ralog.log_warning(log, "in the active queue of a running daemon; not transferred",
                                  queue_id=queue_id)
            else:
                yield queue_id, queue

    async def run(self, ids: Sequence[str] | None = None) -> TransferReport:
        """Transfer the named messages (None: every one); stop at the
        first failure of the other node itself."""
        report = TransferReport()
        self._running = True
        try:
            todo = list(self.candidates(ids))
            for position, (queue_id, queue) in enumerate(todo):
                if self._stopping:
                    report.interrupted = True
                    break
                await self._one(queue_id, queue, len(todo) - position - 1, report)
                if report.stopped is not None:
                    break
        finally:
            self._running = False
            self.agent.close()
            waiters, self._stopped_waiters = self._stopped_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return report

    def stop(self) -> Deferred[None]:
        """Stop after the message in flight (SIGTERM, SIGINT: the
        reactor's shutdown waits for it), so that none is left on hold;
        fires when the run has ended."""
        self._stopping = True
        if not self._running:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopped_waiters.append(waiter)
        return waiter

    async def _one(self, queue_id: str, queue: str, backlog: int, report: TransferReport) -> None:
        if queue != HOLD:
            try:
                self.spool.move(queue_id, queue, HOLD)
            except FileNotFoundError:
                report.skipped += 1  # delivered or claimed meanwhile
                return
        self.in_flight = queue_id
        try:
            await self._claimed(queue_id, queue, backlog, report)
        finally:
            self.in_flight = None

    async def _claimed(self, queue_id: str, queue: str, backlog: int, report: TransferReport) -> None:
        # Back to where it was when not everything went; a stale claim
        # from active/ goes to incoming/, as the daemon's recovery would.
        home = INCOMING if queue == ACTIVE else DEFERRED if queue == HOLD else queue
        try:
            queue_file = self.spool.open(queue_id, HOLD)
        except CorruptQueueFile as exc:
            self.spool.mark_corrupt(queue_id, HOLD, exc.reason)
            report.skipped += 1
            return
        except OSError as exc:
            self._put_back(queue_id, home, report, f"cannot open the queue file: {exc}")
            report.skipped += 1
            return
        with queue_file:
            envelope = queue_file.envelope
            selected = [r for r in envelope.pending() if self._selected(r)]
            if not selected:
                self._put_back(queue_id, home, report)
                report.skipped += 1
                return
            request = SmtpRequest(envelope, domain=selected[0].domain, recipients=tuple(selected),
                                  backlog=backlog)
            started = self.clock.seconds()
            try:
                result = await self.agent.deliver(request)
            except BaseException:
                # A bug below, or the run cancelled: nothing was crossed
                # off, so the message goes back as it was.
                queue_file.close()
                self._put_back(queue_id, home, report)
                raise
            if result.corrupt is not None:
                queue_file.close()
                self.spool.mark_corrupt(queue_id, HOLD, result.corrupt)
                report.skipped += 1
                return
            sent = [r for r in selected if self._status(result, r).ok]
            if sent:
                try:
                    queue_file.mark_done_many(r.index for r in sent)
                except OSError as exc:
                    # They are queued over there and pending here: both
                    # nodes would deliver them.  Say so, loudly, once.
                    ralog.log_warning(log, f"cannot mark transferred recipients done: {exc}; they may be "
                                      "delivered twice", queue_id=queue_id)
            self._log(envelope, selected, sent, result, started)
            # A REQUIRETLS message fails over a session without TLS on its
            # own account (kept here, delivered from here): no reason to
            # stop for the others.
            if not sent and not envelope.requiretls and self._node_failed(result, selected):
                status = self._status(result, selected[0])
                report.stopped = status
                report.auth_refused = status.stage == AUTH_STAGE
            report.recipients += len(sent)
            pending = queue_file.pending_count()
            log_kinds = queue_file.logs_that_may_exist()
        if pending == 0:
            try:
                self.spool.remove(queue_id, HOLD, log_kinds=log_kinds)
            except OSError as exc:
                ralog.log_warning(log, f"cannot remove queue file: {exc}", queue_id=queue_id)
                report.held.append(queue_id)
            else:
                ralog.log_removed(log, queue_id)
            report.moved += 1
            return
        if len(sent) < len(selected):
            if report.stopped is None:
                report.kept += 1
        else:
            report.moved += 1  # what was selected went; the others stay
        self._put_back(queue_id, home, report)

    def _selected(self, recipient: Recipient) -> bool:
        return self.destination is None or recipient.domain.rstrip(".") == self.destination

    @staticmethod
    def _status(result: Any, recipient: Recipient) -> Status:
        outcome = result.outcomes.get(recipient.index)
        if outcome is None:
            return Status("4.3.0", "mail system error: no delivery status for this recipient")
        return outcome.status

    def _node_failed(self, result: Any, recipients: Iterable[Recipient]) -> bool:
        """Nothing went and the server answered no recipient in a mail
        transaction (it was down, refused the session or our AUTH, or
        the connection broke): the next messages would fare the same."""
        for recipient in recipients:
            status = self._status(result, recipient)
            if status.code is not None and status.stage in _TRANSACTION_STAGES:
                return False
        return True

    def _log(self, envelope: Any, selected: list[Recipient], sent: list[Recipient], result: Any,
             started: float) -> None:
        now = self.clock.seconds()
        delay = max(0.0, now - envelope.arrival_time)
        done = {r.index for r in sent}
        for recipient in selected:
            outcome = result.outcomes.get(recipient.index)
            status = self._status(result, recipient)
            sent_at = result.transmissions.get(recipient.index)
            if sent_at is None:
                setup, transmission = max(0.0, now - started), 0.0
            else:
                setup, transmission = sent_at.connected - started, sent_at.done - sent_at.connected
            if recipient.index in done:
                shown, verdict = dataclasses.replace(status, text=f"transferred: {status.text}"), "sent"
            else:
                shown = dataclasses.replace(status, text=f"not transferred, kept in the local queue: {status.text}")
                verdict = "deferred"
            ralog.log_delivery(
                log,
                queue_id=envelope.queue_id,
                recipient=recipient,
                relay=str(outcome.server) if outcome is not None and outcome.server is not None else None,
                conn_use=sent_at.conn_use if sent_at is not None else None,
                delay=delay,
                delays=(max(0.0, started - envelope.arrival_time), 0.0, max(0.0, setup), max(0.0, transmission)),
                status=shown,
                outcome=verdict,
            )

    def _put_back(self, queue_id: str, home: str, report: TransferReport, why: str | None = None) -> None:
        if why:
            ralog.log_warning(log, why, queue_id=queue_id)
        try:
            self.spool.move(queue_id, HOLD, home)
        except OSError as exc:
            ralog.log_warning(log, f"left on hold, cannot move it back to {home}: {exc}; "
                              f"release it with relayagent postsuper -H {queue_id}", queue_id=queue_id)
            report.held.append(queue_id)


# ---------------------------------------------------------------------------
# The command


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """``relayagent transfer --to HOST:PORT [ID ...|ALL] [--destination D]``."""
    parser.add_argument("--to", required=True, metavar="HOST:PORT",
                        help="the other relayagent's listener (smtpd_endpoints), e.g. node2.example:10025")
    parser.add_argument("--destination", metavar="DOMAIN",
                        help="only the recipients of this domain (with no ID: from every message)")
    parser.add_argument("ids", nargs="*", metavar="ID", help="queue ids, or ALL")


class _Usage(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _selection(args: argparse.Namespace) -> list[str] | None:
    if not args.ids:
        if args.destination:
            return None
        raise _Usage(EX_USAGE, "transfer: nothing to do: name queue ids, ALL, or --destination")
    if "ALL" in args.ids:
        if len(args.ids) > 1:
            raise _Usage(EX_USAGE, "transfer: ALL takes no queue ids with it")
        return None
    for queue_id in args.ids:
        if not is_queue_id(queue_id):
            raise _Usage(EX_USAGE, f"transfer: invalid queue id: {queue_id!r}")
    return list(args.ids)


def _relayagent_events(event: Any) -> PredicateResult:
    namespace = event.get("log_namespace") or ""
    if namespace == "relayagent" or namespace.startswith("relayagent."):
        return PredicateResult.maybe
    return PredicateResult.no


def run_command(context: Any, args: argparse.Namespace) -> int:
    """The command: a reactor of its own for the run, the Postfix lines
    on standard error (and in ``maillog_file`` when set)."""
    try:
        selection = _selection(args)
        nexthop = parse_target(args.to)
        if args.destination is not None and not args.destination.strip("."):
            raise _Usage(EX_USAGE, "transfer: empty --destination")
    except ValueError as exc:
        print(f"relayagent: transfer: {exc}", file=context.stderr)
        return EX_USAGE
    except _Usage as exc:
        print(f"relayagent: {exc}", file=context.stderr)
        return exc.code
    config = context.config
    settings = TransferSettings.from_config(config)
    passwords = PasswordLookup(open_maps(settings.smtp_sasl_password_maps, base_dir=settings.base_dir))
    if passwords.credentials_for(nexthop.host, str(nexthop)) is None and not settings.smtp_tls_cert_file:
        print(f"relayagent: transfer: no password for {nexthop.host} or {nexthop} in "
              "smtp_sasl_password_maps and no client certificate (smtp_tls_cert_file): the other "
              "node takes a transfer from an authenticated client only", file=context.stderr)
        return EX_CONFIG
    # Imported here, not at the top: only this command runs a reactor.
    from twisted.internet import reactor
    from twisted.logger import globalLogPublisher

    outputs: list[Any] = [context.stderr]
    maillog_file = settings.maillog_file
    opened = None
    if maillog_file:
        try:
            opened = open(maillog_file, "a", encoding="utf-8")  # noqa: SIM115 - closed below
            outputs.append(opened)
        except OSError as exc:
            print(f"relayagent: warning: cannot open maillog_file {maillog_file}: {exc}", file=context.stderr)
    # relayagent's lines only: not the reactor's "Main loop terminated".
    observers = [FilteringLogObserver(observer, [_relayagent_events])
                 for out in outputs for observer in ralog.make_observers(config, out)]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    spool = Spool.from_config(config, clock=reactor.seconds)
    # With no daemon, active/ holds stale claims, ours to take; the lock,
    # held to the end, keeps a daemon from starting meanwhile and
    # delivering them from active/ while we do.
    try:
        lock: int | None = lock_spool(settings.queue_directory)
    except (DaemonRunning, OSError):
        lock = None
    take_active = lock is not None
    outcome: dict[str, Any] = {}
    try:
        try:
            agent = make_agent(config, reactor, nexthop)
        except (ConfigError, ValueError) as exc:  # a bad certificate, CA file, TLS setting
            print(f"relayagent: transfer: fatal: {exc}", file=context.stderr)
            return EX_CONFIG
        transfer = Transfer(spool, agent, nexthop, clock=reactor, destination=args.destination,
                            take_active=take_active)

        def start() -> None:
            done = Deferred.fromCoroutine(transfer.run(selection))
            done.addBoth(finish)

        def finish(result: Any) -> None:
            outcome["result"] = result
            try:
                reactor.stop()
            except ReactorNotRunning:
                pass  # a signal is stopping it, and waited for us

        reactor.callWhenRunning(start)
        reactor.addSystemEventTrigger("before", "shutdown", transfer.stop)
        reactor.run()
    finally:
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
        if opened is not None:
            opened.close()
        if lock is not None:
            os.close(lock)
    result = outcome.get("result")
    if not isinstance(result, TransferReport):
        text = result.getErrorMessage() if hasattr(result, "getErrorMessage") else "interrupted"
        held = transfer.in_flight
        if held is not None and spool.find(held, (HOLD,)) == HOLD:
            text += f"; {held} is left on hold: run the transfer again naming it, or relayagent postsuper -H {held}"
        print(f"relayagent: transfer: fatal: {text}", file=context.stderr)
        return EX_SOFTWARE if hasattr(result, "getErrorMessage") else EX_TEMPFAIL
    if result.kept or result.held:
        # What went back to deferred/ or incoming/: the daemon's next scan
        # finds it; a wakeup makes it sooner.
        trigger(settings.queue_directory, "wakeup")
    plural = "" if result.moved == 1 else "s"
    summary = f"relayagent: transfer: {result.moved} message{plural} ({result.recipients} recipients) to {nexthop}"
    if result.kept:
        summary += f", {result.kept} kept here with recipients the other node refused"
    if result.stopped is not None:
        summary += f"; stopped: {result.stopped.text}"
    if result.interrupted:
        summary += "; interrupted: the rest is still queued here"
    if result.held:
        summary += f"; left on hold: {' '.join(result.held)}"
    print(summary, file=context.stderr if result.exit_code else context.stdout)
    return result.exit_code
