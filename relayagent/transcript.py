"""
The session transcript: the last lines sent and received, for notices.

Postfix's smtp(8) keeps the conversation of a session and mails it to the
postmaster with a "protocol" notice (smtp_chat.c: "Out:"/"In:" lines).
``Transcript`` keeps the last ``max_lines`` lines and at most
``max_octets`` of text (oldest dropped first), so a chatty or hostile
server cannot make it grow.  Lines the caller marks as secret (AUTH
payloads) are stored already redacted: "Out: AUTH <redacted>".

Owns no parameters.
"""

from __future__ import annotations

from collections import deque

_MAX_SHOWN = 200  # octets of one line kept; the rest is cut with "..."


class Transcript:
    """A bounded list of "Out: ..." / "In: ..." lines."""

    def __init__(self, max_lines: int = 100, max_octets: int = 16384) -> None:
        self._lines: deque[str] = deque()
        self._octets = 0
        self._max_lines = max_lines
        self._max_octets = max_octets

    def sent(self, line: bytes | str, *, redact: bool = False) -> None:
        if redact:
            text = _redacted(line)
        else:
            text = _text(line)
        self._add("Out: " + text)

    def received(self, line: bytes | str) -> None:
        self._add("In: " + _text(line))

    def note(self, text: str) -> None:
        """A line of our own (e.g. "body: 12345 octets" instead of the body)."""
        self._add(text)

    def lines(self) -> list[str]:
        return list(self._lines)

    def __str__(self) -> str:
        return "\n".join(self._lines)

    def _add(self, line: str) -> None:
        self._lines.append(line)
        self._octets += len(line)
        while self._lines and (
            len(self._lines) > self._max_lines or self._octets > self._max_octets
        ):
            self._octets -= len(self._lines.popleft())


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
