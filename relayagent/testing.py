"""
Test doubles for relayagent's boundaries, shipped with the package so that
our tests, and the tests of programs that embed relayagent, share one copy
of each (docs: DESIGN.md, "every boundary with more than one
implementation is a zope interface with a test double shipped in
relayagent/testing.py").  Each double provides the interface of the real
thing and is checked with ``zope.interface.verify.verifyObject`` in
tests/test_testing.py.  Nothing here opens a socket or reads the clock:
time is a ``task.Clock`` and the network is ``twisted.test.iosim``.

No library module imports this one (the layering contract in .importlinter
forbids it); it may import from every layer.

SYNOPSIS::

    Doubles of the boundaries:
    FakeSession(server=None, *, extensions=None, respond=None, replies=(),
                answers=None, reusable=True, probe_ok=True)
        ISMTPSession: scripted replies to command(), per-recipient answers
        to deliver(), records everything it is asked (commands, sent,
        deliveries, resets, quits); a twisted Protocol, so a connector can
        build it; greet() / refuse(code) / fail(status) settle ``greeted``.
    FakeSessionFactory(server, sessions=None, **session_options)
        builds one FakeSession per connection and keeps them in ``sessions``.
    FakeTLSSession(server_context, ...)
        a FakeSession whose start_tls runs a real TLS handshake over memory
        BIOs (pyOpenSSL) against ``server_context``, for the TLS layer.
    FakeDNSResolver()
        twisted.internet.interfaces.IResolver from a table of records
        (mx(), a(), aaaa(), cname(), ``errors``); anything else NXDOMAIN.
    FakeHTTPClient()
        IHTTPClient from a table (``serve(url, body)``; GETs and POSTs kept).
    FakeNexthopResolver(nexthops=None, addresses=None)
        INexthopResolver from tables; records what it was asked.
    FakeConnector(answers=None, *, site_failure=None, session=None, server=None,
                  **session_options)
        IConnector: one FakeSession per request (``answers`` per address,
        ``session_options`` for it; or the given ``session``), smtp's
        transaction step run on it; or every recipient failed with
        ``site_failure`` and no server.
    FakeDeliveryAgent(spool=None)
        IDeliveryAgent: keeps each request with a Deferred the test settles
        (complete()); records defer_unsent and finish.
    FakeLimiter()
        ILimiter: keeps each acquire with a Deferred the test settles
        (grant(), refuse()); records releases and shaped replies.
    FakeSpool(fail=None, *, deferred=False, directory=None)
        what the intake (relayagent.smtpd.intake) queues into: records each
        enqueue (its content read as the spool reads it), or raises
        ``fail``, or answers Deferreds the test fires (``pending``).
    FakeStatvfs(free_bytes, block_size=4096)
        os.statvfs with the free space a test wants; records the paths.
    FailingFile(room, error=ENOSPC)
        a temporary file whose writes fail once ``room`` octets are used,
        as a file on a full disk does.
    ThreadCallReactor()
        records callFromThread calls (a worker thread's reports) until
        the test runs them (run_calls()).
    LogCapture(testcase)
        every log event while a test runs (text(), messages()).
    secret_forms(password, *extra)
        the password and its base64 forms, to grep logs for leaks.
    reply_from(text) -> Reply
        "250 2.0.0 ok" or "250-a\\n250 b" (or a list of lines) as a Reply.

    The scripted SMTP server, for the real SMTPSession:
    ScriptedServer(greeting=..., ehlo=..., helo=..., mail=..., rcpt=...,
                   data=..., dot=..., rset=..., quit=..., other=...)
        a protocol factory: each reply is a string or a list of lines,
        Series(r1, r2, ...) for successive calls, SILENT for no reply to
        it or anything after (to test timeouts), HANGUP to drop the
        connection; ``rcpt`` may map
        addresses to replies.  A 421 reply closes the connection after
        it, as servers do; RCPT without MAIL gets 503, DATA with no recipient accepted 554.
        Records ``commands`` and ``messages``.
    connect_session(server, *, clock=None, config=None, server_info=None,
                    security=None, **parameters) -> SessionRun
        a real relayagent.smtp.session.SMTPSessionFactory connected to
        ``server`` over iosim; SessionRun.run(deferred) pumps until it
        fires and returns its result (or raises its failure).
    connect_through_connector(servers, *, config=None, security=None,
                              **parameters) -> ConnectorRun
        the real relayagent.smtp.connect.Connector on a MemoryReactorClock,
        making real sessions; ``servers`` maps an address to its
        ScriptedServer (others refuse the connection); ConnectorRun.run
        completes connections and pumps until a Deferred fires.

DIAGNOSTICS
    FakeSession.deliver raises RuntimeError for a second transaction while
    one runs (as SMTPSession does).  SessionRun.run raises AssertionError
    when the Deferred has not fired once nothing moves any more (a test
    waiting for a reply its script never sends: advance the clock).
    ScriptedServer answers a command it has no reply for with "502 5.5.2
    command not scripted" and records it.

Owns no parameters.
"""

from __future__ import annotations

import base64
import errno
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import common, dns
from twisted.names.error import DNSNameError
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from relayagent.common.config import Config
from relayagent.common.status import DeliveryFailure, Status
from relayagent.common.transcript import Transcript
from relayagent.qmgr.interfaces import IDeliveryAgent, ILimiter
from relayagent.qmgr.limits import Grant
from relayagent.qmgr.scheduler import RequestResult
from relayagent.smtp.channel import ServerInfo, SessionSettings
from relayagent.smtp.connect import Connector
from relayagent.smtp.dnssec import AuthenticatedAnswer
from relayagent.smtp.ehlo import announced_size
from relayagent.smtp.https import HTTPError, HTTPResponse
from relayagent.smtp.interfaces import IConnector, IHTTPClient, INexthopResolver, ISMTPSession
from relayagent.smtp.reply import Reply, ReplyAssembler
from relayagent.smtp.resolve import AddressList
from relayagent.smtp.result import RecipientOutcome, SmtpResult
from relayagent.smtp.session import SMTPSessionFactory
from relayagent.smtp.transaction import TransactionResult
from relayagent.spool import ACTIVE

__all__ = [
    "HANGUP",
    "SILENT",
    "Command",
    "ConnectorRun",
    "Delivery",
    "FakeDNSResolver",
    "FakeDeliveryAgent",
    "FakeNexthopResolver",
    "FakeSession",
    "FakeSessionFactory",
    "FakeTLSSession",
    "LogCapture",
    "ScriptedServer",
    "Series",
    "SessionRun",
    "connect_session",
    "connect_through_connector",
    "reply_from",
    "secret_forms",
]

DEFAULT_SERVER = ServerInfo("mx.example.com", "192.0.2.1", 25, "example.com")


def reply_from(text: str | Sequence[str] | Reply) -> Reply:
    """A Reply from its text: one line, lines joined by newlines, or a list
    of lines, each with its code ("250-mx", "250 PIPELINING")."""
    if isinstance(text, Reply):
        return text
    lines = text.split("\n") if isinstance(text, str) else list(text)
    assembler = ReplyAssembler()
    result = None
    for line in lines:
        result = assembler.feed(line.encode("utf-8"))
    if result is None:
        raise ValueError(f"not a whole reply: {text!r}")
    return result


def _deferred_reply(result: Any) -> defer.Deferred[Reply]:
    if isinstance(result, defer.Deferred):
        return result
    if isinstance(result, BaseException):
        return defer.fail(result)
    return defer.succeed(reply_from(result))


# ---------------------------------------------------------------------------
# Sessions


class Command(NamedTuple):
    """One ``command()`` call a FakeSession was given (equal to the tuple)."""

    line: bytes
    stage: str
    timeout: float
    redact: bool


class Delivery(NamedTuple):
    """One ``deliver()`` call: the addresses, ``last`` and ``probe``."""

    addresses: list[str]
    last: bool
    probe: bool


# An answer of FakeSession.deliver: no status at all for that recipient.
NO_STATUS: Any = Status("4.3.0", "FakeSession: NO_STATUS (never in a result)")


def _sent_status(server: ServerInfo) -> Status:
    return Status("2.0.0", "250 2.0.0 Ok: queued as FAKE", code=250,
                  reply="250 2.0.0 Ok: queued as FAKE", remote_mta=server.host)


@implementer(ISMTPSession)
class FakeSession(protocol.Protocol):
    """An ISMTPSession without a protocol engine.

    ``command(line, ...)`` records a ``Command`` (in ``commands``, the
    line in ``sent``) and answers with ``respond(line)`` when given (a
    callable returning a Reply, reply text, an exception or a Deferred),
    else the next of ``replies``, else "500 unexpected".  ``deliver``
    records a ``Delivery`` and answers each recipient with
    ``answers[address]`` (a Status; default: sent; ``NO_STATUS``: the
    recipient is left out of the result, as a broken layer might), or
    fails with ``deliver_error`` (say a CorruptQueueFile), reusable when
    ``reusable``; with ``probe=True`` it counts a reset first and, when
    ``probe_ok`` is false, answers ``probe_failed``.  ``reset()`` answers
    ``probe_ok``; ``quit()`` counts and closes the transport if there is
    one.  ``greeted`` is settled by ``greet()``, ``refuse()`` or
    ``fail()`` (or at once with ``greeted=True``).
    """

    def __init__(
        self,
        server: ServerInfo | None = None,
        *,
        extensions: Mapping[str, str] | None = None,
        respond: Callable[[bytes], Any] | None = None,
        replies: Iterable[Any] = (),
        answers: Mapping[str, Status] | None = None,
        reusable: bool = True,
        probe_ok: bool = True,
        usable: bool = True,
        greeted: bool = False,
        deliver_error: Exception | None = None,
    ) -> None:
        self.server = server or DEFAULT_SERVER
        self.deliver_error = deliver_error
        self.extensions: dict[str, str] = dict(extensions or {})
        auth = self.extensions.get("AUTH", "")
        self.auth_mechanisms: frozenset[str] = frozenset(m.upper() for m in auth.split())
        self.usable = usable
        self.transactions = 0
        self.transcript = Transcript()
        self.greeted: defer.Deferred[Any] = defer.Deferred()
        self.answers: dict[str, Status] = dict(answers or {})
        self.reusable = reusable
        self.probe_ok = probe_ok
        self.commands: list[Command] = []
        self.sent: list[bytes] = []
        self.deliveries: list[Delivery] = []
        self.tls_creators: list[Any] = []
        self.resets = 0
        self.quits = 0
        self._respond = respond
        self._replies = deque(replies)
        self._busy = False
        if greeted:
            self.greet()

    # -- ISMTPSession ---------------------------------------------------

    @property
    def namaddr(self) -> str:
        return self.server.namaddr

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        return announced_size(self.extensions)

    def command(self, line: bytes, *, stage: str, timeout: float, redact: bool = False) -> defer.Deferred[Reply]:
        self.commands.append(Command(line, stage, timeout, redact))
        self.sent.append(line)
        self.transcript.sent(line, redact=redact)
        return self.respond(line)

    def respond(self, line: bytes) -> defer.Deferred[Reply]:
        """The reply to ``line`` (override, or pass ``respond=`` / ``replies=``)."""
        if self._respond is not None:
            result = self._respond(line)
        elif self._replies:
            result = self._replies.popleft()
        else:
            result = "500 unexpected"
        return _deferred_reply(result)

    def start_tls_handshake(self, connection_creator: Any) -> defer.Deferred[None]:
        return self.start_tls(connection_creator)

    def start_tls(self, connection_creator: Any) -> defer.Deferred[None]:
        """Records the creator and succeeds (FakeTLSSession does a handshake)."""
        self.tls_creators.append(connection_creator)
        return defer.succeed(None)

    def deliver(self, envelope: Any, recipients: Sequence[Any], *, last: bool = False,
                probe: bool = False) -> defer.Deferred[TransactionResult]:
        if self._busy:
            raise RuntimeError("one transaction at a time per session")
        if probe:
            self.resets += 1
            if not self.probe_ok:
                self.usable = False
                return defer.succeed(TransactionResult({}, None, False, probe_failed=True))
        self.deliveries.append(Delivery([r.address for r in recipients], last, probe))
        self.transactions += 1
        if self.deliver_error is not None:
            return defer.fail(self.deliver_error)
        statuses = {r.index: self.answers.get(r.address) or _sent_status(self.server) for r in recipients
                    if self.answers.get(r.address) is not NO_STATUS}
        reusable = self.reusable and not last
        if not reusable:
            self.usable = False
        return defer.succeed(TransactionResult(statuses, None, reusable))

    def reset(self) -> defer.Deferred[bool]:
        self.resets += 1
        if not self.probe_ok:
            self.usable = False
        return defer.succeed(self.probe_ok)

    def quit(self) -> defer.Deferred[None]:
        self.quits += 1
        self.usable = False
        if self.transport is not None:
            self.transport.loseConnection()
        return defer.succeed(None)

    # -- what a test does with it ----------------------------------------

    def greet(self) -> None:
        """The greeting and EHLO went well: ``greeted`` fires."""
        self.greeted.callback(self)

    def refuse(self, code: int, stage: str = "CONNECT") -> None:
        """The server refused with ``code`` ("refused to talk to me")."""
        dsn = f"{code // 100}.0.0"
        self.fail(Status(dsn, f"host {self.server.namaddr} refused to talk to me: {code} go away",
                         code=code, stage=stage))

    def fail(self, status: Status) -> None:
        """``greeted`` fails with DeliveryFailure(status)."""
        self.usable = False
        self.greeted.errback(DeliveryFailure(status))


class FakeSessionFactory(protocol.Factory):
    """One FakeSession (with ``session_options``) per connection, kept in ``sessions``."""

    def __init__(self, server: ServerInfo, sessions: list[FakeSession] | None = None,
                 **session_options: Any) -> None:
        self.server = server
        self.sessions = sessions if sessions is not None else []
        self.session_options = session_options

    def buildProtocol(self, addr: Any) -> FakeSession:
        session = FakeSession(self.server, **self.session_options)
        session.factory = self
        self.sessions.append(session)
        return session


class _FakeTLSProtocol:
    """Stands in for Twisted's TLSMemoryBIOProtocol (the verify callback's target)."""

    def __init__(self) -> None:
        self.verification_failure: Any = None

    def failVerification(self, reason: Any) -> None:
        self.verification_failure = reason


def memory_handshake(client: SSL.Connection, server: SSL.Connection, tls_protocol: Any) -> None:
    """Run a TLS handshake between two memory-BIO connections."""
    done = {id(client): False, id(server): False}
    for _ in range(50):
        moved = False
        for connection, peer in ((client, server), (server, client)):
            if not done[id(connection)]:
                try:
                    connection.do_handshake()
                    done[id(connection)] = True
                except SSL.WantReadError:
                    pass
            if tls_protocol.verification_failure is not None:
                raise ConnectionLost("aborted: certificate refused")
            try:
                data = connection.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                peer.bio_write(data)
                moved = True
        if all(done.values()) and not moved:
            return
    raise AssertionError("the handshake did not finish")


class FakeTLSSession(FakeSession):
    """A FakeSession for the STARTTLS layer: STARTTLS gets ``starttls_reply``,
    and ``start_tls`` runs a real handshake against ``server_context``
    (recording the SNI asked for and the client certificate), then plays
    EHLO again: ``ehlo_after_tls`` fails it, else the extensions become
    ``after_tls_extensions``."""

    def __init__(
        self,
        server_context: SSL.Context | None,
        *,
        host: str = "mx.example.com",
        nexthop: str = "example.com",
        offer_starttls: bool = True,
        starttls_reply: Reply | None = None,
        ehlo_after_tls: Exception | None = None,
    ) -> None:
        extensions = {"PIPELINING": ""}
        if offer_starttls:
            extensions["STARTTLS"] = ""
        super().__init__(ServerInfo(host, "192.0.2.1", 25, nexthop), extensions=extensions)
        self.server_context = server_context
        self.starttls_reply = starttls_reply or reply_from("220 2.0.0 Ready to start TLS")
        self.ehlo_after_tls = ehlo_after_tls
        self.sni: list[bytes | None] = []
        self.client_certificate: Any = None
        self.tls_protocol = _FakeTLSProtocol()
        self.tls = False
        self.after_tls_extensions = {"PIPELINING": "", "AUTH": "PLAIN LOGIN"}

    def command(self, line: bytes, *, stage: str, timeout: float, redact: bool = False) -> defer.Deferred[Reply]:
        if line == b"STARTTLS":
            self.commands.append(Command(line, stage, timeout, redact))
            self.sent.append(line)
            return defer.succeed(self.starttls_reply)
        return super().command(line, stage=stage, timeout=timeout, redact=redact)

    def start_tls(self, connection_creator: Any) -> defer.Deferred[None]:
        creator = connection_creator
        self.tls_creators.append(creator)
        assert self.server_context is not None
        self.server_context.set_tlsext_servername_callback(lambda conn: self.sni.append(conn.get_servername()))
        client = creator.clientConnectionForTLS(self.tls_protocol)
        client.set_connect_state()
        server = SSL.Connection(self.server_context, None)
        server.set_accept_state()
        try:
            memory_handshake(client, server, self.tls_protocol)
        except (SSL.Error, ConnectionLost) as error:
            return defer.fail(
                DeliveryFailure(Status("4.4.2", f"lost connection with {self.server.namaddr}: {error}"))
            )
        self.client_certificate = server.get_peer_certificate()
        self.tls = True
        self.sent.append(b"EHLO client.example.com")
        if self.ehlo_after_tls is not None:
            return defer.fail(self.ehlo_after_tls)
        self.extensions = dict(self.after_tls_extensions)
        self.auth_mechanisms = frozenset(self.extensions["AUTH"].split())
        return defer.succeed(None)


# ---------------------------------------------------------------------------
# Resolvers


class FakeDNSResolver(common.ResolverBase):
    """A twisted.names IResolver answering from a table: ``records[(name,
    type)]`` is a list of RRHeader (empty: NODATA), ``errors[(name, type)]``
    an exception to fail with.  A name with no record of any type is
    NXDOMAIN; one with records of other types only is NODATA.  Every
    query is kept in ``queries``.  ``validated`` (a set of ``(name,
    type)``, or ``validate_all``) makes answers carry the AD bit, as
    ``relayagent.smtp.dnssec.DNSSECResolver``'s do."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[tuple[str, int], list[dns.RRHeader]] = {}
        self.errors: dict[tuple[str, int], Exception] = {}
        self.queries: list[tuple[str, int]] = []
        self.validated: set[tuple[str, int]] = set()
        self.validate_all = False

    def _lookup(self, name, cls, type, timeout):  # noqa: A002 - ResolverBase's signature
        name = name.decode() if isinstance(name, bytes) else name
        self.queries.append((name, type))
        key = (name.lower(), type)
        if key in self.errors:
            return defer.fail(self.errors[key])
        authentic = self.validate_all or key in self.validated
        if key in self.records:
            return defer.succeed(AuthenticatedAnswer((self.records[key], [], []), authentic))
        if any(owner == key[0] for owner, _ in self.records):
            return defer.succeed(AuthenticatedAnswer(([], [], []), authentic))
        return defer.fail(DNSNameError(name))

    def tlsa(self, owner: str, *rdata: bytes) -> None:
        """TLSA records (raw rdata: usage, selector, matching type, data)
        at ``owner`` (``_25._tcp.mx.example.com``)."""
        self.records[(owner, 52)] = [
            dns.RRHeader(owner, 52, payload=dns.UnknownRecord(data)) for data in rdata
        ]

    def mx(self, domain: str, *pairs: tuple[int, str]) -> None:
        """Answer MX queries for ``domain`` with ``(preference, host)`` pairs (none: NODATA)."""
        self.records[(domain, dns.MX)] = [
            dns.RRHeader(domain, dns.MX, payload=dns.Record_MX(preference, host)) for preference, host in pairs
        ]

    def a(self, host: str, *addresses: str) -> None:
        """Answer A queries for ``host`` with ``addresses`` (none: NODATA)."""
        self.records[(host, dns.A)] = [dns.RRHeader(host, dns.A, payload=dns.Record_A(a)) for a in addresses]

    def aaaa(self, host: str, *addresses: str) -> None:
        """Answer AAAA queries for ``host`` with ``addresses`` (none: NODATA)."""
        self.records[(host, dns.AAAA)] = [dns.RRHeader(host, dns.AAAA, payload=dns.Record_AAAA(a)) for a in addresses]

    def txt(self, name: str, *texts: str) -> None:
        """TXT records of ``name``, one per text (each one character string)."""
        self.records[(name, dns.TXT)] = [
            dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(text.encode())) for text in texts
        ]

    def cname(self, alias: str, target: str, rrtype: int, *extra: dns.RRHeader) -> None:
        """Answer ``rrtype`` queries for ``alias`` with a CNAME to ``target``,
        then the records of ``extra``."""
        self.records[(alias, rrtype)] = [dns.RRHeader(alias, dns.CNAME, payload=dns.Record_CNAME(target)), *extra]


assert IResolver.implementedBy(FakeDNSResolver)


class FakeSpool:
    """Records each enqueue; reads the content stream as the spool would
    (module docstring)."""

    def __init__(self, fail: Exception | None = None, *, deferred: bool = False,
                 directory: str | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail = fail
        self.deferred = deferred
        self.pending: list[tuple[defer.Deferred[str], str]] = []
        if directory is not None:
            # For the intake's space check and the glue's temporary file.
            os.makedirs(directory, exist_ok=True)
            self.directory = directory

    def enqueue(self, sender: str, recipients: Iterable[Any], content: Any, *,
                body_type: Any = None, **options: Any) -> Any:
        """Record the message (its content read whole) and return its queue id
        ``QNNNNN``, or, with ``deferred``, a Deferred the test fires from
        ``pending``.  Raises ``fail`` when it is set."""
        if self.fail is not None:
            raise self.fail
        data = content.read()
        self.messages.append(dict(sender=sender, recipients=list(recipients), content=data, body_type=body_type,
                                  **({"requiretls": True} if options.get("requiretls") else {})))
        queue_id = f"Q{len(self.messages):05d}"
        if self.deferred:
            waiting: defer.Deferred[str] = defer.Deferred()
            self.pending.append((waiting, queue_id))
            return waiting
        return queue_id


class FakeStatvfs:
    """os.statvfs with the free blocks a test wants; ``asked``: the paths."""

    def __init__(self, free_bytes: int, block_size: int = 4096) -> None:
        self.free_bytes = free_bytes
        self.block_size = block_size
        self.asked: list[str] = []

    def __call__(self, path: str) -> os.statvfs_result:
        self.asked.append(path)
        free = self.free_bytes // self.block_size
        return os.statvfs_result((self.block_size, self.block_size, 10**6, free, free, 10**6, 10**5, 10**5, 0, 255))


class FailingFile:
    """A temporary file whose writes fail once ``room`` octets are used,
    as a file on a full disk does (a buffered file fails at its flush)."""

    def __init__(self, room: int, error: int = errno.ENOSPC) -> None:
        self.room = room
        self.error = error
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> int:
        """Append ``data``, or raise OSError(``error``) when it would take more
        than ``room`` octets in all (nothing is written then)."""
        if len(self.data) + len(data) > self.room:
            raise OSError(self.error, os.strerror(self.error))
        self.data += data
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: a write fails at once."""
        pass

    def seek(self, offset: int) -> int:
        """Does not move; returns 0 (``read`` gives everything anyway)."""
        return 0

    def read(self, size: int = -1) -> bytes:
        """Everything written so far, whatever ``size``."""
        return bytes(self.data)

    def close(self) -> None:
        """Note the file as closed (``closed``)."""
        self.closed = True


class ThreadCallReactor:
    """The part of a reactor a worker thread talks to: ``callFromThread``
    calls, and ``callLater(0, ...)`` (the end of this reactor turn), are
    recorded until ``run_calls()``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:  # noqa: N802 - Twisted's name
        """Record the call for ``run_calls``."""
        self.calls.append((function, args))

    def callLater(self, delay: float, function: Callable[..., Any], *args: Any) -> None:  # noqa: N802 - Twisted's name
        """Record a call at the end of this turn (only ``delay`` 0)."""
        if delay != 0:
            raise ValueError("ThreadCallReactor.callLater takes only a delay of 0")
        self.calls.append((function, args))

    def run_calls(self) -> None:
        """Make the calls recorded so far, in order, as the reactor thread
        would (calls they record wait for the next ``run_calls``)."""
        calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)


@implementer(IConnector)
class FakeConnector:
    """The connection layer for smtp's entry point: each ``deliver`` makes
    one session (a new ``FakeSession(server, answers=answers)``, or the
    ``session`` given) and runs the transaction step on it, every
    recipient's outcome from that server; with ``site_failure`` no session
    is made and every recipient gets that status with no server.
    ``sessions``: the sessions used, in order; ``calls``: the indexes of
    each request."""

    def __init__(self, answers: Mapping[str, Status] | None = None, *, site_failure: Status | None = None,
                 session: Any = None, server: ServerInfo | None = None, **session_options: Any) -> None:
        self.answers = dict(answers or {})
        self.site_failure = site_failure
        self.session = session
        self.server = server or DEFAULT_SERVER
        self.session_options = session_options
        self.sessions: list[Any] = []
        self.calls: list[list[int]] = []
        self.demands: list[Any] = []  # each request's tls_demand (None: none given)

    def deliver(self, resolver: Any, nexthops: Sequence[Any], recipients: Iterable[int],
                transact: Callable[[Any, list[int]], defer.Deferred[dict[int, Status]]],
                *, tls_demand: Any = None) -> defer.Deferred[SmtpResult]:
        """One session (the only, hence final, server) for ``recipients``."""
        indexes = list(recipients)
        self.calls.append(indexes)
        self.demands.append(tls_demand)
        if self.site_failure is not None:
            return defer.succeed(SmtpResult({i: RecipientOutcome(self.site_failure, None) for i in indexes}))
        session = self.session
        if session is None:
            session = FakeSession(self.server, answers=self.answers, **self.session_options)
        self.sessions.append(session)
        server = getattr(session, "server", self.server)
        return transact(session, indexes).addCallback(
            lambda statuses: SmtpResult({i: RecipientOutcome(s.final(), server) for i, s in statuses.items()},
                                        sessions=1)
        )


@implementer(INexthopResolver)
class FakeNexthopResolver:
    """INexthopResolver from tables: ``nexthops[domain]`` a list of Nexthop,
    ``addresses[nexthop.host]`` a list of MailExchangerAddress or a Status
    (the lookup fails with DeliveryFailure(status)).  An unknown host has
    no address (4.4.4).  ``asked`` keeps the nexthops looked up."""

    def __init__(self, nexthops: Mapping[str, list[Any]] | None = None,
                 addresses: Mapping[str, Any] | None = None) -> None:
        self.table: dict[str, list[Any]] = dict(nexthops or {})
        self.address_table: dict[str, Any] = dict(addresses or {})
        self.asked: list[Any] = []

    def nexthops(self, domain: str) -> list[Any]:
        return list(self.table.get(domain, ()))

    def addresses(self, nexthop: Any) -> defer.Deferred[AddressList]:
        self.asked.append(nexthop)
        found = self.address_table.get(nexthop.host)
        if isinstance(found, Status):
            return defer.fail(DeliveryFailure(found))
        if not found:
            return defer.fail(DeliveryFailure(Status("4.4.4", f"Host not found: {nexthop.host}")))
        return defer.succeed(AddressList(found))


# ---------------------------------------------------------------------------
# The delivery agent


@implementer(IDeliveryAgent)
class FakeDeliveryAgent:
    """Records the scheduler's requests; the test decides when and how each
    ends (``complete``).  ``finish`` closes the message and, with a
    ``spool``, removes its file from active/."""

    def __init__(self, spool: Any = None) -> None:
        self.spool = spool
        self.requests: list[tuple[Any, defer.Deferred[RequestResult]]] = []
        self.unsent: list[tuple[Any, Status]] = []
        self.finished: list[str] = []

    def deliver(self, request: Any) -> defer.Deferred[RequestResult]:
        deferred: defer.Deferred[RequestResult] = defer.Deferred()
        self.requests.append((request, deferred))
        return deferred

    def defer_unsent(self, request: Any, status: Status) -> None:
        self.unsent.append((request, status))

    def finish(self, message: Any) -> None:
        self.finished.append(message.queue_id)
        message.close()
        if self.spool is not None:
            self.spool.remove(message.queue_id, ACTIVE)

    def complete(self, position: int = 0, failure: Status | None = None) -> Any:
        """End request ``position`` (the oldest by default); ``failure``: a site failure."""
        request, deferred = self.requests.pop(position)
        deferred.callback(RequestResult(site_failure=failure))
        return request

    def destinations(self) -> list[str]:
        """The destination of each request so far, in order."""
        return [request.destination for request, _ in self.requests]


@implementer(ILimiter)
class FakeLimiter:
    """Records the queue manager's questions; the test answers each
    (``grant``, ``refuse``), in order."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, defer.Deferred[Grant]]] = []
        self.released: list[tuple[str, Grant, int]] = []
        self.shaped: list[tuple[str, Status]] = []
        self.stopped = False

    def acquire(self, key: str) -> defer.Deferred[Grant]:
        """A Deferred the test fires with ``grant`` or ``refuse``."""
        deferred: defer.Deferred[Grant] = defer.Deferred()
        self.asked.append((key, deferred))
        return deferred

    def release(self, key: str, grant: Grant, connections: int = 0) -> None:
        """Recorded in ``released``."""
        self.released.append((key, grant, connections))

    def shape(self, key: str, status: Status) -> None:
        """Recorded in ``shaped``; no rule applies."""
        self.shaped.append((key, status))

    def stop(self) -> defer.Deferred[None]:
        """Sets ``stopped``."""
        self.stopped = True
        return defer.succeed(None)

    def grant(self, position: int = 0) -> str:
        """Answer question ``position`` (the oldest by default) with a grant; its key."""
        key, deferred = self.asked.pop(position)
        deferred.callback(Grant(True, lease=f"lease-{len(self.released)}"))
        return key

    def refuse(self, wait: float | None, position: int = 0) -> str:
        """Answer question ``position`` with "wait ``wait`` seconds"; its key."""
        key, deferred = self.asked.pop(position)
        deferred.callback(Grant(False, wait))
        return key


# ---------------------------------------------------------------------------
# Logs


class LogCapture:
    """Every log event, formatted, while a test runs."""

    def __init__(self, case: Any) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self) -> str:
        """Each event formatted, and its repr (every field): for greps."""
        return "\n".join(str(formatEvent(event)) + " " + repr(event) for event in self.events)

    def messages(self) -> list[str]:
        """The text of each event captured so far, as Twisted formats it."""
        return [str(formatEvent(event)) for event in self.events]


def secret_forms(password: str, *extra: bytes) -> list[str]:
    """The password and every base64 form it could leak in."""
    forms = [password, base64.b64encode(password.encode()).decode()]
    forms += [base64.b64encode(item).decode() for item in extra]
    return forms


# ---------------------------------------------------------------------------
# The scripted SMTP server


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SILENT = _Marker("SILENT")  # no reply, to this or anything after: the client's timer runs
HANGUP = _Marker("HANGUP")  # the connection is dropped instead of a reply


class Series:
    """Successive replies for successive calls of one command; the last one
    repeats."""

    def __init__(self, *replies: Any) -> None:
        if not replies:
            raise ValueError("Series needs at least one reply")
        self.replies = list(replies)

    def take(self, call: int) -> Any:
        """The reply for call number ``call`` (from 0); past the end, the last one."""
        return self.replies[min(call, len(self.replies) - 1)]


class _ServerProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, script: ScriptedServer) -> None:
        self.script = script
        self.in_data = False
        self.body: list[bytes] = []
        self.recipients = 0  # accepted in this transaction
        self.mail = False  # MAIL accepted
        self.stalled = False  # SILENT was answered: it hears nothing more

    def connectionMade(self) -> None:
        self.script.connections.append(self)
        self._answer(self.script.greeting)

    def lineReceived(self, line: bytes) -> None:
        if self.stalled:
            return
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.script.messages.append(b"".join(self.body))
                self.body = []
                self.recipients, self.mail = 0, False
                self._answer(self.script._reply_for("dot"))
            else:
                self.body.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        text = line.decode("utf-8", "replace")
        self.script.commands.append(text)
        verb = text.split(" ", 1)[0].split(":", 1)[0].upper()
        if verb == "MAIL":
            answer = self.script._reply_for("mail")
            code = _code(answer)
            self.mail = code is not None and 200 <= code < 300
        elif verb == "RCPT" and not self.mail:
            answer = "503 5.5.1 Error: need MAIL command"
        elif verb == "RCPT":
            answer = self.script._rcpt_reply(text)
            code = _code(answer)
            self.recipients += code is not None and 200 <= code < 300
        elif verb == "DATA":
            answer = self.script._reply_for("data")
            if _code(answer) == 354:
                if self.recipients:
                    self.in_data = True
                else:  # as Postfix's smtpd says to a pipelined DATA
                    answer = "554 5.5.1 Error: no valid recipients"
        elif verb in ("EHLO", "HELO", "RSET", "QUIT"):
            answer = self.script._reply_for(verb.lower())
            self.recipients, self.mail = 0, False
        else:
            answer = self.script.other.get(verb, "502 5.5.2 command not scripted")
        self._answer(answer)
        if verb == "QUIT" and answer is not SILENT:
            self.transport.loseConnection()

    def _answer(self, answer: Any) -> None:
        if answer is SILENT:
            self.stalled = True
            return
        if answer is HANGUP:
            self.transport.loseConnection()
            return
        lines = answer.split("\n") if isinstance(answer, str) else list(answer)
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))
        if _code(answer) == 421:
            self.transport.loseConnection()


def _code(answer: Any) -> int | None:
    if answer is SILENT or answer is HANGUP:
        return None
    last = answer.split("\n")[-1] if isinstance(answer, str) else list(answer)[-1]
    return int(last[:3]) if last[:3].isdigit() else None


class ScriptedServer(protocol.Factory):
    """An SMTP server that says what it is told (see the module docstring).

    Each reply is a string ("250 2.0.0 ok", or lines joined by newlines),
    a list of lines, ``Series(...)``, ``SILENT`` or ``HANGUP``.  ``rcpt``
    is one reply for every recipient or a mapping from address (without
    angle brackets) to reply, others getting "250 2.1.5 Ok".  ``other``
    maps further verbs (AUTH, STARTTLS, ...) to replies.  ``commands``
    keeps every command line received, ``messages`` every message body
    (dot-unstuffed, CRLF), ``connections`` every server protocol.
    """

    def __init__(
        self,
        *,
        greeting: Any = "220 mx.example.com ESMTP",
        ehlo: Any = ("250-mx.example.com", "250-PIPELINING", "250-8BITMIME", "250 ENHANCEDSTATUSCODES"),
        helo: Any = "250 mx.example.com",
        mail: Any = "250 2.1.0 Ok",
        rcpt: Any = "250 2.1.5 Ok",
        data: Any = "354 End data with <CR><LF>.<CR><LF>",
        dot: Any = "250 2.0.0 Ok: queued as SCRIPTED",
        rset: Any = "250 2.0.0 Ok",
        quit: Any = "221 2.0.0 Bye",
        other: Mapping[str, Any] | None = None,
    ) -> None:
        self.greeting = greeting
        self.replies: dict[str, Any] = {"ehlo": ehlo, "helo": helo, "mail": mail, "data": data,
                                        "dot": dot, "rset": rset, "quit": quit}
        self.rcpt = rcpt
        self.other = {verb.upper(): answer for verb, answer in (other or {}).items()}
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.connections: list[_ServerProtocol] = []
        self._calls: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> _ServerProtocol:
        server = _ServerProtocol(self)
        server.factory = self
        return server

    def _reply_for(self, key: str, answer: Any = None) -> Any:
        answer = self.replies[key] if answer is None else answer
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        return answer.take(call) if isinstance(answer, Series) else answer

    def _rcpt_reply(self, text: str) -> Any:
        if not isinstance(self.rcpt, Mapping):
            return self._reply_for("rcpt", self.rcpt)
        start, end = text.find("<"), text.find(">")
        address = text[start + 1:end] if 0 <= start < end else ""
        answer = self.rcpt.get(address, "250 2.1.5 Ok")
        key = "rcpt " + address
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        return answer.take(call) if isinstance(answer, Series) else answer


@dataclass
class SessionRun:
    """A real SMTPSession connected to a ScriptedServer over iosim."""

    session: Any
    server: ScriptedServer
    pump: iosim.IOPump
    clock: Clock
    config: Config

    def flush(self) -> None:
        """Move every byte that can move (and run what is due now)."""
        self.pump.flush()

    def run(self, deferred: defer.Deferred[Any]) -> Any:
        """Pump until ``deferred`` has fired; its result, or its failure raised."""
        results: list[Any] = []
        deferred.addBoth(results.append)
        self.pump.flush()
        if not results:
            raise AssertionError("the Deferred did not fire and nothing moves: advance the clock?")
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def greet(self) -> Any:
        """Pump until the greeting and EHLO are done; the session (or the failure raised)."""
        return self.run(self.session.greeted)

    def advance(self, seconds: float) -> None:
        """Pump, let ``seconds`` pass on the clock, and pump again."""
        self.pump.flush()
        self.clock.advance(seconds)
        self.pump.flush()

    def transcript(self) -> list[str]:
        """The session's transcript lines so far (``Out: ...``/``In: ...``)."""
        return self.session.transcript.lines()


def _config(config: Config | None, parameters: Mapping[str, str]) -> Config:
    base = config if config is not None else Config.defaults().replace(smtp_helo_name="client.example.com")
    return base.replace(**parameters) if parameters else base


def connect_session(
    server: ScriptedServer,
    *,
    clock: Clock | None = None,
    config: Config | None = None,
    server_info: ServerInfo | None = None,
    security: Any = None,
    **parameters: str,
) -> SessionRun:
    """A real ``SMTPSessionFactory``'s session, connected to ``server`` over
    ``twisted.test.iosim`` and pumped through the greeting exchange
    (``run.session.greeted`` has fired unless the script stalls it).
    ``parameters``: main.cf parameters for the session (smtp_*_timeout ...)."""
    clock = clock if clock is not None else Clock()
    config = _config(config, parameters)
    factory = SMTPSessionFactory(SessionSettings.from_config(config), clock, server_info or DEFAULT_SERVER, security)
    session = factory.buildProtocol(None)
    server_protocol = server.buildProtocol(None)
    pump = iosim.connect(
        server_protocol, iosim.makeFakeServer(server_protocol),
        session, iosim.makeFakeClient(session),
        greet=True, clock=clock,
    )
    return SessionRun(session, server, pump, clock, config)


@dataclass
class ConnectorRun:
    """A real Connector on a MemoryReactorClock, with ScriptedServers by address."""

    connector: Any
    reactor: MemoryReactorClock
    config: Config
    servers: Mapping[str, ScriptedServer]
    pumps: list[iosim.IOPump] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def _complete_one(self) -> bool:
        """Connect (or refuse) the oldest pending connection attempt."""
        if not self.reactor.tcpClients:
            return False
        host, port, client_factory, _timeout, _bind = self.reactor.tcpClients.pop(0)
        connector = self.reactor.connectors.pop(0)
        server = self.servers.get(host)
        if server is None:
            self.refused.append(host)
            client_factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
            return True
        client = client_factory.buildProtocol(None)
        server_protocol = server.buildProtocol(None)
        self.pumps.append(iosim.connect(
            server_protocol, iosim.makeFakeServer(server_protocol),
            client, iosim.makeFakeClient(client),
            greet=False, clock=self.reactor,
        ))
        return True

    def run(self, deferred: defer.Deferred[Any]) -> Any:
        """Complete connections and pump until ``deferred`` fires and nothing
        moves; its result (or its failure raised)."""
        results: list[Any] = []
        deferred.addBoth(results.append)
        for _ in range(1000):
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved
            if self._complete_one():
                continue
            if not moved:
                break
        if not results:
            raise AssertionError("the Deferred did not fire and nothing moves: advance the clock?")
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result


def connect_through_connector(
    servers: Mapping[str, ScriptedServer],
    *,
    config: Config | None = None,
    security: Any = None,
    **parameters: str,
) -> ConnectorRun:
    """A real ``relayagent.smtp.connect.Connector`` whose sessions are real
    ``SMTPSession``s on a MemoryReactorClock; ``servers`` maps an address
    (e.g. "192.0.2.1") to the ScriptedServer that answers there (any
    port).  A connection to an address without a server is refused."""
    reactor = MemoryReactorClock()
    config = _config(config, parameters)
    settings = SessionSettings.from_config(config)

    def session_factory_for(server_info: ServerInfo, plaintext: bool = False) -> SMTPSessionFactory:
        return SMTPSessionFactory(settings, reactor, server_info, None if plaintext else security)

    return ConnectorRun(Connector(reactor, config, session_factory_for), reactor, config, servers)


@implementer(IHTTPClient)
class FakeHTTPClient:
    """An ``IHTTPClient`` answering from a table: ``responses[url]`` is an
    ``HTTPResponse`` or an exception (``HTTPError``) to fail with; any
    other URL fails with ``HTTPError("connection refused")``.  Every GET
    is kept in ``gets``, every POST as (url, body, content type) in
    ``posts`` (answered with ``post_code``)."""

    def __init__(self) -> None:
        self.responses: dict[str, Any] = {}
        self.gets: list[str] = []
        self.posts: list[tuple[str, bytes, str]] = []
        self.post_code = 200

    def serve(self, url: str, body: str | bytes, *, code: int = 200, media_type: str = "text/plain") -> None:
        """Answer GETs of ``url`` with ``body``."""
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.responses[url] = HTTPResponse(code, media_type, data)

    def get(self, url: str, *, timeout: float, max_size: int) -> defer.Deferred[Any]:
        """IHTTPClient.get from the table (the size limit applies)."""
        self.gets.append(url)
        answer = self.responses.get(url)
        if answer is None:
            return defer.fail(HTTPError(f"{url}: connection refused"))
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if len(answer.body) > max_size:
            return defer.fail(HTTPError(f"{url}: response body larger than {max_size} bytes"))
        return defer.succeed(answer)

    def post(self, url: str, body: bytes, *, content_type: str, timeout: float) -> defer.Deferred[int]:
        """IHTTPClient.post: kept in ``posts``."""
        self.posts.append((url, body, content_type))
        return defer.succeed(self.post_code)
