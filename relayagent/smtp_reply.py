"""
SMTP server replies: assembling lines into replies, and replies into statuses.

A ``ReplyAssembler`` takes the lines a server sends and gives back whole
replies (multi-line replies joined), refusing what cannot be a reply: a
line that does not start with a three-digit code followed by SP, "-" or
the end of the line; a code whose first digit is not 2 to 5; a line over
``MAX_LINE_OCTETS``; a reply of more than ``MAX_REPLY_LINES`` lines.  A
refusal is a ``ProtocolError``; nothing a server sends can make it raise
anything else or hold more than one bounded reply in memory.

``reply_status`` turns a reply into a ``Status`` worded as Postfix words it
(smtp_chat.c, smtp_trouble.c): "host mx[192.0.2.1] said: 550 5.1.1 <u@x>:
unknown user (in reply to RCPT TO command)".  The RFC 3463 enhanced status
code at the start of the first line is believed only when its class digit
equals the reply code's first digit; otherwise the status is X.0.0 made
from the reply code.

Owns no parameters (the limits are fixed, as in Postfix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayagent.status import Status

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; servers send longer
# ones in practice, so we are generous but bounded.
MAX_LINE_OCTETS = 2000
MAX_REPLY_LINES = 100

_LINE_RE = re.compile(rb"^([0-9]{3})([ -]|$)")
_ENHANCED_RE = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")


class ProtocolError(Exception):
    """What the server sent is not an SMTP reply."""


@dataclass(frozen=True)
class Reply:
    """One whole server reply.

    ``code``: the three-digit reply code.  ``enhanced``: the RFC 3463 code
    from the first line when its class matches the reply code, else None.
    ``lines``: each line as received (code included), decoded leniently.
    ``text``: the lines joined with a space, as Postfix shows a reply.
    """

    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def dsn(self) -> str:
        """The enhanced status code, made from the reply code when absent."""
        if self.enhanced is not None:
            return self.enhanced
        return f"{self.code // 100}.0.0"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        return 300 <= self.code < 400

    def message_lines(self) -> list[str]:
        """Each line's text after the code and separator (EHLO keywords)."""
        return [line[4:] for line in self.lines]


def _decode(raw: bytes) -> str:
    # Replies should be ASCII; UTF-8 servers exist.  Never fail on bytes.
    return raw.decode("utf-8", errors="backslashreplace")


def parse_enhanced(code: int, first_line_text: str) -> str | None:
    """The enhanced status code of a reply, if it is there and believable."""
    match = _ENHANCED_RE.match(first_line_text)
    if match is None or int(match.group(1)) != code // 100:
        return None
    return match.group(0)


class ReplyAssembler:
    """Collects reply lines; ``feed`` returns a ``Reply`` when one is whole."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._code: int | None = None

    @property
    def in_progress(self) -> bool:
        """Whether part of a multi-line reply has been received."""
        return bool(self._lines)

    def feed(self, line: bytes) -> Reply | None:
        """Take one line (without its line end)."""
        if len(line) > MAX_LINE_OCTETS:
            raise ProtocolError(f"reply line longer than {MAX_LINE_OCTETS} octets")
        match = _LINE_RE.match(line)
        if match is None:
            raise ProtocolError(f"malformed reply: {_decode(line[:100])!r}")
        code = int(match.group(1))
        if not 200 <= code <= 599:
            raise ProtocolError(f"reply code out of range: {_decode(line[:100])!r}")
        if self._code is not None and code != self._code:
            raise ProtocolError(
                f"reply code changed within a multi-line reply: {_decode(line[:100])!r}"
            )
        self._code = code
        self._lines.append(_decode(line))
        if len(self._lines) > MAX_REPLY_LINES:
            raise ProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")
        if match.group(2) == b"-":
            return None
        lines = tuple(self._lines)
        self._lines = []
        self._code = None
        return Reply(code=code, enhanced=parse_enhanced(code, lines[0][4:]), lines=lines)


def reply_status(reply: Reply, *, host: str, namaddr: str, request: str, stage: str) -> Status:
    """A failure status from a server reply, worded as Postfix words it.

    ``request`` names the command ("RCPT TO command"); ``stage`` is the
    short stage name kept in ``Status.stage``.
    """
    return Status(
        dsn=reply.dsn,
        text=f"host {namaddr} said: {reply.text} (in reply to {request})",
        code=reply.code,
        stage=stage,
        reply=reply.text,
        remote_mta=host,
    )


def sent_status(reply: Reply, *, host: str, stage: str = "end of DATA") -> Status:
    """The status of a delivered recipient: the server's reply to "."."""
    return Status(
        dsn=reply.dsn,
        text=reply.text,
        code=reply.code,
        stage=stage,
        reply=reply.text,
        remote_mta=host,
    )
