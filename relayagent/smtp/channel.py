"""
The line channel of an ESMTP client session: lines in, commands out, each
reply matched to the command that asked for it.

This is smtp(8)'s smtp_chat.c for Twisted, on a plain ``LineReceiver``
(twisted.mail's ``ESMTPClient`` answers one reply at a time, cannot
pipeline and has one idle timeout; nothing of it is used).
``SMTPChannel`` owns:

- the receive buffer: a line over ``MAX_LINE_OCTETS`` is cut there and
  the rest of it skipped, as Postfix's smtp_get() does; replies parsed
  as smtp_chat_resp() (``smtp.reply``): garbage skipped, bounded memory;
- a FIFO of expected replies (``PendingReply``), so pipelined commands
  (RFC 2920) get their replies in order, and the replies that came while
  nothing was expected (``MAX_UNCLAIMED_REPLIES``), which answer the next
  commands; a reply gets a Deferred only when someone waits for it;
- the write buffer of pipelined commands (``queue_command`` + ``flush``)
  and its count of unanswered octets (``PIPELINE_BUFFER_OCTETS``);
- one reply timer (``smtp_*_timeout`` of the oldest expected reply's
  ``Stage``, restarted once per read that brought replies), with
  Postfix's stage texts ("conversation with host[addr] timed out while
  sending RCPT TO"), and the same texts for a lost connection;
- the end of the session (``break_session``): every waiter learns why,
  the body producer and a TLS handshake in progress are stopped;
- a bounded "Out:/In:" transcript with AUTH payloads redacted.

The steps of the conversation (``smtp.setup``: greeting, EHLO/HELO,
STARTTLS; ``smtp.transaction``: MAIL, RCPT, DATA, ".", RSET, QUIT;
``smtp.body``: the body producer) use only the public API below.

ERROR CONVENTION
    One, values: a wait on the channel never fails.  A reply Deferred
    fires with the ``Reply``, or, once the session is over, with the
    channel's ``Broken`` (whose ``status`` says why: 4.4.2 lost or timed
    out, 421, protocol error); the TLS handshake waiter fires with None
    or the ``Status``; the steps return ``Status | None`` ("the reason
    the session cannot go on").  Why values rather than an exception:
    the reply path is hot (one reply per command, several per message)
    and a value costs no ``Failure``; the replies of pipelined commands
    that are read only when the transaction gets to them, or never (QUIT
    with ``smtp_skip_quit_response``, the rest of the queue after a 421)
    cannot become "Unhandled error in Deferred"; and an already-fired
    reply is read without a trip through the coroutine machinery.
    Exceptions remain only at the session's outer boundary, where the
    interface says so: ``DeliveryFailure`` from ``greeted``, ``command``
    and ``start_tls_handshake`` (ISMTPSession, for the connector and the
    TLS/SASL layer), and ``CorruptQueueFile`` out of ``deliver`` (a
    queue file matter for the queue manager, not an SMTP outcome).

SYNOPSIS
    channel.queue_command(b"RCPT TO:<a@b>", "rcpt")  -> Deferred[Reply | Broken]
    channel.pipeline_command(b"RCPT TO:<a@b>", "rcpt")  -> PendingReply (.result, .wait())
    channel.flush()                      write what is queued, start its timer
    channel.command_reply(line, stage)   queue_command + flush
    channel.expect(stage)                a reply with no command (the greeting)
    channel.expect_reply(stage)          the same, as a PendingReply
    channel.drained()                    every reply so far is in (or broken)
    channel.broken                       None, or the Broken that ended it
    channel.break_session(status)        end it: every waiter gets Broken(status)

DIAGNOSTICS
    Logged (info): "host[addr]:port: response longer than 2048 octets:
    ..." and "host[addr]:port: unexpected reply from server: ...".
    Commands are logged (debug) for peers in ``debug_peer_list``.

Owns (timeouts by stage): smtp_helo_timeout, smtp_mail_timeout,
smtp_rcpt_timeout, smtp_data_init_timeout, smtp_data_xfer_timeout,
smtp_data_done_timeout, smtp_rset_timeout, smtp_quit_timeout; binds
them with the other parameters of the session's steps in
``SessionSettings`` (one object per agent, built at start-up).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from relayagent.common.config import Settings
from relayagent.common.maillog import DebugPeers
from relayagent.common.status import Status
from relayagent.common.transcript import Transcript
from relayagent.smtp.reply import (
    MAX_LINE_OCTETS,
    PROTOCOL,
    Reply,
    ReplyAssembler,
    reply_status,
)

log = Logger()

# Replies that came while no command was waiting are kept for the next
# commands (see _unsolicited); a server that sends more than this is not
# talking SMTP.
MAX_UNCLAIMED_REPLIES = 8

# Postfix stops to read replies when unanswered pipelined commands would
# pass its stream buffer (VSTREAM_BUFSIZE, 4096 octets): a server that does
# not read while its replies are unread can then never deadlock us.
PIPELINE_BUFFER_OCTETS = 4096


@dataclass(frozen=True)
class ServerInfo:
    """The peer of a session, for log and status texts."""

    host: str
    address: str
    port: int
    nexthop: str
    # The recipient domain whose MTA-STS policy applies to this MX host
    # ("" for none: a [host] nexthop, a relay; smtp.mtasts.sts_policy_domain).
    policy_domain: str = ""
    # DNSSEC status of the lookups that gave this server (resolve's
    # MailExchangerAddress), for DANE; False when unknown.
    mx_dnssec_valid: bool = False
    host_dnssec_valid: bool = False

    @property
    def namaddr(self) -> str:
        """``host[address]``, as in Postfix's status texts."""
        return f"{self.host}[{self.address}]"

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True)
class Stage:
    """One step of the conversation.

    ``while_text``: completes "lost connection with X while ...".
    ``request``: completes "(in reply to ...)".  ``name``: ``Status.stage``.
    """

    while_text: str
    request: str
    name: str
    timeout_parameter: str | None


# The texts are Postfix's (smtp_proto.c xfer_states / xfer_request).
STAGES: dict[str, Stage] = {
    "greeting": Stage("receiving the initial server greeting", "initial server greeting", "CONNECT", "smtp_helo_timeout"),
    "ehlo": Stage("performing the EHLO handshake", "EHLO command", "EHLO", "smtp_helo_timeout"),
    "helo": Stage("performing the HELO handshake", "HELO command", "HELO", "smtp_helo_timeout"),
    "mail": Stage("sending MAIL FROM", "MAIL FROM command", "MAIL FROM", "smtp_mail_timeout"),
    "rcpt": Stage("sending RCPT TO", "RCPT TO command", "RCPT TO", "smtp_rcpt_timeout"),
    "data": Stage("sending DATA command", "DATA command", "DATA", "smtp_data_init_timeout"),
    "body": Stage("sending message body", "end of DATA command", "end of DATA", "smtp_data_xfer_timeout"),
    "dot": Stage(
        "sending end of data -- message may be sent more than once",
        "end of DATA command",
        "end of DATA",
        "smtp_data_done_timeout",
    ),
    "rset": Stage("sending final RSET", "final RSET command", "RSET", "smtp_rset_timeout"),
    "probe": Stage("sending RSET probe", "RSET probe", "RSET", "smtp_rset_timeout"),
    "quit": Stage("sending QUIT", "QUIT command", "QUIT", "smtp_quit_timeout"),
    "tls": Stage("performing the TLS handshake", "STARTTLS command", "STARTTLS", "smtp_starttls_timeout"),
    "idle": Stage("waiting to send the next command", "no command", "idle", None),
}


class Broken:
    """The conversation is over; ``status`` says why (4.4.2, 421, protocol).
    What a reply Deferred fires with once the session has ended."""

    def __init__(self, status: Status) -> None:
        self.status = status


class PendingReply:
    """The reply one command (or the greeting) awaits.

    ``result`` is None until the reply is in, then the ``Reply``, or the
    ``Broken`` that ended the session first.  A Deferred is made only
    for a reply someone waits on (``wait``): the replies of pipelined
    commands that are read once the last of their write is in
    (``smtp.transaction``) cost none, nor the callbacks of one.
    """

    __slots__ = ("stage", "timeout", "result", "_waiter")

    def __init__(self, stage: Stage, timeout: float, result: Reply | Broken | None = None) -> None:
        self.stage = stage
        self.timeout = timeout
        self.result: Reply | Broken | None = result
        self._waiter: Deferred[Reply | Broken] | None = None

    def wait(self) -> Deferred[Reply | Broken]:
        """A Deferred that fires with ``result`` once it is in (at once when
        it is); it never fails.  Every call gives the same Deferred until
        the reply is in."""
        if self.result is not None:
            return succeed(self.result)
        if self._waiter is None:
            self._waiter = Deferred()
        return self._waiter

    def arrived(self, result: Reply | Broken) -> None:
        """The reply (or the end of the session) is in: keep it and wake the
        waiter, if any."""
        self.result = result
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(result)


@dataclass(frozen=True, slots=True)
class SessionSettings(Settings):
    """What the channel and the session's steps (``smtp.setup``,
    ``smtp.transaction``, ``smtp.data``) read, bound once."""

    smtp_helo_timeout: float
    smtp_mail_timeout: float
    smtp_rcpt_timeout: float
    smtp_data_init_timeout: float
    smtp_data_xfer_timeout: float
    smtp_data_done_timeout: float
    smtp_rset_timeout: float
    smtp_quit_timeout: float
    smtp_starttls_timeout: float
    debug_peer_list: tuple[str, ...]
    debug_peer_level: int
    smtp_helo_name: str
    smtp_pix_workarounds: tuple[str, ...]
    smtp_pix_workaround_threshold_time: float
    smtp_pix_workaround_delay_time: float
    smtp_always_send_ehlo: bool
    smtp_never_send_ehlo: bool
    smtp_skip_quit_response: bool
    disable_mime_output_conversion: bool
    mime_nesting_limit: int
    mime_boundary_length_limit: int
    smtp_line_length_limit: int
    base_dir: str  # for a debug_peer_list table


def debug_level_of(settings: SessionSettings, server: ServerInfo) -> int:
    """``debug_peer_level`` when the server is in ``debug_peer_list``."""
    if not settings.debug_peer_list:
        return 0
    try:
        peers = DebugPeers(settings.debug_peer_level, settings.debug_peer_list, base_dir=settings.base_dir)
        return peers.level_for(server.nexthop, server.host, server.address)
    except ValueError:
        return 0  # an unreadable pattern file: no debug logging rather than no session


class BodyStream(Protocol):
    """What the channel needs of the body producer it carries
    (``smtp.data.BodyProducer``)."""

    def abort(self, broken: Broken) -> None:
        """Stop sending the body because the session broke (``broken``): the
        producer unregisters and its ``done`` fires with ``broken``; no-op
        once it has finished."""


class SMTPChannel(LineReceiver):
    """The line channel of one ESMTP client connection (see the module
    docstring).  ``smtp.session.SMTPSession`` is one, with the steps on
    top; ``opened(greeting)`` is its hook, called from ``connectionMade``
    with the Deferred of the server's greeting."""

    # Servers end lines with CRLF; a bare LF is accepted and the CR stripped.
    delimiter = b"\n"

    def __init__(self, settings: SessionSettings, clock: IReactorTime, server: ServerInfo) -> None:
        self.settings = settings
        self.clock = clock
        self.server = server
        self.transcript = Transcript()
        # debug_peer_list: commands are logged (debug) for listed peers
        # only; nobody else pays for the events.
        self.debug_level = debug_level_of(settings, server)
        # Whether another transaction may be started: the session sets it
        # once greeted; the end of the session clears it.
        self.usable = False
        # A reply that said the server is out of step with us (garbage, a
        # yes where a no was read, a reply nobody asked for): the session
        # is never cached after its mail.
        self.out_of_step = False
        self._assembler = ReplyAssembler()
        self._pending: deque[PendingReply] = deque()
        self._outgoing: list[bytes] = []
        self._unanswered_octets = 0
        self._timer: Any = None
        self._timer_for: PendingReply | None = None  # the reply the timer runs for
        self._broken: Broken | None = None
        self._body: BodyStream | None = None
        self._early_reply: Reply | None = None
        # Replies that came while no command was waiting: they answer the
        # next commands, in order, as they would for Postfix, which reads
        # replies from its stream whenever it expects one.
        self._unclaimed: deque[Reply] = deque()
        self._skipping_long_line = False
        self._handshake: Deferred[Status | None] | None = None
        self._drain_waiters: list[Deferred[None]] = []
        self._quitting = False
        self._connected = False
        # A reply came during this read: the timer restarts at its end.
        self._timer_due = False
        # The reply timeouts by parameter name, each looked up once
        # (``timeout_of``).
        self._timeouts: dict[str | None, float] = {}

    # -- what the steps read ----------------------------------------------

    @property
    def namaddr(self) -> str:
        """The server as ``host[address]``, as in Postfix's status texts."""
        return self.server.namaddr

    @property
    def broken(self) -> Broken | None:
        """None while the conversation goes on; then why it ended."""
        return self._broken

    @property
    def connection_open(self) -> bool:
        """Whether the transport is still connected."""
        return self._connected

    @property
    def unanswered_octets(self) -> int:
        """The octets of the commands whose replies are not in yet."""
        return self._unanswered_octets

    def local_status(self, dsn: str, text: str) -> Status:
        """A Status of our own making about this server."""
        return Status(dsn=dsn, text=text, remote_mta=self.server.host)

    def lost_status(self, stage: Stage, detail: str = "") -> Status:
        """4.4.2 "lost connection with host[addr] while <stage>"."""
        return Status(
            dsn="4.4.2",
            text=f"lost connection with {self.namaddr} while {stage.while_text}{detail}",
            stage=stage.name,
            remote_mta=self.server.host,
        )

    def timeout_of(self, stage: Stage) -> float:
        """The reply timeout of ``stage``, in seconds: its ``smtp_*_timeout``
        setting (300 for a stage without one)."""
        if stage.timeout_parameter is None:
            return 300.0  # a stage with no parameter of its own (none waits)
        timeout: float = getattr(self.settings, stage.timeout_parameter)
        return timeout

    # -- connection events -------------------------------------------------

    def opened(self, greeting: Deferred[Reply | Broken]) -> None:
        """The connection is up; ``greeting`` fires with the server's greeting."""

    def connectionMade(self) -> None:
        self._connected = True
        greeting = self.expect("greeting")
        self._start_timer()
        self.opened(greeting)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._connected = False
        self.usable = False
        self._cancel_timer()
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.callback(self.lost_status(STAGES["tls"], f": {reason.value}"))
        if self._broken is None and not self._quitting:
            self._break(self.lost_status(self._current_stage()), close=False)
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
            if self._timer_due:
                self._start_timer()

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
            # A line is progress: the timeout is per read.
            if self._busyReceiving:
                self._timer_due = True
            else:
                self._start_timer()
            return
        self._reply_arrived(reply)

    # -- the reply queue ---------------------------------------------------

    def _current_stage(self) -> Stage:
        if self._body is not None:
            return STAGES["body"]
        if self._pending:
            return self._pending[0].stage
        return STAGES["quit"] if self._quitting else STAGES["idle"]

    def expect(self, stage_key: str | Stage, timeout: float | None = None) -> Deferred[Reply | Broken]:
        """A Deferred of the next reply, which fires with the Reply, or with the
        Broken that ended the session (lost connection, timeout, garbage)
        and never errs.  The wait times out after ``timeout`` seconds, by
        default the stage's timeout parameter (``timeout_of``), counted from
        the flush that sends the command."""
        return self.expect_reply(stage_key, timeout).wait()

    def expect_reply(self, stage_key: str | Stage, timeout: float | None = None) -> PendingReply:
        """``expect`` without a Deferred: the ``PendingReply`` of the next
        reply, whose ``result`` is set when it is in."""
        stage = STAGES[stage_key] if stage_key.__class__ is str else stage_key
        if self._broken is not None:
            return PendingReply(stage, 0.0, self._broken)
        if self._unclaimed:
            # A reply that came before its command: Postfix, reading its
            # stream, would take it as this command's reply, and so do we
            # (the command's own reply then answers the next one).
            return PendingReply(stage, 0.0, self._unclaimed.popleft())
        if timeout is None:
            timeout = self._timeouts.get(stage.timeout_parameter)
            if timeout is None:
                timeout = self.timeout_of(stage)
                if stage.timeout_parameter is not None:
                    self._timeouts[stage.timeout_parameter] = timeout
        expectation = PendingReply(stage, timeout)
        self._pending.append(expectation)
        return expectation

    def queue_command(
        self, line: bytes, stage_key: str | Stage, *, timeout: float | None = None, redact: bool = False
    ) -> Deferred[Reply | Broken]:
        """Buffer a command and expect its reply; ``flush`` sends."""
        return self.pipeline_command(line, stage_key, timeout=timeout, redact=redact).wait()

    def pipeline_command(
        self, line: bytes, stage_key: str | Stage, *, timeout: float | None = None, redact: bool = False
    ) -> PendingReply:
        """``queue_command`` without a Deferred: the ``PendingReply`` of the
        command, for a pipelined command whose reply is read once a later
        one is in (replies come in order)."""
        if self._broken is None:
            self.transcript.sent(line, redact=redact)
            if self.debug_level and not redact:
                log.debug("{server}: > {line}", server=str(self.server), line=line, debug_peer=True)
            self._outgoing.append(line + b"\r\n")
            self._unanswered_octets += len(line) + 2
        return self.expect_reply(stage_key, timeout)

    def flush(self) -> None:
        """Write the queued commands in one write (unless the session is
        broken), and start the reply timer for the oldest reply awaited."""
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
        self._timer_due = False
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
        self.timed_out(self._pending[0].stage)

    def timed_out(self, stage: Stage) -> None:
        """The reply (or the body's progress) for ``stage`` took too long."""
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
            self.out_of_step = True  # Postfix: never cache after garbage
        expectation = self._pending.popleft()
        if self._busyReceiving:
            # Restarted once the lines of this read are handled
            # (dataReceived), not for each of the pipelined replies in it.
            self._timer_due = True
        else:
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
        expectation.arrived(reply)

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
        self.out_of_step = True
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

    def _break(self, status: Status, *, close: bool = True, keep: PendingReply | None = None) -> None:
        """End the conversation: every waiter learns ``status``."""
        if self._broken is not None:
            return
        self._broken = Broken(status)
        self.usable = False
        self._cancel_timer()
        self._outgoing = []
        pending = [e for e in self._pending if e is not keep]
        self._pending.clear()
        for expectation in pending:
            expectation.arrived(self._broken)
        self._wake_drain_waiters()
        if self._body is not None:
            self._body.abort(self._broken)
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.callback(status)
        if close and self._connected:
            self.abort_connection()

    def abort_connection(self) -> None:
        """Drop the connection at once (nothing more is written)."""
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:  # pragma: no cover - every current transport has it
            self.transport.loseConnection()


    # -- the API of the steps ---------------------------------------------

    def command_reply(
        self, line: bytes, stage_key: str | Stage, *, timeout: float | None = None, redact: bool = False
    ) -> Deferred[Reply | Broken]:
        """Send one command now and expect its reply."""
        deferred = self.queue_command(line, stage_key, timeout=timeout, redact=redact)
        self.flush()
        return deferred

    def break_session(self, status: Status, *, close: bool = True) -> None:
        """End the conversation: every waiter learns ``status``; the
        connection is dropped unless ``close`` is false."""
        self._break(status, close=close)

    def close_quietly(self) -> None:
        """End the session as agreed (after QUIT, or out of step): nothing
        more is expected; whatever the server still says is ignored."""
        self._quitting = True
        self._cancel_timer()
        if self._broken is None:
            self._broken = Broken(
                Status(dsn="4.4.2", text=f"session with {self.namaddr} ended", remote_mta=self.server.host)
            )
        self._pending.clear()
        if self._connected:
            self.transport.loseConnection()

    def quitting(self) -> None:
        """QUIT is on its way: a lost connection or a stray reply from now
        on is the end the session asked for."""
        self._quitting = True

    def drained(self) -> Deferred[None]:
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

    def discard_plaintext(self) -> bool:
        """Before the TLS handshake: drop what the server sent after its
        reply to STARTTLS; whether there was any (a line still in the
        buffer, or a reply nobody asked for)."""
        return bool(self.clearLineBuffer() or self._unclaimed)

    def handshake(self) -> Deferred[Status | None]:
        """A waiter for the TLS handshake the transport is about to start:
        fires with None when it completes, or with the Status that ended
        the session first (lost connection, timeout)."""
        self._handshake = Deferred()
        return self._handshake

    @property
    def handshaking(self) -> bool:
        """Whether a TLS handshake is awaited (``handshake``)."""
        return self._handshake is not None

    @property
    def body(self) -> BodyStream | None:
        """The body producer on its way, if any."""
        return self._body

    def carry_body(self, body: BodyStream | None) -> None:
        """The body producer that writes now (None: the body is done)."""
        self._body = body

    def take_early_reply(self) -> Reply | None:
        """The reply that came while the body was on its way, if any (once)."""
        early, self._early_reply = self._early_reply, None
        return early
