"""
Tricky messages for interop tests, and how to check that one arrived intact.

Each ``Case`` is a message as it is queued (header and body, LF or CRLF line
ends, exactly the octets handed to ``Spool.enqueue``) with a unique
Message-ID, so that a test can find it among what a server stored.  A
server stores a message with LF line ends and its own trace fields
(Received, Return-Path, Delivered-To) on top; ``arrived_intact`` checks
that what it stored is exactly the queued message after that, line ends
aside, and says what differs when it is not.

    case = corpus.case("leading_dots", tag="exim")
    queue_id = spool.enqueue(SENDER, case.recipients, case.content)
    ...
    stored = server.find(case.message_id)
    problem = corpus.arrived_intact(stored.content, case.content)   # None when intact

``CASES`` names every case; ``TRACE_FIELDS`` lists the header fields a
server may add above the message.
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
from collections.abc import Callable
from dataclasses import dataclass

SENDER = "sender@example.org"
# Header fields that receiving servers put on top of a message they store
# (RFC 5321 section 4.4 trace fields, and the local delivery agent's
# Delivered-To); nothing else may be added.
TRACE_FIELDS = frozenset({"received", "return-path", "delivered-to"})

UTF8_TEXT = "Grüße aus Köln – fünf € für das Café, ½ Größe; 日本語のテキスト; emoji 🎉\n"


@dataclass(frozen=True)
class Case:
    """One queued message: its content, its recipients and how to find it."""

    name: str
    content: bytes
    message_id: str
    recipients: tuple[str, ...] = ("rcpt@example.com",)
    eight_bit: bool = False  # has 8bit text parts (converted without 8BITMIME)


def _header(name: str, message_id: str, extra: str = "") -> bytes:
    # Date and Message-ID present: servers add them when missing (OpenSMTPD
    # does, at the end of the header), which would change the message.
    return (
        f"From: Sender <{SENDER}>\n"
        "To: Recipient <rcpt@example.com>\n"
        f"Subject: interop {name}\n"
        "Date: Tue, 01 Dec 2026 12:00:00 +0000\n"
        f"Message-ID: <{message_id}>\n" + extra
    ).encode()


def _simple(name: str, mid: str) -> bytes:
    return _header(name, mid) + b"\nA plain short message.\nTwo lines.\n"


def _leading_dots(name: str, mid: str) -> bytes:
    # Dot-stuffing: every line that starts with "." must get a second one
    # on the wire, and lose it again at the server.
    return _header(name, mid) + (
        b"\n.leading dot\n..two dots\n...three\n. dot space\n.\t.tab\n"
        b"a line.\n.\nafter a lone dot\n..\n"
        b".\n"  # a lone "." as the last line
    )


def _lone_dot(name: str, mid: str) -> bytes:
    # A line of exactly "." in the middle: unstuffed it would end DATA there.
    return _header(name, mid) + b"\nbefore\n.\nafter the dot that is not the end\n"


def _crlf(name: str, mid: str) -> bytes:
    return (_header(name, mid) + b"\nline one\nline two\n.dotted\n\nlast\n").replace(b"\n", b"\r\n")


def _mixed_line_ends(name: str, mid: str) -> bytes:
    return _header(name, mid).replace(b"\n", b"\r\n", 2) + b"\nlf\r\ncrlf\nlf\r\n.crlf dot\n.lf dot\n\r\nend\n"


def _line_998(name: str, mid: str) -> bytes:
    # RFC 5322's limit: 998 octets, CRLF excluded. It must not be folded.
    long_line = b"".join(bytes([33 + i % 94]) for i in range(998))
    dotted = b"." + long_line[1:]
    return _header(name, mid) + b"\n" + long_line + b"\n" + dotted + b"\nshort\n"


def _utf8_body(name: str, mid: str) -> bytes:
    extra = (
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
    )
    return _header(name, mid, extra) + ("\n" + UTF8_TEXT + ".ünicode after a dot\n= equals sign\n").encode()


def _no_final_newline(name: str, mid: str) -> bytes:
    return _header(name, mid) + b"\nthe last line has no line end"


def _empty_body(name: str, mid: str) -> bytes:
    # The header and the blank line after it, no body at all.
    return _header(name, mid) + b"\n"


def _large(name: str, mid: str) -> bytes:
    # About 2 MB: many writes and reads, dots at buffer boundaries.
    lines = []
    size = 0
    number = 0
    while size < 2 * 1024 * 1024:
        text = f"{number:07d} " + "abcdefghij" * (number % 9)
        line = ("." + text if number % 5 == 0 else text).encode() + b"\n"
        lines.append(line)
        size += len(line)
        number += 1
    return _header(name, mid) + b"\n" + b"".join(lines)


def _many_recipients(name: str, mid: str) -> bytes:
    return _header(name, mid) + b"\nfor a hundred recipients\n"


def _multipart(name: str, mid: str) -> bytes:
    attachment = base64.encodebytes(bytes(range(256)) * 8).decode()
    extra = (
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="outer-boundary"\n'
    )
    body = (
        "\nThis is the preamble.\n"
        ".a preamble line with a dot\n"
        "--outer-boundary\n"
        'Content-Type: multipart/alternative; boundary="inner"\n'
        "\n"
        "--inner\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        "plain part\n"
        ".\n"
        "--inner\n"
        "Content-Type: text/html; charset=us-ascii\n"
        "\n"
        "<p>html part</p>\n"
        "--inner--\n"
        "--outer-boundary\n"
        "Content-Type: application/octet-stream\n"
        'Content-Disposition: attachment; filename="bytes.bin"\n'
        "Content-Transfer-Encoding: base64\n"
        "\n" + attachment + "--outer-boundary--\n"
        "The epilogue.\n"
    )
    return _header(name, mid, extra) + body.encode()


def _multipart_8bit(name: str, mid: str) -> bytes:
    extra = (
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b8"\n'
    )
    body = (
        "\n--b8\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n" + UTF8_TEXT + "--b8\n"
        "Content-Type: text/plain; charset=us-ascii\n"
        "\n"
        "seven bit part\n"
        "--b8--\n"
    )
    return _header(name, mid, extra) + body.encode()


_BUILDERS: dict[str, Callable[[str, str], bytes]] = {
    "simple": _simple,
    "leading_dots": _leading_dots,
    "lone_dot": _lone_dot,
    "crlf": _crlf,
    "mixed_line_ends": _mixed_line_ends,
    "line_998": _line_998,
    "utf8_body": _utf8_body,
    "no_final_newline": _no_final_newline,
    "empty_body": _empty_body,
    "large": _large,
    "many_recipients": _many_recipients,
    "multipart": _multipart,
    "multipart_8bit": _multipart_8bit,
}
CASES = tuple(_BUILDERS)
EIGHT_BIT_CASES = frozenset({"utf8_body", "multipart_8bit"})


def case(name: str, *, tag: str = "t") -> Case:
    """A fresh copy of case ``name`` with a Message-ID no other run has."""
    message_id = f"{name}.{tag}.{os.urandom(6).hex()}@relayagent.test"
    recipients: tuple[str, ...] = ("rcpt@example.com",)
    if name == "many_recipients":
        # Two domains, so that nexthop grouping is not what keeps them together.
        recipients = tuple(f"r{n:03d}@{'example.com' if n % 2 else 'example.net'}" for n in range(100))
    return Case(
        name=name,
        content=_BUILDERS[name](name, message_id),
        message_id=message_id,
        recipients=recipients,
        eight_bit=name in EIGHT_BIT_CASES,
    )


def on_the_wire(content: bytes) -> bytes:
    """What a server that stores LF line ends must store for ``content``:
    CRLF and LF both become LF, and the last line gets its line end (the
    client must add one before the final ".")."""
    text = content.replace(b"\r\n", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    return text


def split_trace(stored: bytes, expected_length: int) -> tuple[bytes, bytes]:
    """``stored`` as (what the server added on top, the rest), the rest
    being the last ``expected_length`` octets."""
    cut = len(stored) - expected_length
    if cut < 0:
        return b"", stored
    return stored[:cut], stored[cut:]


def trace_field_names(added: bytes) -> list[str]:
    """The names of the header fields in ``added`` (folded lines joined);
    a line that is neither a field nor a continuation is named ``?line``."""
    names = []
    for line in added.split(b"\n"):
        if not line or line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        names.append(name.decode("ascii", "replace").strip().lower() if colon else "?" + line.decode(errors="replace"))
    return names


def arrived_intact(stored: bytes, queued: bytes) -> str | None:
    """None when ``stored`` is the queued message (line ends aside) under
    nothing but trace fields; else one line saying what is wrong."""
    expected = on_the_wire(queued)
    stored = stored.replace(b"\r\n", b"\n")
    added, rest = split_trace(stored, len(expected))
    if rest != expected:
        return describe_difference(rest, expected)
    extra = [name for name in trace_field_names(added) if name not in TRACE_FIELDS]
    if extra or (added and not added.endswith(b"\n")):
        return f"the server added more than trace fields above the message: {extra or added[-80:]!r}"
    return None


def describe_difference(got: bytes, expected: bytes) -> str:
    """Where ``got`` and ``expected`` first differ, with some context."""
    position = next(
        (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected))
    )
    start = max(0, position - 40)
    return (
        f"differs at octet {position} of {len(expected)} (stored {len(got)} octets): "
        f"expected {expected[start:position + 40]!r}, stored {got[start:position + 40]!r}"
    )


def decoded_text_parts(content: bytes) -> list[str]:
    """The decoded text of every text/* part of ``content``, in order (to
    compare a message converted to 7bit with the 8bit original)."""
    message = email.message_from_bytes(content.replace(b"\r\n", b"\n"), policy=email.policy.compat32)
    texts = []
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True) or b""
        charset = part.get_content_charset() or "us-ascii"
        texts.append(payload.decode(charset))
    return texts
