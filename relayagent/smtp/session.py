"""
The ESMTP client protocol engine: one ``SMTPSession`` per connection.

This is smtp(8)'s smtp_proto.c and smtp_chat.c for Twisted, on a plain
``LineReceiver`` (twisted.mail's ``ESMTPClient`` answers one reply at a
time, cannot pipeline, has one idle timeout and stuffs dots per chunk;
nothing of it is used), with:

- a FIFO of expected replies, so MAIL, every RCPT and DATA go out in one
  write when the server offers PIPELINING (RFC 2920), replies matched in
  order, stopping to read when about 4 KB of commands are unanswered;
  lock-step otherwise;
- a timer per expected reply (``smtp_*_timeout``), each with Postfix's
  stage text ("conversation with host[addr] timed out while sending RCPT
  TO"), and the same stage text for a lost connection;
- SIZE, BODY=8BITMIME/7BIT, DSN (RET, ENVID, NOTIFY, ORCPT) and SMTPUTF8
  parameters on MAIL and RCPT; the 5.3.4 size refusal; the 5.6.7 SMTPUTF8
  refusal;
- the body streamed from the queue file by a push producer that honours
  the transport's back-pressure, through ``relayagent.smtp.mime``'s 8bit-to-7bit
  converter when the server lacks 8BITMIME, and ``smtp.body.BodyEncoder``
  (CRLF, dot-stuffing across chunk boundaries, long lines);
- reply parsing as Postfix's smtp_chat_resp() (``smtp.reply``): garbage
  skipped, long lines cut, the last line's code, bounded memory; a reply
  of the wrong kind is Postfix's outcome (5.5.0), never a traceback; the
  EHLO keywords by ``smtp.ehlo.parse_ehlo``;
- per-recipient ``Status`` results worded as Postfix words them, RSET after
  a refused transaction, 421 ending the session, RSET probes and several
  transactions per session for the connection cache;
- the PIX firewall workarounds and ``smtp_skip_quit_response``;
- a bounded "Out:/In:" transcript with AUTH payloads redacted.

Owns: smtp_helo_name, smtp_always_send_ehlo, smtp_never_send_ehlo,
smtp_helo_timeout, smtp_mail_timeout, smtp_rcpt_timeout,
smtp_data_init_timeout, smtp_data_xfer_timeout, smtp_data_done_timeout,
smtp_rset_timeout, smtp_quit_timeout, smtp_line_length_limit,
smtp_pix_workarounds, smtp_pix_workaround_delay_time,
smtp_pix_workaround_threshold_time, smtp_skip_quit_response,
disable_mime_output_conversion; passes mime_nesting_limit and
mime_boundary_length_limit to the converter.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from twisted.internet import protocol, task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relayagent.common.envelope import BodyType, Envelope, Recipient, address_problem
from relayagent.common.maillog import DebugPeers
from relayagent.common.status import DeliveryFailure, Status
from relayagent.common.transcript import Transcript
from relayagent.smtp import mime
from relayagent.smtp.body import BodyEncoder
from relayagent.smtp.ehlo import announced_size, parse_ehlo
from relayagent.smtp.interfaces import ISMTPSession
from relayagent.smtp.reply import (
    MAX_LINE_OCTETS,
    PROTOCOL,
    Reply,
    ReplyAssembler,
    reply_status,
    sent_status,
)
from relayagent.spool.queuefile import CorruptQueueFile

log = Logger()

# Replies that came while no command was waiting are kept for the next
# commands (see _unsolicited); a server that sends more than this is not
# talking SMTP.
MAX_UNCLAIMED_REPLIES = 8

# Postfix stops to read replies when unanswered pipelined commands would
# pass its stream buffer (VSTREAM_BUFSIZE, 4096 octets): a server that does
# not read while its replies are unread can then never deadlock us.
PIPELINE_BUFFER_OCTETS = 4096

DEFAULT_CHUNK_SIZE = 65536

# A greeting made only of these is the CISCO PIX "fixup" mangling
# (smtp_proto.c: strspn(resp->str, "20 *\t\n")).
_PIX_GREETING_RE = re.compile(r"^[20 *\t\n]*$")

# RFC 5321 Dot-string; with RFC 6531 any non-ASCII character is atext too.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]"
_DOT_ATOM_RE = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")


@dataclass(frozen=True)
class ServerInfo:
    """The peer of a session, for log and status texts."""

    host: str
    address: str
    port: int
    nexthop: str

    @property
    def namaddr(self) -> str:
        """``host[address]``, as in Postfix's status texts."""
        return f"{self.host}[{self.address}]"

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True)
class TransactionResult:
    """The outcome of one mail transaction.

    ``recipients``: one Status per recipient passed in, by
    ``Recipient.index``.  ``status_of_transaction``: the message-level
    outcome (the reply to ".", or the MAIL/DATA refusal, size refusal,
    lost connection ...), None when only RCPT replies decided.
    ``session_usable``: whether another transaction may follow.
    ``probe_failed``: ``deliver(..., probe=True)`` found the session dead
    (the RSET probe failed): nothing was tried, the statuses mean
    nothing, and the session is closed; deliver on another session.
    """

    recipients: dict[int, Status]
    status_of_transaction: Status | None
    session_usable: bool
    probe_failed: bool = False


class SecurityNegotiator(Protocol):
    """What the TLS/SASL layer gives the session (see module docstring)."""

    def negotiate(self, session: SMTPSession) -> Deferred[None]: ...


@dataclass(frozen=True)
class _Stage:
    """One step of the conversation.

    ``while_text``: completes "lost connection with X while ...".
    ``request``: completes "(in reply to ...)".  ``name``: ``Status.stage``.
    """

    while_text: str
    request: str
    name: str
    timeout_parameter: str | None


# The texts are Postfix's (smtp_proto.c xfer_states / xfer_request).
STAGES: dict[str, _Stage] = {
    "greeting": _Stage("receiving the initial server greeting", "initial server greeting", "CONNECT", "smtp_helo_timeout"),
    "ehlo": _Stage("performing the EHLO handshake", "EHLO command", "EHLO", "smtp_helo_timeout"),
    "helo": _Stage("performing the HELO handshake", "HELO command", "HELO", "smtp_helo_timeout"),
    "mail": _Stage("sending MAIL FROM", "MAIL FROM command", "MAIL FROM", "smtp_mail_timeout"),
    "rcpt": _Stage("sending RCPT TO", "RCPT TO command", "RCPT TO", "smtp_rcpt_timeout"),
    "data": _Stage("sending DATA command", "DATA command", "DATA", "smtp_data_init_timeout"),
    "body": _Stage("sending message body", "end of DATA command", "end of DATA", "smtp_data_xfer_timeout"),
    "dot": _Stage(
        "sending end of data -- message may be sent more than once",
        "end of DATA command",
        "end of DATA",
        "smtp_data_done_timeout",
    ),
    "rset": _Stage("sending final RSET", "final RSET command", "RSET", "smtp_rset_timeout"),
    "probe": _Stage("sending RSET probe", "RSET probe", "RSET", "smtp_rset_timeout"),
    "quit": _Stage("sending QUIT", "QUIT command", "QUIT", "smtp_quit_timeout"),
    "tls": _Stage("performing the TLS handshake", "STARTTLS command", "STARTTLS", "smtp_starttls_timeout"),
    "idle": _Stage("waiting to send the next command", "no command", "idle", None),
}


class _Broken:
    """The conversation is over; ``status`` says why (4.4.2, 421, protocol)."""

    def __init__(self, status: Status) -> None:
        self.status = status


@dataclass
class _Expectation:
    stage: _Stage
    timeout: float
    deferred: Deferred[Reply | _Broken]


# What xtext (RFC 3461 4) leaves alone: "!" to "~" but "+" and "=".
_XCHAR_RE = re.compile(rb"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*")
_NOT_XCHAR_RE = re.compile(rb"[^\x21-\x2a\x2c-\x3c\x3e-\x7e]")


def xtext(value: str) -> str:
    """RFC 3461 xtext: "+" "=" controls, space and non-ASCII as +HH.
    (Once per recipient of every transaction: the common all-plain value
    costs one regex match.)"""
    raw = value.encode("utf-8")
    if _XCHAR_RE.fullmatch(raw):
        return value
    return _NOT_XCHAR_RE.sub(lambda m: b"+%02X" % m.group()[0], raw).decode("ascii")


def smtp_path(address: str) -> str:
    """``<address>``, the local part quoted when it is not a dot-atom
    (Postfix's smtp_quote_821_env, RFC 5321 4.1.2)."""
    if not address:
        return "<>"
    if address_problem(address):
        # The spool refuses such addresses and the queue-file reader calls
        # them corrupt: reaching here is a bug, never a command to inject.
        raise ValueError(f"address {address!r} {address_problem(address)}")
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if local and not (local.startswith('"') and local.endswith('"')) and not _DOT_ATOM_RE.match(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"<{local}{at}{domain}>"


def uxtext(value: str) -> str:
    """RFC 6533 utf-8-addr-xtext: "+", "=", "\\", controls, space and
    non-ASCII as \\x{HEX}, so the ORCPT of a UTF-8 address is ASCII."""
    out = []
    for char in value:
        point = ord(char)
        if 0x21 <= point <= 0x7E and char not in "+=\\":
            out.append(char)
        else:
            out.append(f"\\x{{{point:X}}}")
    return "".join(out)


def orcpt_parameter(recipient: Recipient, quoted: str | None = None) -> str | None:
    """The ORCPT= value for ``recipient``: the one it was queued with, else
    its own address as the original one (Postfix's orig_addr; nothing
    here rewrites addresses), ``rfc822;`` or, for a UTF-8 address,
    ``utf-8;`` (RFC 6533).  ``quoted``: the address as in its RCPT TO
    path, when the caller has it."""
    if recipient.orcpt:
        addr_type, _, address = recipient.orcpt.partition(";")
        if addr_type.strip().lower() == "utf-8":
            return "utf-8;" + uxtext(address)
        return xtext(recipient.orcpt)
    if not recipient.address:
        return None
    if quoted is None:
        quoted = smtp_path(recipient.address)[1:-1]
    if quoted.isascii():
        return xtext("rfc822;" + quoted)
    return "utf-8;" + uxtext(quoted)


# How much of the content is read, at most, to see whether its header is
# all ASCII (only for SMTPUTF8 mail to a server without SMTPUTF8).
_HEADER_SCAN_LIMIT = 256 * 1024


def requires_smtputf8(envelope: Envelope, recipients: Sequence[Recipient]) -> bool:
    """Whether this delivery needs a server with SMTPUTF8.

    Per delivery, not per message (Postfix's SMTPUTF8_README): the sender
    asked for SMTPUTF8, and the sender address, an address of this
    delivery's recipients, or the message header is not ASCII.  Mail
    whose UTF-8 is elsewhere (another recipient's address) goes to a
    server without SMTPUTF8 as plain mail."""
    if not envelope.smtputf8:
        return False
    if not envelope.sender.isascii() or not all(r.address.isascii() for r in recipients):
        return True
    return not _header_is_ascii(envelope)


def _header_is_ascii(envelope: Envelope) -> bool:
    """Whether the message header (up to the first empty line) is ASCII;
    unreadable or over ``_HEADER_SCAN_LIMIT`` counts as not."""
    try:
        with envelope.open_content() as stream:
            head = stream.read(_HEADER_SCAN_LIMIT)
    except Exception:  # noqa: BLE001 - the body producer reports the queue file's trouble
        return False
    end = min((i for i in (head.find(b"\n\n"), head.find(b"\r\n\r\n")) if i >= 0), default=-1)
    if end < 0:
        if len(head) >= _HEADER_SCAN_LIMIT:
            return False
        end = len(head)  # a message that is all header
    return head[:end].isascii()


def _debug_level(config: Any, server: ServerInfo) -> int:
    """``debug_peer_level`` when the server is in ``debug_peer_list``."""
    listed = config["debug_peer_list"]
    if not listed:
        return 0
    try:
        return DebugPeers(config).level_for(server.nexthop, server.host, server.address)
    except ValueError:
        return 0  # an unreadable pattern file: no debug logging rather than no session


@implementer(IHandshakeListener, ISMTPSession)
class SMTPSession(LineReceiver):
    """One ESMTP client connection (see the module docstring)."""

    # Servers end lines with CRLF; a bare LF is accepted and the CR stripped.
    delimiter = b"\n"

    def __init__(
        self,
        config: Any,
        clock: IReactorTime,
        server: ServerInfo,
        security: SecurityNegotiator | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        helo_name = config["smtp_helo_name"]
        # What EHLO and HELO name us as: an IDN in its ASCII form.
        self.identity = helo_name.encode("ascii") if helo_name.isascii() else helo_name.encode("idna")
        self.config = config
        self.clock = clock
        self.server = server
        self.security = security
        self.chunk_size = chunk_size
        self.greeted: Deferred[SMTPSession] = Deferred()
        self.extensions: dict[str, str] = {}
        self.auth_mechanisms: frozenset[str] = frozenset()
        self.esmtp = False
        self.pix_workarounds: frozenset[str] = frozenset()
        self.transcript = Transcript()
        # debug_peer_list: commands are logged (debug) for listed peers
        # only; nobody else pays for the events.
        self.debug_level = _debug_level(config, server)
        self.usable = False
        self.transactions = 0
        self._assembler = ReplyAssembler()
        self._pending: deque[_Expectation] = deque()
        self._outgoing: list[bytes] = []
        self._unanswered_octets = 0
        self._timer: Any = None
        self._timer_for: _Expectation | None = None  # the reply the timer runs for
        self._broken: _Broken | None = None
        self._body: _BodyProducer | None = None
        self._early_reply: Reply | None = None
        # Replies that came while no command was waiting: they answer the
        # next commands, in order, as they would for Postfix, which reads
        # replies from its stream whenever it expects one.
        self._unclaimed: deque[Reply] = deque()
        self._out_of_step = False
        self._skipping_long_line = False
        self._handshake: Deferred[None] | None = None
        self._busy = False
        self._drain_waiters: list[Deferred[None]] = []
        self._quitting = False
        self._connected = False

    # -- what the layers above read ---------------------------------------

    @property
    def namaddr(self) -> str:
        return self.server.namaddr

    def has(self, keyword: str) -> bool:
        """Whether the server offered an EHLO keyword (any case)."""
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int | None:
        """The SIZE the server announced, None when absent, zero or bad."""
        return announced_size(self.extensions)

    # -- connection events -------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        greeting = self._expect("greeting")
        self._start_timer()
        Deferred.fromCoroutine(self._setup(greeting)).addErrback(self._setup_crashed)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._connected = False
        self.usable = False
        self._cancel_timer()
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.errback(reason)
        if self._broken is None and not self._quitting:
            stage = self._current_stage()
            self._break(
                Status(
                    dsn="4.4.2",
                    text=f"lost connection with {self.namaddr} while {stage.while_text}",
                    stage=stage.name,
                    remote_mta=self.server.host,
                ),
                close=False,
            )
        elif self._broken is None:
            self._break(
                Status(dsn="4.4.2", text=f"connection with {self.namaddr} closed", remote_mta=self.server.host),
                close=False,
            )
    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the STARTTLS handshake finished."""
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:
        """Lines out of ``data``; a line over ``MAX_LINE_OCTETS`` is cut
        there and the rest of it skipped, as Postfix's smtp_get() does
        (LineReceiver would drop the connection's whole buffer).  What
        follows the line being handled stays in ``_buffer``, so that
        ``clearLineBuffer`` sees it (the STARTTLS injection check)."""
        if self._busyReceiving:
            self._buffer += data
            return
        self._busyReceiving = True
        try:
            self._buffer += data
            while self._buffer and self._broken is None:
                buffer = self._buffer
                newline = buffer.find(b"\n")
                if self._skipping_long_line:
                    self._buffer = b"" if newline < 0 else buffer[newline + 1:]
                    self._skipping_long_line = newline < 0
                    continue
                if newline < 0:
                    if len(buffer) > MAX_LINE_OCTETS + 1:
                        self._buffer = b""
                        self._skipping_long_line = True
                        self._long_line(buffer)
                    return
                line = buffer[:newline]
                self._buffer = buffer[newline + 1:]
                if len(line) > MAX_LINE_OCTETS + 1:
                    self._long_line(line)
                else:
                    self.lineReceived(line)
        finally:
            self._busyReceiving = False

    def _long_line(self, line: bytes) -> None:
        log.info(
            "{server}: response longer than {limit} octets: {head}...",
            server=str(self.server), limit=MAX_LINE_OCTETS,
            head=line[:30].decode("ascii", "backslashreplace"),
        )
        self.lineReceived(line[:MAX_LINE_OCTETS])

    def lineReceived(self, line: bytes) -> None:
        if self._broken is not None:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        self.transcript.received(line)
        reply = self._assembler.feed(line)
        if reply is None:
            self._start_timer()  # a line is progress: the timeout is per read
            return
        self._reply_arrived(reply)

    # -- the reply queue ---------------------------------------------------

    def _timeout_of(self, stage: _Stage) -> float:
        if stage.timeout_parameter is None:
            return 300.0  # a stage with no parameter of its own (none waits)
        return float(self.config[stage.timeout_parameter])

    def _current_stage(self) -> _Stage:
        if self._body is not None:
            return STAGES["body"]
        if self._pending:
            return self._pending[0].stage
        return STAGES["quit"] if self._quitting else STAGES["idle"]

    def _expect(self, stage_key: str | _Stage, timeout: float | None = None) -> Deferred[Reply | _Broken]:
        stage = STAGES[stage_key] if isinstance(stage_key, str) else stage_key
        deferred: Deferred[Reply | _Broken] = Deferred()
        if self._broken is not None:
            deferred.callback(self._broken)
            return deferred
        if self._unclaimed:
            # A reply that came before its command: Postfix, reading its
            # stream, would take it as this command's reply, and so do we
            # (the command's own reply then answers the next one).
            deferred.callback(self._unclaimed.popleft())
            return deferred
        self._pending.append(
            _Expectation(stage, self._timeout_of(stage) if timeout is None else timeout, deferred)
        )
        return deferred

    def _queue_command(
        self, line: bytes, stage_key: str | _Stage, *, timeout: float | None = None, redact: bool = False
    ) -> Deferred[Reply | _Broken]:
        """Buffer a command and expect its reply; ``_flush`` sends."""
        if self._broken is None:
            self.transcript.sent(line, redact=redact)
            if self.debug_level and not redact:
                log.debug("{server}: > {line}", server=str(self.server), line=line, debug_peer=True)
            self._outgoing.append(line + b"\r\n")
            self._unanswered_octets += len(line) + 2
        return self._expect(stage_key, timeout)

    def _flush(self) -> None:
        if self._outgoing and self._broken is None:
            data, self._outgoing = self._outgoing, []
            self.transport.writeSequence(data)
        if self._pending and (self._timer_for is not self._pending[0] or self._timer is None):
            # The oldest expected reply is new (an idle session's timer was
            # left running for nothing): its timeout runs from now.
            self._start_timer()

    def _start_timer(self) -> None:
        """(Re)start the timeout of the oldest expected reply.

        One timer per session, moved with ``reset`` rather than cancelled
        and made again for every reply; when no reply is expected it is
        left to run out, doing nothing (``_timer_fired``), until the next
        command moves it again or the session ends."""
        if self._pending and self._broken is None:
            expectation = self._pending[0]
            self._timer_for = expectation
            timer = self._timer
            if timer is not None and timer.active():
                timer.reset(expectation.timeout)
            else:
                self._timer = self.clock.callLater(expectation.timeout, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        if not self._pending or self._broken is not None:
            return  # left running while nothing was expected
        if self._timer_for is not self._pending[0]:
            self._start_timer()  # a command not flushed yet: its time runs from now
            return
        self._timed_out(self._pending[0].stage)

    def _timed_out(self, stage: _Stage) -> None:
        self._timer = None
        self._break(
            Status(
                dsn="4.4.2",
                text=f"conversation with {self.namaddr} timed out while {stage.while_text}",
                stage=stage.name,
                remote_mta=self.server.host,
            )
        )

    def _reply_arrived(self, reply: Reply) -> None:
        if not self._pending:
            self._unsolicited(reply)
            return
        if reply.garbled:
            self._out_of_step = True  # Postfix: never cache after garbage
        expectation = self._pending.popleft()
        self._start_timer()
        if not self._pending:
            self._unanswered_octets = 0
            self._wake_drain_waiters()
        if reply.code == 421 and expectation.stage is not STAGES["quit"]:
            # RFC 5321 3.8: the server is closing; everything after this
            # reply is lost.  The waiter gets the 421 itself; the rest of
            # the queue gets it as the reason the session ended.
            self._break(
                reply_status(
                    reply,
                    host=self.server.host,
                    namaddr=self.namaddr,
                    request=expectation.stage.request,
                    stage=expectation.stage.name,
                ),
                keep=expectation,
            )
        expectation.deferred.callback(reply)

    def _unsolicited(self, reply: Reply) -> None:
        if self._body is not None:
            # A premature reply while the body is on its way (e.g. 552 too
            # big): keep it as the reply to "." should the connection drop.
            self._early_reply = reply
            return
        if self._quitting:
            return
        log.info(
            "{server}: unexpected reply from server: {text}", server=str(self.server), text=reply.text
        )
        # Out of step with the server: never cached after this mail.
        self._out_of_step = True
        if reply.code == 421 or len(self._unclaimed) >= MAX_UNCLAIMED_REPLIES:
            # A server closing (an idle timeout), or one that talks on its
            # own without end: the session is over; the mail it was to
            # carry waits (4.4.2).
            status = reply_status(reply, host=self.server.host, namaddr=self.namaddr,
                                  request="no command", stage="idle")
            if not status.soft:
                status = Status(dsn="4.4.2", text=f"{status.text}: unexpected replies, no command was pending",
                                code=status.code, stage="idle", reply=status.reply,
                                remote_mta=self.server.host, notify_class=PROTOCOL)
            self._break(status)
            return
        self._unclaimed.append(reply)

    def _break(self, status: Status, *, close: bool = True, keep: _Expectation | None = None) -> None:
        """End the conversation: every waiter learns ``status``."""
        if self._broken is not None:
            return
        self._broken = _Broken(status)
        self.usable = False
        self._cancel_timer()
        self._outgoing = []
        pending = [e for e in self._pending if e is not keep]
        self._pending.clear()
        for expectation in pending:
            expectation.deferred.callback(self._broken)
        self._wake_drain_waiters()
        if self._body is not None:
            self._body.abort(self._broken)
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.errback(DeliveryFailure(status))
        if close and self._connected:
            self._abort_connection()

    def _abort_connection(self) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:  # pragma: no cover - every current transport has it
            self.transport.loseConnection()

    # -- greeting, EHLO, HELO ---------------------------------------------

    async def _setup(self, greeting_reply: Deferred[Reply | _Broken]) -> None:
        greeting = await greeting_reply
        if isinstance(greeting, _Broken):
            self._fail_greeting(greeting.status)
            return
        if not greeting.positive:
            self._fail_greeting(self._refusal(greeting, STAGES["greeting"]))
            return
        workarounds = frozenset(w.lower() for w in self.config["smtp_pix_workarounds"])
        if workarounds and _PIX_GREETING_RE.match("\n".join(greeting.lines)):
            self.pix_workarounds = workarounds
            log.info(
                "enabling PIX workarounds: {workarounds} for {server}",
                workarounds=", ".join(sorted(workarounds)),
                server=str(self.server),
            )
        words = greeting.lines[0][4:].split()[1:]
        self.esmtp = any(w.upper() == "ESMTP" for w in words)
        if self.config["smtp_always_send_ehlo"]:
            self.esmtp = True
        if self.config["smtp_never_send_ehlo"] or "disable_esmtp" in self.pix_workarounds:
            self.esmtp = False
        refused = await self._hello(use_ehlo=self.esmtp)
        if refused is not None:
            self._fail_greeting(refused)
            return
        if self.security is not None:
            try:
                await self.security.negotiate(self)
            except DeliveryFailure as failure:
                self._fail_greeting(failure.status, failure=failure)
                return
            except Exception as error:
                log.failure("security layer failed for {server}", server=str(self.server))
                self._fail_greeting(
                    Status(dsn="4.3.0", text=f"local TLS/SASL error with {self.namaddr}: {error}", remote_mta=self.server.host)
                )
                return
            if self._broken is not None:
                self._fail_greeting(self._broken.status)
                return
        self.usable = True
        self.greeted.callback(self)

    async def _hello(self, *, use_ehlo: bool) -> Status | None:
        """EHLO (falling back to HELO unless it got 421) or HELO, at the
        start and again after STARTTLS (Postfix's smtp_helo() does both);
        the reason the session cannot go on, or None."""
        if use_ehlo:
            reply = await self._command_reply(b"EHLO " + self.identity, "ehlo")
            if isinstance(reply, _Broken):
                return reply.status
            if reply.positive:
                self._take_extensions(reply)
                return None
            if reply.code == 421:
                return self._refusal(reply, STAGES["ehlo"])
            self.esmtp = False
        self.extensions = {}
        self.auth_mechanisms = frozenset()
        reply = await self._command_reply(b"HELO " + self.identity, "helo")
        if isinstance(reply, _Broken):
            return reply.status
        if not reply.positive:
            return self._refusal(reply, STAGES["helo"])
        return None

    def _take_extensions(self, reply: Reply) -> None:
        offered = parse_ehlo(reply.message_lines())
        self.extensions = offered.extensions
        self.auth_mechanisms = offered.auth_mechanisms

    def _refusal(self, reply: Reply, stage: _Stage) -> Status:
        """The greeting, EHLO (421) or HELO said no.  ``stage`` tells the
        connection layer which: only a 5xx greeting is skipped as if it
        were 4xx (smtp_skip_5xx_greeting); a 5xx HELO is final, as in
        Postfix's smtp_helo().  Postfix says QUIT after a refusal; we
        close, which servers take the same way."""
        return Status(
            dsn=reply.dsn,
            text=f"host {self.namaddr} refused to talk to me: {reply.text}",
            code=reply.code,
            stage=stage.name,
            reply=reply.text,
            remote_mta=self.server.host,
        )

    def _fail_greeting(self, status: Status, *, failure: DeliveryFailure | None = None) -> None:
        self.usable = False
        if not self.greeted.called:
            self.greeted.errback(failure if failure is not None else DeliveryFailure(status))
        if self._broken is None:
            if self._connected and status.code != 421 and self._handshake is None:
                # A server that is still talking (it refused, or TLS/AUTH
                # said no) gets QUIT, as from Postfix; its reply is not
                # awaited (smtp_skip_quit_response).
                self.transcript.sent(b"QUIT")
                self.transport.write(b"QUIT\r\n")
                self._break(status, close=False)
                self.transport.loseConnection()
            else:
                self._break(status)

    def _setup_crashed(self, failure: Failure) -> None:
        log.failure("ESMTP session setup crashed for {server}", failure, server=str(self.server))
        self._fail_greeting(
            Status(dsn="4.3.0", text=f"internal error talking to {self.namaddr}", remote_mta=self.server.host)
        )

    # -- the API for the security layer -----------------------------------

    def _command_reply(
        self, line: bytes, stage_key: str | _Stage, *, timeout: float | None = None, redact: bool = False
    ) -> Deferred[Reply | _Broken]:
        deferred = self._queue_command(line, stage_key, timeout=timeout, redact=redact)
        self._flush()
        return deferred

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
        custom = _Stage(stage, f"{verb} command", verb, None)
        deferred = self._command_reply(line, custom, timeout=timeout, redact=redact)

        def unwrap(result: Reply | _Broken) -> Reply:
            if isinstance(result, _Broken):
                raise DeliveryFailure(result.status)
            return result

        return deferred.addCallback(unwrap)

    def start_tls_handshake(self, connection_creator: Any) -> Deferred[None]:
        """After the security layer's STARTTLS got 220: handshake, then EHLO again."""
        return Deferred.fromCoroutine(self._start_tls(connection_creator))

    start_tls = start_tls_handshake

    async def _start_tls(self, connection_creator: Any) -> None:
        if self._broken is not None:
            raise DeliveryFailure(self._broken.status)
        stage = STAGES["tls"]
        if self.clearLineBuffer() or self._unclaimed:
            # Plaintext that came after the 220 to STARTTLS (still in the
            # buffer, or already read as a reply nobody asked for) would
            # otherwise be read as the first reply over TLS: a man in the
            # middle's injected response (CVE-2011-0411, client side).
            status = Status(
                dsn="4.4.2",
                text=f"protocol error: host {self.namaddr} sent plaintext data after its reply "
                "to STARTTLS",
                stage=stage.name,
                remote_mta=self.server.host,
                notify_class=PROTOCOL,
            )
            self._break(status)
            raise DeliveryFailure(status)
        self._handshake = Deferred()
        handshake = self._handshake
        timer = self.clock.callLater(self._timeout_of(stage), self._timed_out, stage)
        self.transport.startTLS(connection_creator)
        try:
            await handshake
        except DeliveryFailure:
            raise
        except Exception as error:
            raise DeliveryFailure(
                Status(
                    dsn="4.4.2",
                    text=f"lost connection with {self.namaddr} while {stage.while_text}: {error}",
                    stage=stage.name,
                    remote_mta=self.server.host,
                )
            ) from None
        finally:
            if timer.active():
                timer.cancel()
        refused = await self._hello(use_ehlo=True)
        if refused is not None:
            self._break(refused)
            raise DeliveryFailure(refused)

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
        self._busy = True

        def done(result: TransactionResult) -> TransactionResult:
            self._busy = False
            self.transactions += 1
            return result

        return Deferred.fromCoroutine(
            self._transaction(envelope, tuple(recipients), last, probe)
        ).addBoth(done)

    def reset(self) -> Deferred[bool]:
        """RSET probe before reusing the session: False when it is unusable."""
        return Deferred.fromCoroutine(self._reset())

    async def _reset(self) -> bool:
        if self._broken is not None or not self.usable:
            return False
        reply = await self._command_reply(b"RSET", "probe")
        if isinstance(reply, _Broken) or not reply.positive:
            self.usable = False
            return False
        return True

    def quit(self) -> Deferred[None]:
        """QUIT and close (the reply awaited unless smtp_skip_quit_response)."""
        return Deferred.fromCoroutine(self._quit())

    async def _quit(self) -> None:
        self.usable = False
        if self._broken is not None or not self._connected:
            if self._connected:
                self.transport.loseConnection()
            return
        deferred = self._queue_command(b"QUIT", "quit")
        self._quitting = True
        self._flush()
        if not self.config["smtp_skip_quit_response"]:
            await deferred
        self._close_quietly()

    def _close_quietly(self) -> None:
        self._quitting = True
        self._cancel_timer()
        if self._broken is None:
            self._broken = _Broken(
                Status(dsn="4.4.2", text=f"session with {self.namaddr} ended", remote_mta=self.server.host)
            )
        self._pending.clear()
        if self._connected:
            self.transport.loseConnection()

    def _mail_from(self, envelope: Envelope, converting: bool) -> bytes:
        parts = ["MAIL FROM:" + smtp_path(envelope.sender)]
        if self.has("SIZE") and not converting:
            parts.append(f"SIZE={envelope.content_size}")
        if self.has("8BITMIME"):
            if envelope.body_type is BodyType.EIGHT_BIT_MIME:
                parts.append("BODY=8BITMIME")
            elif envelope.body_declared:
                parts.append("BODY=7BIT")
            # An undeclared 7-bit body: no BODY=, as from Postfix.
        if envelope.smtputf8 and self.has("SMTPUTF8"):
            parts.append("SMTPUTF8")
        if self.has("DSN"):
            if envelope.envid:
                parts.append("ENVID=" + xtext(envelope.envid))
            if envelope.ret is not None:
                parts.append("RET=" + envelope.ret.value)
        return " ".join(parts).encode("utf-8")

    def _rcpt_to(self, recipient: Recipient) -> bytes:
        path = smtp_path(recipient.address)
        parts = ["RCPT TO:" + path]
        if self.has("DSN"):
            orcpt = orcpt_parameter(recipient, path[1:-1])
            if orcpt is not None:
                parts.append("ORCPT=" + orcpt)
            notify = recipient.notify.esmtp_value()
            if notify is not None:
                parts.append("NOTIFY=" + notify)
        return " ".join(parts).encode("utf-8")

    def _local_status(self, dsn: str, text: str) -> Status:
        return Status(dsn=dsn, text=text, remote_mta=self.server.host)

    def _probe_failed(self, outcome: _Outcome) -> TransactionResult:
        """The session is dead or out of step: drop it; nothing was sent
        that could deliver anything."""
        self.usable = False
        if self._broken is None:
            self._break(self._local_status("4.4.2", f"RSET probe to {self.namaddr} failed"))
        result = outcome.finish(self._broken.status if self._broken else None, usable=False)
        return TransactionResult(result.recipients, result.status_of_transaction, False, probe_failed=True)

    async def _transaction(
        self, envelope: Envelope, recipients: tuple[Recipient, ...], last: bool, probe: bool = False
    ) -> TransactionResult:
        outcome = _Outcome(self, recipients)
        if probe and (self._broken is not None or not self.usable):
            return self._probe_failed(outcome)
        if self._broken is not None or not self.usable:
            status = self._broken.status if self._broken is not None else self._local_status(
                "4.4.2", f"session with {self.namaddr} is not usable"
            )
            return outcome.finish(status.softened() if status.hard else status, usable=False)

        # Checks that need no command (smtp_xfer).
        if not self.has("SMTPUTF8") and requires_smtputf8(envelope, recipients):
            status = self._local_status(
                "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.namaddr}"
            )
            return await self._after_local_refusal(outcome, status, last)
        limit = self.size_limit
        if limit is not None and limit < envelope.content_size:
            status = self._local_status(
                "5.3.4",
                f"message size {envelope.content_size} exceeds size limit {limit} of server {self.namaddr}",
            )
            return await self._after_local_refusal(outcome, status, last)

        converting = mime.needs_conversion(
            envelope.body_type, self.has("8BITMIME"), self.config["disable_mime_output_conversion"]
        )
        pipelining = self.has("PIPELINING")

        probe_d: Deferred[Reply | _Broken] | None = None
        if probe:
            probe_d = self._queue_command(b"RSET", "probe")
            if not pipelining:
                self._flush()
                if not _positive(await probe_d):
                    return self._probe_failed(outcome)
                probe_d = None
        # [RSET,] MAIL, RCPT..., DATA: one write when pipelining, else lock-step.
        mail_reply_d = self._queue_command(self._mail_from(envelope, converting), "mail")
        if not pipelining:
            self._flush()
            if not outcome.take_mail(await mail_reply_d):
                return await self._abort(outcome, last)
        rcpt_reply_ds: list[tuple[Recipient, Deferred[Reply | _Broken]]] = []
        for recipient in recipients:
            line = self._rcpt_to(recipient)
            if pipelining and self._unanswered_octets + len(line) + 2 > PIPELINE_BUFFER_OCTETS:
                # Read what is due before writing more (see PIPELINE_BUFFER_OCTETS).
                self._flush()
                await self._drained()
                if self._broken is not None:
                    break
            reply_d = self._queue_command(line, "rcpt")
            if pipelining:
                rcpt_reply_ds.append((recipient, reply_d))
            else:
                self._flush()
                if not outcome.take_rcpt(recipient, await reply_d):
                    break
        data_reply_d: Deferred[Reply | _Broken] | None = None
        if self._broken is None and (pipelining or outcome.accepted):
            data_reply_d = self._queue_command(b"DATA", "data")
        self._flush()
        if pipelining:
            # Replies come in order (or the session breaks and every waiter
            # hears it at once): wait once, for the last, then read the
            # others, which are in by then.
            last_d = data_reply_d or (rcpt_reply_ds[-1][1] if rcpt_reply_ds else mail_reply_d)
            await _reply(last_d)
        if probe_d is not None and not _positive(await _reply(probe_d)):
            # The commands after it are void: the connection goes.
            return self._probe_failed(outcome)
        if pipelining:
            outcome.take_mail(await _reply(mail_reply_d))
            for recipient, reply_d in rcpt_reply_ds:
                outcome.take_rcpt(recipient, await _reply(reply_d))
        data_reply = await _reply(data_reply_d) if data_reply_d is not None else None

        if isinstance(data_reply, _Broken):
            return outcome.finish(data_reply.status, usable=False)
        if self._broken is not None and data_reply is None:
            return outcome.finish(self._broken.status, usable=False)
        if data_reply is None or not outcome.accepted or outcome.mail_refused:
            if data_reply is not None and data_reply.intermediate:
                # RFC 2920 3.1: DATA got 354 although nothing was accepted:
                # end the empty message at once.
                dot = await self._command_reply(b".", "dot")
                if isinstance(dot, _Broken):
                    return outcome.finish(dot.status, usable=False)
                return await self._maybe_quit(outcome.finish(None, usable=True), last)
            return await self._abort(outcome, last)
        if not data_reply.intermediate:
            outcome.message_failed(data_reply, STAGES["data"])
            return await self._abort(outcome, last)

        # 354: the body, then "." (and QUIT when this is the last transaction).
        try:
            body_result = await self._send_body(envelope, converting)
        except CorruptQueueFile as corrupt:
            # The content failed its checksum on the way: no "." goes, so
            # the server keeps nothing of it; the connection drops and the
            # queue manager moves the file to corrupt/.
            self._break(self._local_status("4.3.0", f"queue file {envelope.queue_id} is corrupt: {corrupt.reason}"))
            raise
        if isinstance(body_result, Status):
            # A MIME or queue file error: there is no way to cancel DATA
            # but to drop the connection (as Postfix does).
            self._break(body_result)
            return outcome.finish(body_result, usable=False)
        if isinstance(body_result, _Broken):
            early, self._early_reply = self._early_reply, None
            if early is not None and not early.positive:
                outcome.message_failed(early, STAGES["dot"])
            return outcome.finish(body_result.status, usable=False)
        if "delay_dotcrlf" in self.pix_workarounds and (
            self.clock.seconds() - envelope.arrival_time >= self.config["smtp_pix_workaround_threshold_time"]
        ):
            # PIX firewalls lose a ".CRLF" that shares a packet with the body.
            await task.deferLater(self.clock, self.config["smtp_pix_workaround_delay_time"], lambda: None)
            if self._broken is not None:
                return outcome.finish(self._broken.status, usable=False)
        early, self._early_reply = self._early_reply, None
        dot_d = self._queue_command(b".", "dot")
        # QUIT goes in the same write as "." only to a server that
        # pipelines: any other may take it as a pipelining violation and
        # refuse the message (OpenSMTPD: "500 5.5.1 Invalid command:
        # Pipelining not supported").  Without PIPELINING nothing is
        # written before the previous reply is in.
        quit_d = self._queue_command(b"QUIT", "quit") if last and pipelining else None
        self._flush()
        if early is not None:
            # The server answered before "."; it is out of step from now on.
            dot_reply: Reply | _Broken = early
            self._close_quietly()
        else:
            dot_reply = await dot_d
            if quit_d is not None and isinstance(dot_reply, Reply) and dot_reply.code != 421:
                if not self.config["smtp_skip_quit_response"]:
                    await quit_d
                self._close_quietly()
        if isinstance(dot_reply, _Broken):
            return outcome.finish(dot_reply.status, usable=False)
        if dot_reply.positive:
            outcome.message_sent(dot_reply)
        else:
            outcome.message_failed(dot_reply, STAGES["dot"])
        if last and quit_d is None and early is None:
            return await self._maybe_quit(outcome.finish(None, usable=False), last)
        return outcome.finish(None, usable=self._broken is None and not last)

    def _drained(self) -> Deferred[None]:
        """Fires when every command sent so far has its reply (or the session broke)."""
        waiter: Deferred[None] = Deferred()
        if not self._pending or self._broken is not None:
            waiter.callback(None)
        else:
            self._drain_waiters.append(waiter)
        return waiter

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _after_local_refusal(self, outcome: _Outcome, status: Status, last: bool) -> TransactionResult:
        result = outcome.finish(status, usable=True)
        return await self._maybe_quit(result, last)

    async def _maybe_quit(self, result: TransactionResult, last: bool) -> TransactionResult:
        if last and self._broken is None:
            await self._quit()
            return TransactionResult(result.recipients, result.status_of_transaction, False)
        return result

    async def _abort(self, outcome: _Outcome, last: bool) -> TransactionResult:
        """MAIL, every RCPT or DATA refused: RSET, and the session lives on."""
        if self._broken is not None:
            return outcome.finish(self._broken.status, usable=False)
        reply = await self._command_reply(b"RSET", "rset")
        usable = isinstance(reply, Reply) and reply.positive and self._broken is None
        if isinstance(reply, Reply) and not reply.positive:
            self.usable = False
        result = outcome.finish(None, usable=usable)
        if last or not usable:
            await self._quit()
            return TransactionResult(result.recipients, result.status_of_transaction, False)
        return result

    def _send_body(self, envelope: Envelope, converting: bool) -> Deferred[None | Status | _Broken]:
        try:
            stream = envelope.open_content()
        except OSError as error:
            return succeed(self._local_status("4.3.0", f"cannot read queue file {envelope.queue_id}: {error}"))
        converter = None
        if converting:
            converter = mime.SevenBitConverter(
                nesting_limit=self.config["mime_nesting_limit"],
                boundary_length_limit=self.config["mime_boundary_length_limit"],
            )
        self.transcript.note(f"Out: <message body, {envelope.content_size} octets>")
        producer = _BodyProducer(
            self,
            stream,
            # Plain content (found so when queued) needs only CRLF; not
            # when it is converted, as the converter writes new lines.
            BodyEncoder(self.config["smtp_line_length_limit"], plain=envelope.plain_lines and converter is None),
            converter,
            self.chunk_size,
            self._timeout_of(STAGES["body"]),
        )
        self._body = producer

        def finished(result: None | Status | _Broken) -> None | Status | _Broken:
            self._body = None
            return result

        producer.done.addBoth(finished)
        producer.start()
        return producer.done


async def _reply(deferred: Deferred[Reply | _Broken]) -> Reply | _Broken:
    """A reply, without a trip through the coroutine machinery when it is
    already in (a reply Deferred never fails and has no callbacks)."""
    if deferred.called:
        return deferred.result  # type: ignore[no-any-return]
    return await deferred


def _positive(reply: Reply | _Broken) -> bool:
    return isinstance(reply, Reply) and reply.positive


class _Outcome:
    """The per-recipient bookkeeping of one transaction."""

    def __init__(self, session: SMTPSession, recipients: tuple[Recipient, ...]) -> None:
        self.session = session
        self.recipients = recipients
        self.statuses: dict[int, Status] = {}
        self.accepted: list[Recipient] = []
        self.mail_reply: Reply | None = None
        self.mail_taken = False
        self.mail_refused = False
        self.message_status: Status | None = None

    def _reply_status(self, reply: Reply, stage: _Stage) -> Status:
        server = self.session.server
        status = reply_status(reply, host=server.host, namaddr=server.namaddr, request=stage.request, stage=stage.name)
        if reply.dsn[0] not in "45":
            # A yes or a 3xx where a failure was read: Postfix's protocol
            # error, after which the session is never cached.
            self.session._out_of_step = True
        return status

    def take_mail(self, reply: Reply | _Broken) -> bool:
        if self.mail_taken:
            return not self.mail_refused
        self.mail_taken = True
        if isinstance(reply, _Broken):
            self.mail_refused = True
            return False
        self.mail_reply = reply
        if not reply.positive:
            self.mail_refused = True
            self.message_status = self._reply_status(reply, STAGES["mail"])
            for recipient in self.recipients:
                self.statuses.setdefault(recipient.index, self.message_status)
            return False
        return True

    def take_rcpt(self, recipient: Recipient, reply: Reply | _Broken) -> bool:
        if isinstance(reply, _Broken) or self.mail_refused:
            return not isinstance(reply, _Broken)
        if reply.positive:
            self.accepted.append(recipient)
        else:
            self.statuses[recipient.index] = self._reply_status(reply, STAGES["rcpt"])
        return reply.code != 421

    def message_failed(self, reply: Reply, stage: _Stage) -> None:
        self.message_status = self._reply_status(reply, stage)
        for recipient in self.accepted:
            self.statuses.setdefault(recipient.index, self.message_status)

    def message_sent(self, reply: Reply) -> None:
        self.message_status = sent_status(reply, host=self.session.server.host)
        for recipient in self.accepted:
            self.statuses.setdefault(recipient.index, self.message_status)

    def finish(self, status: Status | None, *, usable: bool) -> TransactionResult:
        """Every recipient still without a status gets ``status``."""
        if status is not None:
            self.message_status = self.message_status or status
            for recipient in self.recipients:
                self.statuses.setdefault(recipient.index, status)
        fallback = self.message_status or Status(
            dsn="4.4.2",
            text=f"conversation with {self.session.namaddr} ended before a reply",
            remote_mta=self.session.server.host,
        )
        for recipient in self.recipients:
            self.statuses.setdefault(recipient.index, fallback)
        return TransactionResult({r.index: self.statuses[r.index] for r in self.recipients}, self.message_status,
                                 usable and self.session._broken is None and not self.session._out_of_step)


@implementer(IPushProducer)
class _BodyProducer:
    """Streams the queue file's content into the transport.

    A push producer: it writes chunks until the transport pauses it, and
    goes on when resumed, so a slow server holds at most the transport's
    buffer plus one chunk in memory.  Paused for longer than
    ``smtp_data_xfer_timeout`` is a timeout "while sending message body".
    """

    def __init__(
        self,
        session: SMTPSession,
        stream: BinaryIO,
        encoder: BodyEncoder,
        converter: Any,
        chunk_size: int,
        xfer_timeout: float,
    ) -> None:
        self.session = session
        self.stream = stream
        self.encoder = encoder
        self.converter = converter
        self.chunk_size = chunk_size
        self.xfer_timeout = xfer_timeout
        self.done: Deferred[None | Status | _Broken] = Deferred()
        self._paused = False
        self._finished = False
        self._producing = False
        self._timer: Any = None

    def start(self) -> None:
        self.session.transport.registerProducer(self, True)
        self._arm_timer()
        self._produce()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._arm_timer()
        self._produce()

    def stopProducing(self) -> None:
        # The transport calls this before the protocol's connectionLost:
        # the body did not get through.
        if not self._finished:
            session = self.session
            broken = session._broken or _Broken(
                Status(
                    dsn="4.4.2",
                    text=f"lost connection with {session.namaddr} while {STAGES['body'].while_text}",
                    stage=STAGES["body"].name,
                    remote_mta=session.server.host,
                )
            )
            self._finish(broken, stopped=True)

    def abort(self, broken: _Broken) -> None:
        if not self._finished:
            self._finish(broken, stopped=True)

    def _arm_timer(self) -> None:
        # Per write, as Postfix: any progress restarts the clock.
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.xfer_timeout)
        else:
            self._timer = self.session.clock.callLater(self.xfer_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.session._timed_out(STAGES["body"])

    def _produce(self) -> None:
        if self._producing:
            return  # resumed from inside our own write
        self._producing = True
        try:
            while not self._paused and not self._finished:
                try:
                    raw = self.stream.read(self.chunk_size)
                    if not raw:
                        tail = self.converter.close() if self.converter is not None else b""
                        out = (self.encoder.encode(tail) if tail else b"") + self.encoder.flush()
                        if out:
                            self.session.transport.write(out)
                        self._finish(None)
                        return
                    if self.converter is not None:
                        raw = self.converter.feed(raw)
                except OSError as error:
                    self._finish(self.session._local_status("4.3.0", f"queue file read error: {error}"))
                    return
                except CorruptQueueFile as error:
                    self._finish(error)
                    return
                except mime.MimeError as error:
                    self._finish(Status(dsn=error.dsn, text=str(error), stage="end of DATA"))
                    return
                out = self.encoder.encode(raw)
                if out:
                    self.session.transport.write(out)
                    if self._timer is not None and self._timer.active():
                        self._timer.reset(self.xfer_timeout)
        finally:
            self._producing = False

    def _finish(self, result: None | Status | _Broken | CorruptQueueFile, *, stopped: bool = False) -> None:
        self._finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        try:
            self.stream.close()
        except OSError:
            pass
        if not stopped:
            try:
                self.session.transport.unregisterProducer()
            except Exception:  # noqa: BLE001 - a transport already gone
                pass
        if isinstance(result, CorruptQueueFile):
            self.done.errback(result)
        else:
            self.done.callback(result)


class SMTPSessionFactory(protocol.ClientFactory):
    """Builds the ``SMTPSession`` of a connection (for endpoints)."""

    protocol = SMTPSession
    # One factory per connection: no "Starting factory" line for each.
    noisy = False

    def __init__(
        self,
        config: Any,
        clock: IReactorTime,
        server: ServerInfo,
        security: SecurityNegotiator | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.config = config
        self.clock = clock
        self.server = server
        self.security = security
        self.chunk_size = chunk_size
        self.session: SMTPSession | None = None

    def buildProtocol(self, addr: Any) -> SMTPSession:
        session = SMTPSession(self.config, self.clock, self.server, self.security, chunk_size=self.chunk_size)
        session.factory = self
        self.session = session
        return session
