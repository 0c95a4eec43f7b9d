"""
Delivery status notifications: RFC 3464 reports, delay warnings, success
("relayed") notices, double bounces and postmaster notices, as Postfix's
bounce(8) daemon writes them (bounce_notify_util.c, bounce_notify_service.c,
bounce_warn_service.c, bounce_trace_service.c, the default templates of
bounce(5)) and smtp(8)'s transcript notice (smtp_chat.c smtp_chat_notify).

The messages are built with the standard ``email`` package under
``email.policy.SMTP`` (``SMTPUTF8`` for SMTPUTF8 mail): it folds long
header fields and RFC 2047-encodes non-ASCII text as RFC 2045/2047/5322
require, quotes odd local parts, uses CRLF line ends throughout, and refuses
CR or LF inside a header value, which is our last line of defence against
header injection (we strip control characters from envelope and server data
before they get there, the way Postfix's printable() does).  The returned
original is spliced in verbatim after generation, so its octets (8-bit ones
included) are never re-encoded or re-folded.

SYNOPSIS::

    plan = notices("failure", envelope, reports, settings=settings, clock=clock)
    for notice in plan.notices:          # sender, recipients, content, body type, label
        new_id = spool.enqueue(notice.sender, notice.recipients, notice.content, ...)
        ralog.log_notice(log, envelope.queue_id, new_id, notice.label)
    for warning in plan.warnings: ...    # notices discarded (a failed double bounce)
    success_report(...)                  # a "relayed" notice earned? (NOTIFY=SUCCESS, no DSN at the server)
    postmaster_notice(cls, ...)          # notify_classes: protocol, resource, software, data
    build_report(...), bounce_recipient_for(...)   # the pieces notices() is made of

DIAGNOSTICS: building a notice does not fail for bad data: control
characters are stripped (``printable``) and long lines wrapped; a bounce
that cannot be returned (the null sender, a double bounce without
``2bounce`` in notify_classes) is a warning in ``NoticePlan.warnings``,
not an exception.  ``RuntimeError`` only for a bug (a part lost while the
report is spliced).

Owns these main.cf parameters: notify_classes, error_notice_recipient,
bounce_notice_recipient, 2bounce_notice_recipient, delay_notice_recipient,
double_bounce_sender, delay_warning_time (the text of the warning; the
scheduler decides when), bounce_size_limit, requiretls_redact_dsn.
Reads tls_required_enable (a notice about a message with ``TLS-Required:
No`` has it too).  Reads myhostname, myorigin,
mail_name and maximal_queue_lifetime.
"""

from __future__ import annotations

import email.utils
import io
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.message import Message
from typing import TYPE_CHECKING, Any, Literal

from relayagent.common.config import Settings, parameter
from relayagent.common.envelope import BodyType, Envelope, Notify, Recipient, Ret
from relayagent.common.status import Status

if TYPE_CHECKING:
    import email.policy
    from email.headerregistry import Address
    from email.mime.base import MIMEBase

Kind = Literal["failure", "delay", "success"]
Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
NoticeClass = Literal["protocol", "resource", "software", "data", "bounce", "2bounce", "delay"]

# Postfix's line_wrap() widths: bounce text 79 columns, transcripts 78,
# continuation lines indented by 4.
_WRAP_WIDTH = 79
_TRANSCRIPT_WIDTH = 78
_WRAP_INDENT = 4

# Which NOTIFY keyword asks for which kind of notice.
_NOTIFY_FOR_KIND: dict[str, Notify] = {
    "failure": Notify.FAILURE,
    "delay": Notify.DELAY,
    "success": Notify.SUCCESS,
}

_SUBJECTS = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_POSTMASTER_SUBJECTS = {
    "failure": "Postmaster Copy: Undelivered Mail",
    "delay": "Postmaster Warning: Delayed Mail",
    "success": "Successful Mail Delivery Report",
}

# The text of bounce(5)'s default templates ($myhostname etc. filled in).
_FAILURE_TEXT = """\
This is the mail system at host {myhostname}.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system
"""

_DELAY_TEXT = """\
This is the mail system at host {myhostname}.

####################################################################
# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #
####################################################################

Your message could not be delivered for more than {warn_hours} hour(s).
It will be retried until it is {lifetime_days} day(s) old.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system
"""

_SUCCESS_TEXT = """\
This is the mail system at host {myhostname}.

Your message was successfully delivered to the destination(s)
listed below. If the message was delivered to mailbox you will
receive no further notifications. Otherwise you may still receive
notifications of mail delivery errors from other systems.

                   The mail system
"""

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]")
# RFC 5322 atom characters: what a diagnostic-type or an X- name may hold.
_NON_ATOM_RE = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~-]")


@dataclass(frozen=True, slots=True)
class BounceSettings(Settings):
    """What the notices are made of, bound once (the queue manager's
    ``qmgr.delivery`` holds one)."""

    notify_classes: tuple[str, ...]
    error_notice_recipient: str
    bounce_notice_recipient: str
    double_bounce_notice_recipient: str = parameter("2bounce_notice_recipient")
    delay_notice_recipient: str
    double_bounce_sender: str
    delay_warning_time: float
    bounce_size_limit: int
    myhostname: str
    myorigin: str
    mail_name: str
    maximal_queue_lifetime: float
    requiretls_redact_dsn: bool
    tls_required_enable: bool


# ---------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class RecipientReport:
    """What happened to one recipient, for one notice.

    ``action`` is RFC 3464's: failed, delayed, delivered, relayed, expanded.
    ``remote_mta`` overrides ``status.remote_mta`` (the server's host name).
    ``last_attempt`` and ``will_retry_until`` are POSIX times or None;
    a delay notice without ``will_retry_until`` reports arrival plus
    ``maximal_queue_lifetime``, as Postfix does.
    """

    recipient: Recipient
    status: Status
    action: Action
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None


@dataclass(frozen=True)
class Notice:
    """One message to enqueue: ``spool.enqueue(sender, list(recipients),
    content, body_type=body_type, smtputf8=smtputf8)``; then log
    ``QUEUEID: <label>: NEWID``."""

    sender: str
    recipients: tuple[str, ...]
    content: bytes = field(repr=False)
    label: str
    body_type: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False


@dataclass(frozen=True)
class NoticePlan:
    """The notices due for one event, and warnings for the ones discarded."""

    notices: tuple[Notice, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class BounceRoute:
    """Where a failure notice for a message goes (``bounce_recipient_for``).

    ``postmaster_copy``: written as a postmaster copy (no boiler-plate,
    "Postmaster Copy" subject, every recipient regardless of NOTIFY).
    """

    sender: str
    recipient: str
    postmaster_copy: bool
    ret: Ret
    label: str


# ---------------------------------------------------------------------------
# Small pure helpers


def _now(clock: Any) -> float:
    """The time from ``clock``: an IReactorTime (``.seconds()``) or a
    callable such as ``time.time``."""
    seconds = getattr(clock, "seconds", None)
    if callable(seconds):
        return float(seconds())
    return float(clock())


def printable(text: str, *, allow_utf8: bool = False, replacement: str = "?") -> str:
    """``text`` with control characters (and, unless ``allow_utf8``,
    non-ASCII characters) replaced, as Postfix's printable() does to
    anything from the network or the queue file before it goes into a
    notice.  This is what keeps CR/LF out of header fields."""
    text = _CONTROL_RE.sub(replacement, text)
    if not allow_utf8:
        text = _NON_ASCII_RE.sub(replacement, text)
    return text


def line_wrap(text: str, width: int = _WRAP_WIDTH, indent: int = _WRAP_INDENT) -> list[str]:
    """Break ``text`` at white space into lines of at most ``width``
    columns; continuation lines are indented by ``indent`` (Postfix's
    line_wrap()).  A word longer than a line is kept whole."""
    words = text.split(" ")
    lines: list[str] = []
    current = ""
    prefix = ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if current and len(prefix) + len(candidate) > width:
            lines.append(prefix + current)
            prefix = " " * indent
            current = word
        else:
            current = candidate
    lines.append(prefix + current)
    return lines


def is_double_bounce_address(address: str, settings: BounceSettings) -> bool:
    """Whether ``address`` is our double-bounce sender."""
    return address.lower() == double_bounce_address(settings).lower()


def double_bounce_address(settings: BounceSettings) -> str:
    """``double_bounce_sender@myhostname`` (mail_addr.c), or the parameter
    itself when it already names a domain."""
    sender = settings.double_bounce_sender
    return sender if "@" in sender else f"{sender}@{settings.myhostname}"


def qualify(address: str, settings: BounceSettings) -> str:
    """An unqualified notice recipient such as ``postmaster`` gets
    ``@$myorigin`` (Postfix's cleanup does the same); we deliver by SMTP
    only, so a bare local part would go nowhere."""
    if "@" in address or not address:
        return address
    origin = settings.myorigin
    return f"{address}@{origin}"


def wants_notice(kind: Kind, recipient: Recipient) -> bool:
    """Whether the sender asked for a ``kind`` notice for this recipient
    (RFC 3461 NOTIFY; no NOTIFY means FAILURE and DELAY)."""
    return recipient.notify.wants(_NOTIFY_FOR_KIND[kind])


def notifications_for(kind: Kind, envelope: Envelope, reports: Iterable[RecipientReport]) -> list[RecipientReport]:
    """The reports that belong in the sender's ``kind`` notice.

    NOTIFY decides per recipient, and the action must fit the kind: a
    failure notice lists failed recipients, a delay notice delayed ones,
    a success notice delivered, relayed or expanded ones.  A message from
    the null sender gets no notice to its sender at all.
    """
    if not envelope.sender:
        return []
    fitting = {
        "failure": ("failed",),
        "delay": ("delayed",),
        "success": ("delivered", "relayed", "expanded"),
    }[kind]
    return [r for r in reports if r.action in fitting and wants_notice(kind, r.recipient)]


# The brief's other name for the same question.
who_gets_notified = notifications_for


def success_report(
    recipient: Recipient,
    status: Status,
    *,
    server_offers_dsn: bool,
    when: float | None = None,
) -> RecipientReport | None:
    """The success-notice entry for a recipient an SMTP server accepted.

    RFC 3461 section 5.2.2: when the next server offers DSN the NOTIFY
    request travels on with the mail and that server answers it, so we
    send nothing; when it does not, and the sender asked for SUCCESS, we
    send a notice with action "relayed" (Postfix's smtp_rcpt.c does the
    same).  None when no notice is due.
    """
    if server_offers_dsn or not recipient.notify.wants(Notify.SUCCESS):
        return None
    return RecipientReport(
        recipient=recipient,
        status=status,
        action="relayed",
        remote_mta=status.remote_mta,
        last_attempt=when,
    )


def bounce_recipient_for(envelope: Envelope, settings: BounceSettings) -> BounceRoute | None:
    """Where the failure notice for ``envelope`` goes, or None to drop it.

    The rules of bounce_notify_service.c:

    - mail from the double-bounce sender (a postmaster notice) that fails
      is dropped: never a triple bounce;
    - mail from the null sender (a bounce) that fails goes, as a double
      bounce, to ``2bounce_notice_recipient`` from the double-bounce
      sender, with the whole bounce returned, but only when
      ``notify_classes`` has ``bounce`` or ``2bounce`` (Postfix's default
      ``resource, software`` drops it);
    - anything else goes to its sender from the null sender, returning
      what RET asked for (FULL when not given).
    """
    if envelope.sender and is_double_bounce_address(envelope.sender, settings):
        return None
    if not envelope.sender:
        classes = set(settings.notify_classes)
        if not classes & {"bounce", "2bounce"}:
            return None
        return BounceRoute(
            sender=double_bounce_address(settings),
            recipient=qualify(settings.double_bounce_notice_recipient, settings),
            postmaster_copy=True,
            ret=Ret.FULL,
            label="postmaster non-delivery notification",
        )
    return BounceRoute(
        sender="",
        recipient=envelope.sender,
        postmaster_copy=False,
        ret=envelope.ret or Ret.FULL,
        label="sender non-delivery notification",
    )


def _discard_reason(envelope: Envelope, settings: BounceSettings) -> str:
    if envelope.sender:
        return "undeliverable postmaster notification discarded"
    return "undeliverable bounce discarded (notify_classes has neither bounce nor 2bounce)"


# ---------------------------------------------------------------------------
# Building a report


class _ReportGenerator(BytesGenerator):
    """Writes a delivery-status part whose payload is a plain string (our
    marker) as is; the stock generator expects a list of field blocks
    there, and writes only the first block of a global-delivery-status."""

    def _write_string_payload(self, msg: Message) -> None:
        payload = msg.get_payload()
        if isinstance(payload, str):
            self._fp.write(self._encode(payload))
        else:  # pragma: no cover - we always give a string
            super()._handle_message_delivery_status(msg)

    _handle_message_delivery_status = _write_string_payload
    _handle_message_global_delivery_status = _write_string_payload


def _mail_date(when: float) -> str:
    return email.utils.formatdate(when, localtime=True)


def _atom(text: str) -> str:
    """``text`` made into an RFC 5322 atom (for X-<mail_name>-... names)."""
    return _NON_ATOM_RE.sub("-", text) or "Postfix"


def _address_type(address: str, smtputf8: bool) -> str:
    return "utf-8" if smtputf8 and _NON_ASCII_RE.search(address) else "rfc822"


def _orcpt_field(orcpt: str, smtputf8: bool) -> str:
    """``Original-Recipient`` from the stored ``type;address`` form."""
    addr_type, sep, address = orcpt.partition(";")
    if not sep:
        addr_type, address = "rfc822", orcpt
    addr_type = _atom(addr_type.strip()) or "rfc822"
    return f"{addr_type}; {printable(address.strip(), allow_utf8=smtputf8)}"


def _diagnostic_code(status: Status, mail_name: str, smtputf8: bool) -> str:
    """``smtp; 550 5.1.1 ...`` when a server said it, else ``X-Postfix;
    <our reason>`` (bounce_notify_util.c)."""
    if status.reply and status.code is not None:
        reply = status.reply.strip()
        if not reply.startswith(str(status.code)):
            reply = f"{status.code} {reply}"
        return f"smtp; {printable(reply, allow_utf8=smtputf8)}"
    return f"X-{_atom(mail_name)}; {printable(status.text, allow_utf8=smtputf8)}"


def _header_address(address: str, smtputf8: bool) -> Address | str:
    """An address for a To: field, its local part quoted as RFC 5322 wants,
    never able to carry a CR or LF."""
    # email.policy and its header registry load with the first notice (start-up time).
    from email.headerregistry import Address  # noqa: PLC0415

    address = printable(address, allow_utf8=smtputf8)
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    try:
        return Address(username=local, domain=domain)
    except (ValueError, IndexError):
        # Something the header parser cannot take: a harmless stand-in.
        return Address(username=printable(local, replacement="_").replace(" ", "_") or "unknown",
                       domain=domain.replace(" ", "_"))


def _original_lines(
    envelope: Envelope,
    *,
    headers_only: bool,
    limit: int,
) -> tuple[bytes, bool]:
    """The original message to return, line ends made CRLF, and whether it
    holds 8-bit octets.

    Read line by line from ``envelope.open_content()``; never more than
    ``limit`` octets (0: no limit), cut at a line boundary.  With
    ``headers_only`` it stops at the end of the header (the first line that
    is neither a header nor a continuation, as Postfix's IS_HEADER).
    """
    out = io.BytesIO()
    eight_bit = False
    with envelope.open_content() as stream:
        in_header = True
        for raw in stream:
            line = raw.rstrip(b"\r\n")
            if in_header and not (line[:1] in (b" ", b"\t") or re.match(rb"^[!-9;-~]+:", line)):
                in_header = False
                if headers_only:
                    break
            if limit and out.tell() + len(line) + 2 > limit:
                break
            if not eight_bit and any(octet > 0x7F for octet in line):
                eight_bit = True
            out.write(line + b"\r\n")
    return out.getvalue(), eight_bit


def _delivery_status_part(
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    *,
    kind: Kind,
    settings: BounceSettings,
    policy: email.policy.EmailPolicy,
    global_type: bool,
) -> tuple[MIMEBase, bytes]:
    """The delivery-status part (its payload still to be spliced in) and
    the octets of its fields."""
    from email.mime.base import MIMEBase  # noqa: PLC0415 - loads with the first report (start-up time)
    smtputf8 = envelope.smtputf8
    mail_name = _atom(settings.mail_name)
    part = MIMEBase("message", "global-delivery-status" if global_type else "delivery-status", policy=policy)
    del part["MIME-Version"]
    part["Content-Description"] = "Delivery report"

    per_message: dict[str, str] = {}
    per_message["Reporting-MTA"] = f"dns; {printable(settings.myhostname)}"
    if envelope.envid:
        per_message["Original-Envelope-Id"] = printable(envelope.envid)
    per_message[f"X-{mail_name}-Queue-ID"] = printable(envelope.queue_id)
    if envelope.sender:
        per_message[f"X-{mail_name}-Sender"] = (
            f"{_address_type(envelope.sender, smtputf8)}; {printable(envelope.sender, allow_utf8=smtputf8)}"
        )
    if envelope.arrival_time > 0:
        per_message["Arrival-Date"] = _mail_date(envelope.arrival_time)
    blocks: list[dict[str, str]] = [per_message]

    lifetime = float(settings.maximal_queue_lifetime)
    for report in reports:
        rcpt = report.recipient
        block: dict[str, str] = {}
        block["Final-Recipient"] = (
            f"{_address_type(rcpt.address, smtputf8)}; {printable(rcpt.address, allow_utf8=smtputf8)}"
        )
        # Always, as Postfix (bounce_notify_util.c): the ORCPT given, else
        # the recipient as it reached us; RFC 3464 6.3.d says MUST NOT,
        # 5.2.1.d lets a relay add ORCPT, which downstream DSNs then carry.
        block["Original-Recipient"] = _orcpt_field(
            rcpt.orcpt or f"{_address_type(rcpt.address, smtputf8)};{rcpt.address}", smtputf8
        )
        block["Action"] = "failed" if kind == "failure" else report.action
        block["Status"] = report.status.dsn
        remote = report.remote_mta or report.status.remote_mta
        if remote:
            block["Remote-MTA"] = f"dns; {printable(remote)}"
        block["Diagnostic-Code"] = _diagnostic_code(report.status, settings.mail_name, smtputf8)
        if report.last_attempt:
            block["Last-Attempt-Date"] = _mail_date(report.last_attempt)
        if kind == "delay":
            until = report.will_retry_until or envelope.arrival_time + lifetime
            block["Will-Retry-Until"] = _mail_date(until)
        blocks.append(block)
    # The fields are written here, wrapped at 79 columns as Postfix's
    # bounce_print_wrap does, but with one space of indent rather than
    # Postfix's four, so that RFC 5322 unfolding gives back the value
    # exactly; and spliced in after the report is generated: the email
    # package's generator writes only the first block of a
    # message/global-delivery-status, cannot write the UTF-8 octets such a
    # report holds, and folds "Diagnostic-Code:" right after its colon.
    # Every value went through printable(): no CR or LF can get here.
    rendered = [
        "\r\n".join(
            wrapped
            for name, value in block.items()
            for wrapped in line_wrap(f"{name}: {value}", _WRAP_WIDTH, 1)
        )
        for block in blocks
    ]
    # RFC 3464: the per-message block, then each per-recipient block,
    # separated by one empty line.
    return part, ("\r\n\r\n".join(rendered) + "\r\n").encode("utf-8")


def _human_text(
    kind: Kind,
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    *,
    settings: BounceSettings,
    postmaster_copy: bool,
    transcript: Sequence[str] | None,
) -> str:
    lines: list[str] = []
    if not postmaster_copy:
        # bounce(5) defaults; a postmaster copy skips the boiler-plate.
        template = {"failure": _FAILURE_TEXT, "delay": _DELAY_TEXT, "success": _SUCCESS_TEXT}[kind]
        lines.extend(
            template.format(
                myhostname=printable(settings.myhostname),
                # bounce_template.c: integer division, as $name_hours does.
                warn_hours=int(float(settings.delay_warning_time) // 3600),
                lifetime_days=int(float(settings.maximal_queue_lifetime) // 86400),
            ).splitlines()
        )
    for report in reports:
        lines.append("")
        address = printable(report.recipient.address, allow_utf8=envelope.smtputf8)
        reason = printable(report.status.text, allow_utf8=envelope.smtputf8)
        lines.extend(line_wrap(f"<{address}>: {reason}"))
    if postmaster_copy and transcript:
        lines.extend(["", "Transcript of session follows.", ""])
        lines.extend(_transcript_lines(transcript))
    return "\n".join(lines) + "\n"


def _transcript_lines(transcript: Iterable[str]) -> list[str]:
    """Transcript lines wrapped, each prefixed by one space: untrusted text
    must never start a line of its own (smtp_chat.c print_line)."""
    out: list[str] = []
    for entry in transcript:
        for wrapped in line_wrap(printable(entry), _TRANSCRIPT_WIDTH, _WRAP_INDENT):
            out.append(" " + wrapped)
    return out


def build_report(
    kind: Kind,
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    *,
    settings: BounceSettings,
    clock: Any = time.time,
    transcript: Sequence[str] | None = None,
    to: str | None = None,
    postmaster_copy: bool = False,
    ret: Ret | None = None,
) -> bytes:
    """An RFC 3464 ``multipart/report; report-type=delivery-status``
    message, as octets with CRLF line ends.

    ``kind``: failure (a bounce), delay (a warning) or success.
    ``reports``: the recipients to list, already filtered by NOTIFY (see
    ``notifications_for``); the caller decides.  ``to``: the To: address,
    by default the envelope sender.  ``postmaster_copy``: Postfix's
    postmaster variant (no boiler-plate, "Postmaster Copy" subject,
    Auto-Submitted: auto-generated); only then is ``transcript`` (already
    redacted "Out:"/"In:" lines) included, because a sender has no business
    reading our session with another site's server.  ``ret``: how much of
    the original to return, default the envelope's RET, else FULL; a
    message larger than ``bounce_size_limit`` is returned as headers only
    (so its MIME structure is not cut), as Postfix 3.x does; so is a
    REQUIRETLS message with ``requiretls_redact_dsn`` (RFC 8689 section 5).
    """
    # The email package's MIME classes load with the first report (start-up time).
    import email.policy  # noqa: PLC0415
    from email.mime.base import MIMEBase  # noqa: PLC0415
    from email.mime.multipart import MIMEMultipart  # noqa: PLC0415
    from email.mime.text import MIMEText  # noqa: PLC0415

    smtputf8 = envelope.smtputf8
    policy = email.policy.SMTPUTF8 if smtputf8 else email.policy.SMTP
    global_type = smtputf8
    myhostname = printable(settings.myhostname)
    now = _now(clock)
    recipient = envelope.sender if to is None else to

    report = MIMEMultipart("report", policy=policy)
    report.set_param("report-type", "delivery-status")
    report["From"] = f"MAILER-DAEMON@{myhostname} (Mail Delivery System)"
    subjects = _POSTMASTER_SUBJECTS if postmaster_copy else _SUBJECTS
    report["Subject"] = subjects[kind]
    report["To"] = _header_address(recipient, smtputf8)
    if envelope.tls_not_required and not envelope.requiretls and settings.tls_required_enable:
        # As Postfix's bounce(8): the notice of a message that waived TLS
        # waives it too (RFC 8689 4.1), so it reaches a sender whose TLS
        # trouble may be why the message failed.
        report["TLS-Required"] = "No"
    report["Auto-Submitted"] = "auto-generated" if postmaster_copy else "auto-replied"
    report["Date"] = _mail_date(now)
    report["Message-ID"] = f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}.{os.urandom(6).hex()}" \
                           f".{printable(envelope.queue_id, replacement='_')}@{myhostname}>"
    report.preamble = "This is a MIME-encapsulated message."

    text = _human_text(kind, envelope, reports, settings=settings,
                       postmaster_copy=postmaster_copy, transcript=transcript)
    charset = "utf-8" if _NON_ASCII_RE.search(text) else "us-ascii"
    notification = MIMEText(text, "plain", charset, policy=policy)
    del notification["MIME-Version"]
    notification["Content-Description"] = "Notification"
    report.attach(notification)

    status_part, status_fields = _delivery_status_part(envelope, reports, kind=kind, settings=settings,
                                                       policy=policy, global_type=global_type)
    status_marker = f"RELAYAGENT-STATUS-{os.urandom(16).hex()}"
    status_part.set_payload(status_marker + "\r\n")
    report.attach(status_part)

    # The original: RET=HDRS, or too big for bounce_size_limit -> headers.
    limit = int(settings.bounce_size_limit)
    wanted = ret or envelope.ret or Ret.FULL
    if envelope.requiretls and settings.requiretls_redact_dsn:
        # RFC 8689 section 5 / Postfix's requiretls_redact_dsn: the notice
        # goes without REQUIRETLS (a new message, not flagged), so it
        # carries no more of the original than its header.
        wanted = Ret.HDRS
    headers_only = wanted is Ret.HDRS or (limit > 0 and not 0 < envelope.content_size <= limit)
    original, eight_bit = _original_lines(envelope, headers_only=headers_only, limit=limit)
    return_path = f"Return-Path: <{printable(envelope.sender, allow_utf8=smtputf8)}>\r\n".encode("utf-8")
    original = return_path + original
    eight_bit = eight_bit or _NON_ASCII_RE.search(envelope.sender) is not None

    undelivered = "Undelivered " if kind in ("failure", "delay") else ""
    if headers_only:
        subtype = ("message", "global-headers") if global_type else ("text", "rfc822-headers")
        description = f"{undelivered}Message Headers"
    else:
        subtype = ("message", "global") if global_type else ("message", "rfc822")
        description = f"{undelivered}Message"
    returned = MIMEBase(*subtype, policy=policy)
    del returned["MIME-Version"]
    returned["Content-Description"] = description
    if eight_bit:
        returned["Content-Transfer-Encoding"] = "8bit"
        report["Content-Transfer-Encoding"] = "8bit"
    # A placeholder, replaced by the original octets after generation so
    # that the email package never re-encodes or re-folds them.
    placeholder = f"RELAYAGENT-ORIGINAL-{os.urandom(16).hex()}"
    returned.set_payload(placeholder + "\r\n")
    report.attach(returned)

    for _attempt in range(8):
        buffer = io.BytesIO()
        _ReportGenerator(buffer, policy=policy).flatten(report)
        generated = buffer.getvalue()
        boundary = report.get_boundary()
        if boundary is None or not any(f"--{boundary}".encode("ascii") in octets
                                       for octets in (original, status_fields)):
            break
        # The original happens to hold our boundary: pick another one.
        report.set_boundary(f"=_relayagent_{os.urandom(12).hex()}")
    return _splice(generated, [(status_marker, status_fields), (placeholder, original)])


def _splice(generated: bytes, replacements: Sequence[tuple[str, bytes]]) -> bytes:
    """Put each ``(marker, octets)`` in place of its marker line."""
    for marker, octets in replacements:
        before, found, after = generated.partition((marker + "\r\n").encode("ascii"))
        if not found:  # pragma: no cover - the generator always writes it
            raise RuntimeError("DSN generation lost a part")
        generated = before + octets + after
    return generated


# ---------------------------------------------------------------------------
# Which notices an event produces


def notices(
    kind: Kind,
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    *,
    settings: BounceSettings,
    clock: Any = time.time,
) -> NoticePlan:
    """Every notice due when recipients of ``envelope`` failed (``kind``
    failure), were delayed past ``delay_warning_time`` (delay) or were
    delivered with NOTIFY=SUCCESS to a server without DSN (success).

    ``reports`` holds every recipient the event concerns; NOTIFY filtering,
    double bounces and ``notify_classes`` postmaster copies happen here.
    An empty plan means nothing is to be sent.
    """
    classes = set(settings.notify_classes)
    found: list[Notice] = []
    warnings: list[str] = []

    def add(sender: str, to: str, content: bytes, label: str) -> None:
        eight_bit = any(octet > 0x7F for octet in content)
        found.append(Notice(
            sender=sender,
            recipients=(to,),
            content=content,
            label=label,
            body_type=BodyType.EIGHT_BIT_MIME if eight_bit else BodyType.SEVEN_BIT,
            smtputf8=envelope.smtputf8 and eight_bit,
        ))

    def build(to: str, chosen: Sequence[RecipientReport], *, postmaster: bool, ret: Ret | None) -> bytes:
        return build_report(kind, envelope, chosen, settings=settings, clock=clock,
                            to=to, postmaster_copy=postmaster, ret=ret)

    if kind == "failure":
        failed = [r for r in reports if r.action == "failed"]
        if not failed:
            return NoticePlan()
        route = bounce_recipient_for(envelope, settings)
        if route is None:
            warnings.append(_discard_reason(envelope, settings))
            return NoticePlan((), tuple(warnings))
        if route.postmaster_copy:
            add(route.sender, route.recipient,
                build(route.recipient, failed, postmaster=True, ret=route.ret), route.label)
            return NoticePlan(tuple(found), ())
        chosen = notifications_for("failure", envelope, failed)
        if chosen:
            add(route.sender, route.recipient,
                build(route.recipient, chosen, postmaster=False, ret=route.ret), route.label)
        if "bounce" in classes:
            to = qualify(settings.bounce_notice_recipient, settings)
            add(double_bounce_address(settings), to,
                build(to, failed, postmaster=True, ret=Ret.HDRS),
                "postmaster non-delivery notification")
        return NoticePlan(tuple(found), ())

    if kind == "delay":
        delayed = [r for r in reports if r.action == "delayed"]
        if not delayed or (envelope.sender and is_double_bounce_address(envelope.sender, settings)):
            return NoticePlan()
        if not envelope.sender:
            # bounce_warn_service.c: a delayed bounce warns the postmaster,
            # when notify_classes has delay.
            if "delay" in classes:
                to = qualify(settings.delay_notice_recipient, settings)
                add(double_bounce_address(settings), to,
                    build(to, delayed, postmaster=True, ret=Ret.HDRS),
                    "postmaster delay notification")
            return NoticePlan(tuple(found), ())
        chosen = notifications_for("delay", envelope, delayed)
        if chosen:
            add("", envelope.sender,
                build(envelope.sender, chosen, postmaster=False, ret=Ret.HDRS),
                "sender delay notification")
        if "delay" in classes:
            to = qualify(settings.delay_notice_recipient, settings)
            add(double_bounce_address(settings), to,
                build(to, delayed, postmaster=True, ret=Ret.HDRS),
                "postmaster delay notification")
        return NoticePlan(tuple(found), ())

    # success: only to a real sender (bounce_trace_service.c).
    if not envelope.sender or is_double_bounce_address(envelope.sender, settings):
        return NoticePlan()
    chosen = notifications_for("success", envelope, reports)
    if chosen:
        add("", envelope.sender,
            build(envelope.sender, chosen, postmaster=False, ret=Ret.HDRS),
            "sender delivery status notification")
    return NoticePlan(tuple(found), ())


# ---------------------------------------------------------------------------
# Postmaster notices (notify_classes)


def postmaster_notice(
    cls: NoticeClass,
    envelope: Envelope,
    status: Status,
    transcript: Sequence[str] | None,
    settings: BounceSettings,
    *,
    clock: Any = time.time,
    server: str | None = None,
    reports: Sequence[RecipientReport] | None = None,
) -> tuple[str, list[str], bytes] | None:
    """A notice to the postmaster for a problem of class ``cls``, as
    ``(sender, recipients, content)``, or None when ``notify_classes`` does
    not ask for it or the mail is itself a notice (null or double-bounce
    sender: no notice wars).

    protocol, resource, software, data (smtp(8)'s classes) go to
    ``error_notice_recipient`` with the session transcript, in smtp_chat.c's
    wording ("<mail_name> SMTP client: errors from <server>").  bounce,
    2bounce and delay make a postmaster copy of the report for ``reports``
    (default: every pending recipient with ``status``) and go to
    ``bounce_notice_recipient``, ``2bounce_notice_recipient`` or
    ``delay_notice_recipient``.  ``notices()`` already makes the bounce and
    delay copies (and the double bounce of a failed bounce, which this
    function never does since a bounce has the null sender); call this
    one for smtp(8)'s classes.
    """
    if cls not in settings.notify_classes:
        return None
    if not envelope.sender or is_double_bounce_address(envelope.sender, settings):
        return None
    sender = double_bounce_address(settings)
    if cls in ("bounce", "2bounce", "delay"):
        kind: Kind = "delay" if cls == "delay" else "failure"
        action: Action = "delayed" if kind == "delay" else "failed"
        notice_recipient = {"bounce": settings.bounce_notice_recipient,
                            "2bounce": settings.double_bounce_notice_recipient,
                            "delay": settings.delay_notice_recipient}[cls]
        to = qualify(notice_recipient, settings)
        chosen = list(reports) if reports is not None else [
            RecipientReport(recipient=r, status=status, action=action) for r in envelope.pending()
        ]
        content = build_report(kind, envelope, chosen, settings=settings, clock=clock, to=to,
                               postmaster_copy=True, ret=Ret.HDRS, transcript=transcript)
        return sender, [to], content

    to = qualify(settings.error_notice_recipient, settings)
    peer = printable(server or status.remote_mta or "the remote server")
    # The email package's MIME classes load with the first notice (start-up time).
    import email.policy  # noqa: PLC0415
    from email.mime.text import MIMEText  # noqa: PLC0415

    policy = email.policy.SMTP
    body = [f"Unexpected response from {peer}.", ""]
    body.append(f"Queue ID: {printable(envelope.queue_id)}, status {status.dsn}: {printable(status.text)}")
    body.append("")
    if transcript:
        body.extend(["Transcript of session follows.", ""])
        body.extend(_transcript_lines(transcript))
    message = MIMEText("\n".join(body) + "\n", "plain", "us-ascii", policy=policy)
    message["From"] = f"MAILER-DAEMON@{printable(settings.myhostname)} (Mail Delivery System)"
    message["To"] = f"{_header_address(to, False)} (Postmaster)"
    message["Subject"] = f"{_atom(settings.mail_name)} SMTP client: errors from {peer}"
    message["Auto-Submitted"] = "auto-generated"
    message["Date"] = _mail_date(_now(clock))
    message["Message-ID"] = f"<{os.urandom(8).hex()}.{printable(envelope.queue_id, replacement='_')}" \
                            f"@{printable(settings.myhostname)}>"
    buffer = io.BytesIO()
    BytesGenerator(buffer, policy=policy).flatten(message)
    return sender, [to], buffer.getvalue()


__all__ = [
    "Action",
    "BounceRoute",
    "Kind",
    "Notice",
    "NoticePlan",
    "RecipientReport",
    "bounce_recipient_for",
    "build_report",
    "double_bounce_address",
    "is_double_bounce_address",
    "line_wrap",
    "notices",
    "notifications_for",
    "postmaster_notice",
    "printable",
    "qualify",
    "success_report",
    "wants_notice",
    "who_gets_notified",
]

