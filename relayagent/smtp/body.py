"""
The message body on the wire: line ends, dot-stuffing and long lines.

``BodyEncoder`` turns queued content, fed in chunks of any size, into the
octets sent after DATA (RFC 5321 4.5.2), as Postfix's smtp_text_out()
does (smtp_proto.c):

- LF and CRLF line ends both become CRLF; CR is never doubled.
- A bare CR (not followed by LF) also becomes CRLF.  Postfix passes a bare
  CR through as data; RFC 5321 2.3.8 says CR and LF occur only together,
  and a bare CR next to a "." is what "SMTP smuggling" exploits in
  receivers, so we follow the RFC here.
- Every line that starts with "." gets one more ".", the first line of
  the body and lines that begin right after a chunk boundary included.
- A line longer than ``line_length_limit`` octets (0: no limit) is broken
  with CRLF SPACE: the first piece holds ``limit`` octets, each
  continuation a SPACE and up to ``limit - 1`` more.  The added dot of
  dot-stuffing does not count, as in Postfix.
- ``flush()`` ends an unterminated last line with CRLF; the "." that ends
  DATA is the session's business.

Speed: a chunk is handled with a few whole-chunk ``bytes`` operations
(replace, and ``rfind`` jumps of a line-length limit to look for a long
line); a per-line Python loop runs only for chunks that hold an
over-long line.  State carried across chunks: a trailing CR,
whether the next octet starts a line, and the current line's length.

Most mail needs none of that but the CRLF: ``spool.plain.PlainLineScanner``
tells, once, when a message is queued, whether its content is *plain*: LF line
ends only (no CR anywhere), no line that starts with ".", no line longer
than ``PLAIN_LINE_LIMIT`` octets.  The queue file keeps the answer, and
for plain content ``BodyEncoder(plain=True)`` only turns LF into CRLF:
one C-level pass per chunk instead of four, on every delivery attempt
(as Postfix's cleanup(8) does the looking once and smtp(8) just writes).

Owns (its value is passed in): smtp_line_length_limit.
"""

from __future__ import annotations

from relayagent.spool.plain import PLAIN_LINE_LIMIT, has_line_over


class BodyEncoder:
    """A stateful, pure encoder: ``encode(chunk)`` ... ``flush()``.

    ``plain=True`` promises plain content (``PlainLineScanner``): the
    encoder then only turns LF into CRLF.  The promise holds only under a
    line-length limit of 0 or at least ``PLAIN_LINE_LIMIT``; under a
    smaller one the general path runs whatever ``plain`` says.
    """

    def __init__(self, line_length_limit: int = 998, *, plain: bool = False) -> None:
        if line_length_limit < 0:
            raise ValueError("line_length_limit must be >= 0")
        # A limit of 1 leaves no room after the continuation SPACE.
        self._limit = max(line_length_limit, 2) if line_length_limit else 0
        self._carry_cr = False
        self._at_line_start = True
        self._column = 0
        self.octets_out = 0
        self.plain = plain and (line_length_limit == 0 or line_length_limit >= PLAIN_LINE_LIMIT)

    def encode(self, chunk: bytes) -> bytes:
        """The wire form of ``chunk``, given everything encoded before it."""
        if self.plain:
            if not chunk:
                return b""
            self._at_line_start = chunk.endswith(b"\n")
            out = chunk.replace(b"\n", b"\r\n")
            self.octets_out += len(out)
            return out
        if self._carry_cr:
            chunk = b"\r" + chunk
            self._carry_cr = False
        if chunk.endswith(b"\r"):
            # It may be the first half of a CRLF split across chunks.
            self._carry_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return self._encode_lf(chunk)

    def flush(self) -> bytes:
        """The end of the body: a held CR, and a CRLF after a last partial line."""
        out = b""
        if self._carry_cr:
            self._carry_cr = False
            out = self._encode_lf(b"\n")
        if not self._at_line_start:
            out += self._encode_lf(b"\n")
        return out

    def _encode_lf(self, data: bytes) -> bytes:
        """Encode LF-only ``data`` (non-empty)."""
        limit = self._limit
        last_nl = data.rfind(b"\n")
        if limit and self._has_long_line(data):
            data = self._break_long_lines(data.split(b"\n"))
            last_nl = data.rfind(b"\n")
        stuffed = data.replace(b"\n.", b"\n..")
        if self._at_line_start and data[:1] == b".":
            stuffed = b"." + stuffed
        if last_nl < 0:
            self._column += len(data)
        else:
            self._column = len(data) - last_nl - 1
        self._at_line_start = data.endswith(b"\n")
        out = stuffed.replace(b"\n", b"\r\n")
        self.octets_out += len(out)
        return out

    def _has_long_line(self, data: bytes) -> bool:
        """Whether a line of ``data`` (the first one continuing the
        current line) passes the limit."""
        return has_line_over(data, self._limit, self._column)

    def _break_long_lines(self, lines: list[bytes]) -> bytes:
        """Join ``lines`` with LF, breaking each over-long one with LF SPACE.

        The first line continues the current line (at ``self._column``).
        Breaking is lazy: a line of exactly ``limit`` octets is left whole;
        a break is made only before an octet that would pass the limit.
        """
        limit = self._limit
        pieces: list[bytes] = []
        column = self._column
        for number, line in enumerate(lines):
            if number:
                pieces.append(b"\n")
                column = 0
            room = limit - column
            if len(line) <= room:
                pieces.append(line)
                column += len(line)
                continue
            pieces.append(line[:room])
            position = room
            while position < len(line):
                piece = line[position : position + limit - 1]
                pieces.append(b"\n ")
                pieces.append(piece)
                position += len(piece)
                column = 1 + len(piece)
        return b"".join(pieces)


def encode_body(
    content: bytes, line_length_limit: int = 998, chunk_size: int | None = None, *, plain: bool = False
) -> bytes:
    """Encode a whole body at once (tests and small messages)."""
    encoder = BodyEncoder(line_length_limit, plain=plain)
    if chunk_size is None:
        return encoder.encode(content) + encoder.flush()
    out = [encoder.encode(content[i : i + chunk_size]) for i in range(0, len(content), chunk_size)]
    out.append(encoder.flush())
    return b"".join(out)
