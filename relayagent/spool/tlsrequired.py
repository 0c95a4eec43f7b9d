"""
Whether queued content has the header field ``TLS-Required: No`` (RFC
8689 section 4.1): the sender's request that delivery ignore recipient-
side TLS policy (a mandatory TLS level, DANE, MTA-STS) for this message.
The spool asks once, while the message is queued (as Postfix's cleanup(8)
notes it), and keeps the answer in the queue file's options octet; the
SMTP client acts on it (``smtp.requiretls``) when ``tls_required_enable``
says so.

Only the header section is looked at (up to the first empty line);
folded fields are unfolded; the field name and the value ``No`` are
matched without regard to case.  Memory is bounded: a header line longer
than ``MAX_LINE`` octets is not a ``TLS-Required`` field we believe.

SYNOPSIS

    scanner = TLSRequiredScanner()
    for chunk in chunks: scanner.feed(chunk)
    scanner.found                       # or has_tls_required_no(content)

DIAGNOSTICS: none; content that is not a well-formed header simply does
not have the field.

Owns no parameters (``tls_required_enable`` is the SMTP client's).
"""

from __future__ import annotations

FIELD_NAME = b"tls-required"
# The longest (unfolded) header field we look into.
MAX_LINE = 65536


class TLSRequiredScanner:
    """Feed the content in chunks of any size; ``found`` says whether the
    header section had ``TLS-Required: No``.  Stops looking at the end of
    the header section."""

    def __init__(self) -> None:
        self.found = False
        self._done = False
        self._partial = b""  # the current line, not yet ended
        self._field: bytes | None = None  # the current TLS-Required field, unfolded
        self._overlong = False

    def feed(self, chunk: bytes) -> None:
        """Look at the next part of the content."""
        if self._done or not chunk:
            return
        data = self._partial + chunk
        start = 0
        while not self._done:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            self._line(data[start:newline])
            start = newline + 1
        rest = data[start:]
        if len(rest) > MAX_LINE:
            # A line this long is no field we act on: skip to its end.
            self._overlong = True
            rest = b""
        self._partial = rest if not self._done else b""

    def close(self) -> None:
        """The content ended (a header with no body and no final newline)."""
        if not self._done and self._partial:
            self._line(self._partial)
        self._end_field()
        self._done = True

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        overlong, self._overlong = self._overlong or len(line) > MAX_LINE, False
        if not line and not overlong:
            self._end_field()
            self._done = True  # the end of the header section
            return
        if line[:1] in (b" ", b"\t") and not overlong:
            if self._field is not None and len(self._field) + len(line) <= MAX_LINE:
                self._field += line
            else:
                self._field = None
            return
        self._end_field()
        if overlong:
            return
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == FIELD_NAME:
            self._field = value

    def _end_field(self) -> None:
        if self._field is not None and self._field.strip().lower() == b"no":
            self.found = True
        self._field = None


def has_tls_required_no(content: bytes) -> bool:
    """``TLSRequiredScanner`` over a whole content at once."""
    scanner = TLSRequiredScanner()
    scanner.feed(content)
    scanner.close()
    return scanner.found
