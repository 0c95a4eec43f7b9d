"""
SMTP server replies: assembling lines into replies, and replies into statuses.

A ``ReplyAssembler`` takes the lines a server sends and gives back whole
replies, as forgiving as Postfix's smtp_chat_resp() and as bounded:

- a line is part of a reply when it starts with three digits followed by
  "-" (more lines follow), SP or the end of the line (the last line);
- any other line (garbage, a banner without a code, "2500 ok") is kept
  in the reply's text and otherwise skipped: the reply goes on until a
  last line comes;
- the code and the enhanced status code are the last line's (Postfix's
  rule, which settles a multi-line reply whose lines disagree);
- at most ``MAX_REPLY_LINES`` lines are kept (the last line always is);
  the rest are read and dropped, so an EHLO reply of 500 lines costs the
  memory of 100.  Lines arrive already cut to ``MAX_LINE_OCTETS`` by the
  session.

``reply_status`` turns a reply into a failure ``Status`` worded as Postfix
words it (smtp_chat.c, smtp_trouble.c): "host mx[192.0.2.1] said: 550
5.1.1 <u@x>: unknown user (in reply to RCPT TO command)".

SYNOPSIS

    assembler = ReplyAssembler()
    reply = assembler.feed(b"250 2.0.0 Ok")        # Reply, or None: more to come
    status = reply_status(reply, host=..., namaddr=..., request="DATA command", stage="DATA")
    status = sent_status(reply, host=...)          # the reply to "." that delivered

DIAGNOSTICS

``feed`` never raises: whatever a server sends is a line of a reply.  The
RFC 3463 code of a reply is believed only when its class digit equals the
reply code's first digit; otherwise it is X.0.0 from the reply code, and
5.5.0 for a code that is not 2xx, 4xx or 5xx (a 354 where a final reply
was due, say).  ``reply_status`` of a 2xx reply (a reply that says yes
where the client needed another answer: 250 to DATA) is Postfix's
"Protocol error: host ... said: 250 ..." with 5.5.0.  Both mark
protocol errors for ``notify_classes = protocol`` as Postfix's
smtp_check_code() does.

Owns no parameters (the limits are fixed, as in Postfix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relayagent.common.status import Status

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; servers send longer
# ones in practice.  The session cuts a longer line to this and skips the
# rest of it, as Postfix does with line_length_limit.
MAX_LINE_OCTETS = 2000
MAX_REPLY_LINES = 100

_ENHANCED_RE = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?=\s|$)")
# A reply line, in one match on the decoded line: three digits and "-"
# (more lines follow), SP or the end of the line (the last line); on a
# last line also what ``parse_enhanced`` finds after the code, with its
# class digit.  Decoding leaves an ASCII octet as it was and makes any
# other into characters that are neither digits, SP nor "-", so the
# decoded line matches as its octets would.
_REPLY_LINE_RE = re.compile(r"([0-9]{3})(?:(-)|( )(?:(([245])\.[0-9]{1,3}\.[0-9]{1,3})(?=\s|$))?|$)")

# Status.notify_class of a protocol error (a notify_classes class).
PROTOCOL = "protocol"


@dataclass(frozen=True)
class Reply:
    """One whole server reply.

    ``code``: the three-digit reply code of the last line.  ``enhanced``:
    the RFC 3463 code from the last line when its class matches the
    reply code, else None.  ``lines``: each line as received (code
    included, garbage lines too), decoded leniently.  ``text``: the lines
    joined with a space, as Postfix shows a reply.  ``garbled``: some
    line was garbage (the session is then out of step: never cached).
    """

    code: int
    enhanced: str | None
    lines: tuple[str, ...]
    garbled: bool = False  # a line of it was not a reply line

    @property
    def text(self) -> str:
        """The lines joined with a space, codes included, as Postfix logs a reply."""
        return " ".join(self.lines)

    @property
    def dsn(self) -> str:
        """The enhanced status code, made from the reply code when absent
        (5.5.0 when the code is not 2xx, 4xx or 5xx: smtp_chat.c)."""
        if self.enhanced is not None:
            return self.enhanced
        first = self.code // 100
        return f"{first}.0.0" if first in (2, 4, 5) else "5.5.0"

    @property
    def positive(self) -> bool:
        """Whether the reply code is 2xx."""
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        """Whether the reply code is 3xx (354 after DATA, 334 during AUTH)."""
        return 300 <= self.code < 400

    def message_lines(self) -> list[str]:
        """Each reply line's text after the code and separator (EHLO
        keywords); garbage lines are left out."""
        return [line[4:] for line in self.lines if line[:3].isdigit() and line[3:4] in ("", " ", "-")]


def parse_enhanced(code: int, line_text: str) -> str | None:
    """The enhanced status code of a reply, if it is there and believable."""
    match = _ENHANCED_RE.match(line_text)
    if match is None or int(match.group(1)) != code // 100:
        return None
    return match.group(0)


def is_protocol_error(code: int) -> bool:
    """Postfix's smtp_check_code(): codes that say a client or server broke
    the protocol (postmaster notices with ``notify_classes = protocol``)."""
    return code < 400 or code > 599 or code == 555 or 500 <= code < 510


class ReplyAssembler:
    """Collects reply lines; ``feed`` returns a ``Reply`` when one is whole."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._garbled = False

    def feed(self, line: bytes) -> Reply | None:
        """Take one line (without its line end)."""
        # Replies should be ASCII; UTF-8 servers exist.  Never fail on
        # octets.  One decode and one match a line (``_REPLY_LINE_RE``).
        text = line.decode("utf-8", errors="backslashreplace")
        match = _REPLY_LINE_RE.match(text)
        if match is not None:
            digits, more, _space, enhanced, enhanced_class = match.groups()
            if more is None:
                if self._lines:
                    lines = self._lines
                    self._lines = []
                    lines.append(text)
                    kept = tuple(lines)
                else:
                    kept = (text,)
                garbled, self._garbled = self._garbled, False
                if enhanced is not None and enhanced_class != digits[0]:
                    enhanced = None  # its class is not the reply code's
                return Reply(code=int(digits), enhanced=enhanced, lines=kept, garbled=garbled)
        else:
            self._garbled = True
        if len(self._lines) < MAX_REPLY_LINES - 1:
            self._lines.append(text)
        return None


def reply_status(reply: Reply, *, host: str, namaddr: str, request: str, stage: str) -> Status:
    """A failure status from a server reply, worded as Postfix words it.

    ``request`` names the command ("RCPT TO command"); ``stage`` is the
    short stage name kept in ``Status.stage``.  A reply that is not a
    failure (2xx) is a protocol error, 5.5.0 (smtp_trouble.c).
    """
    dsn = reply.dsn
    text = f"host {namaddr} said: {reply.text} (in reply to {request})"
    if dsn[0] not in "45":
        dsn, text = "5.5.0", "Protocol error: " + text
    return Status(
        dsn=dsn,
        text=text,
        code=reply.code,
        stage=stage,
        reply=reply.text,
        remote_mta=host,
        notify_class=PROTOCOL if is_protocol_error(reply.code) else None,
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
