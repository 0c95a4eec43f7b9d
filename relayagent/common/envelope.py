"""
The envelope of a queued message, as every phase sees it.

The spool reads these from queue files; the ESMTP client turns them into
MAIL FROM / RCPT TO parameters; the delivery layer and the DSN writer act
on them.  They are plain, immutable data: no phase reaches into another's
internals through them.

SYNOPSIS::

    envelope = Envelope(queue_id, sender, (Recipient("b@example.net"),),
                        arrival_time, content_size, open_content)
    envelope.pending(), recipient.domain, envelope.open_content()
    Notify.parse("SUCCESS,FAILURE").esmtp_value(), notify.wants(Notify.DELAY)
    address_problem(address)               # None, or why it cannot be queued
    ATEXT, LET_DIG, LDH                    # character classes of the address grammar
    DOT_ATOM_RE.fullmatch(local_part)      # a dot-atom (else the local part is quoted)

DIAGNOSTICS: ``Notify.parse`` raises ``ValueError`` for a bad NOTIFY
value; ``address_problem`` returns its answer instead of raising.

Owns no parameters.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

# C0 controls, DEL and C1 controls: never part of an address.  A CR or LF
# in one would end an SMTP command line (or a header) early, so every
# address is checked where it enters the spool and again where it is read.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# The address grammar's character classes (RFC 5321 4.1.2, RFC 5322
# 3.2.3), where with RFC 6531 any non-ASCII character counts as atext and
# as a letter.  Each is written as the complement of the ASCII characters
# it leaves out: spelling out a range up to U+10FFFF costs re several
# milliseconds to compile, at every start of every command.
ATEXT = r"""[^\x00-\x20"(),.:;<>@\[\\\]\x7f]"""  # atext
LET_DIG = r"[^\x00-\x2f:-@\[-`{-\x7f]"  # Let-dig: a letter or a digit
LDH = r"[^\x00-\x2c./:-@\[-`{-\x7f]"  # Let-dig or "-", inside an Ldh-str
# RFC 5321's Dot-string, RFC 5322's dot-atom-text (for ``fullmatch``).
DOT_ATOM_RE = re.compile(rf"{ATEXT}+(?:\.{ATEXT}+)*")


def address_problem(address: str) -> str | None:
    """Why ``address`` cannot be queued or sent, or None when it can."""
    if _CONTROL_RE.search(address):
        return "has a control character"
    return None


class BodyType(enum.Enum):
    """The body type of RFC 1652, as declared or detected at enqueue."""

    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"


class Ret(enum.Enum):
    """RFC 3461 RET: how much of the message a bounce returns."""

    FULL = "FULL"
    HDRS = "HDRS"


class Notify(enum.Flag):
    """RFC 3461 NOTIFY for one recipient.

    ``NEVER`` is the empty flag; ``DEFAULT`` (no NOTIFY given) behaves as
    FAILURE plus DELAY, as RFC 3461 section 4.1 and Postfix both do, but is
    kept apart so that we do not send a NOTIFY= the sender never asked for.
    """

    NEVER = 0
    SUCCESS = enum.auto()
    FAILURE = enum.auto()
    DELAY = enum.auto()
    DEFAULT = enum.auto()

    def wants(self, kind: Notify) -> bool:
        """Whether a notice of ``kind`` (SUCCESS, FAILURE or DELAY) is wanted."""
        if self & Notify.DEFAULT:
            return kind in (Notify.FAILURE, Notify.DELAY)
        return bool(self & kind)

    def esmtp_value(self) -> str | None:
        """The NOTIFY= parameter value, or None when none was given."""
        if self & Notify.DEFAULT:
            return None
        if not self:
            return "NEVER"
        return ",".join(
            name
            for name, flag in (
                ("SUCCESS", Notify.SUCCESS),
                ("FAILURE", Notify.FAILURE),
                ("DELAY", Notify.DELAY),
            )
            if self & flag
        )

    @classmethod
    def parse(cls, text: str) -> Notify:
        """Parse an RFC 3461 NOTIFY value (``NEVER`` or a comma list)."""
        words = [w.strip().upper() for w in text.split(",") if w.strip()]
        if words == ["NEVER"]:
            return cls.NEVER
        if not words or "NEVER" in words:
            raise ValueError(f"bad NOTIFY value: {text!r}")
        result = cls.NEVER
        for word in words:
            if word not in ("SUCCESS", "FAILURE", "DELAY"):
                raise ValueError(f"bad NOTIFY value: {text!r}")
            result |= cls[word]
        return result


class RecipientState(enum.Enum):
    """Where a recipient stands in its queue file."""

    PENDING = "pending"
    DONE = "done"


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient.

    ``index`` is its position in the queue file (stable for the life of
    the file; the spool marks recipients done by index).  ``orcpt`` is the
    RFC 3461 original recipient as ``addr-type;xtext-decoded-address``, or
    None.
    """

    address: str
    index: int = 0
    orcpt: str | None = None
    notify: Notify = Notify.DEFAULT
    state: RecipientState = RecipientState.PENDING

    @property
    def domain(self) -> str:
        """The domain part, lower-cased (empty for a local address)."""
        _, _, domain = self.address.rpartition("@")
        return domain.lower() if "@" in self.address else ""


@dataclass(frozen=True)
class Envelope:
    """What the queue file says about a message, without its content.

    ``content_size`` is the size in octets of the content as queued;
    ``open_content`` returns a new binary stream positioned at the first
    octet of the content (header and body, as queued: line ends LF or
    CRLF), so that each delivery attempt streams it afresh.
    ``plain_lines`` says the content was found plain when queued (LF line
    ends only, no line starting with ".", none over 998 octets:
    ``spool.plain.PlainLineScanner``), so its wire form needs only CRLF.
    ``body_declared``: whoever queued it gave the body type (BODY=); when
    it was only detected, a 7-bit message goes out with no BODY=, as
    Postfix sends none for an undeclared one.
    ``requiretls``: the sender asked for REQUIRETLS (RFC 8689: MAIL FROM
    ... REQUIRETLS, or ``sendmail -O requiretls=yes``): the message goes
    only over verified TLS to servers that offer REQUIRETLS.
    ``tls_not_required``: the header has ``TLS-Required: No`` (RFC 8689
    section 4.1), as found when the message was queued; it counts only
    when ``requiretls`` is False.
    """

    queue_id: str
    sender: str
    recipients: tuple[Recipient, ...]
    arrival_time: float
    content_size: int
    open_content: Callable[[], BinaryIO] = field(compare=False, repr=False)
    body_type: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    envid: str | None = None
    ret: Ret | None = None
    plain_lines: bool = False
    body_declared: bool = True
    requiretls: bool = False
    tls_not_required: bool = False

    def pending(self) -> tuple[Recipient, ...]:
        """The recipients not yet done."""
        return tuple(r for r in self.recipients if r.state is RecipientState.PENDING)
