"""
Whether queued content is *plain*: LF line ends only (no CR anywhere), no
line that starts with ".", no line longer than ``PLAIN_LINE_LIMIT``
octets.  The spool asks once, when a message is queued, and keeps the
answer in the queue file's content-form octet; for plain content the SMTP
client's ``smtp.body.BodyEncoder(plain=True)`` only turns LF into CRLF.

SYNOPSIS

    scanner = PlainLineScanner()
    for chunk in chunks: scanner.feed(chunk)
    scanner.plain                      # or is_plain(whole_content)
    has_line_over(data, limit, column)  # shared with the body encoder

DIAGNOSTICS: none; anything that is not plain is simply not plain.

Owns no parameters.
"""

from __future__ import annotations

# RFC 5321 4.5.3.1.6: 1000 octets with the CRLF.  Plain content has no
# longer line, so it needs no breaking under any smtp_line_length_limit of
# at least this (the default) or 0.
PLAIN_LINE_LIMIT = 998


class PlainLineScanner:
    """Whether content fed in chunks of any size is *plain*: no CR, no line
    that starts with ".", no line over ``PLAIN_LINE_LIMIT`` octets (the LF
    not counted).  Used when a message is queued; the answer is kept in
    the queue file.  Once an exception is seen, the rest is not looked at."""

    def __init__(self) -> None:
        self.plain = True
        self._at_line_start = True
        self._column = 0

    def feed(self, chunk: bytes) -> None:
        """Look at the next ``chunk``; ``plain`` becomes False at the first
        thing that is not plain (and stays so)."""
        if not self.plain or not chunk:
            return
        if (
            b"\r" in chunk
            or b"\n." in chunk
            or (self._at_line_start and chunk[:1] == b".")
            or has_line_over(chunk, PLAIN_LINE_LIMIT, self._column)
        ):
            self.plain = False
            return
        last_newline = chunk.rfind(b"\n")
        if last_newline < 0:
            self._column += len(chunk)
        else:
            self._column = len(chunk) - last_newline - 1
        self._at_line_start = last_newline == len(chunk) - 1


def is_plain(content: bytes) -> bool:
    """``PlainLineScanner`` over a whole content at once."""
    scanner = PlainLineScanner()
    scanner.feed(content)
    return scanner.plain


def has_line_over(data: bytes, limit: int, column: int) -> bool:
    """Whether a line of ``data`` (the first one continuing a line already
    ``column`` octets long) passes ``limit`` octets.  Jumps from line end to
    line end a window of ``limit + 1`` octets at a time with ``rfind``:
    tens of C calls per 64 KB instead of a list of every line."""
    size = len(data)
    position = 0
    allowed = limit - column
    while True:
        end = position + allowed + 1
        if end > size:
            return False  # what is left fits
        newline = data.rfind(b"\n", position, end)
        if newline < 0:
            return True
        position = newline + 1
        allowed = limit
