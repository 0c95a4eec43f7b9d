"""
8bit-to-7bit MIME conversion for servers that do not offer 8BITMIME.

Postfix's smtp(8) downgrades an 8bit message on the way out when the server
did not announce 8BITMIME (RFC 6152) and ``disable_mime_output_conversion``
is ``no``; the work is done by mime_state.c.  This module is our own
streaming implementation of the same behaviour:

- The headers of the message and of every body part are parsed (folded
  continuation lines, names in any case, ``Content-Type`` with parameters
  and a quoted or plain ``boundary``, ``Content-Transfer-Encoding``).  The
  defaults are RFC 2045/2046's: text/plain and 7bit; the children of a
  multipart/digest default to message/rfc822.
- A leaf part declared ``8bit`` or ``binary`` becomes quoted-printable: its
  ``Content-Transfer-Encoding`` header is dropped and
  ``Content-Transfer-Encoding: quoted-printable`` is written at the end of
  its header block; "=", octets below 32 except TAB and octets above 126 are
  encoded; a soft line break is made once an output line passes 72 columns
  (so no line is longer than 76); a SPACE or TAB before a line end is
  encoded; every input line end is a hard line break.
- A multipart or message/rfc822 entity declared ``8bit`` or ``binary`` gets
  ``Content-Transfer-Encoding: 7bit`` the same way; a message/rfc822 body is
  parsed as a message of its own (its headers, its parts).
- Every other header is passed on as it was, 8-bit octets included, as
  Postfix does; so is the body of a part that is declared (or defaults to)
  7bit, quoted-printable or base64, even if it holds 8-bit octets: headers
  have already been written by the time such octets show up, and Postfix
  does not convert them either.  ``SevenBitConverter.unconverted_8bit``
  tells the caller when that happened, so it can log it.
- More than ``mime_nesting_limit`` nested multiparts is refused
  (DIAGNOSTICS).  Postfix counts from -1, so it takes up to limit + 2
  nested multiparts and refuses the next one; we count the same way.
  message/rfc822 levels are not counted (they cost no memory here either).
- A boundary is matched on at most ``mime_boundary_length_limit`` octets;
  a delimiter line matches when it starts with "--" and the (possibly cut)
  boundary, whatever follows, innermost multipart first; a delimiter of an
  outer multipart closes the inner ones.

Where we differ from Postfix, on purpose:

- Headers are not rewritten: Postfix changes "Name : value" into
  "Name: value" and re-folds long headers; we keep them byte for byte.
- Postfix labels every message/* entity (other than message/global) 7bit
  while it quoted-printable-encodes the body of message/partial,
  message/external-body and the others, which leaves a mislabelled part.
  RFC 2045 section 6 says the label must describe the encoding, so only
  message/rfc822 is treated as a composite here; every other message/*
  subtype declared 8bit or binary is a leaf and gets quoted-printable.
- A soft-broken line that would start with "-" starts with "=2D" instead,
  so that a "--boundary" in the middle of a long line can never become a
  delimiter line after the break (RFC 2046 section 5.1.1); Postfix does not
  do this.
- Postfix drops header text past header_size_limit (102400); we pass it on
  and only parse the first 102400 octets of any one header.

The input is a whole message as queued (header, blank line, body), with LF
or CRLF line ends in any mix, in chunks cut anywhere.  The output has LF
line ends; the ESMTP layer turns them into CRLF and dot-stuffs.  A bare CR
that is not part of a CRLF is data (``=0D`` inside a converted part).  A
binary part's CRLF and LF are both line ends and become hard line breaks,
as in Postfix, whose queue file keeps lines, not octets: decoding gives LF
where the original had CRLF.  Input that does not end with a line end gets
one; empty input stays empty.

Memory does not depend on the size of the message: a line longer than
``SevenBitConverter.LINE_PIECE`` (64 KiB) is handled in pieces (Postfix's
REC_TYPE_CONT records), with the same output as if handled whole (a
boundary or header name is always within the first piece).

SYNOPSIS::

    if needs_conversion(body_type, server_has_8bitmime, disable_conversion):
        converter = SevenBitConverter(nesting_limit=..., boundary_length_limit=...)
        out = converter.feed(chunk) ... + converter.close()
        converter.unconverted_8bit         # 8-bit octets left as they were
    convert_to_7bit(whole_message)

DIAGNOSTICS: ``feed`` and ``close`` raise ``MimeError`` (its ``dsn``,
5.6.0 "MIME nesting exceeds safety limit": the message bounces) and keep
raising it; use after ``close`` and bad limits are ``ValueError``.

Owns: mime_nesting_limit, mime_boundary_length_limit,
disable_mime_output_conversion (the caller passes their values in; see
``needs_conversion``).
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass
from enum import Enum

from relayagent.common.envelope import BodyType

__all__ = [
    "MimeError",
    "SevenBitConverter",
    "convert_to_7bit",
    "needs_conversion",
]

# Postfix's header_size_limit default: how much of one header we parse.
HEADER_PARSE_LIMIT = 102400

# Postfix breaks a quoted-printable line once it holds more than 72 columns,
# before the next character; with a 3-column escape and the "=" of the soft
# break, no line passes 76 columns (RFC 2045 section 6.7, rule 5).
_QP_BREAK_AFTER = 73

_CR = 13
_EQUALS = 61
_DASH = 45

# Octets quoted-printable may carry as themselves: TAB, SPACE to "<", ">"
# to "~".  Everything else (including "=") is written as "=XX".
_QP_UNSAFE = re.compile(rb"[^\t\x20-\x3c\x3e-\x7e]+")

# A header starts with a name of printable ASCII other than ":", then
# optional blanks, then ":" (is_header.c accepts the obsolete "Name :").
_HEADER_START = re.compile(rb"([!-9;-~]+)[ \t]*:")

# RFC 2045 tspecials, each a token of its own in a Content-Type value.
_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?=')
_BLANKS = frozenset(b" \t\r\n")


class MimeError(Exception):
    """The message cannot be converted; it bounces with ``dsn``."""

    def __init__(self, text: str, dsn: str = "5.6.0") -> None:
        super().__init__(text)
        self.text = text
        self.dsn = dsn

    def __str__(self) -> str:
        return self.text


def needs_conversion(
    body_type: BodyType | str | None,
    server_has_8bitmime: bool,
    disable_conversion: bool,
) -> bool:
    """Whether the body must go through ``SevenBitConverter``.

    As Postfix's SMTP_MIME_DOWNGRADE: conversion is not disabled, the server
    did not offer 8BITMIME, and the body is not known to be 7bit (an unknown
    body type is converted, like Postfix's empty encoding).
    """
    if disable_conversion or server_has_8bitmime:
        return False
    if isinstance(body_type, BodyType):
        return body_type is not BodyType.SEVEN_BIT
    if isinstance(body_type, str):
        return body_type.strip().upper() not in ("7BIT", "SEVEN_BIT")
    return True


class _Domain(Enum):
    """The encoding domain of RFC 2045 section 2.7 to 2.9."""

    SEVEN = "7bit"
    EIGHT = "8bit"
    BINARY = "binary"


# Content-Transfer-Encoding values and the domain each one puts a part in;
# unknown values leave the domain as it was (mime_state.c does the same).
_ENCODING_DOMAINS: dict[bytes, _Domain] = {
    b"7bit": _Domain.SEVEN,
    b"8bit": _Domain.EIGHT,
    b"binary": _Domain.BINARY,
    b"base64": _Domain.SEVEN,
    b"quoted-printable": _Domain.SEVEN,
}


class _Kind(Enum):
    """What we need to know of a content type."""

    TEXT = "text"
    MESSAGE = "message"  # any message/* but rfc822 and global: a leaf here
    RFC822 = "message/rfc822"
    GLOBAL = "message/global"
    MULTIPART = "multipart"
    OTHER = "other"


class _State(Enum):
    PRIMARY = "primary headers"
    MULTIPART = "part headers"  # after a --boundary line
    NESTED = "nested headers"  # at the start of a message/rfc822 body
    BODY = "body"


@dataclass(frozen=True)
class _Multipart:
    """One open multipart: its boundary (cut) and its parts' default type."""

    boundary: bytes
    child_kind: _Kind


@dataclass
class _Token:
    kind: str  # "atom", "quoted", or the tspecial character itself
    value: bytes


def _tokenize_groups(value: bytes) -> list[list[_Token]]:
    """Split a Content-* header value into ";"-separated groups of tokens.

    RFC 2045/822 lexing, as header_token.c does it: blanks separate tokens,
    comments in parentheses (nested, with backslash quoting) are skipped,
    quoted strings lose their quotes and backslashes, each tspecial is a
    token of its own, and ";" closes a group.
    """
    groups: list[list[_Token]] = [[]]
    index, end = 0, len(value)
    while index < end:
        octet = value[index]
        if octet in _BLANKS:
            index += 1
        elif octet == 0x28:  # "(": a comment, possibly nested
            depth = 0
            while index < end:
                octet = value[index]
                if octet == 0x5C:  # backslash quotes the next octet
                    index += 2
                    continue
                if octet == 0x28:
                    depth += 1
                elif octet == 0x29:
                    depth -= 1
                    if depth == 0:
                        index += 1
                        break
                index += 1
        elif octet == 0x22:  # '"': a quoted string
            index += 1
            text = bytearray()
            while index < end and value[index] != 0x22:
                if value[index] == 0x5C and index + 1 < end:
                    index += 1
                text.append(value[index])
                index += 1
            index += 1  # the closing quote, when there is one
            groups[-1].append(_Token("quoted", bytes(text)))
        elif octet == 0x3B:  # ";" ends a group
            groups.append([])
            index += 1
        elif octet in _TSPECIALS:
            groups[-1].append(_Token(chr(octet), bytes((octet,))))
            index += 1
        else:
            start = index
            while index < end and value[index] not in _TSPECIALS and value[index] not in _BLANKS:
                index += 1
            groups[-1].append(_Token("atom", value[start:index]))
    return groups


def _is_atom(token: _Token, text: bytes) -> bool:
    return token.kind == "atom" and token.value.lower() == text


def _qp_escape_run(match: re.Match[bytes]) -> bytes:
    # b"\xc3\xa9" -> b"=C3=A9"
    return b"=" + binascii.hexlify(match[0], b"=").upper()


class SevenBitConverter:
    """Streaming 8bit-to-7bit converter; see the module docstring.

    ``feed(data)`` takes the next chunk of the message and returns the
    output that is ready; ``close()`` returns the rest.  Both raise
    ``MimeError`` (and keep raising it) once the message is found to nest
    multiparts too deep; the caller must then abort the transaction without
    sending the final ".", as Postfix does.
    """

    # Lines longer than this are handled in pieces (memory bound).
    LINE_PIECE = 65536

    def __init__(self, *, nesting_limit: int = 100, boundary_length_limit: int = 2048) -> None:
        if nesting_limit < 0 or boundary_length_limit < 1:
            raise ValueError(
                f"bad MIME limits: nesting {nesting_limit}, boundary length {boundary_length_limit}"
            )
        self.nesting_limit = nesting_limit
        self.boundary_length_limit = boundary_length_limit
        # The first piece of a line must hold "--", a whole (cut) boundary
        # and the closing "--", so that delimiters are found in it.
        self._piece = max(self.LINE_PIECE, boundary_length_limit + 5)
        # True once an 8-bit octet went out unconverted (a header, or a part
        # declared 7bit that was not): the caller may want to log it.
        self.unconverted_8bit = False

        self._pending = b""  # input after the last line end (< one piece)
        self._out: list[bytes] = []
        self._error: MimeError | None = None
        self._closed = False

        # Parser state, as mime_state.c keeps it.
        self._state = _State.PRIMARY
        self._kind = _Kind.TEXT
        self._domain = _Domain.SEVEN
        self._stack: list[_Multipart] = []  # innermost last
        self._prev_cont = False  # the last record was a piece of a longer line

        # The header being collected: its raw text (folded lines joined by
        # LF), or, once it passed HEADER_PARSE_LIMIT, streamed out directly.
        self._header: bytearray | None = None
        self._header_streaming = False
        self._header_dropped = False

        # The quoted-printable output line under construction (< 76 columns),
        # carried across the pieces of a long input line.
        self._qp_line = b""

    # ----------------------------------------------------------------- API

    def feed(self, data: bytes) -> bytes:
        """Convert the next chunk; return whatever output is complete."""
        self._check_usable()
        if not data:
            return b""
        buffer = self._pending + bytes(data) if self._pending else bytes(data)
        lines = buffer.split(b"\n")
        self._pending = lines.pop()
        index, count = 0, len(lines)
        while index < count and not self._in_last_part():
            line = lines[index]
            index += 1
            if line[-1:] == b"\r":
                line = line[:-1]
            while len(line) > self._piece:
                piece, line = self._cut_one(line)
                self._record(piece, True)
            self._record(line, False)
        if index < count:
            self._feed_last_part(lines[index:] if index else lines)
        while len(self._pending) >= self._piece:
            piece, self._pending = self._cut_one(self._pending)
            self._record(piece, True)
        return self._take_output()

    def close(self) -> bytes:
        """Flush the rest of the message; return the last of the output."""
        self._check_usable()
        self._closed = True
        if self._pending or self._prev_cont:
            # Input that does not end with a line end gets one (mime_state.c).
            rest, self._pending = self._pending, b""
            self._record(rest, False)
        if self._state is not _State.BODY:
            # The message ends inside a header block: finish it as a
            # non-text record does in mime_state.c, without a blank line.
            self._finish_header()
            self._end_header_block()
            self._state = _State.BODY
        return self._take_output()

    # ----------------------------------------------------------- plumbing

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ValueError("SevenBitConverter used after close()")

    def _take_output(self) -> bytes:
        output = b"".join(self._out)
        self._out.clear()
        if self._error is not None:
            raise self._error
        return output

    def _in_last_part(self) -> bool:
        """Whether the rest of the message is one body, whatever it holds.

        With no multipart open there is no delimiter to look for, so the
        parser can never leave this state; the lines go straight to the
        output (the speed of large single-part messages depends on it).
        """
        return self._state is _State.BODY and not self._stack

    def _feed_last_part(self, lines: list[bytes]) -> None:
        self._prev_cont = False
        if self._domain is _Domain.SEVEN:
            # Each CRLF that ends a line becomes LF; nothing else changes.
            text = (b"\n".join(lines) + b"\n").replace(b"\r\n", b"\n")
            if not self.unconverted_8bit and not text.isascii():
                self.unconverted_8bit = True
            self._out.append(text)
            return
        # The lines are in memory already, so a long one need not be cut in
        # pieces here: the encoder's output does not depend on the cuts.
        emit = self._qp_emit
        for encoded in _qp_escape_lines(lines):
            emit(encoded, False)

    def _cut_one(self, text: bytes) -> tuple[bytes, bytes]:
        """Cut the first piece off a line that goes on past one piece.

        A CR at the cut is kept back: it may be the first half of a CRLF
        whose LF has not arrived yet.
        """
        cut = self._piece
        if text[cut - 1] == _CR:
            cut -= 1
        return text[:cut], text[cut:]

    # ------------------------------------------------------ state machine

    def _record(self, text: bytes, is_cont: bool) -> None:
        """Handle one input line, or one piece of a long line (``is_cont``).

        The structure follows mime_state_update(): header states collect
        and judge headers; the first line that is no header ends the block
        and falls through to the body code, which looks for delimiters.
        """
        if self._state is not _State.BODY:
            if self._header is not None:
                if self._prev_cont:
                    self._extend_header(text)
                    self._prev_cont = is_cont
                    return
                if text[:1] in (b" ", b"\t"):
                    self._extend_header(b"\n" + text)
                    self._prev_cont = is_cont
                    return
                self._finish_header()
            elif self._prev_cont:
                # The rest of a long delimiter line that led here.
                self._out.append(text if is_cont else text + b"\n")
                self._prev_cont = is_cont
                return
            if _HEADER_START.match(text):
                self._header = bytearray(text)
                self._header_streaming = False
                self._header_dropped = False
                self._check_header_size()
                self._prev_cont = is_cont
                return
            self._end_header_block()
            if not text:
                self._enter_body()
            else:
                # Not a header and not the blank line: the header block is
                # broken.  Postfix adds the missing blank line after the
                # primary headers only (not in parts: it would break
                # signatures), and goes on with the body.
                if self._state is _State.PRIMARY:
                    self._out.append(b"\n")
                self._state = _State.BODY
        self._body_record(text, is_cont)

    def _body_record(self, text: bytes, is_cont: bool) -> None:
        if (
            self._stack
            and not self._prev_cont
            and len(text) > 2
            and text[0] == _DASH
            and text[1] == _DASH
        ):
            self._match_delimiter(text)
        self._prev_cont = is_cont
        if self._domain is not _Domain.SEVEN:
            self._qp_encode_record(text, is_cont)
        else:
            if not self.unconverted_8bit and not text.isascii():
                self.unconverted_8bit = True
            self._out.append(text if is_cont else text + b"\n")

    def _match_delimiter(self, text: bytes) -> None:
        for depth in range(len(self._stack) - 1, -1, -1):
            boundary = self._stack[depth].boundary
            if text.startswith(boundary, 2):
                # A delimiter of an outer multipart closes the inner ones.
                del self._stack[depth + 1 :]
                if text.startswith(b"--", 2 + len(boundary)):
                    self._stack.pop()
                    self._set(_State.BODY, _Kind.OTHER)
                else:
                    self._set(_State.MULTIPART, self._stack[-1].child_kind)
                return

    def _set(self, state: _State, kind: _Kind) -> None:
        self._state = state
        self._kind = kind
        self._domain = _Domain.SEVEN

    def _enter_body(self) -> None:
        """The blank line after a header block: what comes next."""
        kind = self._kind
        if kind is _Kind.RFC822 or (kind is _Kind.GLOBAL and self._domain is _Domain.SEVEN):
            # A message of its own follows, with text/plain 7bit defaults.
            self._set(_State.NESTED, _Kind.TEXT)
        elif kind is _Kind.MULTIPART:
            # The preamble: passed on as is, until the first delimiter.
            self._set(_State.BODY, _Kind.OTHER)
        else:
            self._state = _State.BODY

    # ------------------------------------------------------------ headers

    def _extend_header(self, text: bytes) -> None:
        header = self._header
        assert header is not None
        if self._header_streaming:
            if not self._header_dropped:
                self._emit_header_text(text)
            return
        header += text
        self._check_header_size()

    def _check_header_size(self) -> None:
        header = self._header
        assert header is not None
        if len(header) > HEADER_PARSE_LIMIT:
            # Judge the header on its first HEADER_PARSE_LIMIT octets now,
            # and stream the rest, so that memory stays bounded.
            self._header_dropped = not self._judge_header(bytes(header[:HEADER_PARSE_LIMIT]))
            if not self._header_dropped:
                self._emit_header_text(bytes(header))
            self._header_streaming = True
            header.clear()

    def _finish_header(self) -> None:
        header = self._header
        if header is None:
            return
        self._header = None
        if self._header_streaming:
            if not self._header_dropped:
                self._out.append(b"\n")
            return
        text = bytes(header)
        if self._judge_header(text):
            self._emit_header_text(text + b"\n")

    def _emit_header_text(self, text: bytes) -> None:
        if not self.unconverted_8bit and not text.isascii():
            self.unconverted_8bit = True
        self._out.append(text)

    def _judge_header(self, text: bytes) -> bool:
        """Parse a Content-* header; whether the header is to be written.

        A Content-Transfer-Encoding header that puts the entity outside the
        7bit domain is dropped: a new one is written at the end of the
        header block, once the content type is known.
        """
        match = _HEADER_START.match(text)
        if match is None:  # cannot happen: the header started with a name
            return True
        name = match[1].lower()
        value = text[match.end() :]
        if name == b"content-type":
            self._parse_content_type(value)
        elif name == b"content-transfer-encoding":
            self._parse_transfer_encoding(value)
            return self._domain is _Domain.SEVEN
        return True

    def _parse_transfer_encoding(self, value: bytes) -> None:
        groups = _tokenize_groups(value)
        if groups[0] and groups[0][0].kind == "atom":
            domain = _ENCODING_DOMAINS.get(groups[0][0].value.lower())
            if domain is not None:
                self._domain = domain

    def _parse_content_type(self, value: bytes) -> None:
        groups = _tokenize_groups(value)
        tokens = groups[0]
        if not tokens:
            return  # an empty Content-Type changes nothing (mime_state.c)
        subtype = b""
        if len(tokens) >= 3 and tokens[1].kind == "/" and tokens[2].kind == "atom":
            subtype = tokens[2].value.lower()
        if _is_atom(tokens[0], b"text"):
            self._kind = _Kind.TEXT
        elif _is_atom(tokens[0], b"message"):
            self._kind = {b"rfc822": _Kind.RFC822, b"global": _Kind.GLOBAL}.get(
                subtype, _Kind.MESSAGE
            )
        elif _is_atom(tokens[0], b"multipart"):
            self._kind = _Kind.MULTIPART
            child = _Kind.RFC822 if subtype == b"digest" else _Kind.TEXT
            # Every boundary parameter counts, as in mime_state.c: several
            # are illegal, but one of them may be the one the sender uses.
            for params in groups[1:]:
                if (
                    len(params) >= 3
                    and _is_atom(params[0], b"boundary")
                    and params[1].kind == "="
                ):
                    self._push(params[2].value, child)
        else:
            self._kind = _Kind.OTHER

    def _push(self, boundary: bytes, child: _Kind) -> None:
        # mime_state.c starts its nesting level at -1 and refuses a push
        # once the level is above the limit.
        if len(self._stack) - 1 > self.nesting_limit:
            if self._error is None:
                self._error = MimeError("MIME nesting exceeds safety limit")
            return
        self._stack.append(_Multipart(boundary[: self.boundary_length_limit], child))

    def _end_header_block(self) -> None:
        """Write the new Content-Transfer-Encoding header, if one is due."""
        self._finish_header()
        if self._domain is _Domain.SEVEN:
            return
        if self._kind in (_Kind.MULTIPART, _Kind.RFC822):
            self._out.append(b"Content-Transfer-Encoding: 7bit\n")
        else:
            self._out.append(b"Content-Transfer-Encoding: quoted-printable\n")

    # --------------------------------------------------- quoted-printable

    def _qp_encode_record(self, text: bytes, is_cont: bool) -> None:
        """Append one line (or piece) of a converted part, RFC 2045 6.7."""
        self._qp_emit(_qp_escape(text), is_cont)

    def _qp_emit(self, encoded: bytes, is_cont: bool) -> None:
        """Append one escaped line (or piece): soft breaks, trailing blanks."""
        if (
            len(encoded) <= _QP_BREAK_AFTER
            and not is_cont
            and not self._qp_line
            and encoded[-1:] not in (b" ", b"\t")
        ):
            self._out.append(encoded + b"\n")  # the common short line
            return
        line = self._qp_line + encoded if self._qp_line else encoded
        out = self._out
        lead = b""  # "=2D" in place of a "-" that starts a soft-broken line
        start, end = 0, len(line)
        while True:
            room = _QP_BREAK_AFTER - len(lead)
            if end - start <= room:
                break
            # Break at the first octet boundary at or past column 73 that is
            # not inside an "=XX" escape ("=" only ever starts an escape).
            cut = start + room
            if line[cut - 1] == _EQUALS:
                cut += 2
            elif line[cut - 2] == _EQUALS:
                cut += 1
            if cut >= end:
                break  # the line may end here: no soft break (yet)
            out.append(lead + line[start:cut] + b"=\n")
            start = cut
            if line[start] == _DASH:
                # Never start a soft-broken line with "-": it could turn a
                # "--boundary" from the middle of a line into a delimiter.
                lead = b"=2D"
                start += 1
            else:
                lead = b""
        rest = lead + line[start:] if (lead or start) else line
        if is_cont:
            self._qp_line = rest
            return
        self._qp_line = b""
        if rest and rest[-1] in (0x20, 0x09):
            # Blanks before a line end are encoded (RFC 2045 6.7, rule 3).
            rest = rest[:-1] + (b"=20\n" if rest[-1] == 0x20 else b"=09\n")
            out.append(rest)
        else:
            out.append(rest + b"\n")


def _qp_escape(text: bytes) -> bytes:
    """Escape the octets of one line (no line end) that QP must escape.

    binascii.b2a_qp does it in C; we undo its soft line breaks (ours are
    made by the caller, Postfix's way) and keep it from escaping a final
    blank (a sentinel octet) since a piece of a long line is not a line
    end.  It also escapes a "." that starts one of its own lines and is
    followed by CR or NUL; those rare lines take the slower regular
    expression, so that the output never depends on where lines are cut.
    """
    if _QP_UNSAFE.search(text) is None:
        return text
    if b".\r" in text or b".\x00" in text:
        return _QP_UNSAFE.sub(_qp_escape_run, text)
    return binascii.b2a_qp(text + b"x", istext=False).replace(b"=\n", b"")[:-1]


def _qp_escape_lines(lines: list[bytes]) -> list[bytes]:
    """``_qp_escape`` of each line, CR of a CRLF removed, in one C call.

    The lines are joined with \\x01, which b2a_qp escapes as "=01" (a
    literal "=" becomes "=3D", so "=01" can come from nothing else); when
    a line holds \\x01 itself, or one of the rare sequences that make
    b2a_qp's output depend on its own line breaks, each line is done alone.
    """
    joined = b"\x01".join(lines).replace(b"\r\x01", b"\x01")
    if joined[-1:] == b"\r":
        joined = joined[:-1]
    if joined.count(b"\x01") != len(lines) - 1 or b".\r" in joined or b".\x00" in joined:
        return [_qp_escape(line[:-1] if line[-1:] == b"\r" else line) for line in lines]
    encoded = binascii.b2a_qp(joined + b"x", istext=False).replace(b"=\n", b"")
    return encoded[:-1].split(b"=01")


def convert_to_7bit(data: bytes, **limits: int) -> bytes:
    """Convert a whole message at once (for tests and small messages)."""
    converter = SevenBitConverter(**limits)
    return converter.feed(data) + converter.close()
