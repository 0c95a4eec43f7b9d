"""
Receiving mail into the spool, for every SMTP server in relayagent (the
listener and twisted.mail's servers): what Postfix's smtpd(8) checks and
cleanup(8) writes.

One SMTP transaction (MAIL, its RCPTs, DATA) becomes one queue file
holding every relayed recipient: Twisted's server asks for one message
receiver per recipient and feeds each the same lines, so the receivers of
one transaction share a ``_Transaction`` that writes the content once and
enqueues it once at the final ".".  With a spool that has ``new_message``
(``Spool``, ``ThreadedSpool``: the listener's) the content goes straight
into the queue file: held in memory up to the spool's limit (128 KiB, the
whole of most messages), streamed into the file under ``tmp/`` beyond,
and written, fsynced and linked into ``incoming/`` at the "." in one call
(for the listener, written in the reactor thread and fsynced and linked
in the thread pool); with any other spool, into a
temporary file that the spool's ``enqueue`` reads (memory does not grow
with the message either way).  The client gets 250 only after the queue
file and its directory entry are durable (the spool fsyncs both before
it returns), and 451 4.3.0 when the spool cannot take the message.

A full disk is an ordinary condition, answered as Postfix answers it:
MAIL FROM gets "452 4.3.1 Insufficient system storage" while the queue
file system is below ``queue_minfree`` or 1.5 x ``message_size_limit``
(``relayagent.spool.space``); a write that fails later (the temporary
file, the queue file, its fsyncs) ends the transaction with "451 4.3.0 Error: queue
file write error" at the final ".", nothing of it kept.  Each is one
warning line, never a traceback, and the next transaction tries again.

We relay for a client when it is authenticated (by SASL, or by a client
certificate the listener found in ``relay_clientcerts``), connected
over a UNIX socket, or its address is in ``mynetworks``: the rule of twisted.mail's
``DomainQueuer.willRelay``, with ``mynetworks`` in place of its
hard-coded 127.0.0.1.  Anyone else gets "554 5.7.1 <rcpt>: Relay access
denied", as from Postfix's smtpd.

SYNOPSIS

    intake = Intake.from_config(config, spool, trigger)
    RelayDomain(intake)            # an IDomain for MailService.domains
    RelayDeliveryFactory(intake)   # an IMessageDeliveryFactory for ESMTP servers

DIAGNOSTICS: refusals are ``smtp.SMTPBadSender`` / ``SMTPBadRcpt`` /
``SMTPServerError`` with Postfix's replies (the constants below); a spool
that fails to take a message is 451 4.3.0 and one warning line.

Owns: mynetworks, message_size_limit, hopcount_limit.  Reads myhostname,
queue_directory and queue_minfree (``relayagent.spool.space`` owns it).
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import os
import re
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IDomain, IMessageSMTP
from twisted.python.failure import Failure
from zope.interface import implementer

from relayagent.common import maillog as ralog
from relayagent.common.config import Config, Settings
from relayagent.common.envelope import BodyType, Notify, Recipient, Ret
from relayagent.spool import space

log = Logger(namespace="relayagent.smtpd.twistedmail")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Postfix's replies, word for word where Postfix has one.
QUEUE_WRITE_ERROR = (451, b"4.3.0 Error: queue file write error")
MESSAGE_TOO_BIG = (552, b"5.3.4 Error: message file too big")
TOO_MANY_HOPS = (554, b"5.4.0 Error: too many hops")
# str, not bytes: Twisted turns validateFrom errors into a reply with networkString.
INSUFFICIENT_STORAGE = space.INSUFFICIENT_STORAGE
BAD_SENDER_SYNTAX = (501, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = (501, "5.1.3 Bad recipient address syntax")
UNDECLARED_UTF8 = (553, "5.6.7 Must declare SMTPUTF8 to send unicode address")


# -- address syntax ----------------------------------------------------------

_CONTROL_OCTETS = re.compile(rb"[\x00-\x1f\x7f]")


def address_problem(address: smtp.Address, bad_syntax: tuple[int, str]) -> tuple[int, str] | None:
    """Why an envelope address from the client may not be taken, or None.

    Twisted's parser lets a quoted local part hold any octet but '"', so
    ``<"a<LF>X-Header: v"@example.com>`` arrives intact; in our Received
    header, the queue file and the next hop's RCPT TO line that CR, LF or
    NUL would forge header fields or SMTP commands.  RFC 5321's qtextSMTP
    and quoted-pairSMTP have no control characters, so they are a syntax
    error (``bad_syntax``, Postfix's 501 5.1.3 / 5.1.7).  We do not offer
    SMTPUTF8, so an 8-bit octet gets Postfix's 553 5.6.7 (and never
    reaches ``str()``, which would raise).
    """
    raw = address.local + b"@" + address.domain
    if _CONTROL_OCTETS.search(raw):
        return bad_syntax
    if not raw.isascii():
        return UNDECLARED_UTF8
    return None


def check_sender(origin: smtp.Address) -> None:
    """Raise the SMTP error for a sender ``address_problem`` refuses."""
    problem = address_problem(origin, BAD_SENDER_SYNTAX)
    if problem is not None:
        # SMTPServerError, not SMTPBadSender: Twisted would echo the
        # address, control characters and all, in the reply line.
        raise smtp.SMTPServerError(*problem)


def check_recipient(user: smtp.User) -> None:
    """Raise the SMTP error for a recipient ``address_problem`` refuses."""
    problem = address_problem(user.dest, BAD_RECIPIENT_SYNTAX)
    if problem is not None:
        raise smtp.SMTPServerError(*problem)


# -- mynetworks -----------------------------------------------------------


def parse_mynetworks(items: Iterable[str]) -> list[IPNetwork]:
    """Parse mynetworks items: ``10.0.0.0/8``, ``192.0.2.1``, ``[::1]/128``,
    ``[2001:db8::1]``.  Raises ValueError naming a bad item."""
    networks: list[IPNetwork] = []
    for item in items:
        text = item.strip()
        bracketed = text.startswith("[")
        if bracketed:
            close = text.find("]")
            if close < 0:
                raise ValueError(f"mynetworks: bad item {item!r}: no closing ']'")
            text = text[1:close] + text[close + 1:]
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"mynetworks: bad item {item!r}: expected an address or address/prefix"
            ) from None
        if network.network_address != ipaddress.ip_address(text.partition("/")[0]):
            # A typo such as 192.168.1.5/0 would otherwise relay for the
            # whole Internet; Postfix refuses it the same way.
            address = f"[{network.network_address}]" if bracketed else str(network.network_address)
            raise ValueError(
                f"mynetworks: non-null host address bits in {item!r}, "
                f"perhaps you should use {address}/{network.prefixlen} instead"
            )
        networks.append(network)
    return networks


def _peer_ip(peer: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(peer, "host", None)
    if not isinstance(host, str):
        return None
    return _host_ip(str(host))


# Several times a session (the relay check, the Received header, the
# connect, client= and disconnect lines), for the same few clients:
# ipaddress takes tens of microseconds a parse.
@functools.lru_cache(maxsize=1024)
def _host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    # An IPv4 client of a dual-stack socket shows up as ::ffff:a.b.c.d;
    # match it against the IPv4 networks.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class IntakeSettings(Settings):
    """What the intake checks mail against, bound once."""

    myhostname: str
    mynetworks: tuple[str, ...]
    message_size_limit: int
    hopcount_limit: int
    queue_minfree: int


class RelayPolicy:
    """Who may relay: authenticated clients, UNIX-socket clients and
    clients whose address is in ``mynetworks``."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)
        # Once per client address (its text: an ipaddress object's hash
        # is Python code), not per RCPT.
        self._host_in_networks = functools.lru_cache(maxsize=1024)(self._search_networks)

    @classmethod
    def from_config(cls, config: Config) -> RelayPolicy:
        """The policy of ``config``'s ``mynetworks``; raises ValueError for a
        network that does not parse."""
        return cls(parse_mynetworks(IntakeSettings.from_config(config).mynetworks))

    def in_mynetworks(self, peer: object) -> bool:
        """Whether ``peer`` (a Twisted address) is in ``mynetworks``; a
        UNIX-socket peer always is, a peer with no IP address never."""
        if isinstance(peer, UNIXAddress):
            return True
        host = getattr(peer, "host", None)
        if not isinstance(host, str):
            return False
        return self._host_in_networks(str(host))

    def _search_networks(self, host: str) -> bool:
        address = _host_ip(host)
        if address is None:
            return False
        return any(address.version == net.version and address in net for net in self.networks)

    def will_relay(self, protocol: object, *, authenticated: bool = False) -> bool:
        """Whether the client of ``protocol`` may relay: it authenticated
        (``authenticated`` or the protocol's own flag, or a client
        certificate in ``relay_clientcerts``: the listener's
        ``relayagent_clientcert_relay``), it is on a UNIX socket, or its
        peer is in ``mynetworks``."""
        if authenticated or bool(getattr(protocol, "authenticated", False)):
            return True
        if getattr(protocol, "relayagent_clientcert_relay", False) is True:
            return True
        transport = getattr(protocol, "transport", None)
        if transport is None:
            return False
        return self.in_mynetworks(transport.getPeer())


# -- the Received header ----------------------------------------------------


@dataclass(frozen=True)
class ClientInfo:
    """What the Received header says about the client."""

    helo: str | None
    peer: object
    esmtp: bool = True
    authenticated: bool = False
    tls: bool = False

    @classmethod
    def of(cls, protocol: object, helo: object = None) -> ClientInfo:
        """The client of ``protocol`` (a twisted.mail SMTP server) and
        ``helo`` (twisted.mail's ``(name, address)``): its HELO name, peer
        address, and whether it spoke ESMTP, authenticated and uses TLS."""
        helo_name = None
        if isinstance(helo, tuple) and helo and helo[0]:
            raw = helo[0]
            helo_name = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
        transport = getattr(protocol, "transport", None)
        peer = transport.getPeer() if transport is not None else None
        esmtp = getattr(protocol, "relayagent_esmtp", isinstance(protocol, smtp.ESMTP))
        return cls(
            helo=helo_name,
            peer=peer,
            esmtp=bool(esmtp),
            authenticated=bool(getattr(protocol, "authenticated", False)),
            tls=bool(getattr(protocol, "encrypted", getattr(protocol, "startedTLS", False))),
        )

    def with_protocol(self) -> str:
        """The "with" keyword of RFC 3848: SMTP, ESMTP, ESMTPA, ESMTPS, ESMTPSA."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.authenticated else "")


_UNSAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def _printable_helo(helo: str) -> str:
    # The HELO argument is client data going into a header: anything but
    # the characters of a domain or address literal becomes "?" (as
    # Postfix's printable() does), so a bare LF or a ";" cannot forge
    # header structure.
    return _UNSAFE_HELO.sub("?", helo)[:255]


def _address_literal(peer: object) -> str | None:
    if isinstance(peer, (IPv4Address, IPv6Address)) or hasattr(peer, "host"):
        address = _peer_ip(peer)
        if address is None:
            return None
        if isinstance(address, ipaddress.IPv6Address):
            return f"[IPv6:{address.compressed}]"
        return f"[{address}]"
    return None


def received_header(
    client: ClientInfo,
    hostname: str,
    recipients: Sequence[str],
    when: float,
    queue_id: str | None = None,
) -> list[bytes]:
    """The lines of our Received header, in RFC 5321 section 4.4 form::

        Received: from HELO ([ADDRESS])
                by HOSTNAME (relayagent) with ESMTP id QUEUEID
                for <RCPT>; DATE

    ``for`` is given only for a single recipient (others would learn who
    else got the message); ``id`` only when the queue id is known.
    """
    literal = _address_literal(client.peer)
    if client.helo:
        source = _printable_helo(client.helo)
    else:
        source = literal or "unknown"
    first = f"Received: from {source}"
    if literal:
        first += f" ({literal})"
    by = f"\tby {hostname} (relayagent) with {client.with_protocol()}"
    if queue_id:
        by += f" id {queue_id}"
    date = _header_date(int(when))
    if len(recipients) == 1:
        last = f"\tfor <{recipients[0]}>; {date}"
        lines = [first, by, last]
    else:
        lines = [first, by + ";", f"\t{date}"]
    return [line.encode("utf-8", "replace") for line in lines]


@functools.lru_cache(maxsize=2)
def _header_date(second: int) -> str:
    """The RFC 5322 date of a whole second in local time (its fraction is
    never shown): computed once a second while mail streams in, not once
    a message, since ``email.utils`` builds a datetime and its zone each
    time."""
    return email.utils.formatdate(second, localtime=True)


def _is_twisted_received_header(line: bytes) -> bool:
    """Whether a line is the per-recipient header of twisted.mail's
    ``DomainDeliveryBase.receivedHeader`` (one line with embedded LF-TAB
    folds, fed to each receiver before the data)."""
    return line.startswith(b"Received: from ") and b"\n\tby " in line and b"\n\tfor " in line


# -- the intake: one queue file per transaction ------------------------------


class Intake:
    """Turns SMTP transactions into queue files.

    ``spool`` has ``enqueue(sender, recipients, content, *, body_type)``
    returning a queue id (or a Deferred of one) once the file is durable,
    and may have ``new_message(sender, recipients, *, body_type, ...)``:
    a writer with ``write(data)``, ``commit()`` (the queue id, or a
    Deferred of it, once durable) and ``discard()``, which the intake then
    uses instead of a temporary file.  The spool writes and fsyncs the
    file, which is what Postfix's cleanup does before smtpd says 250
    (``ThreadedSpool`` does it in a thread pool).
    ``trigger`` (no arguments) is called after each successful enqueue to
    wake the queue manager; a failing trigger is logged and otherwise
    ignored (the queue manager also polls ``incoming/``).  ``on_queued``,
    when given, is called instead with the message's queue id (the
    daemon hands it to its queue manager, which then need not look for
    it in ``incoming/``).

    ``queue_minfree`` and ``message_size_limit`` decide, at MAIL FROM,
    whether the spool's file system has room (``check_queue_space``);
    ``statvfs`` is ``os.statvfs`` unless a test gives another.
    """

    def __init__(
        self,
        spool: Any,
        *,
        hostname: str,
        relay_policy: RelayPolicy,
        message_size_limit: int = 10240000,
        hopcount_limit: int = 50,
        trigger: Callable[[], object] | None = None,
        on_queued: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.time,
        temp_directory: str | None = None,
        queue_minfree: int = 0,
        statvfs: Callable[[str], Any] = os.statvfs,
    ) -> None:
        self.spool = spool
        self.hostname = hostname
        self.relay_policy = relay_policy
        self.message_size_limit = message_size_limit
        self.queue_minfree = queue_minfree
        self.statvfs = statvfs
        self.hopcount_limit = hopcount_limit
        self.trigger = trigger
        self.on_queued = on_queued
        self.clock = clock
        self.temp_directory = temp_directory
        self._transactions: weakref.WeakKeyDictionary[object, _Transaction] = (
            weakref.WeakKeyDictionary()
        )
        # The User objects we took, so that a delivery can leave their
        # Received header to us (see RelayagentDomainDelivery).
        self.relayed_users: weakref.WeakSet[smtp.User] = weakref.WeakSet()

    @classmethod
    def from_config(
        cls,
        config: Config,
        spool: Any,
        *,
        trigger: Callable[[], object] | None = None,
        on_queued: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Intake:
        """An Intake for ``spool`` with the settings of ``config``
        (myhostname, mynetworks, message_size_limit, hopcount_limit,
        queue_minfree).  Raises ValueError for a bad ``mynetworks``."""
        settings = IntakeSettings.from_config(config)
        return cls(
            spool,
            hostname=settings.myhostname,
            relay_policy=RelayPolicy(parse_mynetworks(settings.mynetworks)),
            message_size_limit=settings.message_size_limit,
            hopcount_limit=settings.hopcount_limit,
            trigger=trigger,
            on_queued=on_queued,
            clock=clock,
            queue_minfree=settings.queue_minfree,
        )

    def check_queue_space(self) -> None:
        """At MAIL FROM: raise "452 4.3.1 Insufficient system storage"
        (one warning logged) when the spool's file system is too full to
        take a message (``relayagent.spool.space``), as Postfix's smtpd
        does before it takes anything of the transaction."""
        problem = space.queue_space_problem(
            getattr(self.spool, "directory", None),
            queue_minfree=self.queue_minfree,
            message_size_limit=self.message_size_limit,
            statvfs=self.statvfs,
        )
        if problem is not None:
            ralog.log_warning(log, problem, service="smtpd")
            raise smtp.SMTPServerError(*INSUFFICIENT_STORAGE)

    def transaction_for(self, user: smtp.User) -> _Transaction:
        """The transaction a recipient belongs to.

        Twisted gives every RCPT of one MAIL the same ``Address`` object as
        ``user.orig``; a new MAIL makes a new one.  So (protocol, orig)
        names the transaction, with no help from the protocol.
        """
        protocol = user.protocol
        current = self._transactions.get(protocol)
        if current is None or current.origin is not user.orig or not current.collecting:
            current = _Transaction(self, protocol, user.orig, user.helo)
            self._transactions[protocol] = current
        return current

    def accept(self, user: smtp.User, *, authenticated: bool = False) -> Callable[[], Any]:
        """Decide one RCPT: a message-receiver factory, or an SMTPBadRcpt
        (SMTPServerError for an address we cannot take at all)."""
        check_recipient(user)
        address = str(user.dest)
        if not self.relay_policy.will_relay(user.protocol, authenticated=authenticated):
            client = ClientInfo.of(user.protocol, user.helo)
            ralog.log_reject(
                log, where="RCPT", client=describe_client(client.peer),
                reply=f"554 5.7.1 <{address}>: Relay access denied", sender=str(user.orig),
                recipient=address, protocol="ESMTP" if client.esmtp else "SMTP", helo=client.helo,
            )
            raise smtp.SMTPBadRcpt(user, 554, f"5.7.1 <{address}>: Relay access denied")
        if b"@" not in user.dest.addrstr or not user.dest.local:
            # Twisted appends our own host name to a bare "user"; relaying
            # that would loop back to us.
            raise smtp.SMTPBadRcpt(user, 550, f"5.1.3 <{address}>: Recipient address needs a domain")
        transaction = self.transaction_for(user)
        self.relayed_users.add(user)
        return transaction.receiver_factory(user)

    def wake_queue_manager(self, queue_id: str) -> None:
        """Call ``on_queued`` (or the trigger) after ``queue_id`` was queued;
        a failure there is logged, never raised (the message is queued
        already)."""
        try:
            if self.on_queued is not None:
                self.on_queued(queue_id)
            elif self.trigger is not None:
                self.trigger()
        except Exception:
            # The message is queued: a lost wake-up only delays it until
            # the queue manager's next look at incoming/.
            log.failure("{queue_id}: cannot trigger the queue manager", queue_id=queue_id)


def describe_client(peer: object) -> str:
    """A client as Postfix's smtpd names it in its log lines,
    ``name[address]``: we do no reverse lookup, so the name is
    ``unknown``, as in Postfix when there is no PTR record;
    ``unknown[unknown]`` for a client with no IP address (a UNIX
    socket)."""
    host = getattr(peer, "host", None) if peer is not None else None
    return _client_name(str(host)) if isinstance(host, str) else "unknown[unknown]"


@functools.lru_cache(maxsize=1024)
def _client_name(host: str) -> str:
    address = _host_ip(host)
    return f"unknown[{address.compressed}]" if address is not None else "unknown[unknown]"


class _Transaction:
    """One MAIL transaction's relayed recipients, content and enqueue.

    Twisted's server calls each recipient's receiver factory at DATA,
    feeds the Received header it made (if any) to each new receiver, then
    feeds every data line to every receiver in turn, then calls each
    receiver's ``eomReceived``.  The first receiver (the lead) is the one
    whose lines we write; the others' copies are dropped.
    """

    def __init__(self, intake: Intake, protocol: object, origin: smtp.Address, helo: object) -> None:
        self.intake = intake
        self.origin = origin
        self.client = ClientInfo.of(protocol, helo)
        self.body_type = _declared_body_type(protocol)
        self.envid, self.ret, self.arrival_time = _declared_dsn(protocol)
        username = getattr(protocol, "relayagent_sasl_username", None)
        self.sasl_username = username if isinstance(username, str) else None
        method = getattr(protocol, "relayagent_sasl_method", None)
        self.sasl_method = method if isinstance(method, str) else "CRAM-MD5"
        self.requiretls = _requested_requiretls(protocol)
        self.receivers: list[_RecipientReceiver] = []
        self.collecting = True
        self._file: IO[bytes] | None = None
        # The spool's writer when it has one (``Spool.new_message``): the
        # content goes once, into the queue file; else the temporary file.
        self._message: Any = None
        # What goes to the writer next, given in pieces of at least
        # _WRITER_PIECE octets (or at the end): one call, not one a line.
        self._pieces: list[bytes] = []
        self._held = 0
        self._committing = False  # the writer's commit is running
        self._size = 0
        self._in_header = True
        self._hops = 1  # our own Received header counts
        self._message_id: str | None = None
        self._failed = False
        self._outcome: Any = None  # queue id, or a Failure
        self._waiters: list[defer.Deferred[Any]] = []
        self._enqueueing = False

    # -- called by Twisted (through the receivers)

    def receiver_factory(self, user: smtp.User) -> Callable[[], _RecipientReceiver]:
        return lambda: self._new_receiver(user)

    def _new_receiver(self, user: smtp.User) -> _RecipientReceiver:
        if not self.collecting:
            raise smtp.SMTPServerError(*QUEUE_WRITE_ERROR)
        receiver = _RecipientReceiver(self, user)
        self.receivers.append(receiver)
        return receiver

    def line(self, receiver: _RecipientReceiver, line: bytes) -> None:
        if self._failed or self._outcome is not None:
            return
        if receiver is not self.receivers[0]:
            return  # a copy of a line the lead already has
        if self.collecting and _is_twisted_received_header(line):
            return  # Twisted's per-recipient header: ours replaces it
        if self.collecting:
            self._start()
        self._write_line(line)

    def header_writer(self) -> Callable[[list[bytes]], None] | None:
        """``write_header`` while the header comes (its first line given
        to ``line``, which started the file), else None."""
        if self.collecting or not self._in_header or self._failed or self._outcome is not None:
            return None
        return self.write_header

    def write_header(self, lines: list[bytes]) -> None:
        """Header lines in one call, dot-unstuffed, without their CRLF, the
        empty line that ends the header last if it came (the listener's
        DATA in bulk): what ``line`` would write of them one by one.
        Raises ``SMTPServerError`` as ``line`` does."""
        if self._failed or self._outcome is not None:
            return
        for line in lines:
            self._note_header_line(line)
        self._write(b"\r\n".join(lines) + b"\r\n")

    def body_writer(self) -> Callable[[bytes], None] | None:
        """``write_body`` once the header is behind (every line from now
        on is body, to be written as it comes), else None."""
        if self.collecting or self._in_header or self._failed or self._outcome is not None:
            return None
        return self.write_body

    def write_body(self, data: bytes) -> None:
        """Body lines in one piece, dot-unstuffed, each with its CRLF (the
        listener's DATA in bulk): what ``line`` would write of them one by
        one.  Raises ``SMTPServerError`` as ``line`` does."""
        if self._failed or self._outcome is not None:
            return
        self._write(data)

    def end(self) -> defer.Deferred[Any]:
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append(waiter)
        if self._outcome is not None:
            self._fire()
        elif not self._enqueueing:
            self._enqueueing = True
            self._enqueue()
        return waiter

    def abort(self) -> None:
        self.collecting = False
        self._failed = True
        self._close_file()

    # -- internals

    @property
    def recipients(self) -> list[str]:
        seen: dict[str, None] = {}
        for receiver in self.receivers:
            # Postfix's cleanup drops exact duplicates; so do we.
            seen.setdefault(str(receiver.dest), None)
        return list(seen)

    @property
    def envelope_recipients(self) -> list[Recipient]:
        """The recipients with their ORCPT and NOTIFY, duplicates dropped
        (the first RCPT of an address keeps its parameters)."""
        seen: dict[str, Recipient] = {}
        for receiver in self.receivers:
            address = str(receiver.dest)
            if address not in seen:
                seen[address] = Recipient(address, orcpt=receiver.orcpt, notify=receiver.notify)
        return list(seen.values())

    def _start(self) -> None:
        self.collecting = False
        new_message = getattr(self.intake.spool, "new_message", None)
        if new_message is not None:
            self._start_message(new_message)
        else:
            # On the spool's file system, not in /tmp (often memory-backed).
            directory = self.intake.temp_directory or getattr(self.intake.spool, "directory", None)
            try:
                # Unnamed (O_TMPFILE, or unlinked at once): whatever happens,
                # no partial file is left behind.
                self._file = tempfile.TemporaryFile(dir=directory)
            except OSError as error:
                self._write_failed(error)
        for header_line in received_header(
            self.client, self.intake.hostname, self.recipients, self.intake.clock()
        ):
            self._write(header_line + b"\r\n")

    def _start_message(self, new_message: Callable[..., Any]) -> None:
        """Open the spool's writer for this transaction (all recipients
        are known at the first line of DATA): the content is held in
        memory and written once, with the queue file's head, at the end
        (streamed into the file past the spool's memory limit)."""
        recipients, options = self._enqueue_arguments()
        try:
            self._message = new_message(str(self.origin), recipients, body_type=self.body_type, **options)
        except OSError as error:
            self._write_failed(error)
        except ValueError:
            self._envelope_refused()

    def _envelope_refused(self) -> None:
        """The spool refuses the envelope (ValueError): as a refused
        enqueue, one error logged and 451 at the final "."."""
        self._not_queued(Failure(), str(self.origin), self.recipients)
        self.abort()

    def _write(self, data: bytes) -> None:
        if self._failed:
            return
        self._size += len(data)
        limit = self.intake.message_size_limit
        if limit and self._size > limit:
            self._fail(MESSAGE_TOO_BIG)
        if self._message is not None:
            self._pieces.append(data)
            self._held += len(data)
            if self._held >= _WRITER_PIECE:
                self._give_pieces()
            return
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as error:
            self._write_failed(error)

    def _give_pieces(self) -> None:
        """Hand what is held to the spool's writer (which may start the
        file under tmp/ and write to it)."""
        data = b"".join(self._pieces)
        self._pieces, self._held = [], 0
        try:
            self._message.write(data)
        except OSError as error:
            self._write_failed(error)
        except ValueError:
            self._envelope_refused()

    def _write_line(self, line: bytes) -> None:
        if self._in_header:
            self._note_header_line(line)
        self._write(line + b"\r\n")

    def _note_header_line(self, line: bytes) -> None:
        """What a line of the header tells: its end (the empty line), the
        Message-ID, one more hop."""
        if not line:
            self._in_header = False
        elif line[:11].lower() == b"message-id:" and self._message_id is None:
            # cleanup's "message-id=<...>" line (the first header).
            self._message_id = _clean_header_value(line[11:])
        elif line[:9].lower() == b"received:":
            self._hops += 1
            # Postfix's cleanup rejects when the count, its own smtpd
            # header included, reaches hopcount_limit; so do we.
            if self._hops >= self.intake.hopcount_limit:
                self._fail(TOO_MANY_HOPS)

    def _fail(self, reply: tuple[int, bytes]) -> None:
        # Raised into Twisted's dataLineReceived: it remembers the error,
        # drops the rest of the data unread, calls connectionLost on every
        # receiver (which discards the file) and answers the final "."
        # with this reply.
        self.abort()
        ralog.log_reject(
            log, where="DATA", client=describe_client(self.client.peer),
            reply=f"{reply[0]} {reply[1].decode()}", sender=str(self.origin),
            recipient=self.recipients[-1] if self.receivers else None,
            protocol="ESMTP" if self.client.esmtp else "SMTP", helo=self.client.helo,
        )
        raise smtp.SMTPServerError(*reply)

    def _write_failed(self, error: OSError) -> None:
        """A write of the content failed (a full disk, most often): one
        warning, the file dropped, and Postfix's 451 4.3.0 at the final
        "." (raised into Twisted's dataLineReceived as ``_fail`` is)."""
        self.abort()
        self._warn_not_queued(error)
        raise smtp.SMTPServerError(*QUEUE_WRITE_ERROR)

    def _warn_not_queued(self, error: BaseException) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        ralog.log_warning(
            log,
            f"DATA from {_describe_peer_info(self.client)}: {QUEUE_WRITE_ERROR[0]} "
            f"{QUEUE_WRITE_ERROR[1].decode()}: {reason}",
            service="smtpd",
        )

    def _close_file(self) -> None:
        if self._message is not None:
            message, self._message = self._message, None
            if self._committing and self._outcome is None:
                return  # its commit runs (in a thread): the commit cleans up
            message.discard()
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:
                # The flush of a buffered tail on a full disk; the
                # descriptor is closed all the same, and the file (never
                # named) is gone with it.
                pass

    def _enqueue(self) -> None:
        if self._failed:
            self._settle(Failure(smtp.SMTPServerError(*QUEUE_WRITE_ERROR)))
            return
        if self.collecting:
            try:
                self._start()  # an empty message: the header is all there is
            except smtp.SMTPServerError as error:
                self._settle(Failure(error))
                return
        sender = str(self.origin)
        recipients = self.recipients
        if self._message is not None:
            if self._pieces:
                try:
                    self._give_pieces()
                except smtp.SMTPServerError as error:
                    self._settle(Failure(error))
                    return
                if self._failed:  # the envelope refused, logged
                    self._settle(Failure(smtp.SMTPServerError(*QUEUE_WRITE_ERROR)))
                    return
            # One hand-off: the write, the fsyncs and the link.
            self._committing = True
            result = defer.maybeDeferred(self._message.commit)
            result.addCallbacks(self._queued, self._not_queued, errbackArgs=(sender, recipients))
            result.addBoth(self._settle)
            return
        assert self._file is not None
        try:
            self._file.flush()
            self._file.seek(0)
        except OSError as error:
            self.abort()
            self._warn_not_queued(error)
            self._settle(Failure(smtp.SMTPServerError(*QUEUE_WRITE_ERROR)))
            return
        spool_file = self._file
        queued_recipients, extra = self._enqueue_arguments()
        result = defer.maybeDeferred(
            self.intake.spool.enqueue, sender, queued_recipients, spool_file, body_type=self.body_type,
            **extra,
        )
        result.addCallbacks(self._queued, self._not_queued, errbackArgs=(sender, recipients))
        result.addBoth(self._settle)

    def _enqueue_arguments(self) -> tuple[list[Any], dict[str, Any]]:
        """The recipients and the options of the enqueue (the spool's
        ``enqueue`` or ``new_message``)."""
        queued_recipients: list[Any] = self.recipients
        extra: dict[str, Any] = {}
        if self.envid is not None:
            extra["envid"] = self.envid
        if self.ret is not None:
            extra["ret"] = self.ret
        if self.arrival_time is not None:
            # A first arrival in the future (a peer's clock ahead of
            # ours) would keep the message for longer than its lifetime.
            extra["arrival_time"] = min(self.arrival_time, self.intake.clock())
        # Only when asked: other spools (twisted.mail glue) need not know it.
        if self.requiretls:
            extra["requiretls"] = True
        if any(r.orcpt is not None or r.notify is not Notify.DEFAULT for r in self.envelope_recipients):
            queued_recipients = self.envelope_recipients
        return queued_recipients, extra

    def _queued(self, queue_id: str) -> str:
        self._close_file()
        # smtpd's and cleanup's lines, before the queue manager can see
        # the message (pflogsumm counts the size of a message received);
        # Postfix's smtpd names the SASL login on the client= line.
        ralog.log_client(log, queue_id, describe_client(self.client.peer),
                         sasl_method=self.sasl_method if self.sasl_username else "", sasl_username=self.sasl_username or "")
        ralog.log_message_id(log, queue_id, self._message_id or "")
        self.intake.wake_queue_manager(queue_id)
        return queue_id

    def _not_queued(self, reason: Failure, sender: str, recipients: list[str]) -> Failure:
        self._close_file()
        if reason.check(OSError):
            # The spool's own trouble (a full disk, a permission): one
            # line; it removed its partial file before raising.
            self._warn_not_queued(reason.value)
        else:
            log.failure(
                "cannot queue a message from <{sender}> for {count} recipient(s)",
                reason, sender=sender, count=len(recipients),
            )
        return Failure(smtp.SMTPServerError(*QUEUE_WRITE_ERROR))

    def _settle(self, outcome: Any) -> None:
        self._outcome = outcome
        self._fire()

    def _fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(self._outcome, Failure):
                waiter.errback(self._outcome)
            else:
                waiter.callback(self._outcome)


# The pieces of content the intake gives the spool's writer at a time
# (its own buffer: the writer is called once for a small message).
_WRITER_PIECE = 64 * 1024


def _describe_peer_info(client: ClientInfo) -> str:
    return describe_client(client.peer)


def _clean_header_value(value: bytes) -> str:
    """A header's value for a log line: decoded, stripped, at most 200
    characters (the line is made safe by the log)."""
    return value.strip().decode("utf-8", "replace")[:200]


def _requested_requiretls(protocol: object) -> bool:
    """MAIL FROM carried REQUIRETLS (RFC 8689), when the protocol
    records it (ours does, and takes it only over TLS)."""
    return getattr(protocol, "relayagent_requiretls", False) is True


def _declared_body_type(protocol: object) -> BodyType | None:
    """BODY= of the MAIL command, when the protocol records it (ours does)."""
    declared = getattr(protocol, "relayagent_body_type", None)
    return declared if isinstance(declared, BodyType) else None


def _declared_dsn(protocol: object) -> tuple[str | None, Ret | None, float | None]:
    """ENVID=, RET= and ARRIVAL= of the MAIL command, when the protocol
    records them (ours does; ARRIVAL only from an authenticated peer)."""
    envid = getattr(protocol, "relayagent_envid", None)
    ret = getattr(protocol, "relayagent_ret", None)
    arrival = getattr(protocol, "relayagent_arrival", None)
    return (
        envid if isinstance(envid, str) else None,
        ret if isinstance(ret, Ret) else None,
        float(arrival) if isinstance(arrival, (int, float)) and not isinstance(arrival, bool) else None,
    )


@implementer(IMessageSMTP)
class _RecipientReceiver:
    """What Twisted's server sees for one recipient: a view of the shared
    transaction."""

    def __init__(self, transaction: _Transaction, user: smtp.User) -> None:
        self.transaction = transaction
        # Only the address: the User holds the protocol, which is the key
        # of the intake's weak _transactions map, and a value that holds
        # its key keeps the entry (and the whole session) alive for ever.
        self.dest = user.dest
        orcpt = getattr(user, "relayagent_orcpt", None)
        notify = getattr(user, "relayagent_notify", Notify.DEFAULT)
        self.orcpt: str | None = orcpt if isinstance(orcpt, str) else None
        self.notify: Notify = notify if isinstance(notify, Notify) else Notify.DEFAULT

    def lineReceived(self, line: bytes) -> None:
        self.transaction.line(self, line)

    def eomReceived(self) -> defer.Deferred[Any]:
        return self.transaction.end()

    def connectionLost(self) -> None:
        self.transaction.abort()


def body_writer(receivers: Sequence[object]) -> Callable[[bytes], None] | None:
    """Where an SMTP server may write the rest of a message's body in
    bulk: when ``receivers`` (Twisted's message receivers of one DATA) are
    all this intake's, of one transaction whose header is behind, its
    ``write_body``; else None (then each line goes to each receiver)."""
    transaction = _lone_transaction(receivers)
    return transaction.body_writer() if transaction is not None else None


def header_writer(receivers: Sequence[object]) -> Callable[[list[bytes]], None] | None:
    """Where an SMTP server may write the lines of a message's header in
    bulk once the first is given: when ``receivers`` are all this
    intake's, of one transaction still in the header, its
    ``write_header``; else None."""
    transaction = _lone_transaction(receivers)
    return transaction.header_writer() if transaction is not None else None


def _lone_transaction(receivers: Sequence[object]) -> _Transaction | None:
    """The transaction of ``receivers`` when they are all this intake's
    and of one transaction (a copy of each line is for it alone)."""
    if not receivers:
        return None
    first = receivers[0]
    if not isinstance(first, _RecipientReceiver):
        return None
    transaction = first.transaction
    for receiver in receivers:
        if not isinstance(receiver, _RecipientReceiver) or receiver.transaction is not transaction:
            return None
    return transaction


# -- the doors into twisted.mail --------------------------------------------


@implementer(IDomain)
class RelayDomain:
    """An ``IDomain`` that relays through relayagent: set it as a
    ``MailService``'s default domain (``domains.setDefaultDomain``)."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def exists(self, user: smtp.User, *, authenticated: bool = False) -> Callable[[], Any]:
        return self.intake.accept(user, authenticated=authenticated)

    def willRelay(self, address: smtp.Address, protocol: object) -> bool:
        """twisted.mail's name for the rule (``DomainQueuer.willRelay``)."""
        return self.intake.relay_policy.will_relay(protocol)

    def addUser(self, user: bytes, password: bytes) -> None:
        raise NotImplementedError("the relay domain has no users")

    def getCredentialsCheckers(self) -> list[Any]:
        return []


@implementer(smtp.IMessageDelivery)
class RelayDelivery:
    """An ``IMessageDelivery`` for ``smtp.ESMTPFactory`` servers: every
    recipient is relayed through relayagent (no local domains)."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def receivedHeader(self, helo: Any, origin: smtp.Address, recipients: list[Any]) -> None:
        return None  # the transaction writes one header for all recipients

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        check_sender(origin)
        self.intake.check_queue_space()
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], Any]:
        return self.intake.accept(user)


@implementer(smtp.IMessageDeliveryFactory)
class RelayDeliveryFactory:
    """twisted.mail's IMessageDeliveryFactory: a RelayDelivery of
    ``intake`` for each SMTP connection."""
    def __init__(self, intake: Intake) -> None:
        self.intake = intake

    def getMessageDelivery(self) -> RelayDelivery:
        return RelayDelivery(self.intake)


