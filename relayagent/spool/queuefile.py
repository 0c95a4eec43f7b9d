"""
The queue file: its binary format, its reader and its in-place updater.

The layout (all integers big-endian; ``docs/queue-format.rst`` is the full
description)::

    offset  size  field
    0       16    magic/version line  b"relayagent-q 01\\n"
    16      8     arrival time        float64, seconds since the epoch
    24      8     content offset      uint64
    32      8     content size        uint64
    40      4     recipient count     uint32
    44      4     envelope length     uint32 (the variable section)
    48      1     body type           0 = 7BIT, 1 = 8BITMIME
    49      1     options             bit 0 SMTPUTF8, bit 1 REQUIRETLS,
                                      bit 2 "TLS-Required: No" header,
                                      bit 3 a local submission
    50      1     RET                 0 = none, 1 = FULL, 2 = HDRS
    51      1     content form        bit 0: plain lines, bit 1: body undeclared
    52      4     content CRC-32
    56      4     envelope CRC-32     of bytes 0-55 and the variable section
    60      4     attempt count       uint32     } the mutable block,
    64      8     next attempt time   float64    } rewritten in place with
    72      4     CRC-32 of 60-71                } one pwrite
    76      N     recipient status    one byte each: b"P" pending, b"D" done
    76+N    S     pickup octet        S = 1 with options bit 3, else 0
    76+N+S  E     variable section    sender, ENVID, recipients[, submission]
    76+N+S+E  C   content

Every byte is checked by something: the fixed and variable envelope by the
envelope CRC, the mutable block by its own CRC, each status byte by being
one of two values two bits apart (a flipped bit never turns pending into
done), the content by the content CRC and the file's exact length.  A
file that fails any check raises ``CorruptQueueFile``, the only error the
reader raises for bad data.

The content form octet records what was learnt about the content when it
was queued, so that no attempt looks again: bit 0, *plain lines*
(``spool.plain.PlainLineScanner``: no CR, no line starting with ".", none
over 998 octets), whose wire form is just LF turned into CRLF; bit 1, the
body type was detected, not declared (a 7-bit message then goes out with
no BODY=, as Postfix sends none).  0 is always correct.

The options octet (once just SMTPUTF8, 0 or 1, so older files read as
before): bit 0 SMTPUTF8; bit 1 REQUIRETLS (RFC 8689), asked for at
intake; bit 2, the header had ``TLS-Required: No`` when queued
(``spool.tlsrequired``).  Other bits are corruption.

The status bytes and the mutable block sit outside the envelope CRC so
that marking a recipient done or recording an attempt is one small
``pwrite`` in place, as Postfix overwrites a recipient record's type byte.

A local submission (``relayagent sendmail`` run as the queue's owner,
queueing straight into ``incoming/``) sets options bit 3: the variable
section ends with a submission record (the submitter's uid and the
Message-ID, ``LocalSubmission``) and a *pickup octet* follows the status
table, ``P`` while pickup's and cleanup's lines are still to be logged,
``D`` once the queue manager logged them (``mark_pickup_logged``).
``submission_to_log`` says whether they are due: a record, no attempt
recorded yet, the octet still ``P``.  Files without the bit (every file
written before it existed) read as before.

Content is never read whole: ``Envelope.open_content()`` returns a stream
over the content region.  A small file (the first read gets all of it) has
its content CRC checked when opened; a large one when its content stream
is read to the end, so a garbled body is caught before the final "."
would be sent.

SYNOPSIS (``Spool.open`` makes a ``QueueFile``)::

    with spool.open(queue_id, "active") as queue_file:
        queue_file.envelope, queue_file.pending_count(), queue_file.open_content()
        queue_file.mark_done_many([0, 1]); queue_file.defer(2, status)
        queue_file.record_attempt(next_attempt)
        queue_file.submission_to_log() -> LocalSubmission | None; queue_file.mark_pickup_logged()
    head = build_head(...)                 # the writer's side, for Spool.enqueue

DIAGNOSTICS: bad data is ``CorruptQueueFile`` (at open, or from the
content stream when a large content is cut short or fails its CRC); a
failed in-place update is ``OSError``; using a closed file is
``ValueError`` and a recipient index out of range ``IndexError``.

Owns no parameters.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from relayagent.common.envelope import (
    BodyType,
    Envelope,
    Notify,
    Recipient,
    RecipientState,
    Ret,
    address_problem,
)
from relayagent.common.status import Status
from relayagent.spool import logs, safeopen
from relayagent.spool.errors import CorruptQueueFile

MAGIC = b"relayagent-q"
VERSION = 1
MAGIC_LINE = MAGIC + b" %02d\n" % VERSION
assert len(MAGIC_LINE) == 16

_HEADER = struct.Struct(">dQQIIBBBBI")  # from offset 16: 40 octets
_CRC = struct.Struct(">I")
_MUTABLE = struct.Struct(">Id")  # attempts, next attempt
HEADER_END = len(MAGIC_LINE) + _HEADER.size  # 56
ENVELOPE_CRC_OFFSET = HEADER_END  # 56
MUTABLE_OFFSET = ENVELOPE_CRC_OFFSET + _CRC.size  # 60
MUTABLE_SIZE = _MUTABLE.size + _CRC.size  # 16
STATUS_OFFSET = MUTABLE_OFFSET + MUTABLE_SIZE  # 76

PENDING = b"P"  # 0x50
DONE = b"D"  # 0x44: two bits away from PENDING
_STATES = {PENDING[0]: RecipientState.PENDING, DONE[0]: RecipientState.DONE}

_BODY_TYPES = {0: BodyType.SEVEN_BIT, 1: BodyType.EIGHT_BIT_MIME}
_BODY_CODES = {v: k for k, v in _BODY_TYPES.items()}
_RETS = {0: None, 1: Ret.FULL, 2: Ret.HDRS}
_RET_CODES = {v: k for k, v in _RETS.items()}
_NOTIFY_BITS = (
    (Notify.SUCCESS, 1),
    (Notify.FAILURE, 2),
    (Notify.DELAY, 4),
    (Notify.DEFAULT, 8),
)


def _notify_of(code: int) -> Notify:
    notify = Notify.NEVER
    for flag, bit in _NOTIFY_BITS:
        if code & bit:
            notify |= flag
    return notify


# Every NOTIFY octet's flags, made once: a Flag's "|" is several Python
# calls (enum's __call__ and __new__), and the reader needs one per
# recipient of every message activated.
_NOTIFY_OF_CODE = tuple(_notify_of(code) for code in range(16))

# The options octet's bits (octet 49; it held only SMTPUTF8, 0 or 1, before
# REQUIRETLS, so files written then read unchanged).
OPTION_SMTPUTF8 = 0x01
OPTION_REQUIRETLS = 0x02  # RFC 8689 REQUIRETLS, asked for at intake
OPTION_TLS_NOT_REQUIRED = 0x04  # a "TLS-Required: No" header (RFC 8689 4.1)
# A local submission: a submission record ends the variable section and
# a pickup octet follows the status table (LocalSubmission).
OPTION_LOCAL_SUBMISSION = 0x08
_OPTION_BITS = OPTION_SMTPUTF8 | OPTION_REQUIRETLS | OPTION_TLS_NOT_REQUIRED | OPTION_LOCAL_SUBMISSION

# The content form octet's bits.
CONTENT_PLAIN_LINES = 0x01
CONTENT_BODY_UNDECLARED = 0x02  # the body type was detected, not declared
_CONTENT_FORM_BITS = CONTENT_PLAIN_LINES | CONTENT_BODY_UNDECLARED

_STRING_NONE = 0xFFFF  # length marker of an absent optional string
MAX_STRING = 0xFFFE

# The longest Message-ID a submission record keeps (the listener logs as
# much of the header).
MAX_MESSAGE_ID = 200
_UID = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class LocalSubmission:
    """What pickup's and cleanup's lines say of a message that
    ``relayagent sendmail`` queued itself (Postfix's ``QUEUEID:
    uid=N from=<sender>`` and ``QUEUEID: message-id=<...>``): the
    submitter's uid and the header's Message-ID ("" for none).  The
    queue manager logs them when it first takes the message in, as
    Postfix's pickup and cleanup daemons log theirs."""

    uid: int
    message_id: str


def pack_submission(submission: LocalSubmission) -> bytes:
    """The submission record at the end of the variable section: the
    uid (uint32) and the Message-ID (a string, at most
    ``MAX_MESSAGE_ID`` characters, line breaks made spaces)."""
    if not 0 <= submission.uid <= 0xFFFFFFFF:
        raise ValueError(f"bad submitter uid {submission.uid}")
    message_id = " ".join(submission.message_id.split())[:MAX_MESSAGE_ID]
    return _UID.pack(submission.uid) + _pack_string(message_id, "Message-ID")


# How much the first read takes: a message this small is read, checked and
# parsed after one read system call.
FIRST_READ = 64 * 1024
CONTENT_CHUNK = 64 * 1024


# ---------------------------------------------------------------------------
# Writing


def _pack_string(text: str | None, what: str) -> bytes:
    if text is None:
        return struct.pack(">H", _STRING_NONE)
    data = text.encode("utf-8")
    if len(data) > MAX_STRING:
        raise ValueError(f"{what} too long ({len(data)} octets)")
    return struct.pack(">H", len(data)) + data


def _notify_code(notify: Notify) -> int:
    return sum(bit for flag, bit in _NOTIFY_BITS if notify & flag)


def pack_mutable(attempts: int, next_attempt: float) -> bytes:
    """The queue file's mutable record (at MUTABLE_OFFSET): the attempt
    count and the time of the next attempt, with their CRC."""
    body = _MUTABLE.pack(attempts, next_attempt)
    return body + _CRC.pack(zlib.crc32(body))


def build_envelope(
    sender: str,
    recipients: Iterable[Recipient],
    envid: str | None,
) -> tuple[bytes, int]:
    """The variable section and the number of recipients."""
    parts = [_pack_string(sender, "sender"), _pack_string(envid, "ENVID")]
    count = 0
    for recipient in recipients:
        parts.append(bytes([_notify_code(recipient.notify)]))
        parts.append(_pack_string(recipient.address, "recipient address"))
        parts.append(_pack_string(recipient.orcpt, "ORCPT"))
        count += 1
    return b"".join(parts), count


def build_head(
    *,
    arrival_time: float,
    variable: bytes,
    recipient_count: int,
    content_size: int,
    content_crc: int,
    body_type: BodyType,
    smtputf8: bool,
    ret: Ret | None,
    plain_lines: bool = False,
    body_declared: bool = True,
    requiretls: bool = False,
    tls_not_required: bool = False,
    submission: LocalSubmission | None = None,
) -> bytes:
    """Everything before the content: header, CRC, mutable block, status
    table (and pickup octet) and variable section.  ``plain_lines`` only
    where the content was scanned and found plain
    (``spool.plain.PlainLineScanner``);
    ``body_declared`` False where nobody declared the body type (no
    BODY= at intake) and the writer detected it.  ``requiretls``: the
    sender asked for REQUIRETLS; ``tls_not_required``: the header has
    ``TLS-Required: No``.  ``submission``: a local submission, whose
    record ends the variable section (and whose pickup octet is P)."""
    pickup = b""
    if submission is not None:
        variable += pack_submission(submission)
        pickup = PENDING
    content_offset = STATUS_OFFSET + recipient_count + len(pickup) + len(variable)
    fixed = MAGIC_LINE + _HEADER.pack(
        arrival_time,
        content_offset,
        content_size,
        recipient_count,
        len(variable),
        _BODY_CODES[body_type],
        (OPTION_SMTPUTF8 if smtputf8 else 0)
        | (OPTION_REQUIRETLS if requiretls else 0)
        | (OPTION_TLS_NOT_REQUIRED if tls_not_required else 0)
        | (OPTION_LOCAL_SUBMISSION if submission is not None else 0),
        _RET_CODES[ret],
        (CONTENT_PLAIN_LINES if plain_lines else 0) | (0 if body_declared else CONTENT_BODY_UNDECLARED),
        content_crc,
    )
    envelope_crc = zlib.crc32(variable, zlib.crc32(fixed))
    return b"".join(
        (
            fixed,
            _CRC.pack(envelope_crc),
            pack_mutable(0, 0.0),
            PENDING * recipient_count,
            pickup,
            variable,
        )
    )


# ---------------------------------------------------------------------------
# Reading


class _Reader:
    """Bounds-checked reads from the variable section."""

    def __init__(self, queue_id: str, data: bytes) -> None:
        self.queue_id = queue_id
        self.data = data
        self.position = 0

    def take(self, count: int, what: str) -> bytes:
        end = self.position + count
        if end > len(self.data):
            raise CorruptQueueFile(self.queue_id, f"envelope ends inside the {what}")
        chunk = self.data[self.position:end]
        self.position = end
        return chunk

    def string(self, what: str) -> str | None:
        # take()'s checks written out: a queue file has two or three
        # strings per recipient, read at every activation.
        data, start = self.data, self.position + 2
        if start > len(data):
            raise CorruptQueueFile(self.queue_id, f"envelope ends inside the {what}")
        length = (data[start - 2] << 8) | data[start - 1]  # big-endian, as ">H"
        if length == _STRING_NONE:
            self.position = start
            return None
        end = start + length
        if end > len(data):
            raise CorruptQueueFile(self.queue_id, f"envelope ends inside the {what}")
        self.position = end
        try:
            return data[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptQueueFile(self.queue_id, f"{what} is not UTF-8") from None


def parse_variable(
    queue_id: str, variable: bytes, states: bytes, *, submission: bool = False
) -> tuple[str, str | None, tuple[Recipient, ...], LocalSubmission | None]:
    """Sender, ENVID, recipients and (with ``submission``, the options
    bit) the submission record from the variable section."""
    reader = _Reader(queue_id, variable)
    sender = reader.string("sender")
    if sender is None:
        raise CorruptQueueFile(queue_id, "sender missing")
    if address_problem(sender):
        raise CorruptQueueFile(queue_id, f"sender address {address_problem(sender)}")
    envid = reader.string("ENVID")
    recipients = []
    for index, state_byte in enumerate(states):
        if reader.position >= len(variable):
            raise CorruptQueueFile(queue_id, "envelope ends inside the NOTIFY")
        code = variable[reader.position]
        reader.position += 1
        if code & ~15 or (code & 8 and code != 8):
            raise CorruptQueueFile(queue_id, f"recipient {index}: bad NOTIFY code {code}")
        notify = _NOTIFY_OF_CODE[code]
        address = reader.string("recipient address")
        if address is None:
            raise CorruptQueueFile(queue_id, f"recipient {index}: address missing")
        if address_problem(address):
            raise CorruptQueueFile(queue_id, f"recipient {index}: address {address_problem(address)}")
        orcpt = reader.string("ORCPT")
        recipients.append(
            Recipient(
                address=address,
                index=index,
                orcpt=orcpt,
                notify=notify,
                state=_STATES[state_byte],
            )
        )
    record = None
    if submission:
        (uid,) = _UID.unpack(reader.take(_UID.size, "submission record"))
        message_id = reader.string("Message-ID")
        if message_id is None:
            raise CorruptQueueFile(queue_id, "submission record: Message-ID missing")
        record = LocalSubmission(uid, message_id)
    if reader.position != len(variable):
        raise CorruptQueueFile(queue_id, "junk after the last recipient")
    return sender, envid, tuple(recipients), record


def _read_exactly(fd: int, count: int, offset: int) -> bytes:
    chunks = []
    while count > 0:
        chunk = os.pread(fd, min(count, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class QueueFile:
    """An open queue file: its envelope, and the updates the delivery
    layer makes as recipients are delivered, deferred or bounced.

    Build one with ``Spool.open``.  Updates go to the file before the
    method returns (``pwrite``, no fsync, as Postfix's queue-file updates).
    Each update and content stream reopens the file by its name and
    checks it is the same inode (``safeopen.reopen``): a name swapped for
    a link or another file raises ``NotAQueueFile``, nothing is written.
    While a descriptor is held (``held``, or kept from the open until
    ``release``: ``Spool.open(keep_descriptor=True)``) they use that one.
    """

    def __init__(
        self,
        queue_id: str,
        queue_name: str,
        fd: int,
        *,
        log_directory: str,
        clock: Callable[[], float] | None = None,
        path: str | None = None,
        writable: bool = True,
        absent_logs: frozenset[str] = frozenset(),
        identity: tuple[int, int] | None = None,
        keep_descriptor: bool = False,
    ) -> None:
        self.queue_id = queue_id
        self.queue_name = queue_name
        self._fd: int | None = fd
        self._path = path
        self._open_flags = os.O_RDWR if writable else os.O_RDONLY
        # (st_dev, st_ino): every reopen by path must find this same file
        # (safeopen.reopen), never one put in its place.
        self._identity = identity or (0, 0)
        self._closed = False
        self._holds = 0  # the delivery requests running with a held descriptor
        self._log_directory = log_directory
        self._clock = clock
        try:
            if identity is None:
                info = os.fstat(fd)
                self._identity = (info.st_dev, info.st_ino)
            self._parse()
        except BaseException:
            # The descriptor is ours from the start: close it here, once.
            self.close()
            raise
        # The defer and bounce logs known not to exist (``Spool.open``
        # says which, for a message it knows the history of): removing
        # the message then skips unlinking them, and the bounce step
        # skips reading them.  A defer log is only written during an
        # attempt, so a message never attempted has none.
        absent = set(absent_logs)
        if self.attempts > 0:
            absent.discard(logs.DEFER_LOG)
        self._absent_logs = absent
        if path is not None and not keep_descriptor:
            # Hold no descriptor while idle: the queue manager keeps up to
            # qmgr_message_active_limit (20,000) messages active, far more
            # than a process may have files open.  Each update reopens the
            # file by its path (it stays in its queue while updated).
            # ``keep_descriptor`` keeps it until ``release``, for what
            # the opener does next (``Spool.open``).
            os.close(fd)
            self._fd = None

    # -- parsing

    def _corrupt(self, reason: str) -> CorruptQueueFile:
        return CorruptQueueFile(self.queue_id, reason)

    def _parse(self) -> None:
        fd = self._fd
        assert fd is not None  # parsing happens in the constructor only
        first = os.read(fd, FIRST_READ)
        whole = len(first) < FIRST_READ
        if len(first) < len(MAGIC_LINE):
            if first and not MAGIC_LINE.startswith(first):
                raise self._corrupt("not a relayagent queue file (bad magic)")
            raise self._corrupt(f"truncated: {len(first)} octets, no header")
        if first[: len(MAGIC)] != MAGIC:
            raise self._corrupt("not a relayagent queue file (bad magic)")
        version_field = first[len(MAGIC): len(MAGIC_LINE)]
        if version_field != MAGIC_LINE[len(MAGIC):]:
            shown = version_field.decode("ascii", "replace").strip()
            raise self._corrupt(f"unsupported queue file version {shown!r} (this is version {VERSION})")
        if len(first) < STATUS_OFFSET:
            raise self._corrupt(f"truncated: {len(first)} octets, header incomplete")
        (
            arrival_time,
            content_offset,
            content_size,
            recipient_count,
            variable_length,
            body_code,
            option_bits,
            ret_code,
            content_form,
            content_crc,
        ) = _HEADER.unpack_from(first, len(MAGIC_LINE))
        (envelope_crc,) = _CRC.unpack_from(first, ENVELOPE_CRC_OFFSET)
        # The pickup octet exists with the bit (checked by the CRC below:
        # the bit is in octets 0-55).
        pickup_size = 1 if option_bits & OPTION_LOCAL_SUBMISSION else 0
        variable_start = STATUS_OFFSET + recipient_count + pickup_size
        head_end = variable_start + variable_length
        if content_offset != head_end:
            raise self._corrupt("header fields disagree (content offset)")
        if whole:
            file_size = len(first)
        else:
            file_size = os.fstat(fd).st_size
        if file_size < head_end:
            raise self._corrupt(f"truncated: {file_size} octets, envelope needs {head_end}")
        if len(first) >= head_end:
            head = first[:head_end]
        else:
            head = first + _read_exactly(fd, head_end - len(first), len(first))
            if len(head) != head_end:
                raise self._corrupt("truncated while reading the envelope")
        variable = head[variable_start:head_end]
        computed = zlib.crc32(variable, zlib.crc32(head[:HEADER_END]))
        if computed != envelope_crc:
            raise self._corrupt("envelope checksum mismatch")
        if (content_form & ~_CONTENT_FORM_BITS or body_code not in _BODY_TYPES
                or option_bits & ~_OPTION_BITS or ret_code not in _RETS):
            raise self._corrupt("bad flag values in the header")
        if not math.isfinite(arrival_time):
            raise self._corrupt("bad arrival time")
        if file_size != head_end + content_size:
            if file_size < head_end + content_size:
                raise self._corrupt(
                    f"truncated: content has {file_size - head_end} of {content_size} octets"
                )
            raise self._corrupt(f"{file_size - head_end - content_size} octets after the content")
        mutable = head[MUTABLE_OFFSET:STATUS_OFFSET]
        (mutable_crc,) = _CRC.unpack_from(mutable, _MUTABLE.size)
        if zlib.crc32(mutable[: _MUTABLE.size]) != mutable_crc:
            raise self._corrupt("attempt record checksum mismatch")
        attempts, next_attempt = _MUTABLE.unpack_from(mutable)
        if not math.isfinite(next_attempt):
            raise self._corrupt("bad next attempt time")
        states = head[STATUS_OFFSET: STATUS_OFFSET + recipient_count]
        for index, byte in enumerate(states):
            if byte not in _STATES:
                raise self._corrupt(f"recipient {index}: bad status octet 0x{byte:02x}")
        self._pickup_state: int | None = None
        if pickup_size:
            self._pickup_state = head[variable_start - 1]
            if self._pickup_state not in _STATES:
                raise self._corrupt(f"bad pickup octet 0x{self._pickup_state:02x}")
        sender, envid, recipients, submission = parse_variable(
            self.queue_id, variable, states, submission=bool(pickup_size)
        )
        self.submission: LocalSubmission | None = submission
        self._content_verified = False
        if whole:
            if zlib.crc32(first[head_end:]) != content_crc:
                raise self._corrupt("content checksum mismatch")
            self._content_verified = True
        self.attempts: int = attempts
        self.next_attempt: float = next_attempt
        self._states = bytearray(states)
        self._content_offset = head_end
        self._content_crc = content_crc
        self._envelope = Envelope(
            queue_id=self.queue_id,
            sender=sender,
            recipients=recipients,
            arrival_time=arrival_time,
            content_size=content_size,
            open_content=self.open_content,
            body_type=_BODY_TYPES[body_code],
            smtputf8=bool(option_bits & OPTION_SMTPUTF8),
            requiretls=bool(option_bits & OPTION_REQUIRETLS),
            tls_not_required=bool(option_bits & OPTION_TLS_NOT_REQUIRED),
            envid=envid,
            ret=_RETS[ret_code],
            plain_lines=bool(content_form & CONTENT_PLAIN_LINES),
            body_declared=not content_form & CONTENT_BODY_UNDECLARED,
        )

    # -- access

    @property
    def envelope(self) -> Envelope:
        """The envelope, with each recipient's current state."""
        current = tuple(
            recipient
            if recipient.state is _STATES[self._states[recipient.index]]
            else replace(recipient, state=_STATES[self._states[recipient.index]])
            for recipient in self._envelope.recipients
        )
        if current != self._envelope.recipients:
            self._envelope = replace(self._envelope, recipients=current)
        return self._envelope

    def logs_that_may_exist(self) -> tuple[str, ...]:
        """The kinds of log (``defer``, ``bounce``) this message may have
        on disk: all of them unless known otherwise."""
        return tuple(kind for kind in logs.LOG_KINDS if kind not in self._absent_logs)

    def log_removed(self, kind: str) -> None:
        """The caller removed one of the message's logs."""
        self._absent_logs.add(kind)

    def is_done(self, index: int) -> bool:
        """Whether recipient ``index`` is crossed off (delivered or bounced)."""
        return self._states[index] == DONE[0]

    def not_done(self, recipients: Iterable[Recipient]) -> list[Recipient]:
        """Those of ``recipients`` not crossed off yet (``is_done`` of each,
        in one call: a delivery request asks it of all its recipients)."""
        states, done = self._states, DONE[0]
        return [recipient for recipient in recipients if states[recipient.index] != done]

    def pending_count(self) -> int:
        """How many recipients are not crossed off yet (deferred or untried)."""
        return self._states.count(PENDING[0])

    @property
    def closed(self) -> bool:
        """True once ``close`` was called."""
        return self._closed

    def submission_to_log(self) -> LocalSubmission | None:
        """The local submission whose pickup and cleanup lines are still
        to be logged, or None: a file with a submission record, no
        delivery attempt recorded yet (a deferred file has one) and its
        pickup octet still P (``mark_pickup_logged`` not done)."""
        if self.submission is None or self.attempts != 0 or self._pickup_state != PENDING[0]:
            return None
        return self.submission

    def open_content(self) -> BinaryIO:
        """A new binary stream over the content, from its first octet.

        The stream has a descriptor of its own (close it when done) and
        never holds more than one buffer of the content in memory.  Reading
        it to the end checks the content CRC unless that was done at open;
        a mismatch or a file cut short raises ``CorruptQueueFile``.
        """
        raw = _ContentStream(
            self.queue_id,
            self._new_descriptor(),
            self._content_offset,
            self._envelope.content_size,
            None if self._content_verified else self._content_crc,
        )
        return io.BufferedReader(raw, CONTENT_CHUNK)

    def verify_content(self) -> None:
        """Read the whole content once and check its CRC."""
        if self._content_verified:
            return
        with self.open_content() as stream:
            while stream.read(CONTENT_CHUNK):
                pass
        self._content_verified = True

    # -- updates

    def mark_done(self, index: int) -> None:
        """Cross a recipient off: its status octet becomes DONE, in place."""
        self._check_index(index)
        with self._descriptor() as fd:
            written = os.pwrite(fd, DONE, STATUS_OFFSET + index)
        if written != 1:
            raise OSError(f"{self.queue_id}: could not update recipient {index}")
        self._states[index] = DONE[0]

    def mark_done_many(self, indexes: Iterable[int]) -> None:
        """``mark_done`` for several recipients with one open of the file:
        one ``pwrite`` per run of neighbouring indexes."""
        wanted = sorted(set(indexes))
        if not wanted:
            return
        # Sorted: the first and the last are the only ones to check.
        self._check_index(wanted[0])
        self._check_index(wanted[-1])
        runs: list[tuple[int, int]] = []  # (first index, count)
        for index in wanted:
            if runs and runs[-1][0] + runs[-1][1] == index:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((index, 1))
        with self._descriptor() as fd:
            for first, count in runs:
                if os.pwrite(fd, DONE * count, STATUS_OFFSET + first) != count:
                    raise OSError(f"{self.queue_id}: could not update recipients {first}..{first + count - 1}")
                self._states[first:first + count] = DONE * count

    def mark_pickup_logged(self) -> None:
        """The pickup and cleanup lines of a local submission are logged:
        its pickup octet becomes D, in place (one ``pwrite``, before the
        next activation can look).  A file without one is left alone."""
        if self._pickup_state is None:
            return
        offset = STATUS_OFFSET + len(self._states)
        with self._descriptor() as fd:
            written = os.pwrite(fd, DONE, offset)
        if written != 1:
            raise OSError(f"{self.queue_id}: could not update the pickup octet")
        self._pickup_state = DONE[0]

    def defer(self, index: int, status: Status) -> None:
        """Append a recipient's deferral reason to the message's defer log."""
        self._append_log(logs.DEFER_LOG, index, status)

    def bounce(self, index: int, status: Status) -> None:
        """Append a recipient's failure to the message's bounce log."""
        self._append_log(logs.BOUNCE_LOG, index, status)

    def record_attempt(self, next_attempt: float) -> None:
        """One more delivery attempt made; the next is due at ``next_attempt``."""
        self._write_mutable(self.attempts + 1, next_attempt)

    def reset_attempts(self) -> None:
        """Forget earlier attempts (``postsuper -r``)."""
        self._write_mutable(0, 0.0)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold one descriptor while a delivery request runs: its content
        stream (a ``dup``) and its updates use it instead of reopening the
        file by name each time.  The file is reopened and checked once, at
        the start; what is written during the hold goes to that inode.
        Requests of one message may overlap: the descriptor is closed when
        the last hold ends.  At most as many files are held as deliveries
        run (``default_process_limit``), not as messages are active."""
        if self._path is None:  # a file opened without a path holds its descriptor anyway
            yield
            return
        if self._holds == 0 and self._fd is None:
            if self._closed:
                raise ValueError(f"queue file {self.queue_id} is closed")
            try:
                self._fd = safeopen.reopen(self._path, self.queue_id, self._open_flags, self._identity)
            except OSError:
                # Not held (EMFILE, EIO ...): each use reopens the file
                # and meets the error there, as without a hold.
                yield
                return
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._holds == 0 and self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)

    def release(self) -> None:
        """Close the descriptor kept from the open (``keep_descriptor``),
        unless a hold (``held``) uses it: from now on each update reopens
        the file, as for any idle one.  Does nothing for a file closed, not
        kept, or opened without a path."""
        if self._holds == 0 and self._fd is not None and self._path is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def close(self) -> None:
        """Close the held descriptor, if any; later updates and content streams
        raise ValueError.  A second call does nothing."""
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> QueueFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten close must not leak descriptors in a long-running
        # queue manager.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - nothing to report to at exit
            pass

    # -- internals

    @contextlib.contextmanager
    def _descriptor(self) -> Iterator[int]:
        """A descriptor for one update: the held one, or the file reopened."""
        if self._closed:
            raise ValueError(f"queue file {self.queue_id} is closed")
        if self._fd is not None:
            yield self._fd
            return
        assert self._path is not None
        fd = safeopen.reopen(self._path, self.queue_id, self._open_flags, self._identity)
        try:
            yield fd
        finally:
            os.close(fd)

    def _new_descriptor(self) -> int:
        """A descriptor of its own, for a content stream to own and close."""
        if self._closed:
            raise ValueError(f"queue file {self.queue_id} is closed")
        if self._fd is not None:
            return os.dup(self._fd)
        assert self._path is not None
        return safeopen.reopen(self._path, self.queue_id, os.O_RDONLY, self._identity)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._states):
            raise IndexError(f"{self.queue_id}: no recipient {index}")

    def _write_mutable(self, attempts: int, next_attempt: float) -> None:
        if not math.isfinite(next_attempt):
            raise ValueError("next attempt time must be finite")
        data = pack_mutable(attempts, next_attempt)
        with self._descriptor() as fd:
            written = os.pwrite(fd, data, MUTABLE_OFFSET)
        if written != len(data):
            raise OSError(f"{self.queue_id}: could not update the attempt record")
        self.attempts = attempts
        self.next_attempt = next_attempt

    def _append_log(self, kind: str, index: int, status: Status) -> None:
        self._check_index(index)
        recipient = self._envelope.recipients[index]
        when = self._clock() if self._clock is not None else None
        record = logs.format_record(kind, recipient, status, when)
        # Before the write: should it fail half-way, the log may exist.
        self._absent_logs.discard(kind)
        logs.append_record(os.path.join(self._log_directory, kind, self.queue_id), record)


class _ContentStream(io.RawIOBase):
    """The content region of a queue file, read with pread on its own
    descriptor, checking the CRC on a sequential read to the end."""

    def __init__(
        self, queue_id: str, fd: int, start: int, size: int, expected_crc: int | None
    ) -> None:
        super().__init__()
        self._queue_id = queue_id
        self._fd = fd
        self._start = start
        self._size = size
        self._position = 0
        self._expected_crc = expected_crc
        self._crc = 0
        self._sequential = True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._position + offset
        elif whence == io.SEEK_END:
            target = self._size + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if target < 0:
            raise ValueError("negative seek position")
        if target == 0:
            self._crc = 0
            self._sequential = True
        elif target != self._position:
            self._sequential = False
        self._position = target
        return target

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("read from a closed content stream")
        count = min(len(buffer), self._size - self._position)
        if count <= 0:
            return 0
        # Straight into the caller's buffer (BufferedReader.read of a
        # chunk passes the bytes it returns): no copy of our own.
        # The views are released on the way out: a bytearray they still
        # pointed into could not be resized by its owner.
        with memoryview(buffer) as whole, whole[:count] as view:
            read = os.preadv(self._fd, [view], self._start + self._position)
            if not read:
                raise CorruptQueueFile(self._queue_id, "content cut short while reading")
            self._position += read
            if self._expected_crc is not None and self._sequential:
                with view[:read] as got:
                    self._crc = zlib.crc32(got, self._crc)
                if self._position == self._size and self._crc != self._expected_crc:
                    raise CorruptQueueFile(self._queue_id, "content checksum mismatch")
        return read

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
