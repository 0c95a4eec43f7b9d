"""
The session transcript: the last lines sent and received, for notices.

Postfix's smtp(8) keeps the conversation of a session and mails it to the
postmaster with a "protocol" notice (smtp_chat.c: "Out:"/"In:" lines).
``Transcript`` keeps the last ``max_lines`` lines and at most
``max_octets`` of text (oldest dropped first), so a chatty or hostile
server cannot make it grow.  Lines the caller marks as secret (AUTH
payloads) are stored already redacted: "Out: AUTH <redacted>".

SYNOPSIS

    transcript = Transcript()
    transcript.sent(b"MAIL FROM:<a@x>"), transcript.received(b"250 Ok")
    transcript.note("..."), transcript.lines()   # for the notice

DIAGNOSTICS: none; over the limits the oldest lines are dropped.

Owns no parameters.
"""

from __future__ import annotations

from collections import deque

_MAX_SHOWN = 200  # characters of one line shown; the rest is cut with "..."
# Octets of a line kept until it is shown: enough for _MAX_SHOWN characters
# of any UTF-8 (4 octets each at most) and to know there were more.
_MAX_KEPT = 4 * _MAX_SHOWN + 4


class Transcript:
    """A bounded list of "Out: ..." / "In: ..." lines.

    Lines are kept as they came (cut to ``_MAX_KEPT`` octets) and turned
    into text only when someone asks (``lines``): a session says and
    hears several lines per message, and almost every transcript is
    thrown away unread.  At most ``max_lines`` lines are kept, so at most
    ``max_lines * _MAX_KEPT`` octets; ``lines`` gives the newest of them
    that fit in ``max_octets`` characters.  A secret line is redacted
    before it is kept.
    """

    def __init__(self, max_lines: int = 100, max_octets: int = 16384) -> None:
        self._lines: deque[tuple[str, bytes | str]] = deque(maxlen=max_lines)
        self._max_octets = max_octets

    def sent(self, line: bytes | str, *, redact: bool = False) -> None:
        """Keep a line we sent, as ``Out: LINE``; with ``redact`` (AUTH)
        only the command and its mechanism are kept, never the payload."""
        self._lines.append(("Out: ", _redacted(line) if redact else line[:_MAX_KEPT]))

    def received(self, line: bytes | str) -> None:
        """Keep a line the server sent, as ``In: LINE``."""
        self._lines.append(("In: ", line[:_MAX_KEPT]))

    def note(self, text: str) -> None:
        """A line of our own (e.g. "body: 12345 octets" instead of the body)."""
        self._lines.append(("", text))

    def lines(self) -> list[str]:
        """The kept lines as text, oldest first: the newest of them whose total
        length fits in ``max_octets`` characters."""
        kept: list[str] = []
        octets = 0
        for prefix, raw in reversed(self._lines):
            line = prefix + (raw if not prefix else _text(raw))
            octets += len(line)
            if octets > self._max_octets:
                break
            kept.append(line)
        kept.reverse()
        return kept

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _text(line: bytes | str) -> str:
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="backslashreplace")
    line = line.rstrip("\r\n")
    if len(line) > _MAX_SHOWN:
        line = line[:_MAX_SHOWN] + "..."
    return line


def _redacted(line: bytes | str) -> str:
    """Keep the command verb and mechanism, never the payload."""
    words = _text(line).split()
    if len(words) >= 2 and words[0].upper() == "AUTH":
        return f"{words[0]} {words[1]} <redacted>" if len(words) > 2 else f"{words[0]} {words[1]}"
    if words and words[0].upper() == "AUTH":
        return "AUTH <redacted>"
    return "<redacted>"
