"""
The ESMTP client session: one ``SMTPSession`` per connection, what the
connector, the connection cache, the TLS/SASL layer and the delivery code
hold (``ISMTPSession``).

``SMTPSession`` *is* the connection's line channel
(``smtp.channel.SMTPChannel``: buffer, reply FIFO, timers, pipelining,
the end of the session) with the steps on top: a thin object that keeps
the state the steps share (the EHLO keywords, ESMTP or not, the PIX
workarounds, one transaction at a time) and turns the ISMTPSession calls
into them:

- ``smtp.setup``: greeting, EHLO/HELO, the security layer, STARTTLS;
- ``smtp.transaction``: MAIL, RCPT, DATA, ".", RSET, QUIT, the probe;
- ``smtp.data``: the body producer; ``smtp.address``: the parameters.

One object rather than a session holding a channel: the transport is
connected to one protocol, and every reply goes straight from
``dataReceived`` to the step awaiting it, with no layer in between.

The steps return values (``channel.Broken``, ``Status | None``); this
is where they become the interface's exceptions: ``greeted``,
``command`` and ``start_tls_handshake`` fail with ``DeliveryFailure``.

SYNOPSIS
    settings = SessionSettings.from_config(config)      # once, at start-up
    factory = SMTPSessionFactory(settings, clock, ServerInfo(host, addr, port, nexthop), security)
    factory = SMTPSessionFactory(..., security, preparation=await security.prepare(server))
    session = await endpoint.connect(factory); await session.greeted
    result = await session.deliver(envelope, recipients, last=True)
    result = await session.run_transaction(envelope, recipients, last=True)  # in a coroutine

DIAGNOSTICS
    Those of its parts (``smtp.channel``, ``smtp.setup``); ``deliver``
    raises RuntimeError when a transaction is already running.

Owns no parameters of its own: the session and its steps read theirs
from ``smtp.channel.SessionSettings`` (smtp_helo_name ... for
``smtp.setup``, the timeouts for ``smtp.channel``, the transaction's for
``smtp.transaction``, the body's for ``smtp.data``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from zope.interface import implementer

from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp import setup, transaction
from relayagent.smtp.channel import (
    Broken,
    ServerInfo,
    SessionSettings,
    SMTPChannel,
    Stage,
)
from relayagent.smtp.ehlo import announced_size
from relayagent.smtp.interfaces import ISMTPSession
from relayagent.smtp.reply import Reply
from relayagent.smtp.requiretls import TLSDemand
from relayagent.smtp.tls import TLSOutcome
from relayagent.smtp.transaction import TransactionResult

DEFAULT_CHUNK_SIZE = 65536


class SecurityNegotiator(Protocol):
    """What the TLS/SASL layer gives the session (see ``smtp.security``)."""

    def negotiate(self, session: SMTPSession) -> Deferred[None]:
        """STARTTLS and AUTH on the greeted ``session``, as the policy demands;
        the Deferred fails with DeliveryFailure when a demand is not met."""


@implementer(IHandshakeListener, ISMTPSession)
class SMTPSession(SMTPChannel):
    """One ESMTP client connection (see the module docstring)."""

    def __init__(
        self,
        settings: SessionSettings,
        clock: IReactorTime,
        server: ServerInfo,
        security: SecurityNegotiator | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        preparation: Any = None,
    ) -> None:
        super().__init__(settings, clock, server)
        self.identity = setup.helo_identity(settings.smtp_helo_name)
        self.security = security
        self.chunk_size = chunk_size
        self.greeted: Deferred[SMTPSession] = Deferred()
        self.extensions: dict[str, str] = {}
        self.auth_mechanisms: frozenset[str] = frozenset()
        self.esmtp = False
        self.pix_workarounds: frozenset[str] = frozenset()
        self.transactions = 0
        # Left by the security hook: what STARTTLS gave (None: no hook ran)
        # and the message demand it was negotiated for (smtp.requiretls).
        self.tls_outcome: TLSOutcome | None = None
        self.tls_demand = TLSDemand.POLICY
        self.requiretls_cleared = False  # meets smtp_requiretls_policy (smtp.security)
        # The TLS decision made for it before connecting
        # (smtp.security.Preparation, None: decided after EHLO), which the
        # security hook uses and a reuse from the cache must still meet.
        self.tls_preparation: Any = preparation
        self._busy = False

    # -- what the layers above read ---------------------------------------

    def has(self, keyword: str) -> bool:
        """Whether the server offered an EHLO keyword (any case)."""
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The SIZE the server announced, None when absent, zero or bad."""
        return announced_size(self.extensions)

    # -- the greeting -----------------------------------------------------

    def opened(self, greeting: Deferred[Reply | Broken]) -> None:
        Deferred.fromCoroutine(setup.set_up(self, greeting)).addErrback(
            lambda failure: setup.setup_crashed(self, failure)
        )

    # -- the API for the security layer -----------------------------------

    def command(self, line: bytes, *, stage: str, timeout: float, redact: bool = False) -> Deferred[Reply]:
        """Send one command (STARTTLS, AUTH ...) and get its reply.

        ``stage`` completes "lost connection with host[addr] while ...",
        e.g. "receiving the STARTTLS response".  Fails with
        ``DeliveryFailure`` (4.4.2) when the session breaks.  With
        ``redact`` the transcript keeps only the verb and mechanism and
        nothing is logged.
        """
        if redact:
            # A redacted line is an AUTH command or one of its continuation
            # lines, whose first word is the base64 credential itself: it
            # must not become the stage name or the "in reply to" text.
            verb = "AUTH"
        else:
            words = line.split(None, 1)
            verb = words[0].decode("ascii", "replace").upper() if words else "command"
        custom = Stage(stage, f"{verb} command", verb, None)
        deferred = self.command_reply(line, custom, timeout=timeout, redact=redact)

        def unwrap(result: Reply | Broken) -> Reply:
            if isinstance(result, Broken):
                raise DeliveryFailure(result.status)
            return result

        return deferred.addCallback(unwrap)

    def start_tls_handshake(self, connection_creator: Any) -> Deferred[None]:
        """After the security layer's STARTTLS got 220: handshake, then EHLO again."""

        def raise_failure(status: Status | None) -> None:
            if status is not None:
                raise DeliveryFailure(status)

        return Deferred.fromCoroutine(setup.start_tls(self, connection_creator)).addCallback(raise_failure)

    start_tls = start_tls_handshake

    # -- mail transactions --------------------------------------------------

    def deliver(
        self, envelope: Envelope, recipients: Sequence[Recipient], *, last: bool = False,
        probe: bool = False,
    ) -> Deferred[TransactionResult]:
        """One mail transaction for ``recipients`` (see ``TransactionResult``).

        ``probe``: the session comes from the connection cache; RSET first
        to see that it still works (what ``reset`` does on its own), in the
        same write as MAIL, RCPT and DATA when the server pipelines.  If
        the probe fails the result says ``probe_failed`` and nothing was
        delivered: the body goes only after DATA's 354, which comes after
        the RSET reply.
        """
        if self._busy:
            raise RuntimeError("one transaction at a time per session")
        return Deferred.fromCoroutine(self.run_transaction(envelope, recipients, last=last, probe=probe))

    async def run_transaction(
        self, envelope: Envelope, recipients: Sequence[Recipient], *, last: bool = False,
        probe: bool = False,
    ) -> TransactionResult:
        """``deliver`` as a coroutine, for a caller that awaits it in its own
        (``smtp.deliver``): the same transaction without a Deferred of
        its own."""
        if self._busy:
            raise RuntimeError("one transaction at a time per session")
        self._busy = True
        try:
            return await transaction.transact(self, envelope, tuple(recipients), last, probe)
        finally:
            self._busy = False
            self.transactions += 1

    def reset(self) -> Deferred[bool]:
        """RSET probe before reusing the session: False when it is unusable."""
        return Deferred.fromCoroutine(transaction.reset_session(self))

    def quit(self) -> Deferred[None]:
        """QUIT and close (the reply awaited unless smtp_skip_quit_response)."""
        return Deferred.fromCoroutine(transaction.quit_session(self))


class SMTPSessionFactory(protocol.ClientFactory):
    """Builds the ``SMTPSession`` of a connection (for endpoints)."""

    protocol = SMTPSession
    # One factory per connection: no "Starting factory" line for each.
    noisy = False

    def __init__(
        self,
        settings: SessionSettings,
        clock: IReactorTime,
        server: ServerInfo,
        security: SecurityNegotiator | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        preparation: Any = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.server = server
        self.security = security
        self.chunk_size = chunk_size
        # The security hook's decision for this server, made before
        # connecting (smtp.security.SessionSecurity.prepare).
        self.preparation = preparation
        self.session: SMTPSession | None = None

    def buildProtocol(self, addr: Any) -> SMTPSession:
        session = SMTPSession(self.settings, self.clock, self.server, self.security, chunk_size=self.chunk_size,
                              preparation=self.preparation)
        session.factory = self
        self.session = session
        return session
