"""
The built-in SMTP listener: twisted.mail's ESMTP server feeding the spool.

``smtpd_endpoints`` (ours: Twisted server endpoint strings such as
``tcp:10025:interface=127.0.0.1``; empty, the default, means no listener)
makes ``twistd -n relayagent`` accept mail for relaying.  The server is
``twisted.mail.smtp.ESMTP`` with ``relayagent.smtpd.intake`` behind it, and a subclass (``RelayagentESMTP``) that adds what the stock
server lacks:

- SIZE (RFC 1870): advertised with ``message_size_limit``; ``MAIL FROM``
  with a larger ``SIZE=`` gets 552 5.3.4; a message that grows past the
  limit during DATA gets 552 5.3.4 at the final "." and nothing past the
  limit is stored (the glue stops writing and discards the file).
- 8BITMIME (RFC 6152): advertised; ``BODY=7BIT`` / ``BODY=8BITMIME``
  accepted and recorded in the queue file.
- PIPELINING (RFC 2920), made safe.  Twisted's server handles each line
  as it is parsed, even while the previous command's Deferred (sender or
  recipient validation, the enqueue at ".") is still pending, so with
  pipelined input a RCPT can be judged before its MAIL was accepted and
  replies can go out of order or be lost (a QUIT pipelined after "."
  closes the connection before the 250).  We hold further lines while
  such a Deferred is outstanding, and stop reading from the socket when
  too many lines are held.
- Unknown MAIL and RCPT parameters get 555 5.5.4 (RFC 5321 4.1.1.11);
  Twisted's server ignores them silently, so a client could believe a
  DSN request (NOTIFY=, RET=) was taken.
- A failed enqueue answers 451 4.3.0 (Twisted's answers 550 to any
  failure of a message receiver, turning a full disk into bounces), and
  MAIL FROM gets 452 4.3.1 while the queue file system is short of
  space (the glue's ``check_queue_space``: ``queue_minfree``, 1.5 x
  ``message_size_limit``), as from Postfix's smtpd.
- An over-long line ends the session with a 5xx reply (Twisted's server
  keeps buffering a line that never ends).
- REQUIRETLS (RFC 8689), with ``requiretls_enable``: offered in EHLO and
  taken on MAIL FROM only in an encrypted session, and recorded in the
  queue file.  The listener has no STARTTLS of its own (no server
  certificate parameters), so "encrypted" means an implicit-TLS
  endpoint in ``smtpd_endpoints`` (``ssl:10465:privateKey=key.pem:
  certKey=cert.pem``), or a session where Twisted's own STARTTLS ran
  (a MailService factory given a context factory).  In plaintext,
  REQUIRETLS is not offered and ``MAIL FROM:<...> REQUIRETLS`` gets
  555 5.5.4 as any unknown option (as from Postfix's smtpd).

Relaying is the intake's rule: clients in ``mynetworks`` (default
loopback only) or authenticated; anyone else gets 554 5.7.1 for every
recipient.

SYNOPSIS

    services = daemon_listener_services(config, daemon, reactor)   # one per smtpd_endpoints entry
    make_listener_services(config, spool, trigger, reactor=reactor)
    ListenerFactory(intake, config);  MailServiceESMTPFactory(service, portal, config)
    RelayagentESMTP (the server protocol);  parse_esmtp_parameters(text)

DIAGNOSTICS: replies to the client, never exceptions: 552 5.3.4 (size),
555 5.5.4 (unknown parameter, REQUIRETLS in plaintext), 452 4.3.1 (short of space), 451 4.3.0 (the
spool failed), 554 5.7.1 (relaying denied), 5xx for an over-long line.
A bad ``smtpd_endpoints`` string fails at start-up in Twisted's
``strports.service`` (``ValueError``).

Owns: smtpd_endpoints, smtpd_banner.  Reads message_size_limit,
requiretls_enable, myhostname (and, through the glue, mynetworks, hopcount_limit and
queue_minfree).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import strports
from twisted.application.service import IService
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.mail import protocols, smtp
from twisted.python.compat import networkString

from relayagent.common.config import Config, Settings
from relayagent.common.envelope import BodyType
from relayagent.smtpd.intake import (
    QUEUE_WRITE_ERROR,
    Intake,
    RelayDeliveryFactory,
)
from relayagent.spool import Spool
from relayagent.spool.nonblocking import ThreadedSpool

log = Logger(namespace="relayagent.smtpd.listener")

# The longest line we take: RFC 5321 allows 1000 octets; this is generous
# for broken clients and still bounds the memory one connection can hold.
MAX_LINE_LENGTH = 65536
# Held lines (pipelined commands waiting for an earlier reply) before we
# stop reading the socket.
MAX_HELD_LINES = 1000

_PARAMETER = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")


def parse_esmtp_parameters(text: bytes | None) -> list[tuple[str, str | None]]:
    """``KEY=VALUE KEY ...`` of MAIL/RCPT (RFC 5321 4.1.2 esmtp-param).
    Raises ValueError on bad syntax."""
    result: list[tuple[str, str | None]] = []
    for word in (text or b"").split():
        match = _PARAMETER.match(word)
        if match is None:
            raise ValueError(word.decode("ascii", "replace"))
        key, value = match.groups()
        result.append((key.decode("ascii").upper(),
                       value.decode("ascii") if value is not None else None))
    return result


class RelayagentESMTP(smtp.ESMTP):
    """twisted.mail's ESMTP server with SIZE, 8BITMIME, safe PIPELINING."""

    message_size_limit = 0
    banner: bytes | None = None
    # Twisted's own "Receiving message for delivery" line; the glue logs
    # each queued message with its queue id instead.
    noisy = False
    MAX_LENGTH = MAX_LINE_LENGTH

    # Read by relayagent.smtpd.twistedmail: how the client greeted (for the
    # Received header's "with") and what BODY= its MAIL declared.
    relayagent_esmtp = False
    relayagent_body_type: BodyType | None = None
    # Read by relayagent.smtpd.intake: MAIL FROM carried REQUIRETLS.
    relayagent_requiretls = False
    requiretls_enable = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unparsed = b""
        self._held_lines: deque[bytes] = deque()
        self._holding = False
        self._draining = False
        self._reading_paused = False

    # -- greeting and EHLO

    def greeting(self) -> bytes:
        if self.banner is not None:
            return self.banner
        return super().greeting()

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        extensions = super().extensions()
        limit = self.message_size_limit
        extensions[b"SIZE"] = [str(limit).encode("ascii")] if limit else None
        extensions[b"8BITMIME"] = None
        extensions[b"PIPELINING"] = None
        if self.requiretls_enable and self.encrypted:
            # RFC 8689 section 3: only in a session protected by TLS.
            extensions[b"REQUIRETLS"] = None
        return extensions

    @property
    def encrypted(self) -> bool:
        """Whether the session runs over TLS: an implicit-TLS endpoint
        (``ssl:``), or Twisted's STARTTLS done."""
        return bool(self.startedTLS) or ISSLTransport.providedBy(self.transport)

    def do_EHLO(self, rest: bytes) -> None:
        self.relayagent_esmtp = True
        super().do_EHLO(rest)

    def do_HELO(self, rest: bytes) -> None:
        self.relayagent_esmtp = False
        super().do_HELO(rest)

    # -- MAIL and RCPT parameters

    def do_MAIL(self, rest: bytes) -> None:
        match = self.mail_re.match(rest)
        if self._from or match is None:
            super().do_MAIL(rest)  # Twisted's 503 / 501
            return
        try:
            parameters = parse_esmtp_parameters(match.group("opts"))
        except ValueError:
            self.sendCode(501, b"5.5.4 Bad MAIL parameter syntax")
            return
        body_type = None
        requiretls = False
        for key, value in parameters:
            if key == "SIZE":
                if value is None or not value.isdigit():
                    self.sendCode(501, b"5.5.4 Bad message size syntax")
                    return
                if self.message_size_limit and int(value) > self.message_size_limit:
                    self.sendCode(552, b"5.3.4 Message size exceeds fixed limit")
                    return
            elif key == "BODY":
                try:
                    body_type = BodyType((value or "").upper())
                except ValueError:
                    self.sendCode(501, b"5.5.4 Unsupported BODY parameter")
                    return
            elif key == "AUTH" and self.challengers:
                pass  # RFC 4954 5: we may ignore the AUTH= identity
            elif key == "REQUIRETLS" and value is None and self.requiretls_enable and self.encrypted:
                requiretls = True  # RFC 8689 section 4: no value
            else:
                self.sendCode(555, networkString(f"5.5.4 Unsupported option: {key}"))
                return
        self.relayagent_body_type = body_type
        self.relayagent_requiretls = requiretls
        super().do_MAIL(rest)

    def do_RCPT(self, rest: bytes) -> None:
        match = self.rcpt_re.match(rest)
        if match is not None and self._from:
            try:
                parameters = parse_esmtp_parameters(match.group("opts"))
            except ValueError:
                self.sendCode(501, b"5.5.4 Bad RCPT parameter syntax")
                return
            if parameters:
                # No DSN advertised, so no NOTIFY= or ORCPT=.
                key = parameters[0][0]
                self.sendCode(555, networkString(f"5.5.4 Unsupported option: {key}"))
                return
        super().do_RCPT(rest)

    # -- holding pipelined lines while a reply is pending

    def dataReceived(self, data: bytes) -> None:
        *lines, self._unparsed = (self._unparsed + data).split(self.delimiter)
        for index, line in enumerate(lines):
            if len(line) > self.MAX_LENGTH:
                self._held_lines.extend(lines[:index])
                self._drain()
                self._line_too_long()
                return
        self._held_lines.extend(lines)
        if len(self._unparsed) > self.MAX_LENGTH:
            self._drain()
            self._line_too_long()
            return
        self._drain()
        if len(self._held_lines) > MAX_HELD_LINES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _drain(self) -> None:
        if self._draining:
            return  # the outer loop goes on once the hold is released
        self._draining = True
        try:
            while self._held_lines and not self._holding:
                if self.transport.disconnecting:
                    self._held_lines.clear()
                    return
                self.lineReceived(self._held_lines.popleft())
        finally:
            self._draining = False
        if self._reading_paused and len(self._held_lines) < MAX_HELD_LINES // 2:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _hold(self) -> None:
        self._holding = True

    def _release(self) -> None:
        self._holding = False
        self._drain()

    def _line_too_long(self) -> None:
        self._held_lines.clear()
        self._unparsed = b""
        if self.mode == smtp.DATA:
            self.sendCode(552, b"5.3.4 Error: line too long; closing connection")
        else:
            self.sendCode(500, b"5.5.2 Error: line too long; closing connection")
        # Twisted's connectionLost tells the message receivers, which
        # discard what they stored.
        self.transport.loseConnection()

    def validateFrom(self, helo: Any, origin: smtp.Address) -> Any:
        self._hold()
        return super().validateFrom(helo, origin)

    def _cbFromValidate(self, *args: Any, **kwargs: Any) -> None:
        super()._cbFromValidate(*args, **kwargs)
        self._release()

    def _ebFromValidate(self, failure: Any) -> None:
        super()._ebFromValidate(failure)
        self._release()

    def validateTo(self, user: smtp.User) -> Any:
        self._hold()
        return super().validateTo(user)

    def _cbToValidate(self, *args: Any, **kwargs: Any) -> None:
        super()._cbToValidate(*args, **kwargs)
        self._release()

    def _ebToValidate(self, failure: Any) -> None:
        super()._ebToValidate(failure)
        self._release()

    def state_DATA(self, line: bytes) -> None:
        if line == b"." and not self.datafailed:
            self._hold()  # until _messageHandled has replied
        smtp.SMTP.dataLineReceived(self, line)

    def _messageHandled(self, resultList: Any) -> None:
        try:
            failures = [result for ok, result in resultList if not ok]
            if failures:
                reason = failures[0]
                if reason.check(smtp.SMTPServerError):
                    resp = reason.value.resp
                    self.sendCode(reason.value.code,
                                  resp if isinstance(resp, bytes) else networkString(resp))
                else:
                    log.failure("message receiver failed", reason)
                    self.sendCode(*QUEUE_WRITE_ERROR)
            else:
                queue_ids = [r for ok, r in resultList if isinstance(r, str)]
                if queue_ids:
                    self.sendCode(250, networkString(f"2.0.0 Ok: queued as {queue_ids[0]}"))
                else:
                    self.sendCode(250, b"2.0.0 Ok")
        finally:
            self._release()

    def connectionLost(self, reason: Any) -> None:
        self._held_lines.clear()
        super().connectionLost(reason)


@dataclass(frozen=True, slots=True)
class ListenerSettings(Settings):
    """The listener's parameters, bound once."""

    smtpd_endpoints: tuple[str, ...]
    smtpd_banner: str
    myhostname: str
    message_size_limit: int
    queue_directory: str
    requiretls_enable: bool


def configure_protocol(server: RelayagentESMTP, settings: ListenerSettings) -> RelayagentESMTP:
    """Apply main.cf to one server protocol instance."""
    server.message_size_limit = settings.message_size_limit
    server.requiretls_enable = settings.requiretls_enable
    server.host = settings.myhostname.encode("idna")
    server.banner = settings.smtpd_banner.encode("utf-8", "replace")
    return server


class ListenerFactory(protocol.ServerFactory):
    """Builds relay-only ESMTP servers: every recipient goes to the spool
    through ``RelayDeliveryFactory`` (one queue file per transaction)."""

    # No "Starting/Stopping factory <...>" lines: under relayagent's
    # namespace they would land in the maillog, where Postfix has none.
    noisy = False

    def __init__(self, intake: Intake, config: Config) -> None:
        self.intake = intake
        self.settings = ListenerSettings.from_config(config)

    def buildProtocol(self, addr: object) -> RelayagentESMTP:
        server = RelayagentESMTP()
        server.factory = self
        server.deliveryFactory = RelayDeliveryFactory(self.intake)
        configure_protocol(server, self.settings)
        return server


class MailServiceESMTPFactory(protocols.ESMTPFactory):
    """twisted.mail's ESMTP factory for a MailService (local domains,
    portal, AUTH challengers), building ``RelayagentESMTP`` servers."""

    protocol = RelayagentESMTP

    def __init__(self, service: Any, portal: Any, config: Config) -> None:
        super().__init__(service, portal)
        self.settings = ListenerSettings.from_config(config)
        self.domain = self.settings.myhostname.encode("idna")

    def buildProtocol(self, addr: object) -> RelayagentESMTP:
        server = super().buildProtocol(addr)
        configure_protocol(server, self.settings)
        return server


def make_listener_services(
    config: Config,
    spool: Any = None,
    trigger: Callable[[], object] | None = None,
    *,
    reactor: Any = None,
    clock: Callable[[], float] = time.time,
) -> list[IService]:
    """One server service per ``smtpd_endpoints`` string (none when empty).

    ``spool`` defaults to ``Spool(queue_directory)``; ``trigger`` is called
    with no arguments after each queued message.
    """
    settings = ListenerSettings.from_config(config)
    if not settings.smtpd_endpoints:
        return []
    if spool is None:
        spool = Spool(settings.queue_directory)
    intake = Intake.from_config(config, spool, trigger=trigger, clock=clock)
    factory = ListenerFactory(intake, config)
    return [strports.service(description, factory, reactor=reactor) for description in settings.smtpd_endpoints]


class _DaemonSpool:
    """The daemon's spool, which its service makes when it starts (after
    twistd's chroot and uid change): looked up at each enqueue, which
    runs in the reactor's thread pool (``spool.nonblocking``): the
    fsyncs of one client's message hold neither the other clients nor
    the deliveries."""

    def __init__(self, daemon: Any, reactor: Any) -> None:
        self.daemon = daemon
        self.reactor = reactor

    @property
    def directory(self) -> str | None:
        spool = self.daemon.spool
        return spool.directory if spool is not None else None

    def enqueue(self, *args: Any, **kwargs: Any) -> Deferred[str]:
        """``Spool.enqueue`` in the thread pool: a Deferred of the queue id."""
        if self.daemon.spool is None:
            raise OSError("the spool is not open yet")
        return ThreadedSpool(self.daemon.spool, self.reactor).enqueue(*args, **kwargs)


def daemon_listener_services(config: Any, daemon: Any, reactor: Any) -> list[IService]:
    """The listeners of ``twistd relayagent``: ``make_listener_services``
    with the daemon's spool and its queue manager's wakeup as trigger."""

    def wake_queue_manager() -> None:
        if daemon.queue_manager is not None:
            daemon.queue_manager.wakeup()

    return make_listener_services(config, _DaemonSpool(daemon, reactor), wake_queue_manager,
                                  reactor=reactor, clock=reactor.seconds)
