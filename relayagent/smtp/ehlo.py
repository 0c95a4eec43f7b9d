"""
The EHLO reply, parsed: which service extensions a server offers.

A pure function of the reply's lines, as Postfix's smtp_helo() reads them:
the first line is the server's name, every later line a keyword with its
argument ("SIZE 10240000", "AUTH=LOGIN PLAIN"); keywords in any case; the
mechanisms of every AUTH line merged (some servers send "AUTH" and
"AUTH=" lines both).  A line that is not a keyword is left out.

SYNOPSIS

    offered = parse_ehlo(reply.message_lines())
    offered.extensions["SIZE"], offered.auth_mechanisms
    announced_size(offered.extensions)    # SIZE's limit, or None

DIAGNOSTICS: none; whatever the lines say is what is offered.

Owns no parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_KEYWORD_RE = re.compile(r"\s*([^\s=]+)[\s=]?(.*)$")


@dataclass(frozen=True)
class Extensions:
    """``extensions``: keyword (upper case) -> its argument; AUTH's is the
    merged, sorted mechanism list.  ``auth_mechanisms``: those mechanisms."""

    extensions: dict[str, str]
    auth_mechanisms: frozenset[str]


NONE = Extensions({}, frozenset())


def announced_size(extensions: dict[str, str]) -> int | None:
    """The SIZE a server announced, None when absent, zero or bad."""
    value = extensions.get("SIZE", "").split()
    if value and value[0].isdigit() and int(value[0]) > 0:
        return int(value[0])
    return None


def parse_ehlo(lines: Sequence[str]) -> Extensions:
    """The extensions in an EHLO reply's lines (their text after the code)."""
    extensions: dict[str, str] = {}
    mechanisms: set[str] = set()
    for text in lines[1:]:
        match = _KEYWORD_RE.match(text)
        if match is None:
            continue
        keyword, argument = match.group(1).upper(), match.group(2).strip()
        if keyword == "AUTH":
            mechanisms.update(m.upper() for m in argument.split())
            argument = " ".join(sorted(mechanisms))
        extensions[keyword] = argument
    return Extensions(extensions, frozenset(mechanisms))
