"""
Per-message defer and bounce logs, shaped like Postfix's.

Postfix's bounce(8) keeps, for each message, a ``defer/QUEUEID`` file
(why recipients were deferred) and a ``bounce/QUEUEID`` file (why they
failed).  Each is a sequence of records, one per recipient outcome, each a
group of ``name=value`` lines ended by an empty line::

    recipient=user@example.net
    offset=0
    dsn_orig_rcpt=rfc822;user@example.net
    dsn_notify=FAILURE,DELAY
    status=4.4.1
    diag_type=smtp
    diag_text=451 4.3.0 try later
    mta_type=dns
    mta_name=mx.example.net
    action=delayed
    reason=connect to mx.example.net[192.0.2.1]:25: Connection refused
    time=1700000000

``offset`` is the recipient's index in the queue file (Postfix writes the
file offset of the recipient record; an index is what our queue file
addresses recipients by).  ``time`` is ours: when the outcome happened, for
the DSN's Last-Attempt-Date.  The queue manager, ``mailq`` (the
``delay_reason``) and the DSN writer read these logs back.

A record is appended with one ``write`` on a descriptor opened with
``O_APPEND``, so concurrent writers never interleave inside a record.  The
logs are advisory (Postfix does not fsync them either): the queue file is
the truth about which recipients remain.  A write that fails (a full disk)
takes back what it wrote: a bounce record cut short would read as a
failure of a recipient that is still pending, and a log it just created
is removed, so that it is not left behind, empty, after its message.

SYNOPSIS

    data = format_record(DEFER_LOG, recipient, status, when)
    append_record(path, data)
    for record in read_records(path): record.recipient, record.status, ...

DIAGNOSTICS: ``append_record`` raises ``OSError`` (a short write is
ENOSPC) after taking back what it wrote.  ``read_records`` gives no
records for a log that does not exist and raises ``OSError`` for one
that is a link or not a regular file.  ``parse_records`` never raises:
junk lines are skipped, a record without ``recipient=`` is dropped.

Owns no parameters.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

from relayagent.common.envelope import Recipient
from relayagent.common.status import Status
from relayagent.spool import safeopen

DEFER_LOG = "defer"
BOUNCE_LOG = "bounce"
LOG_KINDS = (DEFER_LOG, BOUNCE_LOG)

_ACTIONS = {DEFER_LOG: "delayed", BOUNCE_LOG: "failed"}


@dataclass(frozen=True)
class LogRecord:
    """One recipient outcome read back from a defer or bounce log."""

    recipient: str
    index: int | None
    status: str
    action: str
    reason: str
    orcpt: str | None = None
    notify: str | None = None
    diag_type: str | None = None
    diag_text: str | None = None
    mta_type: str | None = None
    mta_name: str | None = None
    time: float | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)


def _one_line(text: str) -> str:
    """A value fit for one ``name=value`` line: no line breaks or NULs."""
    return " ".join(text.replace("\0", " ").splitlines()) if text else ""


def format_record(kind: str, recipient: Recipient, status: Status, when: float | None) -> bytes:
    """The bytes of one log record (ended by its empty line)."""
    lines = [
        ("recipient", recipient.address),
        ("offset", str(recipient.index)),
    ]
    if recipient.orcpt is not None:
        lines.append(("dsn_orig_rcpt", recipient.orcpt))
    notify = recipient.notify.esmtp_value()
    if notify is not None:
        lines.append(("dsn_notify", notify))
    lines.append(("status", status.dsn))
    if status.reply is not None:
        lines.append(("diag_type", "smtp"))
        lines.append(("diag_text", status.reply))
    if status.remote_mta is not None:
        lines.append(("mta_type", "dns"))
        lines.append(("mta_name", status.remote_mta))
    lines.append(("action", _ACTIONS[kind]))
    lines.append(("reason", status.text))
    if when is not None:
        lines.append(("time", str(int(when))))
    text = "".join(f"{name}={_one_line(value)}\n" for name, value in lines) + "\n"
    return text.encode("utf-8", "surrogateescape")


# The first record of a log (the usual case: one deferral per message
# and attempt) creates it: O_EXCL makes a regular file of ours or fails,
# so it needs none of open_log's checks, nor a size (it is empty).
_NEW_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | safeopen.SAFE_FLAGS


def append_record(path: str, data: bytes) -> None:
    """Append one record with a single write (O_APPEND).  A log that is
    a link or not a regular file is never written: ``OSError``.  Raises
    OSError, the log as it was (or gone, if this call created it), when
    the record cannot be written whole."""
    try:
        # A new log: three system calls (open, write, close) where
        # open_log's way takes six (docs/performance.rst, Backlog).
        fd = os.open(path, _NEW_LOG_FLAGS, 0o600)
        start: int | None = 0
    except FileExistsError:
        # There already, or a link, FIFO or directory in its place:
        # open_log follows nothing and says what it is.
        fd = safeopen.open_log(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        start = None
    try:
        if start is None:
            start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                # A short write to a regular file means the disk is full.
                raise OSError(errno.ENOSPC, f"short write to {path}: {written} of {len(data)} octets")
        except OSError:
            _take_back(fd, path, start)
            raise
    finally:
        os.close(fd)


def _take_back(fd: int, path: str, start: int) -> None:
    """Undo a failed append: the file back to ``start`` octets, or
    removed when it was empty (this append, or one that failed before,
    made it).  Only the process that has a message active writes its logs,
    so no other record is in between.  Best effort: the caller reports
    the failure."""
    try:
        if start == 0:
            os.unlink(path)
        else:
            os.ftruncate(fd, start)
    except OSError:
        pass


def parse_records(data: bytes) -> list[LogRecord]:
    """Records from a log's bytes.  Lenient: junk lines are skipped, and a
    record without ``recipient=`` (a write cut short) is dropped."""
    records = []
    text = data.decode("utf-8", "replace")
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, equals, value = line.partition("=")
            if equals and name:
                fields[name] = value
        if "recipient" not in fields:
            continue
        records.append(_record_from_fields(fields))
    return records


def _record_from_fields(fields: dict[str, str]) -> LogRecord:
    def number(name: str, kind: type) -> float | int | None:
        try:
            return kind(fields[name])
        except (KeyError, ValueError):
            return None

    known = {
        "recipient", "offset", "dsn_orig_rcpt", "dsn_notify", "status", "diag_type",
        "diag_text", "mta_type", "mta_name", "action", "reason", "time",
    }
    index = number("offset", int)
    when = number("time", float)
    return LogRecord(
        recipient=fields["recipient"],
        index=index if isinstance(index, int) else None,
        status=fields.get("status", ""),
        action=fields.get("action", ""),
        reason=fields.get("reason", ""),
        orcpt=fields.get("dsn_orig_rcpt"),
        notify=fields.get("dsn_notify"),
        diag_type=fields.get("diag_type"),
        diag_text=fields.get("diag_text"),
        mta_type=fields.get("mta_type"),
        mta_name=fields.get("mta_name"),
        time=float(when) if when is not None else None,
        extra={k: v for k, v in fields.items() if k not in known},
    )


def read_records(path: str) -> list[LogRecord]:
    """The records of a log file; none when it does not exist.  A log
    that is a link or not a regular file (a FIFO would block the reader)
    is never read: ``OSError``."""
    try:
        fd = safeopen.open_log(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    with open(fd, "rb") as handle:
        return parse_records(handle.read())


