"""
The built-in SMTP listener: twisted.mail's ESMTP server feeding the spool.

``smtpd_endpoints`` (ours: Twisted server endpoint strings such as
``tcp:10587:interface=127.0.0.1``; empty, the default, means no listener)
makes ``twistd -n relayagent`` accept mail for relaying.  The server is
``twisted.mail.smtp.ESMTP`` with ``relayagent.smtpd.intake`` behind it, and a subclass (``RelayagentESMTP``) that adds what the stock
server lacks:

- SIZE (RFC 1870): advertised with ``message_size_limit``; ``MAIL FROM``
  with a larger ``SIZE=`` gets 552 5.3.4; a message that grows past the
  limit during DATA gets 552 5.3.4 at the final "." and nothing past the
  limit is stored (the glue stops writing and discards the file).
- 8BITMIME (RFC 6152): advertised; ``BODY=7BIT`` / ``BODY=8BITMIME``
  accepted and recorded in the queue file.
- PIPELINING (RFC 2920), made safe.  Twisted's server handles each line
  as it is parsed, even while the previous command's Deferred (sender or
  recipient validation, the enqueue at ".") is still pending, so with
  pipelined input a RCPT can be judged before its MAIL was accepted and
  replies can go out of order or be lost (a QUIT pipelined after "."
  closes the connection before the 250).  We hold further lines while
  such a Deferred is outstanding, and stop reading from the socket when
  too many lines are held.
- DSN (RFC 3461): advertised; RET= and ENVID= of MAIL, NOTIFY= and
  ORCPT= of each RCPT are checked (501 5.5.4 when malformed) and kept in
  the queue file, so that the notices this node sends, and the next
  hop's, are the ones the sender asked for.
- Unknown MAIL and RCPT parameters get 555 5.5.4 (RFC 5321 4.1.1.11);
  Twisted's server ignores them silently, so a client could believe a
  request was taken.
- STARTTLS (RFC 3207) with ``smtpd_tls_security_level = may`` or
  ``encrypt`` (``relayagent.smtpd.tls``: certificates, client
  certificates, ``relay_clientcerts``), in Postfix's words: 220 2.0.0,
  then the session starts over (no EHLO, transaction or AUTH of the
  plaintext part is kept, and any byte the client pipelined after
  STARTTLS is dropped unread: the command-injection attack); 554 5.5.1
  for a second STARTTLS, 502 5.5.1 when not offered.  At level
  ``encrypt`` every command but EHLO, HELO, STARTTLS, NOOP, QUIT and
  HELP gets 530 5.7.0 "Must issue a STARTTLS command first".  The
  handshake is logged as smtpd logs it (``Anonymous TLS connection
  established from unknown[192.0.2.1]: TLSv1.3 with cipher ...``).
- AUTH (RFC 4954) with ``smtpd_sasl_auth_enable``: CRAM-MD5 (RFC 2195)
  against ``smtpd_sasl_password_maps`` (username -> password); over TLS
  also PLAIN (RFC 4616) and LOGIN, never in plaintext; with
  ``smtpd_tls_auth_only`` (or at level ``encrypt``) no AUTH at all
  before STARTTLS (530 5.7.0).  Failures are 535 5.7.8 and one warning
  line naming the client and the username, never the response.
- XRELAYAGENT-ARRIVAL (ours, docs/fleet.rst): offered in the EHLO reply
  to an authenticated client only (by SASL, or by a client certificate
  listed in ``relay_clientcerts``; it says EHLO again after AUTH), it
  lets MAIL FROM carry ``ARRIVAL=<unix-time>``, the message's first
  arrival on the node it comes from (``relayagent transfer``), which
  the queue file keeps as its arrival time (a time in the future is
  taken as now).  From anyone else ARRIVAL= is an unknown parameter
  (555): an unauthenticated client cannot make its mail look old (and
  expire or bounce at once), as Postfix trusts XCLIENT and XFORWARD only
  from the hosts it is told to.
- A failed enqueue answers 451 4.3.0 (Twisted's answers 550 to any
  failure of a message receiver, turning a full disk into bounces), and
  MAIL FROM gets 452 4.3.1 while the queue file system is short of
  space (the glue's ``check_queue_space``: ``queue_minfree``, 1.5 x
  ``message_size_limit``), as from Postfix's smtpd.
- An over-long line ends the session with a 5xx reply (Twisted's server
  keeps buffering a line that never ends).
- DATA in bulk: past the message's first line, the lines of each read
  go to the intake in one call, the header's up to its empty line
  (``intake.header_writer``), then the body's up to the final "." in
  one piece (``intake.body_writer``), dot-unstuffed, the size limit
  checked as for a line; not one call chain per line and recipient
  through Twisted's ``dataLineReceived``.  The first line, the ".",
  and receivers that are not the intake's (twisted.mail local domains)
  take Twisted's path.
- REQUIRETLS (RFC 8689), with ``requiretls_enable``: offered in EHLO and
  taken on MAIL FROM only in an encrypted session, and recorded in the
  queue file: after STARTTLS, or on an implicit-TLS endpoint of
  ``smtpd_endpoints`` (``ssl:10465:privateKey=key.pem:
  certKey=cert.pem``).  In plaintext,
  REQUIRETLS is not offered and ``MAIL FROM:<...> REQUIRETLS`` gets
  555 5.5.4 as any unknown option (as from Postfix's smtpd).

With ``relayagent_workers`` > 1 every worker accepts on the listening
sockets (``relayagent/master/worker.py``, "Listener").  Each endpoint is
made on a ``ListenerReactor``: in worker 0 it binds as always and the
port it bound is kept (``SharedListener.descriptor``); in another
worker, given worker 0's descriptor (``SharedListener.listen_on``), the
same endpoint adopts it instead of binding, under TLS for ``ssl:``
(the endpoint's own context factory), with that worker's copy of the
factory, whose intake queues into that worker's spool
(``daemon.intake_spool``) and wakes that worker's queue manager
(``daemon.listener_queued``).  ``tcp:``, ``tcp6:`` and ``ssl:``
endpoints are shared; ``unix:`` and ``systemd:`` ones listen in worker
0 alone (see the worker module).  No limit here is per listener: the
ones above are per session or per message.

Relaying is the intake's rule: clients in ``mynetworks`` (default
loopback only), authenticated by SASL, or showing a client certificate
listed in ``relay_clientcerts``; anyone else gets 554 5.7.1 for every
recipient.

SYNOPSIS

    listeners = daemon_listener_services(config, daemon, reactor)  # SharedListener per entry
    listener.service; listener.descriptor() -> (fd, family) | None; listener.listen_on(fd, family)
    make_listener_services(config, spool, trigger, reactor=reactor)
    ListenerFactory(intake, config);  MailServiceESMTPFactory(service, portal, config)
    RelayagentESMTP (the server protocol);  parse_esmtp_parameters(text)

DIAGNOSTICS: replies to the client, never exceptions: 552 5.3.4 (size),
555 5.5.4 (unknown parameter, REQUIRETLS in plaintext), 501 5.5.4 (a
malformed DSN or ARRIVAL parameter), 535 5.7.8 (AUTH failed), 530 5.7.0
(STARTTLS first), 504 5.5.4 (a mechanism not offered now), 452 4.3.1
(short of space), 451 4.3.0 (the spool failed), 554 5.7.1 (relaying
denied), 5xx for an over-long line.
``SharedListener.listen_on`` raises what the reactor raises for a
descriptor it cannot adopt, and ValueError for an endpoint that is
neither TCP nor TLS.  A bad ``smtpd_endpoints`` string fails at start-up in Twisted's
``strports.service`` (``ValueError``), a bad ``smtpd_tls_*`` setting in
``ServerTLS.from_config`` (``TLSConfigError``, a ``ValueError``).

Owns: smtpd_endpoints, smtpd_banner, smtpd_sasl_auth_enable,
smtpd_sasl_password_maps.  Reads message_size_limit, requiretls_enable,
the smtpd_tls_* parameters (relayagent.smtpd.tls owns them),
myhostname (and, through the glue, mynetworks, hopcount_limit and
queue_minfree).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.application import strports
from twisted.application.service import IService
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import imap4, protocols, smtp
from twisted.mail.interfaces import IMessageDeliveryFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.compat import networkString
from zope.interface import implementer

from relayagent.common import maillog as ralog
from relayagent.common.config import Config, Settings
from relayagent.common.envelope import BodyType, Notify, Ret
from relayagent.common.maps import MapList, open_maps
from relayagent.smtp.sasl import warn_if_world_readable
from relayagent.smtpd.intake import (
    QUEUE_WRITE_ERROR,
    Intake,
    RelayDeliveryFactory,
    body_writer,
    describe_client,
    header_writer,
)
from relayagent.smtpd.replies import ReplyWriter
from relayagent.smtpd.tls import MUST_STARTTLS, PRE_TLS_COMMANDS, ServerTLS
from relayagent.spool import Spool
from relayagent.spool.nonblocking import ThreadedIncomingMessage, ThreadedSpool

log = Logger(namespace="relayagent.smtpd.listener")

# The longest line we take: RFC 5321 allows 1000 octets; this is generous
# for broken clients and still bounds the memory one connection can hold.
MAX_LINE_LENGTH = 65536
# Held lines (pipelined commands waiting for an earlier reply) before we
# stop reading the socket.
MAX_HELD_LINES = 1000

_PARAMETER = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")


# The EHLO keyword and MAIL parameter of the arrival-time extension.
ARRIVAL_KEYWORD = b"XRELAYAGENT-ARRIVAL"
ARRIVAL_PARAMETER = "ARRIVAL"
# RFC 3461 4.4: ENVID is at most 100 characters.
MAX_ENVID_LENGTH = 100
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


def decode_xtext(text: str) -> str:
    """RFC 3461 xtext decoded (``+2B`` is "+").  Raises ValueError for a
    "+" that is not followed by two upper-case hex digits, or for a
    character xtext does not allow."""
    if any(not 33 <= ord(c) <= 126 or c == "=" for c in text):
        raise ValueError("bad xtext")
    if "+" in _XTEXT_HEX.sub("", text):
        raise ValueError("bad xtext")
    return _XTEXT_HEX.sub(lambda match: chr(int(match.group(1), 16)), text)


def parse_orcpt(value: str) -> str:
    """An ORCPT= value as the queue file keeps it: ``addr-type;address``
    with the address xtext-decoded.  Raises ValueError when malformed."""
    addr_type, sep, address = value.partition(";")
    if not sep or not addr_type or not address or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", addr_type):
        raise ValueError("bad ORCPT")
    if addr_type.lower() == "utf-8":
        decoded = address  # RFC 6533 utf-8-addr-xtext: kept as given
    else:
        decoded = decode_xtext(address)
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        raise ValueError("bad ORCPT")
    return f"{addr_type};{decoded}"


def parse_esmtp_parameters(text: bytes | None) -> list[tuple[str, str | None]]:
    """``KEY=VALUE KEY ...`` of MAIL/RCPT (RFC 5321 4.1.2 esmtp-param).
    Raises ValueError on bad syntax."""
    result: list[tuple[str, str | None]] = []
    for word in (text or b"").split():
        match = _PARAMETER.match(word)
        if match is None:
            raise ValueError(word.decode("ascii", "replace"))
        key, value = match.groups()
        result.append((key.decode("ascii").upper(),
                       value.decode("ascii") if value is not None else None))
    return result


# smtpd's commands in the order of its command table (smtpd.c), for the
# counts of "disconnect from ... ehlo=1 mail=1 rcpt=1 data=1 quit=1
# commands=5"; anything else counts as "unknown".
_COUNTED_COMMANDS = ("helo", "ehlo", "xclient", "xforward", "starttls", "auth", "mail", "rcpt",
                     "data", "bdat", "rset", "noop", "vrfy", "etrn", "quit", "help")


def format_command_stats(counts: dict[str, list[int]]) -> str:
    """smtpd_format_cmd_stats: `` ehlo=1 mail=1 rcpt=0/1 commands=2/3``
    (successes, and the total where they differ), ``counts``: command ->
    [successes, total]."""
    parts = []
    success = total = 0
    for name in (*_COUNTED_COMMANDS, "unknown"):
        ok, seen = counts.get(name, (0, 0))
        if seen:
            parts.append(f" {name}={ok}" if ok == seen else f" {name}={ok}/{seen}")
            success += ok
            total += seen
    parts.append(f" commands={success}" if success == total and total else f" commands={success}/{total}")
    return "".join(parts)


# SASL mechanisms that send the password itself: offered over TLS only.
PLAINTEXT_MECHANISMS = frozenset({b"PLAIN", b"LOGIN"})


@implementer(IHandshakeListener)
class RelayagentESMTP(smtp.ESMTP):
    """twisted.mail's ESMTP server with SIZE, 8BITMIME, safe PIPELINING,
    STARTTLS as Postfix's smtpd does it, and smtpd's ``connect from`` /
    ``disconnect from`` lines."""

    message_size_limit = 0
    banner: bytes | None = None
    # Twisted's own "Receiving message for delivery" line; the glue logs
    # each queued message with its queue id instead.
    noisy = False
    MAX_LENGTH = MAX_LINE_LENGTH

    # Read by relayagent.smtpd.twistedmail: how the client greeted (for the
    # Received header's "with") and what BODY= its MAIL declared.
    relayagent_esmtp = False
    relayagent_body_type: BodyType | None = None
    # Read by relayagent.smtpd.intake: the DSN parameters of MAIL and the
    # first arrival an authenticated peer gave (XRELAYAGENT-ARRIVAL).
    relayagent_envid: str | None = None
    relayagent_ret: Ret | None = None
    relayagent_arrival: float | None = None
    relayagent_sasl_username: str | None = None
    # Read by relayagent.smtpd.intake: MAIL FROM carried REQUIRETLS.
    relayagent_requiretls = False
    requiretls_enable = True
    # The listener's TLS (relayagent.smtpd.tls), None without STARTTLS.
    server_tls: ServerTLS | None = None
    # The SASL mechanism that authenticated the client, for the log.
    relayagent_sasl_method: str | None = None
    # A client certificate listed in relay_clientcerts: relays as an
    # authenticated client does (read by the intake's relay policy).
    relayagent_clientcert_relay = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # ORCPT and NOTIFY of the RCPT being validated (validateTo).
        self._rcpt_dsn: tuple[str | None, Notify] = (None, Notify.DEFAULT)
        self._unparsed = b""
        self._held_lines: deque[bytes] = deque()
        self._holding = False
        self._draining = False
        self._reading_paused = False
        # The command whose first reply decides its success, and the
        # counts for the "disconnect from" line.
        self._counting: str | None = None
        self._command_counts: dict[str, list[int]] = {}
        self._tls_creator: Any = None
        self._tls_established = False

    def connectionMade(self) -> None:
        """smtpd's ``connect from host[addr]``, then the greeting."""
        ralog.log_connect(log, describe_client(self.transport.getPeer()))
        self._replies = ReplyWriter(self.transport)
        super().connectionMade()
        # Ours (smtpd_tls_*), or a context factory given to Twisted's
        # ESMTP (a twisted.mail server's own ``ctx``).
        self.canStartTLS = ((self.server_tls is not None or self.ctx is not None)
                            and ITLSTransport.providedBy(self.transport))

    def state_COMMAND(self, line: bytes) -> None:
        """Count the command for the ``disconnect from`` line, then run
        it (at level encrypt, only the commands allowed before STARTTLS
        until it is done)."""
        verb = line.split(None, 1)[0].decode("ascii", "replace").lower() if line.strip() else ""
        name = verb if verb in _COUNTED_COMMANDS else "unknown"
        self._command_counts.setdefault(name, [0, 0])[1] += 1
        self._counting = name
        if (self.server_tls is not None and self.server_tls.required and not self.encrypted
                and name not in PRE_TLS_COMMANDS):
            self.sendCode(*MUST_STARTTLS)
            return
        super().state_COMMAND(line)

    def sendLine(self, line: bytes) -> None:
        """One line of a reply, through the session's ``ReplyWriter``
        (``relayagent.smtpd.replies``): at once on the socket, or with
        the other replies to the lines of one read."""
        self._replies.write(line + self.delimiter)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Send a reply; the first one to a command decides its success
        (below 400) in the counts."""
        name, self._counting = self._counting, None
        if name is not None and code < 400:
            self._command_counts[name][0] += 1
        if code == 235 and message == b"Authentication successful.":
            message = b"2.7.0 Authentication successful"  # Postfix's (Twisted's has no enhanced code)
        super().sendCode(code, message)

    # -- greeting and EHLO

    def greeting(self) -> bytes:
        """The 220 text: ``smtpd_banner`` when set, else Twisted's."""
        if self.banner is not None:
            return self.banner
        return super().greeting()

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        """The EHLO keywords offered now (STARTTLS, AUTH and REQUIRETLS
        depend on the session's TLS, XRELAYAGENT-ARRIVAL on its
        authentication)."""
        extensions = super().extensions()
        extensions.pop(b"STARTTLS", None)
        if self.canStartTLS and not self.encrypted:
            extensions[b"STARTTLS"] = None
        mechanisms = self.sasl_mechanisms()
        if mechanisms:
            extensions[b"AUTH"] = mechanisms
        else:
            extensions.pop(b"AUTH", None)
        limit = self.message_size_limit
        extensions[b"SIZE"] = [str(limit).encode("ascii")] if limit else None
        extensions[b"8BITMIME"] = None
        extensions[b"PIPELINING"] = None
        extensions[b"DSN"] = None
        if self.may_give_arrival:
            extensions[ARRIVAL_KEYWORD] = None
        if self.requiretls_enable and self.encrypted:
            # RFC 8689 section 3: only in a session protected by TLS.
            extensions[b"REQUIRETLS"] = None
        return extensions

    @property
    def encrypted(self) -> bool:
        """Whether the session runs over TLS: an implicit-TLS endpoint
        (``ssl:``), or STARTTLS done."""
        return bool(self.startedTLS) or ISSLTransport.providedBy(self.transport)

    @property
    def may_give_arrival(self) -> bool:
        """Authenticated by SASL or by a client certificate listed in
        ``relay_clientcerts``: XRELAYAGENT-ARRIVAL is offered and taken."""
        return bool(self.authenticated) or self.relayagent_clientcert_relay

    def sasl_mechanisms(self) -> list[bytes]:
        """The AUTH mechanisms offered now: none before STARTTLS with
        ``smtpd_tls_auth_only``, PLAIN and LOGIN only over TLS."""
        if not self.challengers:
            return []
        encrypted = self.encrypted
        if self.server_tls is not None and self.server_tls.auth_only and not encrypted:
            return []
        return [name for name in self.challengers if encrypted or name not in PLAINTEXT_MECHANISMS]

    # -- STARTTLS (RFC 3207), as Postfix's smtpd

    def ext_STARTTLS(self, rest: bytes) -> None:
        """Postfix's replies; after 220 nothing of the plaintext session
        is kept: not the EHLO, a transaction, an AUTH, nor a byte the
        client sent after the command (the STARTTLS command-injection
        attack, CVE-2011-0411: such bytes must never be taken as sent
        over TLS)."""
        if rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: STARTTLS")
            return
        if self.encrypted:
            self.sendCode(554, b"5.5.1 Error: TLS already active")
            return
        if not self.canStartTLS:
            self.sendCode(502, b"5.5.1 Error: command not implemented")
            return
        self.sendCode(220, b"2.0.0 Ready to start TLS")
        # vstream_fpurge in Postfix: the pipelined plaintext is dropped.
        self._held_lines.clear()
        self._unparsed = b""
        self._reset_session()
        # The 220 goes out in plaintext, and nothing after it but through TLS.
        self._replies.stop_writing_through()
        if self.server_tls is not None:
            self._tls_creator = self.server_tls.connection_creator()
            self.transport.startTLS(self._tls_creator)
        else:
            self.transport.startTLS(self.ctx)
        self.startedTLS = True

    def _reset_session(self) -> None:
        """RFC 3207 section 4.2: discard what the client told us."""
        self._helo = None
        self._from = None
        self._to = []
        self.relayagent_esmtp = False
        self.authenticated = False
        self.relayagent_sasl_username = None
        self.relayagent_sasl_method = None
        self.relayagent_clientcert_relay = False

    def handshakeCompleted(self) -> None:
        """smtpd's ``... TLS connection established from ...`` line, and
        the client certificate judged against ``relay_clientcerts``."""
        if self.server_tls is None:
            return
        connection = self._tls_creator.connection if self._tls_creator is not None else None
        if connection is None:
            handle = getattr(self.transport, "getHandle", lambda: None)()
            connection = handle if isinstance(handle, SSL.Connection) else None
        self._tls_established = True
        examined = self.server_tls.examine(connection)
        self.relayagent_clientcert_relay = self.server_tls.permits_relay(examined)
        ralog.log_line(log, "smtpd", "{text}", text=examined.describe(_client_name(self)))

    def ext_AUTH(self, rest: bytes) -> None:
        """AUTH with the mechanisms offered now (``sasl_mechanisms``)."""
        if self.authenticated:
            self.sendCode(503, b"5.5.1 Error: already authenticated")
            return
        offered = self.sasl_mechanisms()
        if not offered:
            if self.challengers and self.server_tls is not None and self.server_tls.auth_only:
                self.sendCode(*MUST_STARTTLS)
            else:
                self.sendCode(503, b"5.5.1 Error: authentication not enabled")
            return
        mechanism = (rest.split(None, 1) or [b""])[0].upper()
        if mechanism not in offered:
            self.sendCode(504, b"5.5.4 Unsupported authentication mechanism")
            return
        self.relayagent_sasl_method = mechanism.decode("ascii")
        super().ext_AUTH(rest)

    def do_EHLO(self, rest: bytes) -> None:
        """EHLO: Twisted's, noting that the client speaks ESMTP (for Received)."""
        self.relayagent_esmtp = True
        super().do_EHLO(rest)

    def do_HELO(self, rest: bytes) -> None:
        """HELO: Twisted's, noting that the client speaks SMTP only (for Received)."""
        self.relayagent_esmtp = False
        super().do_HELO(rest)

    # -- MAIL and RCPT parameters

    def do_MAIL(self, rest: bytes) -> None:
        """MAIL FROM with its ESMTP parameters (SIZE, BODY, RET, ENVID,
        REQUIRETLS over TLS, ARRIVAL from an authenticated relayagent, AUTH
        ignored), kept for the transaction; then Twisted's MAIL.  A bad or
        duplicate parameter gets 501, an unknown one 555, a SIZE over
        ``message_size_limit`` 552 5.3.4."""
        match = self.mail_re.match(rest)
        if self._from or match is None:
            super().do_MAIL(rest)  # Twisted's 503 / 501
            return
        try:
            parameters = parse_esmtp_parameters(match.group("opts"))
        except ValueError:
            self.sendCode(501, b"5.5.4 Bad MAIL parameter syntax")
            return
        body_type = None
        envid: str | None = None
        ret: Ret | None = None
        arrival: float | None = None
        seen: set[str] = set()
        requiretls = False
        for key, value in parameters:
            if key in seen:
                self.sendCode(501, networkString(f"5.5.4 Duplicate MAIL parameter: {key}"))
                return
            seen.add(key)
            if key == "RET":
                try:
                    ret = Ret((value or "").upper())
                except ValueError:
                    self.sendCode(501, b"5.5.4 Bad RET parameter syntax")
                    return
            elif key == "ENVID":
                try:
                    envid = decode_xtext(value or "")
                except ValueError:
                    envid = None
                if not envid or len(envid) > MAX_ENVID_LENGTH or not envid.isprintable():
                    self.sendCode(501, b"5.5.4 Bad ENVID parameter syntax")
                    return
            elif key == ARRIVAL_PARAMETER and self.may_give_arrival:
                if value is None or not value.isdigit() or len(value) > 12:
                    self.sendCode(501, b"5.5.4 Bad ARRIVAL parameter syntax")
                    return
                arrival = float(value)
            elif key == "SIZE":
                if value is None or not value.isdigit():
                    self.sendCode(501, b"5.5.4 Bad message size syntax")
                    return
                if self.message_size_limit and int(value) > self.message_size_limit:
                    self.sendCode(552, b"5.3.4 Message size exceeds fixed limit")
                    return
            elif key == "BODY":
                try:
                    body_type = BodyType((value or "").upper())
                except ValueError:
                    self.sendCode(501, b"5.5.4 Unsupported BODY parameter")
                    return
            elif key == "AUTH" and self.challengers:
                pass  # RFC 4954 5: we may ignore the AUTH= identity
            elif key == "REQUIRETLS" and value is None and self.requiretls_enable and self.encrypted:
                requiretls = True  # RFC 8689 section 4: no value
            else:
                self.sendCode(555, networkString(f"5.5.4 Unsupported option: {key}"))
                return
        self.relayagent_body_type = body_type
        self.relayagent_envid = envid
        self.relayagent_ret = ret
        self.relayagent_arrival = arrival
        self.relayagent_requiretls = requiretls
        super().do_MAIL(rest)

    def do_RCPT(self, rest: bytes) -> None:
        """RCPT TO with its DSN parameters (NOTIFY, ORCPT), kept for
        ``validateTo``; then Twisted's RCPT.  A bad or duplicate parameter
        gets 501, an unknown one 555."""
        match = self.rcpt_re.match(rest)
        if match is not None and self._from:
            try:
                parameters = parse_esmtp_parameters(match.group("opts"))
            except ValueError:
                self.sendCode(501, b"5.5.4 Bad RCPT parameter syntax")
                return
            orcpt: str | None = None
            notify = Notify.DEFAULT
            seen: set[str] = set()
            for key, value in parameters:
                if key in seen:
                    self.sendCode(501, networkString(f"5.5.4 Duplicate RCPT parameter: {key}"))
                    return
                seen.add(key)
                if key == "NOTIFY":
                    try:
                        notify = Notify.parse(value or "")
                    except ValueError:
                        self.sendCode(501, b"5.5.4 Bad NOTIFY parameter syntax")
                        return
                elif key == "ORCPT":
                    try:
                        orcpt = parse_orcpt(value or "")
                    except ValueError:
                        self.sendCode(501, b"5.5.4 Bad ORCPT parameter syntax")
                        return
                else:
                    self.sendCode(555, networkString(f"5.5.4 Unsupported option: {key}"))
                    return
            self._rcpt_dsn = (orcpt, notify)
        else:
            self._rcpt_dsn = (None, Notify.DEFAULT)
        super().do_RCPT(rest)

    # -- AUTH

    def _cbAuthenticated(self, login: Any) -> Any:
        username = getattr(self.challenger, "username", None)
        if isinstance(username, bytes):
            self.relayagent_sasl_username = _printable(username)
        return super()._cbAuthenticated(login)

    def _ebAuthenticated(self, reason: Any) -> None:
        if reason.check(error.UnauthorizedLogin):
            # Postfix's smtpd: one warning per failure, and 535 5.7.8.
            username = getattr(self.challenger, "username", None)
            ralog.log_warning(
                log,
                f"{_client_name(self)}: SASL {self.relayagent_sasl_method or 'CRAM-MD5'} authentication failed"
                + (f" for user {_printable(username)}" if username else ""),
                service="smtpd",
            )
            self.challenger = None
            self.sendCode(535, b"5.7.8 Error: authentication failed")
            return
        super()._ebAuthenticated(reason)

    # -- holding pipelined lines while a reply is pending

    def dataReceived(self, data: bytes) -> None:
        """Split a read into lines and handle them, their replies sent
        together when all are handled (as smtpd flushes once no input
        is waiting)."""
        with self._replies.batch():
            self._lines_received(data)

    def _lines_received(self, data: bytes) -> None:
        *lines, self._unparsed = (self._unparsed + data).split(self.delimiter)
        for index, line in enumerate(lines):
            if len(line) > self.MAX_LENGTH:
                self._held_lines.extend(lines[:index])
                self._drain()
                self._line_too_long()
                return
        self._held_lines.extend(lines)
        if len(self._unparsed) > self.MAX_LENGTH:
            self._drain()
            self._line_too_long()
            return
        self._drain()
        if len(self._held_lines) > MAX_HELD_LINES and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _drain(self) -> None:
        if self._draining:
            return  # the outer loop goes on once the hold is released
        self._draining = True
        try:
            while self._held_lines and not self._holding:
                if self.transport.disconnecting:
                    self._held_lines.clear()
                    return
                if self.mode == smtp.DATA and self._data_in_bulk():
                    continue
                self.lineReceived(self._held_lines.popleft())
        finally:
            self._draining = False
        if self._reading_paused and len(self._held_lines) < MAX_HELD_LINES // 2:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _data_in_bulk(self) -> bool:
        """In DATA past the message's first line: the held lines go to the
        intake in one call, as Twisted's ``dataLineReceived`` would give
        them one by one to each recipient's receiver (a leading "."
        removed; an ``SMTPServerError`` fails the DATA as there): the
        header's up to its empty line, then the body's up to the final
        ".".  Whether it took any: when not (the first line, the ".",
        receivers not the intake's), the caller gives the next line to
        ``lineReceived``."""
        held = self._held_lines
        if held[0] == b"." or self.datafailed:
            return False
        # Twisted's receivers of this DATA and where it is in the message
        # (name-mangled in smtp.SMTP: should they go, the lines simply go
        # one by one).
        receivers = self.__dict__.get("_SMTP__messages")
        if not receivers:
            return False
        writer: Callable[[Any], Callable[[Any], None] | None]
        if self.__dict__.get("_SMTP__inbody"):
            writer, take_lines = body_writer, self._body_lines
        elif self.__dict__.get("_SMTP__inheader"):
            writer, take_lines = header_writer, self._header_lines
        else:
            return False
        write = writer(receivers)
        if write is None:
            return False
        self._write_in_bulk(write, take_lines(), receivers)
        return True

    def _header_lines(self) -> list[bytes]:
        """The held lines of the header, dot-unstuffed, up to the final "."
        or to the empty line that ends the header (included: Twisted's
        server then knows the body has begun, as its own path tells it)."""
        held = self._held_lines
        lines = []
        while held and held[0] != b".":
            line = held.popleft()
            if line[:1] == b".":
                line = line[1:]
            lines.append(line)
            if not line:
                self._SMTP__inbody = 1
                break
        return lines

    def _body_lines(self) -> bytes:
        """The held lines of the body up to the final "." (or all of
        them), in one piece: dot-unstuffed, each line's CRLF kept."""
        held = self._held_lines
        lines = list(held)
        held.clear()
        try:
            end = lines.index(b".")
        except ValueError:
            end = len(lines)
        else:
            held.extend(lines[end:])
        data = b"\r\n".join(lines[:end])
        # Dot-unstuffing: every line that starts with "." loses that one.
        if data[:1] == b".":
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n") + b"\r\n"

    def _write_in_bulk(self, write: Callable[[Any], None], data: Any, receivers: Any) -> None:
        # Each line given resets the idle timer in Twisted's path.
        self.resetTimeout()
        try:
            write(data)
        except smtp.SMTPServerError as failure:
            self.datafailed = failure
            for receiver in receivers:
                receiver.connectionLost()

    def _hold(self) -> None:
        self._holding = True

    def _release(self) -> None:
        self._holding = False
        with self._replies.batch():
            self._drain()

    def _line_too_long(self) -> None:
        self._held_lines.clear()
        self._unparsed = b""
        if self.mode == smtp.DATA:
            self.sendCode(552, b"5.3.4 Error: line too long; closing connection")
        else:
            self.sendCode(500, b"5.5.2 Error: line too long; closing connection")
        # Twisted's connectionLost tells the message receivers, which
        # discard what they stored.
        self.transport.loseConnection()

    def validateFrom(self, helo: Any, origin: smtp.Address) -> Any:
        self._hold()
        return super().validateFrom(helo, origin)

    def _cbFromValidate(self, *args: Any, **kwargs: Any) -> None:
        super()._cbFromValidate(*args, **kwargs)
        self._release()

    def _ebFromValidate(self, failure: Any) -> None:
        super()._ebFromValidate(failure)
        self._release()

    def validateTo(self, user: smtp.User) -> Any:
        # Twisted calls this from do_RCPT, synchronously: the parameters
        # parsed there are this recipient's.
        user.relayagent_orcpt, user.relayagent_notify = self._rcpt_dsn
        self._hold()
        return super().validateTo(user)

    def _cbToValidate(self, *args: Any, **kwargs: Any) -> None:
        super()._cbToValidate(*args, **kwargs)
        self._release()

    def _ebToValidate(self, failure: Any) -> None:
        super()._ebToValidate(failure)
        self._release()

    def state_DATA(self, line: bytes) -> None:
        """One line of the message: at the final ".", pipelined commands wait
        until the message is queued and answered."""
        if line == b"." and not self.datafailed:
            self._hold()  # until _messageHandled has replied
        smtp.SMTP.dataLineReceived(self, line)

    def _messageHandled(self, resultList: Any) -> None:
        try:
            failures = [result for ok, result in resultList if not ok]
            if failures:
                reason = failures[0]
                if reason.check(smtp.SMTPServerError):
                    resp = reason.value.resp
                    self.sendCode(reason.value.code,
                                  resp if isinstance(resp, bytes) else networkString(resp))
                else:
                    log.failure("message receiver failed", reason)
                    self.sendCode(*QUEUE_WRITE_ERROR)
            else:
                queue_ids = [r for ok, r in resultList if isinstance(r, str)]
                if queue_ids:
                    self.sendCode(250, networkString(f"2.0.0 Ok: queued as {queue_ids[0]}"))
                else:
                    self.sendCode(250, b"2.0.0 Ok")
        finally:
            self._release()

    def connectionLost(self, reason: Any) -> None:
        self._held_lines.clear()
        peer = self.transport.getPeer() if self.transport is not None else None
        if self._tls_creator is not None and not self._tls_established:
            # Postfix's smtpd: "SSL_accept error from host[addr]: ...".
            why = reason.getErrorMessage() if hasattr(reason, "getErrorMessage") else "lost connection"
            ralog.log_warning(log, f"SSL_accept error from {describe_client(peer)}: {_printable(why)}",
                              service="smtpd")
        ralog.log_disconnect(log, describe_client(peer), format_command_stats(self._command_counts))
        super().connectionLost(reason)


def _printable(value: bytes | str) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return "".join(c if c.isprintable() else "?" for c in text)[:100]


def _client_name(server: Any) -> str:
    transport = getattr(server, "transport", None)
    peer = transport.getPeer() if transport is not None else None
    host = getattr(peer, "host", None)
    return f"unknown[{host}]" if host else "unknown"


class _CramMD5(credentials.CramMD5Credentials):
    """Twisted's CRAM-MD5 challenger, taking a malformed response as a
    failed login rather than an exception."""

    def setResponse(self, response: bytes) -> None:
        username, _, digest = response.strip().partition(b" ")
        self.username, self.response = username or None, digest.strip()


class _Plain(imap4.PLAINCredentials):
    """Twisted's PLAIN challenger (RFC 4616), taking a malformed response
    as a failed login rather than an exception; an authorization
    identity other than the username is refused (we act for no one
    else)."""

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            self.username, self.password = None, None
            return
        _, self.username, self.password = parts


class _Login(smtp.LOGINCredentials):
    """Twisted's LOGIN challenger (the username, then the password)."""


@implementer(ICredentialsChecker)
class PasswordTableChecker:
    """CRAM-MD5, PLAIN and LOGIN credentials against
    ``smtpd_sasl_password_maps`` (username -> password), compared in
    constant time."""

    credentialInterfaces = (credentials.IUsernameHashedPassword, credentials.IUsernamePassword)

    def __init__(self, tables: MapList) -> None:
        self.tables = tables

    def requestAvatarId(self, offered: Any) -> defer.Deferred[bytes]:
        """The username when the response proves its password."""
        username = offered.username
        if not username:
            return defer.fail(error.UnauthorizedLogin())
        try:
            password = self.tables.lookup(username.decode("utf-8"))
        except (UnicodeDecodeError, OSError, ValueError):
            password = None
        if password is None:
            return defer.fail(error.UnauthorizedLogin())
        if credentials.IUsernamePassword.providedBy(offered) and not hasattr(offered, "challenge"):
            given = offered.password
            if not isinstance(given, bytes) or not hmac.compare_digest(given, password.encode("utf-8")):
                return defer.fail(error.UnauthorizedLogin())
            return defer.succeed(username)
        response = getattr(offered, "response", b"")
        challenge = getattr(offered, "challenge", b"")
        if not response or not challenge:
            return defer.fail(error.UnauthorizedLogin())
        expected = binascii.hexlify(
            hmac.new(password.encode("utf-8"), challenge, hashlib.md5).digest()
        )
        if not hmac.compare_digest(expected, response.lower()):
            return defer.fail(error.UnauthorizedLogin())
        return defer.succeed(username)


@implementer(portal.IRealm)
class _RelayRealm:
    """An authenticated client gets the same relay delivery as anyone,
    and the intake relays for it (``protocol.authenticated``)."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if IMessageDeliveryFactory not in interfaces:
            raise NotImplementedError("only IMessageDeliveryFactory")
        return IMessageDeliveryFactory, RelayDeliveryFactory(self.intake), lambda: None


@dataclass(frozen=True, slots=True)
class ListenerSettings(Settings):
    """The listener's parameters, bound once."""

    smtpd_endpoints: tuple[str, ...]
    smtpd_banner: str
    myhostname: str
    message_size_limit: int
    queue_directory: str
    requiretls_enable: bool
    smtpd_sasl_auth_enable: bool
    smtpd_sasl_password_maps: tuple[str, ...]
    base_dir: str | None = None


def configure_protocol(server: RelayagentESMTP, settings: ListenerSettings,
                       server_tls: ServerTLS | None = None) -> RelayagentESMTP:
    """Apply main.cf to one server protocol instance."""
    server.server_tls = server_tls
    server.message_size_limit = settings.message_size_limit
    server.requiretls_enable = settings.requiretls_enable
    server.host = settings.myhostname.encode("idna")
    server.banner = settings.smtpd_banner.encode("utf-8", "replace")
    return server


class ListenerFactory(protocol.ServerFactory):
    """Builds relay-only ESMTP servers: every recipient goes to the spool
    through ``RelayDeliveryFactory`` (one queue file per transaction)."""

    # No "Starting/Stopping factory <...>" lines: under relayagent's
    # namespace they would land in the maillog, where Postfix has none.
    noisy = False

    def __init__(self, intake: Intake, config: Config) -> None:
        self.intake = intake
        self.settings = ListenerSettings.from_config(config)
        # Built now: a bad certificate stops relayagent at start-up.
        self.server_tls = ServerTLS.from_config(config)
        self.portal: portal.Portal | None = None
        self.challengers: dict[bytes, Callable[[], Any]] = {}
        if self.settings.smtpd_sasl_auth_enable:
            tables = open_maps(self.settings.smtpd_sasl_password_maps, base_dir=self.settings.base_dir)
            if not tables:
                ralog.log_warning(log, "smtpd_sasl_auth_enable = yes but smtpd_sasl_password_maps "
                                  "is empty: no AUTH", service="smtpd")
            else:
                warn_if_world_readable(tables.files(), "smtpd_sasl_password_maps")
                self.portal = portal.Portal(_RelayRealm(intake), [PasswordTableChecker(tables)])
                host = self.settings.myhostname.encode("idna")
                self.challengers = {b"CRAM-MD5": functools.partial(_CramMD5, host=host)}
                if self.server_tls is not None:
                    # Offered only once the session is encrypted (sasl_mechanisms).
                    self.challengers.update({b"PLAIN": _Plain, b"LOGIN": _Login})

    def buildProtocol(self, addr: object) -> RelayagentESMTP:
        server = RelayagentESMTP(dict(self.challengers))
        server.factory = self
        server.portal = self.portal
        server.deliveryFactory = RelayDeliveryFactory(self.intake)
        configure_protocol(server, self.settings, self.server_tls)
        return server


class MailServiceESMTPFactory(protocols.ESMTPFactory):
    """twisted.mail's ESMTP factory for a MailService (local domains,
    portal, AUTH challengers), building ``RelayagentESMTP`` servers."""

    protocol = RelayagentESMTP

    def __init__(self, service: Any, portal: Any, config: Config) -> None:
        super().__init__(service, portal)
        self.settings = ListenerSettings.from_config(config)
        self.domain = self.settings.myhostname.encode("idna")

    def buildProtocol(self, addr: object) -> RelayagentESMTP:
        server = super().buildProtocol(addr)
        configure_protocol(server, self.settings)
        return server


class ListenerReactor:
    """The reactor an ``smtpd_endpoints`` endpoint is made with: the real
    one, except for how a TCP or TLS port comes to listen.  In worker 0
    the endpoint binds as it always does, and the port it bound is kept
    (``port``: its descriptor is handed to the other workers).  In
    another worker, once ``take`` gave it worker 0's descriptor, the same
    endpoint's ``listen`` adopts that descriptor instead of binding,
    wrapping the factory in TLS as ``listenSSL`` would (implicit TLS: the
    endpoint's context factory, made as root before any fork).  Any
    other kind of endpoint (``unix:``, ``systemd:``) goes straight to the
    real reactor and keeps no port: it listens in worker 0 alone."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.port: Any = None
        self._taken: tuple[int, int] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def take(self, fd: int, family: int) -> None:
        """The next ``listenTCP``/``listenSSL`` adopts ``fd`` (a listening
        socket of ``family``), which it closes, instead of binding."""
        self._taken = (fd, family)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:  # noqa: N802 - IReactorTCP
        """Bind (worker 0: the port is kept) or adopt the descriptor taken."""
        if self._taken is not None:
            return self._adopt(factory)
        self.port = self._reactor.listenTCP(port, factory, backlog, interface)
        return self.port

    def listenSSL(self, port: int, factory: Any, contextFactory: Any,  # noqa: N802,N803 - IReactorSSL
                  backlog: int = 50, interface: str = "") -> Any:
        """Bind (worker 0: the port is kept) or adopt the descriptor taken,
        under TLS with ``contextFactory`` either way."""
        if self._taken is not None:
            return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))
        self.port = self._reactor.listenSSL(port, factory, contextFactory, backlog, interface)
        return self.port

    def _adopt(self, factory: Any) -> Any:
        assert self._taken is not None
        (fd, family), self._taken = self._taken, None
        try:
            return self._reactor.adoptStreamPort(fd, family, factory)
        finally:
            os.close(fd)  # the reactor listens on a duplicate


class SharedListener:
    """One ``smtpd_endpoints`` entry as every worker has it: its service
    (``service``, a child of twistd's service tree in worker 0) and the
    reactor its endpoint was made with (``ListenerReactor``)."""

    def __init__(self, service: Any, reactor: ListenerReactor) -> None:
        self.service = service
        self.reactor = reactor

    def descriptor(self) -> tuple[int, int] | None:
        """Worker 0, once it listens: the listening socket's descriptor and
        address family, for the other workers; None for an endpoint that
        listens in worker 0 alone, or that has not bound yet."""
        port = self.reactor.port
        family = getattr(port, "addressFamily", None)
        if port is None or family is None or not getattr(port, "connected", False):
            return None
        return port.fileno(), family

    def listen_on(self, fd: int, family: int) -> None:
        """Another worker: listen on worker 0's socket ``fd`` (closed here;
        the reactor keeps a duplicate) with this process's copy of the
        factory, which queues into this process's spool.  Raises what
        the reactor raises (``UnsupportedAddressFamily``, OSError), and
        ValueError for an endpoint that is neither TCP nor TLS (it would
        bind a socket of its own)."""
        if not isinstance(self.service.endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
            os.close(fd)
            raise ValueError(f"not a TCP or TLS endpoint: {type(self.service.endpoint).__name__}")
        self.reactor.take(fd, family)
        self.service.privilegedStartService()
        self.service.startService()


def make_listener_services(
    config: Config,
    spool: Any = None,
    trigger: Callable[[], object] | None = None,
    *,
    reactor: Any = None,
    clock: Callable[[], float] = time.time,
) -> list[IService]:
    """One server service per ``smtpd_endpoints`` string (none when empty).

    ``spool`` defaults to ``Spool(queue_directory)``; ``trigger`` is called
    with no arguments after each queued message.
    """
    return [shared.service for shared in _shared_listeners(config, spool, trigger, reactor=reactor, clock=clock)]


def _shared_listeners(config: Config, spool: Any, trigger: Callable[[], object] | None, *,
                      reactor: Any, clock: Callable[[], float],
                      on_queued: Callable[[str], object] | None = None) -> list[SharedListener]:
    settings = ListenerSettings.from_config(config)
    if not settings.smtpd_endpoints:
        return []
    if spool is None:
        spool = Spool(settings.queue_directory)
    if reactor is None:
        from twisted.internet import reactor as global_reactor  # noqa: PLC0415 - as strports does: not at import

        reactor = global_reactor
    intake = Intake.from_config(config, spool, trigger=trigger, on_queued=on_queued, clock=clock)
    factory = ListenerFactory(intake, config)
    listeners = []
    for description in settings.smtpd_endpoints:
        listening = ListenerReactor(reactor)
        listeners.append(SharedListener(strports.service(description, factory, reactor=listening), listening))
    return listeners


class _DaemonSpool:
    """The daemon's spool, which its service makes when it starts (after
    twistd's chroot and uid change): looked up at each enqueue, which
    runs in the reactor's thread pool (``spool.nonblocking``): the
    fsyncs of one client's message hold neither the other clients nor
    the deliveries.  The daemon's ``intake_spool`` when it has one (a
    worker's: the ids of its own partition), else its ``spool``."""

    def __init__(self, daemon: Any, reactor: Any) -> None:
        self.daemon = daemon
        self.reactor = reactor

    def _spool(self) -> Spool | None:
        return getattr(self.daemon, "intake_spool", None) or self.daemon.spool

    @property
    def directory(self) -> str | None:
        spool = self._spool()
        return spool.directory if spool is not None else None

    def _threaded(self) -> ThreadedSpool:
        """The spool of this moment, its blocking work in the thread pool;
        OSError before the daemon has opened it."""
        spool = self._spool()
        if spool is None:
            raise OSError("the spool is not open yet")
        return ThreadedSpool(spool, self.reactor)

    def enqueue(self, *args: Any, **kwargs: Any) -> Deferred[str]:
        """``Spool.enqueue`` in the thread pool: a Deferred of the queue id."""
        return self._threaded().enqueue(*args, **kwargs)

    def new_message(self, *args: Any, **kwargs: Any) -> ThreadedIncomingMessage:
        """``Spool.new_message`` committed in the thread pool (the intake
        writes DATA into it: the content written once, into the queue
        file)."""
        return self._threaded().new_message(*args, **kwargs)


def daemon_listener_services(config: Any, daemon: Any, reactor: Any) -> list[SharedListener]:
    """The listeners of ``twistd relayagent``: ``make_listener_services``
    with the daemon's spool, each queued message's id handed to the
    daemon's ``listener_queued`` (its queue manager's wakeup when it has
    none),
    each with what another worker needs to listen on the same socket
    (``SharedListener``: ``relayagent.master.worker``)."""

    def hand_over(queue_id: str) -> None:
        queued = getattr(daemon, "listener_queued", None)
        if queued is not None:
            queued(queue_id)
        elif daemon.queue_manager is not None:
            daemon.queue_manager.wakeup()

    return _shared_listeners(config, _DaemonSpool(daemon, reactor), None, on_queued=hand_over,
                             reactor=reactor, clock=reactor.seconds)
