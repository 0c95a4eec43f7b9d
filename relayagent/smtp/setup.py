"""
The start of an ESMTP session: the server's greeting, EHLO or HELO, the
security layer (STARTTLS, AUTH), and EHLO again after the TLS handshake,
as coroutines over the session's channel (smtp_proto.c's smtp_helo()).

- a 2xx greeting made only of "2", "0", "*" and white space is the
  CISCO PIX "fixup" mangling: ``smtp_pix_workarounds`` go on for it;
- EHLO when the greeting says ESMTP (or ``smtp_always_send_ehlo``),
  never with ``smtp_never_send_ehlo`` or the PIX ``disable_esmtp``;
  HELO when EHLO is refused (but not after 421); the EHLO keywords by
  ``smtp.ehlo.parse_ehlo``;
- a refusal (greeting, 421 to EHLO, HELO) is "host X refused to talk to
  me", its stage telling the connector which (smtp_skip_5xx_greeting);
  a server still talking gets QUIT without waiting for its reply;
- STARTTLS: plaintext after the 220 is an injection (CVE-2011-0411) and
  ends the session; the handshake has ``smtp_starttls_timeout``.

SYNOPSIS
    Deferred.fromCoroutine(set_up(session, greeting))  # fires session.greeted
    status = await start_tls(session, connection_creator)  # None: EHLO done over TLS

DIAGNOSTICS
    Logged (info): "enabling PIX workarounds: ... for host[addr]:port".
    Logged (failure): "security layer failed for ..." and "ESMTP session
    setup crashed for ..." (a bug; the mail waits with 4.3.0).  The
    greeting's failure is the DeliveryFailure ``session.greeted`` fails
    with.

Owns: smtp_helo_name (``helo_identity``), smtp_always_send_ehlo,
smtp_never_send_ehlo, smtp_pix_workarounds; the greeting, EHLO and HELO
wait smtp_helo_timeout (the channel's stage table).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.channel import STAGES, Broken, Stage
from relayagent.smtp.ehlo import parse_ehlo
from relayagent.smtp.reply import PROTOCOL, Reply

if TYPE_CHECKING:
    from relayagent.smtp.session import SMTPSession

log = Logger()

# A greeting made only of these is the CISCO PIX "fixup" mangling
# (smtp_proto.c: strspn(resp->str, "20 *\t\n")).
_PIX_GREETING_RE = re.compile(r"^[20 *\t\n]*$")


def helo_identity(helo_name: str) -> bytes:
    """What EHLO and HELO name us as (``smtp_helo_name``): an IDN in its ASCII form."""
    return helo_name.encode("ascii") if helo_name.isascii() else helo_name.encode("idna")


async def set_up(session: SMTPSession, greeting_reply: Deferred[Reply | Broken]) -> None:
    """Greeting, EHLO/HELO, the security layer; fires ``session.greeted``."""
    greeting = await greeting_reply
    if isinstance(greeting, Broken):
        _fail_greeting(session, greeting.status)
        return
    if not greeting.positive:
        _fail_greeting(session, _refusal(session, greeting, STAGES["greeting"]))
        return
    workarounds = frozenset(w.lower() for w in session.settings.smtp_pix_workarounds)
    if workarounds and _PIX_GREETING_RE.match("\n".join(greeting.lines)):
        session.pix_workarounds = workarounds
        log.info(
            "enabling PIX workarounds: {workarounds} for {server}",
            workarounds=", ".join(sorted(workarounds)),
            server=str(session.server),
        )
    words = greeting.lines[0][4:].split()[1:]
    session.esmtp = any(w.upper() == "ESMTP" for w in words)
    if session.settings.smtp_always_send_ehlo:
        session.esmtp = True
    if session.settings.smtp_never_send_ehlo or "disable_esmtp" in session.pix_workarounds:
        session.esmtp = False
    refused = await hello(session, use_ehlo=session.esmtp)
    if refused is not None:
        _fail_greeting(session, refused)
        return
    if session.security is not None:
        try:
            await session.security.negotiate(session)
        except DeliveryFailure as failure:
            _fail_greeting(session, failure.status, failure=failure)
            return
        except Exception as error:
            log.failure("security layer failed for {server}", server=str(session.server))
            _fail_greeting(
                session,
                Status(dsn="4.3.0", text=f"local TLS/SASL error with {session.namaddr}: {error}",
                       remote_mta=session.server.host),
            )
            return
        if session.broken is not None:
            _fail_greeting(session, session.broken.status)
            return
    session.usable = True
    session.greeted.callback(session)


async def hello(session: SMTPSession, *, use_ehlo: bool) -> Status | None:
    """EHLO (falling back to HELO unless it got 421) or HELO, at the
    start and again after STARTTLS (Postfix's smtp_helo() does both);
    the reason the session cannot go on, or None."""
    if use_ehlo:
        reply = await session.command_reply(b"EHLO " + session.identity, "ehlo")
        if isinstance(reply, Broken):
            return reply.status
        if reply.positive:
            _take_extensions(session, reply)
            return None
        if reply.code == 421:
            return _refusal(session, reply, STAGES["ehlo"])
        session.esmtp = False
    session.extensions = {}
    session.auth_mechanisms = frozenset()
    reply = await session.command_reply(b"HELO " + session.identity, "helo")
    if isinstance(reply, Broken):
        return reply.status
    if not reply.positive:
        return _refusal(session, reply, STAGES["helo"])
    return None


def _take_extensions(session: SMTPSession, reply: Reply) -> None:
    offered = parse_ehlo(reply.message_lines())
    session.extensions = offered.extensions
    session.auth_mechanisms = offered.auth_mechanisms


def _refusal(session: SMTPSession, reply: Reply, stage: Stage) -> Status:
    """The greeting, EHLO (421) or HELO said no.  ``stage`` tells the
    connection layer which: only a 5xx greeting is skipped as if it
    were 4xx (smtp_skip_5xx_greeting); a 5xx HELO is final, as in
    Postfix's smtp_helo().  Postfix says QUIT after a refusal; we
    close, which servers take the same way."""
    return Status(
        dsn=reply.dsn,
        text=f"host {session.namaddr} refused to talk to me: {reply.text}",
        code=reply.code,
        stage=stage.name,
        reply=reply.text,
        remote_mta=session.server.host,
    )


def _fail_greeting(session: SMTPSession, status: Status, *, failure: DeliveryFailure | None = None) -> None:
    session.usable = False
    if not session.greeted.called:
        session.greeted.errback(failure if failure is not None else DeliveryFailure(status))
    if session.broken is None:
        if session.connection_open and status.code != 421 and not session.handshaking:
            # A server that is still talking (it refused, or TLS/AUTH
            # said no) gets QUIT, as from Postfix; its reply is not
            # awaited (smtp_skip_quit_response).
            session.transcript.sent(b"QUIT")
            session.transport.write(b"QUIT\r\n")
            session.break_session(status, close=False)
            session.transport.loseConnection()
        else:
            session.break_session(status)


def setup_crashed(session: SMTPSession, failure: Failure) -> None:
    """``set_up`` raised: a bug; the session ends with 4.3.0."""
    log.failure("ESMTP session setup crashed for {server}", failure, server=str(session.server))
    _fail_greeting(
        session,
        Status(dsn="4.3.0", text=f"internal error talking to {session.namaddr}", remote_mta=session.server.host),
    )


async def start_tls(session: SMTPSession, connection_creator: Any) -> Status | None:
    """After the security layer's STARTTLS got 220: the handshake, then
    EHLO again; the reason the session cannot go on, or None."""
    if session.broken is not None:
        return session.broken.status
    stage = STAGES["tls"]
    if session.discard_plaintext():
        # Plaintext that came after the 220 to STARTTLS (still in the
        # buffer, or already read as a reply nobody asked for) would
        # otherwise be read as the first reply over TLS: a man in the
        # middle's injected response (CVE-2011-0411, client side).
        status = Status(
            dsn="4.4.2",
            text=f"protocol error: host {session.namaddr} sent plaintext data after its reply "
            "to STARTTLS",
            stage=stage.name,
            remote_mta=session.server.host,
            notify_class=PROTOCOL,
        )
        session.break_session(status)
        return status
    handshake = session.handshake()
    timer = session.clock.callLater(session.timeout_of(stage), session.timed_out, stage)
    session.transport.startTLS(connection_creator)
    try:
        failed = await handshake
    finally:
        if timer.active():
            timer.cancel()
    if failed is not None:
        return failed
    refused = await hello(session, use_ehlo=True)
    if refused is not None:
        session.break_session(refused)
    return refused
