"""
Delivery status: what happened to a recipient, a transaction or a session.

Every phase reports outcomes with these types, so the delivery layer can
act on them (mark done, defer, bounce) and the logger and DSN writer can
render them, without any phase knowing another's internals.

A ``Status`` carries an RFC 3463 enhanced status code (``dsn``), the text
Postfix would show in parentheses after ``status=`` in its log line, the
SMTP reply code when a server gave one, and the stage of the session it
came from.

SYNOPSIS: ``Status``, ``DeliveryFailure``, ``is_enhanced_status``.

DIAGNOSTICS: ``Status`` raises ValueError for a malformed enhanced code.

Owns no parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

# RFC 3463: class.subject.detail, class 2, 4 or 5, subject and detail 0-999.
_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


def is_enhanced_status(text: str) -> bool:
    """Whether ``text`` is a well-formed RFC 3463 status code."""
    return _ENHANCED_RE.match(text) is not None


@dataclass(frozen=True)
class Status:
    """One outcome.

    ``dsn``: the enhanced status code, e.g. ``"4.4.1"``.
    ``text``: the explanation, e.g. ``"connect to mx.example.com[192.0.2.1]:25:
    Connection refused"`` or ``"host mx.example.com[192.0.2.1] said: 550
    5.1.1 <u@example.com>: unknown user (in reply to RCPT TO command)"``.
    ``code``: the SMTP reply code when the status came from a server.
    ``stage``: the stage of the session (``"RCPT TO"``, ``"end of DATA"``...)
    or None for local failures.
    ``reply``: the server's reply text alone (for Diagnostic-Code), if any.
    ``remote_mta``: the server's host name (for Remote-MTA), if any.

    Two contracts between phases, not part of the outcome (not compared):
    ``notify_class``: the ``notify_classes`` class of the problem (e.g.
    ``"protocol"``, set by the session on a protocol error), for the
    postmaster notice; None for none.  ``retry_plaintext``: set by the TLS
    layer on a failed handshake at level may; the connection layer then
    tries the same address once more without STARTTLS.
    ``hard_when_final``: a soft status that becomes hard (``final()``)
    when no other server remains to be tried: RFC 8689 section 4.2.1's
    REQUIRETLS failures, which try the other MX hosts before the message
    is returned (Postfix's SMTP_MISC_FAIL_SOFT_NON_FINAL).
    """

    dsn: str
    text: str
    code: int | None = None
    stage: str | None = None
    reply: str | None = None
    remote_mta: str | None = None
    notify_class: str | None = field(default=None, compare=False, repr=False)
    retry_plaintext: bool = field(default=False, compare=False, repr=False)
    hard_when_final: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not is_enhanced_status(self.dsn):
            raise ValueError(f"not an enhanced status code: {self.dsn!r}")

    @property
    def status_class(self) -> int:
        """2, 4 or 5."""
        return int(self.dsn[0])

    # The three below read the code's first character, which __post_init__
    # checked is 2, 4 or 5: the queue manager asks them of every
    # recipient, and ``status_class`` would be a second call and an int().

    @property
    def ok(self) -> bool:
        """Whether this is a success (a 2.x.x status)."""
        return self.dsn[0] == "2"

    @property
    def soft(self) -> bool:
        """A temporary failure: the recipient is deferred."""
        return self.dsn[0] == "4"

    @property
    def hard(self) -> bool:
        """A permanent failure: the recipient is bounced."""
        return self.dsn[0] == "5"

    def final(self) -> Status:
        """The status as the outcome of the last server tried: hard when
        ``hard_when_final`` says so, else unchanged."""
        if not (self.hard_when_final and self.soft):
            return self
        return replace(self, dsn="5" + self.dsn[1:], retry_plaintext=False, hard_when_final=False)

    def softened(self) -> Status:
        """The same status made temporary (soft_bounce, relayhost 4.3.5...)."""
        if not self.hard:
            return self
        return replace(self, dsn="4" + self.dsn[1:], hard_when_final=False)


class DeliveryFailure(Exception):
    """A failure that ends a connection attempt or a session.

    ``final_server`` is False while other mail exchangers remain to be
    tried; the connection layer fills it in.  ``skip_to_next`` says the
    failure happened where Postfix moves on to the next address (before
    the greeting, or a soft error on a non-final server).
    """

    def __init__(self, status: Status, *, skip_to_next: bool = True) -> None:
        super().__init__(status.text)
        self.status = status
        self.skip_to_next = skip_to_next

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status!r})"
