"""
What becomes of each recipient and of the message after a delivery
request (Postfix: the deliver_completed/bounce_append/defer_append calls
of smtp_trouble.c and smtp_rcpt.c, qmgr_deliver.c's end of a request, and
qmgr_active.c's end of a message: remove, defer, expire).

A request (``relayagent.qmgr.scheduler.DeliveryRequest``: recipients of one
message for one destination) becomes an ``SmtpRequest`` for smtp's one
entry point, ``relayagent.smtp.deliver.SmtpAgent.deliver`` (routing,
addresses, the connection cache, sessions, fallback: all smtp's), which
hands back one ``SmtpResult``.  Its ``notify_classes`` problems go to the
postmaster, and each recipient's outcome is acted on:

- sent: marked done in the queue file, then logged (``status=sent``);
- bounced: written to the bounce log, marked done, logged
  (``status=bounced``); the DSN for the message's bounced recipients is
  built by ``relayagent.bounce.dsn`` from the bounce log when the attempt
  ends (``finish``) and queued with the null sender;
- deferred: written to the defer log with the reason, logged
  (``status=deferred``).  ``soft_bounce = yes`` turns bounces into
  deferrals.

The order is the crash-safety argument: the bounce log before the mark
(a crash between them retries the recipient: at worst two records for
one recipient, merged), the mark before the log line and any notice, the
queue file removed only when no recipient is pending.  A crash between
the server's "250" and the mark sends the recipient again
(at-least-once, as Postfix).  A request's records come first, then all
its marks (one ``pwrite`` per run of neighbouring recipients), then its
log lines, a transaction's recipients at a time (``log_deliveries``).

``finish``, when the message's last request is over: recipients still
pending past ``maximal_queue_lifetime`` (``bounce_queue_lifetime`` for
the null sender) bounce with their last deferral reason
("status=expired, returned to sender"); the bounce notice goes out; one
delay warning is sent when the message has just passed
``delay_warning_time`` (no flag in the queue file: the previous
attempt's end is ``next_attempt - backoff(attempts)``; a crash between
warning and attempt record can send it twice, never zero times); then
the file is removed, or its attempt recorded and it moves to
``deferred/`` with its next-attempt time as its mtime.

SYNOPSIS::

    agent = DeliveryAgent(config, spool, reactor, smtp=smtp_agent,
                          new_mail=wake_the_queue, removal_reactor=reactor)
    d = agent.deliver(request)             # Deferred[RequestResult]
    agent.defer_unsent(request, status); agent.finish(message); agent.stop()

DIAGNOSTICS: ``deliver`` fires with a ``RequestResult`` (its
``site_failure`` is smtp's).  A write error (a full disk) never loses a
recipient nor delivers one twice, and costs one warning line per message
and kind of trouble, not a traceback:

- a bounce record that cannot be written leaves its recipient pending,
  deferred with 4.3.0 "... (not bounced: cannot write the bounce log:
  ...)" (Postfix's "bounce or trace service failure"); it bounces later;
- a defer record that cannot be written costs its reason, not the
  recipient; the marks of the done recipients are made regardless;
- a failure notice that cannot be queued leaves the message deferred
  with its bounce log, to be sent on the next attempt; one plan's
  notices are queued in one batch, all or none, so none goes twice;
- a delay warning, success notice or postmaster notice that cannot be
  queued is one warning, and the message goes on.

A queue file found corrupt is moved to ``corrupt/`` by ``finish``.

Owns: soft_bounce, maximal_queue_lifetime, bounce_queue_lifetime,
delay_warning_time (the timing; ``relayagent.bounce.dsn`` writes the text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relayagent.bounce import dsn
from relayagent.bounce.dsn import BounceSettings
from relayagent.common import maillog as ralog
from relayagent.common import probes
from relayagent.common.config import Config, Settings
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import Status
from relayagent.qmgr.interfaces import IDeliveryAgent
from relayagent.qmgr.scheduler import ActiveMessage, DeliveryRequest, RequestResult, backoff_time
from relayagent.smtp.deliver import SmtpRequest
from relayagent.smtp.result import RecipientOutcome, SessionProblem, SmtpResult, Transmission
from relayagent.spool import (
    ACTIVE,
    BOUNCE_LOG,
    DEFER_LOG,
    DEFERRED,
    CorruptQueueFile,
    LogRecord,
    Message,
    Spool,
)
from relayagent.spool.remover import BackgroundRemover

if TYPE_CHECKING:
    # The server of an outcome (RecipientOutcome.server), for the types only.
    from relayagent.smtp.channel import ServerInfo

log = Logger(namespace="relayagent.qmgr.delivery")


class SmtpDeliverer(Protocol):
    """smtp's entry point (``relayagent.smtp.deliver.SmtpAgent``)."""

    def deliver(self, request: SmtpRequest) -> Deferred[SmtpResult]:
        """Deliver one request: a Deferred of its ``SmtpResult``."""


@dataclass(frozen=True, slots=True)
class EndSettings(Settings):
    """The end of a message's attempt: its parameters, bound once."""

    soft_bounce: bool
    maximal_queue_lifetime: float
    bounce_queue_lifetime: float
    minimal_backoff_time: float
    maximal_backoff_time: float
    delay_warning_time: float


@implementer(IDeliveryAgent)
class DeliveryAgent:
    """Runs delivery requests and ends messages (the scheduler's agent).

    ``smtp``: smtp's entry point (``SmtpAgent``); ``new_mail()`` is
    called when notices were queued (the queue manager's wakeup).
    """

    def __init__(
        self,
        config: Config,
        spool: Spool,
        clock: IReactorTime,
        *,
        smtp: SmtpDeliverer,
        new_mail: Callable[[], None] | None = None,
        removal_reactor: Any = None,
    ) -> None:
        self.settings = EndSettings.from_config(config)
        self.bounce_settings = BounceSettings.from_config(config)
        self.spool = spool
        self.clock = clock
        self.smtp = smtp
        self.new_mail = new_mail
        self.soft_bounce = self.settings.soft_bounce
        self.corrupt: dict[str, str] = {}  # queue id -> reason, found during delivery
        # removal_reactor (a reactor with callFromThread): delivered
        # messages are unlinked by a worker thread (spool.remover); None:
        # here and now.
        self.remover: BackgroundRemover | None = None
        if removal_reactor is not None:
            self.remover = BackgroundRemover(spool, removal_reactor, on_removed=self._removed,
                                             on_error=self._removal_failed)

    def reconfigure(self, config: Config, smtp: SmtpDeliverer) -> None:
        """A reload: the next request goes to ``smtp`` with the lifetimes,
        backoff and notice settings of ``config``; a request in flight
        finishes with what it began with (it holds its smtp agent)."""
        settings = EndSettings.from_config(config)
        bounce_settings = BounceSettings.from_config(config)
        self.settings, self.bounce_settings = settings, bounce_settings
        self.soft_bounce = settings.soft_bounce
        self.smtp = smtp

    def stop(self) -> None:
        """Finish the removals handed to the worker thread (service stop)."""
        if self.remover is not None:
            self.remover.stop()

    # -- one request

    def deliver(self, request: DeliveryRequest) -> Deferred[RequestResult]:
        return Deferred.fromCoroutine(self._deliver(request))

    async def _deliver(self, request: DeliveryRequest) -> RequestResult:
        message = request.message
        queue_file = message.queue_file
        recipients = queue_file.not_done(request.recipients)
        if not recipients or message.queue_id in self.corrupt:
            return RequestResult()
        try:
            with queue_file.held():
                return await self._deliver_held(request, recipients)
        except CorruptQueueFile as exc:
            # Reopened by name at the start of the hold, and found to be
            # another file (a link or a file put in its place).
            self._corrupt_found(message, exc.reason)
            return RequestResult()

    async def _deliver_held(self, request: DeliveryRequest, recipients: list[Recipient]) -> RequestResult:
        """The request, the queue file's descriptor held: one open for
        the body and every mark (``QueueFile.held``)."""
        message = request.message
        started = self.clock.seconds()
        result = await self.smtp.deliver(
            SmtpRequest(message.envelope, request.domain, tuple(recipients), request.backlog)
        )
        self._notify_postmaster(message.envelope, result.problems)
        if result.corrupt is not None:
            self._corrupt_found(message, result.corrupt)
            return RequestResult()
        if message.queue_id in self.corrupt:
            return RequestResult()
        try:
            self._record_many(request, [(r, result.outcomes[r.index]) for r in recipients],
                              started, result.transmissions)
        except CorruptQueueFile as exc:
            # The file's name no longer leads to the file opened (a link or
            # another file put in its place): nothing was written to it.
            self._corrupt_found(message, exc.reason)
            return RequestResult()
        if request.grant is None:
            # No limiter granted this request: nobody reads what the
            # limits would learn from it (QueueManager._release).
            return RequestResult(site_failure=result.site_failure)
        return RequestResult(site_failure=result.site_failure, replies=server_replies(result),
                             connections=connections_made(result))

    def _notify_postmaster(self, envelope: Envelope, problems: Sequence[SessionProblem]) -> None:
        """smtp(8)'s ``notify_classes`` notices (protocol, resource,
        software, data): one per class a transaction raised, with its
        session transcript, to ``error_notice_recipient``."""
        for problem in problems:
            cls = problem.notify_class
            notice = dsn.postmaster_notice(cls, envelope, problem.status, list(problem.transcript),
                                           self.bounce_settings, clock=self.clock, server=problem.server)
            if notice is None:
                continue  # notify_classes does not ask for it, or mail from a notice
            sender, recipients, content = notice
            label = f"postmaster {cls} notification"
            try:
                new_id = self.spool.enqueue(sender, recipients, content)
            except OSError as exc:
                ralog.log_warning(log, f"cannot queue the {label}: {_reason(exc)}",
                                  queue_id=envelope.queue_id)
                continue
            ralog.log_notice(log, envelope.queue_id, new_id, label)
            if self.new_mail is not None:
                self.clock.callLater(0, self.new_mail)

    # -- recipient outcomes

    def _record_many(self, request: DeliveryRequest, outcomes: Sequence[tuple[Recipient, RecipientOutcome]],
                     started: float, transmissions: Mapping[int, Transmission]) -> None:
        """Act on the recipients' outcomes at once (see the module
        docstring), in three passes so that the queue file is opened once
        for all the marks: each recipient's bounce or defer record, then
        every mark, then the log lines and notices.  Each recipient still
        has its bounce record before its mark, and its mark before its
        log line."""
        message = request.message
        queue_file = message.queue_file
        decided: list[tuple[Recipient, RecipientOutcome, Status, str]] = []
        done: list[int] = []
        troubles = _Troubles(message.queue_id)
        soft_bounce = self.soft_bounce
        # The recipients of one transaction share their status: soften it
        # once for them, and they still share it (_transactions).
        softened_from: Status | None = None
        softened: Status | None = None
        for recipient, outcome in outcomes:
            status = outcome.status
            hard = status.hard
            if hard and soft_bounce:
                if status is not softened_from:
                    softened_from, softened = status, status.softened()
                assert softened is not None
                status, hard = softened, False
            if hard:
                try:
                    queue_file.bounce(recipient.index, status)
                except OSError as exc:
                    # No record, no mark: the recipient stays, deferred,
                    # and bounces on a later attempt.
                    troubles.add("cannot write the bounce log", exc)
                    status = Status(
                        "4.3.0", f"{status.text} (not bounced: cannot write the bounce log: {_reason(exc)})",
                        reply=status.reply, remote_mta=status.remote_mta,
                    )
                    hard = False
            if hard:
                verdict = "bounced"
                done.append(recipient.index)
            elif status.ok:
                verdict = "sent"
                done.append(recipient.index)
            else:
                try:
                    queue_file.defer(recipient.index, status)
                except OSError as exc:
                    troubles.add("cannot write the defer log", exc)  # the reason only is lost
                verdict = "deferred"
            decided.append((recipient, outcome, status, verdict))
        if done:
            try:
                queue_file.mark_done_many(done)
            except OSError as exc:
                # In place, one octet each: almost never fails.  Should it,
                # these recipients are tried again (at-least-once).
                troubles.add("cannot mark recipients done in the queue file", exc)
        troubles.log()
        # Every mark above is on the file before the first line below
        # (the crash contract: a crash from here on loses log lines, never
        # sends a recipient twice); the file is removed only in finish,
        # after the marks of the message's every request.  The lines go
        # out a transaction at a time (log_deliveries): what its
        # recipients share is worked out once.
        now = self.clock.seconds()
        envelope = message.envelope
        before_qmgr = max(0.0, message.activated - envelope.arrival_time)
        in_qmgr = max(0.0, (request.dispatched or started) - message.activated)
        delay = max(0.0, now - envelope.arrival_time)
        not_transmitted = (max(0.0, now - started), 0.0)
        for recipients, status, verdict, server, sent in _transactions(decided, transmissions):
            if sent is None:
                setup, transmission = not_transmitted
            else:
                setup, transmission = sent.connected - started, sent.done - sent.connected
            delays = (before_qmgr, in_qmgr, setup, transmission)
            # A "relayed" notice may follow each line (NOTIFY=SUCCESS through
            # a server without DSN; none when it offers DSN): then one line
            # at a time, each followed by its notice's, as they always came.
            notices = status.ok and server is not None and not (sent is not None and sent.dsn_offered)
            for batch in ([recipient] for recipient in recipients) if notices else (recipients,):
                ralog.log_deliveries(
                    log,
                    queue_id=message.queue_id,
                    recipients=batch,
                    relay=str(server) if server is not None else None,
                    conn_use=sent.conn_use if sent is not None else None,
                    delay=delay,
                    delays=delays,
                    status=status,
                    outcome=verdict,
                )
                if probes.tap is not None:
                    for _ in batch:
                        probes.tap.delivery(request.destination, verdict, status.dsn, delay, delays)
                if notices:
                    self._success_notice(message, batch[0], status, False)

    def _success_notice(self, message: ActiveMessage, recipient: Recipient, status: Status,
                        offers_dsn: bool) -> None:
        """A "relayed" notice for NOTIFY=SUCCESS through a server without DSN."""
        report = dsn.success_report(recipient, status, server_offers_dsn=offers_dsn,
                                    when=self.clock.seconds())
        if report is None:
            return
        plan = dsn.notices("success", message.envelope, [report], settings=self.bounce_settings, clock=self.clock)
        self._send_notices(message.queue_id, plan)

    def defer_unsent(self, request: DeliveryRequest, status: Status) -> None:
        """Recipients not tried (dead destination, no route, a crash):
        each gets ``status`` (deferred, or bounced when hard)."""
        queue_file = request.message.queue_file
        outcome = RecipientOutcome(status, None)
        self._record_many(request, [(r, outcome) for r in queue_file.not_done(request.recipients)],
                          self.clock.seconds(), {})

    def _corrupt_found(self, message: ActiveMessage, reason: str) -> None:
        self.corrupt[message.queue_id] = reason

    # -- the end of a message's attempt

    def finish(self, message: ActiveMessage) -> None:
        """Remove the message, or defer it; bounces, expiry and delay
        warnings first (module docstring)."""
        queue_id = message.queue_id
        reason = self.corrupt.pop(queue_id, None)
        if reason is not None:
            message.close()
            self.spool.mark_corrupt(queue_id, ACTIVE, reason)
            return
        queue_file = message.queue_file
        now = self.clock.seconds()
        if queue_file.pending_count() == 0:
            # Every recipient done (the common end): nothing to expire or
            # warn about, and the recipients' states do not matter to the
            # bounce notice, so the envelope need not be brought up to date.
            envelope = message.envelope
            pending: Sequence[Recipient] = ()
        else:
            envelope = queue_file.envelope
            pending = envelope.pending()
            if pending and self._expired(envelope, now):
                self._expire(message, envelope, pending, now)
                envelope = queue_file.envelope
                pending = envelope.pending()
        bounced = self._send_bounces(message, envelope)
        if not pending and bounced:
            message.close()
            self._remove(queue_id, queue_file)
            return
        # Still queued: recipients pending, or a failure notice that could
        # not be queued (its bounce log stays; the next attempt sends it).
        attempts = queue_file.attempts + 1
        minimal, maximal = self.settings.minimal_backoff_time, self.settings.maximal_backoff_time
        if pending and self._delay_warning_due(queue_file, envelope, now, minimal, maximal):
            self._send_delay_warning(message, envelope, pending, now)
        next_attempt = now + backoff_time(attempts, minimal, maximal)
        try:
            queue_file.record_attempt(next_attempt)
        except OSError as exc:
            # In place, as a mark; the message is deferred all the same.
            ralog.log_warning(log, f"cannot record the delivery attempt: {_reason(exc)}", queue_id=queue_id)
        message.close()
        if not bounced:
            self.spool.note_bounce_log(queue_id)
        self.spool.move(queue_id, ACTIVE, DEFERRED)
        try:
            # The mtime is the next-attempt time: the scheduler's scan
            # needs a stat, not a read (Postfix does the same).
            self.spool.set_next_attempt(queue_id, DEFERRED, next_attempt)
        except OSError as exc:
            ralog.log_warning(log, f"cannot set the next attempt time: {exc}", queue_id=queue_id)

    def _remove(self, queue_id: str, queue_file: Any) -> None:
        """Remove a message whose every recipient is done (the marks are
        on the file already), then log "removed"."""
        log_kinds = queue_file.logs_that_may_exist()
        if self.remover is not None:
            self.remover.remove(queue_id, ACTIVE, log_kinds)
            return
        self.spool.remove(queue_id, ACTIVE, log_kinds=log_kinds)
        self._removed(queue_id)

    def _removed(self, queue_id: str) -> None:
        ralog.log_removed(log, queue_id)

    def _removal_failed(self, queue_id: str, error: OSError) -> None:
        # Left in active/: the next start finds nothing pending and tries again.
        ralog.log_warning(log, f"cannot remove queue file: {error}", queue_id=queue_id)

    def _lifetime(self, envelope: Envelope) -> float:
        if envelope.sender:
            return self.settings.maximal_queue_lifetime
        return self.settings.bounce_queue_lifetime

    def _expired(self, envelope: Envelope, now: float) -> bool:
        # soft_bounce: nothing is ever returned, expiry included.
        return not self.soft_bounce and now - envelope.arrival_time >= self._lifetime(envelope)

    def _expire(self, message: ActiveMessage, envelope: Envelope,
                pending: Sequence[Recipient], now: float) -> None:
        """Bounce what is still pending with its last deferral reason."""
        queue_file = message.queue_file
        last = _last_records(self.spool.read_log(DEFER_LOG, message.queue_id))
        ralog.log_expired(log, message.queue_id, envelope.sender)
        for recipient in pending:
            record = last.get(recipient.index)
            status = _status_of(record) if record is not None else Status(
                "4.4.7", "message delivery time exceeded"
            )
            try:
                queue_file.bounce(recipient.index, status)
                queue_file.mark_done(recipient.index)
                if probes.tap is not None:
                    probes.tap.delivery(None, "expired", status.dsn, None, None)
            except OSError as exc:
                # The rest stay pending and expire at the next attempt.
                ralog.log_warning(log, f"cannot write the bounce log: {_reason(exc)}",
                                  queue_id=message.queue_id)
                return

    def _send_bounces(self, message: ActiveMessage, envelope: Envelope) -> bool:
        """One failure notice for every recipient in the bounce log; the
        log is removed once the notice is queued.  False when it could
        not be queued: the log stays, for the next attempt."""
        if BOUNCE_LOG not in message.queue_file.logs_that_may_exist():
            return True
        records = _last_records(self.spool.read_log(BOUNCE_LOG, message.queue_id))
        if not records:
            return True
        by_index = {r.index: r for r in envelope.recipients}
        reports = [
            dsn.RecipientReport(
                recipient=by_index[index],
                status=_status_of(record),
                action="failed",
                remote_mta=record.mta_name,
                last_attempt=record.time,
            )
            for index, record in sorted(records.items())
            if index in by_index
        ]
        plan = dsn.notices("failure", envelope, reports, settings=self.bounce_settings, clock=self.clock)
        if not self._send_notices(message.queue_id, plan):
            return False
        self.spool.remove_log(BOUNCE_LOG, message.queue_id)
        message.queue_file.log_removed(BOUNCE_LOG)
        return True

    def _delay_warning_due(self, queue_file: Any, envelope: Envelope, now: float,
                           minimal: float, maximal: float) -> bool:
        warn_after = self.settings.delay_warning_time
        if warn_after <= 0 or now - envelope.arrival_time < warn_after:
            return False
        if queue_file.attempts <= 0:
            return True
        previous_end = queue_file.next_attempt - backoff_time(queue_file.attempts, minimal, maximal)
        return previous_end - envelope.arrival_time < warn_after

    def _send_delay_warning(self, message: ActiveMessage, envelope: Envelope,
                            pending: Sequence[Recipient], now: float) -> None:
        last = _last_records(self.spool.read_log(DEFER_LOG, message.queue_id))
        reports = [
            dsn.RecipientReport(
                recipient=recipient,
                status=_status_of(last[recipient.index]) if recipient.index in last
                else Status("4.0.0", "delivery temporarily deferred"),
                action="delayed",
                remote_mta=last[recipient.index].mta_name if recipient.index in last else None,
                last_attempt=now,
            )
            for recipient in pending
        ]
        plan = dsn.notices("delay", envelope, reports, settings=self.bounce_settings, clock=self.clock)
        self._send_notices(message.queue_id, plan)

    def _send_notices(self, queue_id: str, plan: dsn.NoticePlan) -> bool:
        """Queue a plan's notices, all or none (one batch: a retry after
        a failure sends none twice).  False, with one warning, when the
        spool could not take them."""
        for warning in plan.warnings:
            ralog.log_warning(log, warning, queue_id=queue_id)
        if not plan.notices:
            return True
        try:
            new_ids = self.spool.enqueue_many(
                Message(notice.sender, list(notice.recipients), notice.content,
                        body_type=notice.body_type, smtputf8=notice.smtputf8)
                for notice in plan.notices
            )
        except OSError as exc:
            labels = ", ".join(dict.fromkeys(notice.label for notice in plan.notices))
            ralog.log_warning(log, f"cannot queue the {labels}: {_reason(exc)}", queue_id=queue_id)
            return False
        for notice, new_id in zip(plan.notices, new_ids, strict=True):
            ralog.log_notice(log, queue_id, new_id, notice.label)
        if self.new_mail is not None:
            # Later, not now: we may be inside the queue manager's refill.
            self.clock.callLater(0, self.new_mail)
        return True


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


class _Troubles:
    """The write errors met while recording one batch of outcomes: one
    warning line per kind, however many recipients met it."""

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id
        self._seen: dict[str, OSError] = {}

    def add(self, what: str, error: OSError) -> None:
        self._seen.setdefault(what, error)

    def log(self) -> None:
        for what, error in self._seen.items():
            ralog.log_warning(log, f"{what}: {_reason(error)}", queue_id=self.queue_id)


def _transactions(
    decided: Sequence[tuple[Recipient, RecipientOutcome, Status, str]], transmissions: Mapping[int, Transmission]
) -> Iterator[tuple[list[Recipient], Status, str, ServerInfo | None, Transmission | None]]:
    """The recipients in runs that log the same but for the address: the
    same status, verdict, server and transmission (the same objects:
    smtp's result gives the recipients of one transaction one of each),
    in order.  A run is one transaction's, or a part of one."""
    run: list[Recipient] = []
    key: tuple[Status, str, ServerInfo | None, Transmission | None] | None = None
    for recipient, outcome, status, verdict in decided:
        sent = transmissions.get(recipient.index)
        server = outcome.server
        if key is not None and status is key[0] and verdict == key[1] and server is key[2] and sent is key[3]:
            run.append(recipient)
            continue
        if key is not None:
            yield (run, *key)
        run, key = [recipient], (status, verdict, server, sent)
    if key is not None:
        yield (run, *key)


def _last_records(records: Sequence[LogRecord]) -> dict[int, LogRecord]:
    """The last record per recipient index (a retried recipient may have
    several)."""
    last: dict[int, LogRecord] = {}
    for record in records:
        if record.index is not None:
            last[record.index] = record
    return last


def _status_of(record: LogRecord) -> Status:
    """A Status back from a defer or bounce log record."""
    try:
        return Status(record.status, record.reason, reply=record.diag_text, remote_mta=record.mta_name)
    except ValueError:
        # A record cut short or edited by hand: keep its class if we can.
        dsn_code = "5.0.0" if record.action == "failed" else "4.0.0"
        return Status(dsn_code, record.reason or "unknown reason")


def server_replies(result: SmtpResult) -> tuple[Status, ...]:
    """The servers' 4xx and 5xx replies of a request, in order, each once
    (for the queue manager's shaping): the skipped addresses' first, then
    the recipients'."""
    seen: set[str] = set()
    replies = []
    statuses = [attempt.status for attempt in result.attempts]
    statuses += [outcome.status for outcome in result.outcomes.values()]
    for status in statuses:
        if status.code is None or status.code < 400:
            continue
        text = status.reply or status.text
        if text not in seen:
            seen.add(text)
            replies.append(status)
    return tuple(replies)


def connections_made(result: SmtpResult) -> int:
    """New connections a request made (for the connection rate): the
    sessions whose first transaction it was, and the addresses tried and
    skipped after a connection (a greeting or EHLO that failed)."""
    fresh = {(t.connected, t.conn_use) for t in result.transmissions.values() if t.conn_use == 1}
    tried = sum(1 for attempt in result.attempts if attempt.server is not None)
    return len(fresh) + tried
