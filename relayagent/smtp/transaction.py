"""
The mail transaction of an ESMTP session, as smtp(8)'s smtp_xfer() does
it: MAIL FROM, every RCPT TO, DATA, the body, "." (and QUIT after the
last), RSET after a refusal, the RSET probe of a cached session.

- with PIPELINING (RFC 2920) [RSET,] MAIL, the RCPTs and DATA go in one
  write, replies matched in order, stopping to read when about 4 KB of
  commands are unanswered (``channel.PIPELINE_BUFFER_OCTETS``); QUIT goes
  with "." after the last transaction; lock-step otherwise;
- SIZE, BODY=8BITMIME/7BIT, DSN (RET, ENVID, NOTIFY, ORCPT), SMTPUTF8
  and REQUIRETLS (RFC 8689, on a session the security hook checked for
  it: ``smtp.requiretls``) parameters (``smtp.address``), and ARRIVAL= to
  a relayagent listener that offers XRELAYAGENT-ARRIVAL (only to an
  authenticated peer); the 5.3.4 size refusal and the 5.6.7
  SMTPUTF8 refusal, decided before any command;
- per-recipient ``Status`` results (``Outcome``) worded as Postfix words
  them; a reply of the wrong kind is Postfix's outcome (5.5.0), never a
  traceback, and the session is not cached after it; 421 ends the
  session; an empty 354 (nothing accepted) gets "." at once;
- the PIX ``delay_dotcrlf`` workaround and ``smtp_skip_quit_response``.

SYNOPSIS
    result = await transact(session, envelope, recipients, last, probe)  # TransactionResult
    ok = await reset_session(session)       # the RSET probe
    await quit_session(session)

DIAGNOSTICS
    None logged here; every outcome is a Status in the TransactionResult.
    ``transact`` lets CorruptQueueFile through (the body failed its
    checksum on the way: no "." went, the connection is dropped).

Owns: smtp_pix_workaround_delay_time, smtp_pix_workaround_threshold_time,
smtp_skip_quit_response, disable_mime_output_conversion; the MAIL, RCPT,
DATA, ".", RSET and QUIT replies wait smtp_mail_timeout ...
smtp_quit_timeout (the channel's stage table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet import task

from relayagent.common.envelope import BodyType, Envelope, Notify, Recipient
from relayagent.common.status import Status
from relayagent.smtp import mime
from relayagent.smtp.address import orcpt_parameter, requires_smtputf8, smtp_path, xtext
from relayagent.smtp.channel import PIPELINE_BUFFER_OCTETS, STAGES, Broken, PendingReply, Stage
from relayagent.smtp.data import send_body
from relayagent.smtp.reply import Reply, reply_status, sent_status
from relayagent.smtp.requiretls import REQUIRETLS_KEYWORD, TLSDemand
from relayagent.spool.queuefile import CorruptQueueFile

if TYPE_CHECKING:
    from relayagent.smtp.session import SMTPSession

# The EHLO keyword of relayagent's listener, after AUTH, for MAIL FROM's
# ARRIVAL=<unix-time> (docs/fleet.rst, "Moving a queue to another node").
ARRIVAL_KEYWORD = "XRELAYAGENT-ARRIVAL"


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


async def reset_session(session: SMTPSession) -> bool:
    """The RSET probe: whether the session can be reused."""
    if session.broken is not None or not session.usable:
        return False
    reply = await session.command_reply(b"RSET", "probe")
    if isinstance(reply, Broken) or not reply.positive:
        session.usable = False
        return False
    return True


async def quit_session(session: SMTPSession) -> None:
    """QUIT and close (the reply awaited unless smtp_skip_quit_response)."""
    session.usable = False
    if session.broken is not None or not session.connection_open:
        if session.connection_open:
            session.transport.loseConnection()
        return
    pending = session.pipeline_command(b"QUIT", "quit")
    session.quitting()
    session.flush()
    if not session.settings.smtp_skip_quit_response:
        await _reply(pending)
    session.close_quietly()


def mail_from(session: SMTPSession, envelope: Envelope, converting: bool) -> bytes:
    """The MAIL FROM command with the parameters the server takes."""
    parts = ["MAIL FROM:" + smtp_path(envelope.sender)]
    if session.has("SIZE") and not converting:
        parts.append(f"SIZE={envelope.content_size}")
    if session.has("8BITMIME"):
        if envelope.body_type is BodyType.EIGHT_BIT_MIME:
            parts.append("BODY=8BITMIME")
        elif envelope.body_declared:
            parts.append("BODY=7BIT")
        # An undeclared 7-bit body: no BODY=, as from Postfix.
    if envelope.smtputf8 and session.has("SMTPUTF8"):
        parts.append("SMTPUTF8")
    requested = envelope.requiretls and getattr(session, "tls_demand", None) is TLSDemand.REQUIRETLS
    outcome = getattr(session, "tls_outcome", None)
    requiretls = requested and session.has(REQUIRETLS_KEYWORD) and outcome is not None and outcome.active
    if requiretls:
        parts.append(REQUIRETLS_KEYWORD)
    if session.has("DSN"):
        if envelope.envid:
            parts.append("ENVID=" + xtext(envelope.envid))
        if requested and not requiretls:
            # smtp_requiretls_policy let it go without REQUIRETLS: ask
            # that a bounce return only the header (Postfix 3.11).
            parts.append("RET=HDRS")
        elif envelope.ret is not None:
            parts.append("RET=" + envelope.ret.value)
    if session.has(ARRIVAL_KEYWORD):
        # Our listener's extension (docs/fleet.rst), offered only to an
        # authenticated relayagent peer: the first arrival, so that the
        # queue lifetimes and delay warnings go on counting from it.
        parts.append(f"ARRIVAL={int(envelope.arrival_time)}")
    return " ".join(parts).encode("utf-8")


def rcpt_to(session: SMTPSession, recipient: Recipient, *, dsn: bool | None = None) -> bytes:
    """The RCPT TO command with the DSN parameters when the server takes them
    (``dsn``: whether it does, when the caller knows; else asked of the
    session)."""
    path = smtp_path(recipient.address)
    parts = ["RCPT TO:" + path]
    if dsn if dsn is not None else session.has("DSN"):
        orcpt = orcpt_parameter(recipient, path[1:-1])
        if orcpt is not None:
            parts.append("ORCPT=" + orcpt)
        # The default (no NOTIFY given) without Flag arithmetic: once per
        # recipient of every transaction.
        notify = None if recipient.notify is Notify.DEFAULT else recipient.notify.esmtp_value()
        if notify is not None:
            parts.append("NOTIFY=" + notify)
    return " ".join(parts).encode("utf-8")


def _probe_failed(session: SMTPSession, outcome: Outcome) -> TransactionResult:
    """The session is dead or out of step: drop it; nothing was sent
    that could deliver anything."""
    session.usable = False
    if session.broken is None:
        session.break_session(session.local_status("4.4.2", f"RSET probe to {session.namaddr} failed"))
    result = outcome.finish(session.broken.status if session.broken else None, usable=False)
    return TransactionResult(result.recipients, result.status_of_transaction, False, probe_failed=True)


async def transact(
    session: SMTPSession, envelope: Envelope, recipients: tuple[Recipient, ...], last: bool, probe: bool = False
) -> TransactionResult:
    """One mail transaction for ``recipients`` of ``envelope`` on
    ``session``, pipelined when the server offers PIPELINING; ``last``:
    no other transaction follows (QUIT goes with "."); ``probe``: a
    cached session, checked with RSET first.

    Returns the TransactionResult: a Status per recipient and whether
    the session may be used again.  Every server or session failure is
    in it; only CorruptQueueFile is raised (the body failed its checksum;
    the connection is dropped before ".").
    """
    outcome = Outcome(session, recipients)
    if probe and (session.broken is not None or not session.usable):
        return _probe_failed(session, outcome)
    if session.broken is not None or not session.usable:
        status = session.broken.status if session.broken is not None else session.local_status(
            "4.4.2", f"session with {session.namaddr} is not usable"
        )
        return outcome.finish(status.softened() if status.hard else status, usable=False)

    # Checks that need no command (smtp_xfer).
    if not session.has("SMTPUTF8") and requires_smtputf8(envelope, recipients):
        status = session.local_status(
            "5.6.7", f"SMTPUTF8 is required, but was not offered by host {session.namaddr}"
        )
        return await _after_local_refusal(session, outcome, status, last)
    limit = session.size_limit
    if limit is not None and limit < envelope.content_size:
        status = session.local_status(
            "5.3.4",
            f"message size {envelope.content_size} exceeds size limit {limit} of server {session.namaddr}",
        )
        return await _after_local_refusal(session, outcome, status, last)

    converting = mime.needs_conversion(
        envelope.body_type, session.has("8BITMIME"), session.settings.disable_mime_output_conversion
    )
    pipelining = session.has("PIPELINING")

    # Each command's PendingReply: under pipelining only the last of the
    # write is waited for (with a Deferred); the others are read off
    # their PendingReply once it is in.
    probe_p: PendingReply | None = None
    if probe:
        probe_p = session.pipeline_command(b"RSET", "probe")
        if not pipelining:
            session.flush()
            if not _positive(await _reply(probe_p)):
                return _probe_failed(session, outcome)
            probe_p = None
    # [RSET,] MAIL, RCPT..., DATA: one write when pipelining, else lock-step.
    mail_reply_p = session.pipeline_command(mail_from(session, envelope, converting), "mail")
    if not pipelining:
        session.flush()
        if not outcome.take_mail(await _reply(mail_reply_p)):
            return await _abort(session, outcome, last)
    rcpt_replies: list[tuple[Recipient, PendingReply]] = []
    dsn = session.has("DSN")
    for recipient in recipients:
        line = rcpt_to(session, recipient, dsn=dsn)
        if pipelining and session.unanswered_octets + len(line) + 2 > PIPELINE_BUFFER_OCTETS:
            # Read what is due before writing more (see PIPELINE_BUFFER_OCTETS).
            session.flush()
            await session.drained()
            if session.broken is not None:
                break
        reply_p = session.pipeline_command(line, "rcpt")
        if pipelining:
            rcpt_replies.append((recipient, reply_p))
        else:
            session.flush()
            if not outcome.take_rcpt(recipient, await _reply(reply_p)):
                break
    data_reply_p: PendingReply | None = None
    if session.broken is None and (pipelining or outcome.accepted):
        data_reply_p = session.pipeline_command(b"DATA", "data")
    session.flush()
    if pipelining:
        # Replies come in order (or the session breaks and every waiter
        # hears it at once): wait once, for the last, then read the
        # others, which are in by then.
        last_p = data_reply_p or (rcpt_replies[-1][1] if rcpt_replies else mail_reply_p)
        await _reply(last_p)
    if probe_p is not None and not _positive(await _reply(probe_p)):
        # The commands after it are void: the connection goes.
        return _probe_failed(session, outcome)
    if pipelining:
        outcome.take_mail(await _reply(mail_reply_p))
        for recipient, reply_p in rcpt_replies:
            outcome.take_rcpt(recipient, await _reply(reply_p))
    data_reply = await _reply(data_reply_p) if data_reply_p is not None else None

    if isinstance(data_reply, Broken):
        return outcome.finish(data_reply.status, usable=False)
    if session.broken is not None and data_reply is None:
        return outcome.finish(session.broken.status, usable=False)
    if data_reply is None or not outcome.accepted or outcome.mail_refused:
        if data_reply is not None and data_reply.intermediate:
            # RFC 2920 3.1: DATA got 354 although nothing was accepted:
            # end the empty message at once.
            dot = await session.command_reply(b".", "dot")
            if isinstance(dot, Broken):
                return outcome.finish(dot.status, usable=False)
            return await _maybe_quit(session, outcome.finish(None, usable=True), last)
        return await _abort(session, outcome, last)
    if not data_reply.intermediate:
        outcome.message_failed(data_reply, STAGES["data"])
        return await _abort(session, outcome, last)

    # 354: the body, then "." (and QUIT when this is the last transaction).
    try:
        body_result = await send_body(session, envelope, converting, session.chunk_size)
    except CorruptQueueFile as corrupt:
        # The content failed its checksum on the way: no "." goes, so
        # the server keeps nothing of it; the connection drops and the
        # queue manager moves the file to corrupt/.
        session.break_session(session.local_status("4.3.0", f"queue file {envelope.queue_id} is corrupt: {corrupt.reason}"))
        raise
    if isinstance(body_result, Status):
        # A MIME or queue file error: there is no way to cancel DATA
        # but to drop the connection (as Postfix does).
        session.break_session(body_result)
        return outcome.finish(body_result, usable=False)
    if isinstance(body_result, Broken):
        early = session.take_early_reply()
        if early is not None and not early.positive:
            outcome.message_failed(early, STAGES["dot"])
        return outcome.finish(body_result.status, usable=False)
    if "delay_dotcrlf" in session.pix_workarounds and (
        session.clock.seconds() - envelope.arrival_time >= session.settings.smtp_pix_workaround_threshold_time
    ):
        # PIX firewalls lose a ".CRLF" that shares a packet with the body.
        await task.deferLater(session.clock, session.settings.smtp_pix_workaround_delay_time, lambda: None)
        if session.broken is not None:
            return outcome.finish(session.broken.status, usable=False)
    early = session.take_early_reply()
    dot_p = session.pipeline_command(b".", "dot")
    # QUIT goes in the same write as "." only to a server that
    # pipelines: any other may take it as a pipelining violation and
    # refuse the message (OpenSMTPD: "500 5.5.1 Invalid command:
    # Pipelining not supported").  Without PIPELINING nothing is
    # written before the previous reply is in.
    quit_p = session.pipeline_command(b"QUIT", "quit") if last and pipelining else None
    session.flush()
    if early is not None:
        # The server answered before "."; it is out of step from now on.
        dot_reply: Reply | Broken = early
        session.close_quietly()
    else:
        dot_reply = await _reply(dot_p)
        if quit_p is not None and isinstance(dot_reply, Reply) and dot_reply.code != 421:
            if not session.settings.smtp_skip_quit_response:
                await _reply(quit_p)
            session.close_quietly()
    if isinstance(dot_reply, Broken):
        return outcome.finish(dot_reply.status, usable=False)
    if dot_reply.positive:
        outcome.message_sent(dot_reply)
    else:
        outcome.message_failed(dot_reply, STAGES["dot"])
    if last and quit_p is None and early is None:
        return await _maybe_quit(session, outcome.finish(None, usable=False), last)
    return outcome.finish(None, usable=session.broken is None and not last)


async def _after_local_refusal(session: SMTPSession, outcome: Outcome, status: Status, last: bool) -> TransactionResult:
    result = outcome.finish(status, usable=True)
    return await _maybe_quit(session, result, last)


async def _maybe_quit(session: SMTPSession, result: TransactionResult, last: bool) -> TransactionResult:
    if last and session.broken is None:
        await quit_session(session)
        return TransactionResult(result.recipients, result.status_of_transaction, False)
    return result


async def _abort(session: SMTPSession, outcome: Outcome, last: bool) -> TransactionResult:
    """MAIL, every RCPT or DATA refused: RSET, and the session lives on."""
    if session.broken is not None:
        return outcome.finish(session.broken.status, usable=False)
    reply = await session.command_reply(b"RSET", "rset")
    usable = isinstance(reply, Reply) and reply.positive and session.broken is None
    if isinstance(reply, Reply) and not reply.positive:
        session.usable = False
    result = outcome.finish(None, usable=usable)
    if last or not usable:
        await quit_session(session)
        return TransactionResult(result.recipients, result.status_of_transaction, False)
    return result


async def _reply(pending: PendingReply) -> Reply | Broken:
    """A reply, without a Deferred or a trip through the coroutine
    machinery when it is already in."""
    result = pending.result
    if result is not None:
        return result
    return await pending.wait()


def _positive(reply: Reply | Broken) -> bool:
    return isinstance(reply, Reply) and reply.positive


class Outcome:
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

    def _reply_status(self, reply: Reply, stage: Stage) -> Status:
        server = self.session.server
        status = reply_status(reply, host=server.host, namaddr=server.namaddr, request=stage.request, stage=stage.name)
        if reply.dsn[0] not in "45":
            # A yes or a 3xx where a failure was read: Postfix's protocol
            # error, after which the session is never cached.
            self.session.out_of_step = True
        return status

    def take_mail(self, reply: Reply | Broken) -> bool:
        """Take the MAIL FROM reply: False when the transaction cannot go on
        (the session broke, or the sender was refused: every recipient then
        gets the refusal).  A second call repeats the first answer."""
        if self.mail_taken:
            return not self.mail_refused
        self.mail_taken = True
        if isinstance(reply, Broken):
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

    def take_rcpt(self, recipient: Recipient, reply: Reply | Broken) -> bool:
        """Take one RCPT TO reply: an accepted recipient is kept, a refused one
        gets its status.  False when no more RCPT should be sent (421, or
        the session broke)."""
        if isinstance(reply, Broken) or self.mail_refused:
            return not isinstance(reply, Broken)
        if reply.positive:
            self.accepted.append(recipient)
        else:
            self.statuses[recipient.index] = self._reply_status(reply, STAGES["rcpt"])
        return reply.code != 421

    def message_failed(self, reply: Reply, stage: Stage) -> None:
        """The message was refused at ``stage`` (DATA, "."): every accepted
        recipient without a status gets the refusal."""
        self.message_status = self._reply_status(reply, stage)
        for recipient in self.accepted:
            self.statuses.setdefault(recipient.index, self.message_status)

    def message_sent(self, reply: Reply) -> None:
        """The server took the message: every accepted recipient without a
        status is sent, with the server's reply."""
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
                                 usable and self.session.broken is None and not self.session.out_of_step)
