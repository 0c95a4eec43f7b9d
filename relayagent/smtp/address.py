"""
The addresses and parameters of MAIL FROM and RCPT TO: the path as
RFC 5321 wants it, xtext (RFC 3461) and utf-8-addr-xtext (RFC 6533) for
ENVID and ORCPT, and whether a delivery needs a server with SMTPUTF8.

Pure functions, no I/O but ``requires_smtputf8``'s look at the message
header (only for SMTPUTF8 mail).

SYNOPSIS
    smtp_path("a b@example.com")         -> '<"a b"@example.com>'
    xtext("a+b=c")                       -> "a+2Bb+3Dc"
    uxtext("dé")                         -> "d\\x{E9}"
    orcpt_parameter(recipient)           -> "rfc822;a@example.com" | "utf-8;..." | None
    requires_smtputf8(envelope, recipients) -> bool

DIAGNOSTICS
    ``smtp_path`` raises ValueError for an address that could inject a
    command (CR, LF, NUL ...): the spool refuses those, so it is a bug.

Owns no parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from relayagent.common.envelope import DOT_ATOM_RE, Envelope, Recipient, address_problem

# What xtext (RFC 3461 4) leaves alone: "!" to "~" but "+" and "=".
_XCHAR_RE = re.compile(rb"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*")
_NOT_XCHAR_RE = re.compile(rb"[^\x21-\x2a\x2c-\x3c\x3e-\x7e]")


def xtext(value: str) -> str:
    """RFC 3461 xtext: "+" "=" controls, space and non-ASCII as +HH.
    (Once per recipient of every transaction: the common all-plain value
    costs one regex match.)"""
    raw = value.encode("utf-8")
    if _XCHAR_RE.fullmatch(raw):
        return value
    return _NOT_XCHAR_RE.sub(lambda m: b"+%02X" % m.group()[0], raw).decode("ascii")


def smtp_path(address: str) -> str:
    """``<address>``, the local part quoted when it is not a dot-atom
    (Postfix's smtp_quote_821_env, RFC 5321 4.1.2)."""
    if not address:
        return "<>"
    if address_problem(address):
        # The spool refuses such addresses and the queue-file reader calls
        # them corrupt: reaching here is a bug, never a command to inject.
        raise ValueError(f"address {address!r} {address_problem(address)}")
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if local and not (local.startswith('"') and local.endswith('"')) and not DOT_ATOM_RE.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"<{local}{at}{domain}>"


def uxtext(value: str) -> str:
    """RFC 6533 utf-8-addr-xtext: "+", "=", "\\", controls, space and
    non-ASCII as \\x{HEX}, so the ORCPT of a UTF-8 address is ASCII."""
    out = []
    for char in value:
        point = ord(char)
        if 0x21 <= point <= 0x7E and char not in "+=\\":
            out.append(char)
        else:
            out.append(f"\\x{{{point:X}}}")
    return "".join(out)


def orcpt_parameter(recipient: Recipient, quoted: str | None = None) -> str | None:
    """The ORCPT= value for ``recipient``: the one it was queued with, else
    its own address as the original one (Postfix's orig_addr; nothing
    here rewrites addresses), ``rfc822;`` or, for a UTF-8 address,
    ``utf-8;`` (RFC 6533).  ``quoted``: the address as in its RCPT TO
    path, when the caller has it."""
    if recipient.orcpt:
        addr_type, _, address = recipient.orcpt.partition(";")
        if addr_type.strip().lower() == "utf-8":
            return "utf-8;" + uxtext(address)
        return xtext(recipient.orcpt)
    if not recipient.address:
        return None
    if quoted is None:
        quoted = smtp_path(recipient.address)[1:-1]
    if quoted.isascii():
        return xtext("rfc822;" + quoted)
    return "utf-8;" + uxtext(quoted)


# How much of the content is read, at most, to see whether its header is
# all ASCII (only for SMTPUTF8 mail to a server without SMTPUTF8).
_HEADER_SCAN_LIMIT = 256 * 1024


def requires_smtputf8(envelope: Envelope, recipients: Sequence[Recipient]) -> bool:
    """Whether this delivery needs a server with SMTPUTF8.

    Per delivery, not per message (Postfix's SMTPUTF8_README): the sender
    asked for SMTPUTF8, and the sender address, an address of this
    delivery's recipients, or the message header is not ASCII.  Mail
    whose UTF-8 is elsewhere (another recipient's address) goes to a
    server without SMTPUTF8 as plain mail."""
    if not envelope.smtputf8:
        return False
    if not envelope.sender.isascii() or not all(r.address.isascii() for r in recipients):
        return True
    return not _header_is_ascii(envelope)


def _header_is_ascii(envelope: Envelope) -> bool:
    """Whether the message header (up to the first empty line) is ASCII;
    unreadable or over ``_HEADER_SCAN_LIMIT`` counts as not."""
    try:
        with envelope.open_content() as stream:
            head = stream.read(_HEADER_SCAN_LIMIT)
    except Exception:  # noqa: BLE001 - the body producer reports the queue file's trouble
        return False
    end = min((i for i in (head.find(b"\n\n"), head.find(b"\r\n\r\n")) if i >= 0), default=-1)
    if end < 0:
        if len(head) >= _HEADER_SCAN_LIMIT:
            return False
        end = len(head)  # a message that is all header
    return head[:end].isascii()
