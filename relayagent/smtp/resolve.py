"""
Nexthop selection and mail exchanger addresses (Postfix: smtp_addr.c, the
address half of smtp_connect.c, trivial-rewrite's transport lookup).

Two questions are answered here, both before any connection is made:

1. Where does mail for a recipient domain go?  ``NexthopResolver.nexthops``
   gives the ordered list of nexthops: the ``transport_maps`` entry for the
   domain (``example.com smtp:[mail.example.com]:587``, ``.example.com``
   for subdomains, ``*`` for everything), else the nexthop of
   ``default_transport``, else ``relayhost``, else the domain itself; then
   the ``smtp_fallback_relay`` entries.  ``[host]`` and ``[host]:port``
   mean "no MX lookup".

2. Which addresses serve a nexthop?  ``NexthopResolver.addresses`` is a
   Deferred chain over a twisted.names ``IResolver``: MX records sorted by
   preference (equal preferences shuffled), each MX host's A and/or AAAA
   records per ``inet_protocols`` ordered per ``smtp_address_preference``,
   the no-MX fallback to the domain's own addresses, null MX (RFC 7505),
   CNAME chains, self-detection against ``inet_interfaces`` and
   ``proxy_interfaces`` (port 25 only) and ``smtp_mx_address_limit``.
   With DNS disabled, or for ``smtp_host_lookup = native``, host names go
   to the system resolver (getaddrinfo) through an injected callable.
   ``getHostByName`` is never used: its ANY query is refused by many
   servers (RFC 8482).  With ``smtp_dns_support_level = dnssec`` the
   queries ask for DNSSEC (``relayagent.smtp.dnssec``) and each address
   records whether its MX RRset and its A/AAAA RRset were validated
   (``MailExchangerAddress.mx_dnssec_valid``/``host_dnssec_valid``),
   for DANE (``relayagent.smtp.dane``).

SYNOPSIS::

    resolver = NexthopResolver(config, make_dns_resolver(config, reactor), reactor,
                               system_resolver=make_system_resolver(reactor))
    for nexthop in resolver.nexthops("example.net"):
        addresses = yield resolver.addresses(nexthop)   # AddressList
    parse_nexthop(text, destination=..., default_port=25, mx_lookup_allowed=True, where=...)

DIAGNOSTICS: delivery failures are ``DeliveryFailure`` with Postfix's
statuses and texts: 5.4.4 not found, 4.4.3 temporary DNS failure, 5.4.3
non-recoverable DNS error, 5.1.0 null MX, 5.1.2 bad destination domain,
5.4.6 "loops back to myself", 4.4.4 "unable to find primary relay"; a
loop or a null MX has ``skip_to_next=False`` (no fallback relay).  A
transport we do not run, a malformed nexthop, port or ``dns_nameservers``
entry is ``ConfigError``; ``to_a_label`` raises ``ValueError``.

Owns: relayhost, transport_maps, default_transport (its nexthop part),
smtp_fallback_relay, fallback_relay, smtp_tcp_port, inet_protocols,
inet_interfaces, proxy_interfaces, smtp_address_preference,
smtp_randomize_addresses, smtp_mx_address_limit, ignore_mx_lookup_error,
disable_dns_lookups, smtp_dns_support_level, smtp_host_lookup,
best_mx_transport, dns_nameservers, smtp_defer_if_no_mx_address_found.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import ipaddress
import random as random_module
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import idna
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import (
    DNSFormatError,
    DNSNameError,
    DNSNotImplementedError,
)
from zope.interface import implementer

from relayagent.common.config import Config, ConfigError, Settings, split_list
from relayagent.common.maps import open_maps
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.dnssec import is_authentic
from relayagent.smtp.interfaces import INexthopResolver

log = Logger(namespace="relayagent.smtp.resolve")

SMTP_PORT = 25

# A DNS answer is followed through at most this many CNAME records, as
# Postfix's dns_lookup() does.
MAX_CNAME_HOPS = 10

# Ports for the service names Postfix configurations use, for systems whose
# /etc/services lacks them (containers often have none).
_WELL_KNOWN_SERVICES = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465, "lmtp": 24}

# The transports we run.  "relay" is Postfix's second instance of the same
# smtp(8) client, so it is served as smtp.
_OUR_TRANSPORTS = frozenset({"smtp", "relay"})

# Texts of Postfix's dns_strerror() for the h_errno values it reports.
_HOST_NOT_FOUND = "Host not found"
_TRY_AGAIN = "Host not found, try again"
_NO_RECOVERY = "Non-recoverable error"
_NO_DATA = "Host found but no data record of requested type"


@dataclass(frozen=True)
class Nexthop:
    """One place to send mail for a recipient domain.

    ``destination``: the recipient domain this nexthop serves (A-label).
    ``host``: the name to look up: a domain for an MX lookup, or a host
    name or address literal (A-label, no brackets).
    ``port``: the TCP port.
    ``mx_lookup``: False for ``[host]`` forms (and when DNS is disabled).
    ``is_relay``: the nexthop is ``relayhost`` or a fallback relay, whose
    hard failures Postfix reports as 4.3.5 (a configuration problem is
    deferred, not bounced).
    ``as_written``: the nexthop as configured, e.g. ``[smtp.example.com]:587``
    (the second key for ``smtp_sasl_password_maps``).
    ``is_fallback``: one of ``smtp_fallback_relay``.
    """

    destination: str
    host: str
    port: int
    mx_lookup: bool
    is_relay: bool
    as_written: str = ""
    is_fallback: bool = False

    def __str__(self) -> str:
        return self.as_written or self.host


@dataclass(frozen=True)
class MailExchangerAddress:
    """One address to connect to, with the MX host name it came from."""

    host: str
    address: str
    family: int  # socket.AF_INET or socket.AF_INET6
    preference: int
    port: int
    # smtp_dns_support_level = dnssec: the MX RRset this host came from was
    # validated (True when no MX lookup was made: a [host] nexthop or a
    # domain without MX records), and so was the host's A/AAAA RRset that
    # gave this address (Postfix's dnssec_valid of the MX and host RRs).
    mx_dnssec_valid: bool = False
    host_dnssec_valid: bool = False

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


class AddressList(list):  # list[MailExchangerAddress]
    """The result of ``NexthopResolver.addresses``.

    ``found_myself`` is True when this machine is one of the domain's mail
    exchangers (the list was truncated at its preference).  Postfix then
    tries no fallback relay: mail would only come back.
    """

    found_myself: bool = False


# ---------------------------------------------------------------------------
# Nexthop syntax


def parse_port(service: str, *, where: str) -> int:
    """A port number or service name (``smtp``, ``submission``) to a number."""
    service = service.strip()
    if service.isdigit():
        port = int(service)
        if not 0 < port < 65536:
            raise ConfigError(f"{where}: bad port number {service!r} (expected 1-65535)")
        return port
    try:
        return socket.getservbyname(service, "tcp")
    except OSError:
        pass
    if service.lower() in _WELL_KNOWN_SERVICES:
        return _WELL_KNOWN_SERVICES[service.lower()]
    raise ConfigError(f"{where}: unknown TCP service {service!r} (expected a port number or a service name)")


def to_a_label(name: str) -> str:
    """A domain or host name in its lower-case A-label (ASCII) form.

    Raises ValueError for a name that is not a valid IDN.
    """
    name = name.strip().rstrip(".")
    if name.isascii():
        return name.lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"{name!r} is not a valid internationalized domain name: {exc}") from None


def _is_address_literal(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_nexthop(
    text: str,
    *,
    destination: str,
    default_port: int,
    mx_lookup_allowed: bool,
    is_relay: bool = False,
    is_fallback: bool = False,
    where: str,
) -> Nexthop:
    """Parse one Postfix destination: ``host``, ``host:port``, ``[host]``,
    ``[host]:port``; ``[ipv6:2001:db8::1]`` and ``[2001:db8::1]`` as well."""
    written = text.strip()
    if not written:
        raise ConfigError(f"{where}: empty destination")
    if written.startswith("["):
        close = written.find("]")
        if close < 0:
            raise ConfigError(f"{where}: missing ']' in destination {written!r}")
        host = written[1:close]
        rest = written[close + 1:]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{where}: unexpected text after ']' in destination {written!r}")
        port = parse_port(rest[1:], where=where) if rest else default_port
        mx_lookup = False
    else:
        host, colon, service = written.partition(":")
        if colon and ":" in service:
            raise ConfigError(f"{where}: an IPv6 address must be written as [address] in destination {written!r}")
        port = parse_port(service, where=where) if colon else default_port
        mx_lookup = mx_lookup_allowed
    if not host:
        raise ConfigError(f"{where}: no host name in destination {written!r}")
    # An address literal has no MX records whatever the brackets say.
    if _is_address_literal(host):
        mx_lookup = False
    try:
        host = to_a_label(host)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Nexthop(
        destination=destination,
        host=host,
        port=port,
        mx_lookup=mx_lookup,
        is_relay=is_relay,
        as_written=written,
        is_fallback=is_fallback,
    )


def split_transport(value: str, *, where: str) -> tuple[str, str]:
    """``transport:nexthop`` to its two parts (either may be empty)."""
    transport, _, nexthop = value.strip().partition(":")
    return transport.strip().lower(), nexthop.strip()


# ---------------------------------------------------------------------------
# Our own addresses (Postfix: own_inet_addr.c)


def _ipv4_interface_addresses() -> set[str]:
    """IPv4 addresses of the network interfaces (Linux SIOCGIFADDR)."""
    found: set[str] = set()
    siocgifaddr = 0x8915
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for name in names:
            try:
                packed = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            found.add(socket.inet_ntoa(packed[20:24]))
    return found


def _ipv6_interface_addresses() -> set[str]:
    """IPv6 addresses of the network interfaces (Linux /proc/net/if_inet6)."""
    found: set[str] = set()
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as table:
            for line in table:
                hex_address = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(hex_address))))
    except (OSError, ValueError, IndexError):
        pass
    return found


def _addresses_of(names: Iterable[str], where: str) -> set[str]:
    found: set[str] = set()
    for name in names:
        bare = name.strip("[]")
        if _is_address_literal(bare):
            found.add(str(ipaddress.ip_address(bare)))
            continue
        try:
            for info in socket.getaddrinfo(bare, None, 0, socket.SOCK_STREAM):
                found.add(str(ipaddress.ip_address(info[4][0].split("%")[0])))
        except OSError as exc:
            log.warn("{where}: cannot resolve {name}: {error}", where=where, name=name, error=exc)
    return found


@dataclass(frozen=True, slots=True)
class ResolveSettings(Settings):
    """The nexthop and address lookup's parameters, bound once."""

    relayhost: str
    transport_maps: tuple[str, ...]
    default_transport: str
    smtp_fallback_relay: tuple[str, ...]
    smtp_tcp_port: str
    inet_protocols: tuple[str, ...]
    inet_interfaces: tuple[str, ...]
    proxy_interfaces: tuple[str, ...]
    smtp_address_preference: str
    smtp_randomize_addresses: bool
    smtp_mx_address_limit: int
    ignore_mx_lookup_error: bool
    disable_dns_lookups: bool
    smtp_dns_support_level: str
    smtp_host_lookup: tuple[str, ...]
    best_mx_transport: str
    dns_nameservers: tuple[str, ...]
    smtp_defer_if_no_mx_address_found: bool
    base_dir: str  # for transport_maps


def check_relays(settings: ResolveSettings) -> None:
    """``relayhost`` and ``smtp_fallback_relay`` parse as destinations
    (``ConfigError`` naming the parameter otherwise), so that a typo such
    as ``[127.0.4.1:43001`` stops the start (and ``relayagent check``)
    instead of deferring every message."""
    for name, items in (("relayhost", split_list(settings.relayhost)),
                        ("smtp_fallback_relay", settings.smtp_fallback_relay)):
        for item in items:
            parse_nexthop(item, destination=item, default_port=25, mx_lookup_allowed=True,
                          is_relay=True, where=name)


def own_addresses(settings: ResolveSettings) -> set[str]:
    """The addresses this mail system receives mail on, for self-detection.

    ``inet_interfaces`` (``all``, ``loopback-only`` or addresses and host
    names) plus ``proxy_interfaces``.  Host names are resolved once, with
    the system resolver, as Postfix does at start-up.
    """
    found: set[str] = set()
    interfaces = [item.lower() for item in settings.inet_interfaces]
    if "all" in interfaces:
        found |= {"127.0.0.1", "::1"}
        found |= _ipv4_interface_addresses()
        found |= _ipv6_interface_addresses()
    elif "loopback-only" in interfaces:
        found |= {"127.0.0.1", "::1"}
    else:
        found |= _addresses_of(settings.inet_interfaces, "inet_interfaces")
    found |= _addresses_of(settings.proxy_interfaces, "proxy_interfaces")
    return found


# ---------------------------------------------------------------------------
# DNS resolvers for production


def resolv_conf_servers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf(5), read once.

    As Postfix does, the file is read at start-up only: after a chroot it
    may be out of reach, and twisted.names' own periodic re-read would then
    fall back to 127.0.0.1.  No usable line (or no file) means
    127.0.0.1, as resolv.conf(5) says.
    """
    servers: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver" and _is_address_literal(words[1]):
                    servers.append((words[1], dns.PORT))
    except OSError:
        pass
    return servers or [("127.0.0.1", dns.PORT)]


def make_dns_resolver(config: Config, reactor: Any, *, resolv_conf: str = "/etc/resolv.conf") -> Any:
    """The twisted.names resolver that ``dns_nameservers`` asks for.

    ``dns_nameservers`` lists ``host`` or ``host:port`` (``[v6addr]:port``
    for IPv6); empty means the name servers in /etc/resolv.conf, read now.
    """
    # Imported here: twisted.names' client is slow to import.
    from relayagent.smtp.dnsclient import QuietResolver

    servers: list[tuple[str, int]] = []
    for item in ResolveSettings.from_config(config).dns_nameservers:
        where = f"dns_nameservers: {item}"
        if item.startswith("["):
            close = item.find("]")
            if close < 0:
                raise ConfigError(f"{where}: missing ']'")
            host, rest = item[1:close], item[close + 1:]
            port = parse_port(rest[1:], where=where) if rest.startswith(":") else dns.PORT
        elif item.count(":") == 1:
            host, _, service = item.partition(":")
            port = parse_port(service, where=where)
        else:
            host, port = item, dns.PORT
        if not _is_address_literal(host):
            raise ConfigError(f"{where}: a name server must be given by its address")
        servers.append((host, port))
    servers = servers or resolv_conf_servers(resolv_conf)
    if ResolveSettings.from_config(config).smtp_dns_support_level == "dnssec":
        # Queries with the AD and DO bits; answers keep the AD bit.
        from relayagent.smtp.dnssec import DNSSECResolver

        for host, port in servers:
            if not ipaddress.ip_address(host).is_loopback:
                log.warn(
                    "smtp_dns_support_level = dnssec: name server {host} is not on this host; "
                    "the AD bit of its answers is trusted as if it were (use a local validating resolver)",
                    host=f"{host}:{port}" if port != dns.PORT else host,
                )
        return DNSSECResolver(servers=servers, reactor=reactor)
    return QuietResolver(servers=servers, reactor=reactor)


SystemResolver = Callable[[str], "Deferred[list[tuple[int, str]]]"]


def make_system_resolver(reactor: Any) -> SystemResolver:
    """getaddrinfo() in the reactor's thread pool: ``name -> [(family, address)]``.

    Errors are ``socket.gaierror`` as getaddrinfo raises them.
    """

    def lookup(name: str) -> Deferred[list[tuple[int, str]]]:
        def blocking() -> list[tuple[int, str]]:
            infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
            return [(info[0], info[4][0]) for info in infos]

        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), blocking)

    return lookup


# ---------------------------------------------------------------------------
# Lookup outcomes


@dataclass
class _HostLookup:
    """The addresses found for one host name, or why none were."""

    addresses: list[tuple[int, str]] = field(default_factory=list)
    error: Status | None = None
    # The address families whose RRset came validated (the AD bit).
    secure_families: set[int] = field(default_factory=set)


def _dns_error_status(name: str, rrtype: str, failure: BaseException, *, hard_dsn: str) -> Status:
    """A Postfix status for a failed DNS query."""
    if isinstance(failure, DNSNameError):
        return Status(hard_dsn, f"Host or domain name not found. Name service error for name={name} type={rrtype}: {_HOST_NOT_FOUND}")
    if isinstance(failure, (DNSFormatError, DNSNotImplementedError)):
        # Postfix's NO_RECOVERY: a hard failure (5.4.3).
        return Status("5.4.3", f"Name service error for name={name} type={rrtype}: {_NO_RECOVERY}")
    # SERVFAIL, REFUSED, timeouts, no server reachable: try again later.
    return Status("4.4.3", f"Host or domain name not found. Name service error for name={name} type={rrtype}: {_TRY_AGAIN}")


def _no_data_status(name: str, rrtype: str) -> Status:
    return Status("5.4.4", f"Host or domain name not found. Name service error for name={name} type={rrtype}: {_NO_DATA}")


def _records_through_cnames(name: str, answers: Sequence[dns.RRHeader], rrtype: int) -> tuple[list[dns.RRHeader], str]:
    """The records of ``rrtype`` for ``name`` in an answer section, following
    CNAME records in it.  Returns them and the last name of the chain (to
    query next when the server did not chase the chain itself)."""
    current = name.lower()
    for _ in range(MAX_CNAME_HOPS + 1):
        records = [rr for rr in answers if rr.type == rrtype and rr.name.name.decode("ascii", "replace").lower().rstrip(".") == current]
        if records:
            return records, current
        aliases = [rr for rr in answers if rr.type == dns.CNAME and rr.name.name.decode("ascii", "replace").lower().rstrip(".") == current]
        if not aliases:
            return [], current
        current = aliases[0].payload.name.name.decode("ascii", "replace").lower().rstrip(".")
    return [], current


# ---------------------------------------------------------------------------
# The resolver


@implementer(INexthopResolver)
class NexthopResolver:
    """Nexthops for a domain and addresses for a nexthop.

    ``dns_resolver``: a twisted.names ``IResolver`` (``make_dns_resolver``),
    or None when DNS is not to be used.  ``clock``: the reactor or a
    ``task.Clock``.  ``random``: the source for shuffling equal
    preferences (seed it in tests).  ``local_addresses``: returns the
    addresses that are this mail system (default: ``own_addresses``).
    ``system_resolver``: ``name -> Deferred[[(family, address)]]``, the
    native lookup (default: getaddrinfo in the clock's thread pool, when
    the clock is a reactor).
    """

    def __init__(
        self,
        config: Config,
        dns_resolver: Any | None,
        clock: IReactorTime,
        *,
        random: random_module.Random | None = None,
        local_addresses: Callable[[], set[str]] | None = None,
        system_resolver: SystemResolver | None = None,
    ) -> None:
        self.settings = settings = ResolveSettings.from_config(config)
        self.dns_resolver = dns_resolver
        self.clock = clock
        self.random = random if random is not None else random_module.Random()
        self._local_addresses_source = local_addresses or (lambda: own_addresses(settings))
        self._local_addresses: set[str] | None = None
        if system_resolver is None and hasattr(clock, "getThreadPool"):
            system_resolver = make_system_resolver(clock)
        self.system_resolver = system_resolver
        self.default_port = parse_port(settings.smtp_tcp_port, where="smtp_tcp_port")
        self.transport_maps = open_maps(settings.transport_maps, base_dir=settings.base_dir)

        protocols = {item.lower() for item in settings.inet_protocols}
        if "all" in protocols or not protocols:
            protocols = {"ipv4", "ipv6"}
        self.families: tuple[int, ...] = tuple(
            family for name, family in (("ipv4", socket.AF_INET), ("ipv6", socket.AF_INET6)) if name in protocols
        )
        support = settings.smtp_dns_support_level
        self.dns_enabled = not (support == "disabled" or (support == "" and settings.disable_dns_lookups))
        # Trust the AD bit of the (local, validating) resolver.
        self.dnssec = self.dns_enabled and support == "dnssec"
        lookup = set(settings.smtp_host_lookup)
        self.host_lookup_dns = self.dns_enabled and "dns" in lookup and dns_resolver is not None
        # With DNS disabled (or no resolver given), the system resolver is
        # all there is, whatever smtp_host_lookup says.
        self.host_lookup_native = "native" in lookup or not self.host_lookup_dns

    # -- nexthops --------------------------------------------------------

    def nexthops(self, domain: str) -> list[Nexthop]:
        """The ordered nexthops for a recipient domain.

        Raises ``ConfigError`` for a transport we do not run or a malformed
        nexthop, and ``DeliveryFailure`` (5.1.2) for a domain that is not a
        valid (internationalized) domain name.
        """
        try:
            a_label = to_a_label(domain)
        except ValueError as exc:
            raise DeliveryFailure(Status("5.1.2", f"bad destination domain: {exc}"), skip_to_next=False) from None
        relayhost = self.settings.relayhost.strip()
        relay_items = split_list(relayhost)
        mx_allowed = self.dns_enabled

        written: tuple[str, ...] = ()
        where = ""
        entry = self._transport_entry(domain, a_label)
        if entry is not None:
            key, value = entry
            where = f"transport_maps entry {key!r}"
            transport, nexthop_text = split_transport(value, where=where)
            self._check_transport(transport or self._default_transport()[0], where)
            written = split_list(nexthop_text)
        if not written:
            transport, nexthop_text = self._default_transport()
            if nexthop_text:
                written, where = split_list(nexthop_text), "default_transport"
        if not written and relay_items:
            written, where = relay_items, "relayhost"
        result: list[Nexthop] = []
        if written:
            for item in written:
                result.append(
                    parse_nexthop(
                        item,
                        destination=a_label,
                        default_port=self.default_port,
                        mx_lookup_allowed=mx_allowed,
                        # Postfix: the nexthop *is* the relayhost when it is
                        # written the same (smtp_connect.c).
                        is_relay=item in relay_items,
                        where=where,
                    )
                )
        else:
            result.append(
                Nexthop(
                    destination=a_label,
                    host=a_label,
                    port=self.default_port,
                    mx_lookup=mx_allowed and not _is_address_literal(a_label),
                    is_relay=False,
                    as_written=a_label,
                )
            )
        for item in self.settings.smtp_fallback_relay:
            result.append(
                parse_nexthop(
                    item,
                    destination=a_label,
                    default_port=self.default_port,
                    mx_lookup_allowed=mx_allowed,
                    is_relay=True,
                    is_fallback=True,
                    where="smtp_fallback_relay",
                )
            )
        return result

    def _default_transport(self) -> tuple[str, str]:
        transport, nexthop = split_transport(self.settings.default_transport, where="default_transport")
        self._check_transport(transport or "smtp", "default_transport")
        return transport, nexthop

    @staticmethod
    def _check_transport(transport: str, where: str) -> None:
        if transport not in _OUR_TRANSPORTS:
            raise ConfigError(
                f"{where}: transport {transport!r} is not available: relayagent runs only "
                "the smtp transport (write smtp:nexthop or relay:nexthop)"
            )

    def _transport_entry(self, domain: str, a_label: str) -> tuple[str, str] | None:
        """transport(5) lookup order: the domain, ``.parent`` for each parent
        domain, then ``*``.  The U-label form is tried before the A-label."""
        if not self.transport_maps:
            return None
        forms = [domain.strip().rstrip(".").lower()]
        if a_label not in forms:
            forms.append(a_label)
        keys: list[str] = []
        for form in forms:
            keys.append(form)
        for form in forms:
            labels = form.split(".")
            keys.extend("." + ".".join(labels[i:]) for i in range(1, len(labels)))
        keys.append("*")
        for key in keys:
            value = self.transport_maps.lookup(key)
            if value is not None:
                return key, value
        return None

    # -- addresses -------------------------------------------------------

    def local_addresses(self) -> set[str]:
        """The addresses of this mail system, normalized, from
        ``local_addresses`` on the first call and remembered after: an MX
        host with one of them is this host, and it and the hosts of worse
        preference are dropped (Postfix's smtp_find_self)."""
        if self._local_addresses is None:
            self._local_addresses = {_normalize(a) for a in self._local_addresses_source()}
        return self._local_addresses

    def addresses(self, nexthop: Nexthop) -> Deferred[AddressList]:
        """The addresses to try for ``nexthop``, best first.

        Fails with ``DeliveryFailure``.  A loop (5.4.6, or 4.4.4 when
        better MX hosts could not be found) has ``skip_to_next=False``: no
        fallback relay is to be tried.
        """
        return Deferred.fromCoroutine(self._addresses(nexthop))

    async def _addresses(self, nexthop: Nexthop) -> AddressList:
        if nexthop.mx_lookup and self.dns_enabled and self.dns_resolver is not None:
            result = await self._domain_addresses(nexthop)
        else:
            result = await self._host_addresses(nexthop)
        limit = self.settings.smtp_mx_address_limit
        if limit > 0 and len(result) > limit:
            del result[limit:]
        return result

    async def _domain_addresses(self, nexthop: Nexthop) -> AddressList:
        """smtp_domain_addr(): MX lookup, then each MX host's addresses."""
        name = nexthop.host
        try:
            answers, mx_secure = await self._query_validated(name, dns.MX)
        except DNSNameError as exc:
            # NXDOMAIN: the name has no records of any type (RFC 8020), so
            # an A/AAAA fallback query could only say the same.
            raise DeliveryFailure(_dns_error_status(name, "MX", exc, hard_dsn="5.4.4")) from None
        except Exception as exc:  # SERVFAIL, REFUSED, timeout, FORMERR...
            status = _dns_error_status(name, "MX", exc, hard_dsn="5.4.4")
            if not self.settings.ignore_mx_lookup_error:
                raise DeliveryFailure(status) from None
            log.info("{name}: {reason}; ignore_mx_lookup_error=yes: looking up its address instead", name=name, reason=status.text)
            return await self._host_addresses(nexthop)

        if not answers:
            return await self._host_addresses(nexthop)

        exchangers = [(rr.payload.preference, rr.payload.name.name.decode("ascii", "replace").rstrip(".").lower()) for rr in answers]
        null_mx = [pair for pair in exchangers if pair[1] == ""]
        if null_mx and len(null_mx) == len(exchangers):
            raise DeliveryFailure(Status("5.1.0", f"Domain {name} does not accept mail (nullMX)"), skip_to_next=False)
        # RFC 7505 forbids a null MX beside other MX records; the real ones
        # are used then.
        exchangers = sorted((pair for pair in exchangers if pair[1] != ""), key=lambda pair: pair[0])
        best_preference = exchangers[0][0]

        lookups = await defer.gatherResults(
            [Deferred.fromCoroutine(self._lookup_host(host)) for _, host in exchangers], consumeErrors=True
        )
        found: list[MailExchangerAddress] = []
        errors: list[Status] = []
        for (preference, host), lookup in zip(exchangers, lookups, strict=True):
            found.extend(
                MailExchangerAddress(
                    host, address, family, preference, nexthop.port,
                    mx_dnssec_valid=mx_secure, host_dnssec_valid=family in lookup.secure_families,
                )
                for family, address in lookup.addresses
            )
            if lookup.error is not None:
                errors.append(lookup.error)
        if not found:
            log.warn("no MX host for {name} has a valid address record", name=name)
            # Postfix: a soft error dominates hard ones.
            soft = [status for status in errors if status.soft]
            status = (soft or errors)[-1] if errors else _no_data_status(name, "A")
            if self.settings.smtp_defer_if_no_mx_address_found:
                # smtp_addr.c: the text stays, a hard status becomes soft.
                status = dataclasses.replace(status, dsn="4" + status.dsn[1:]) if status.hard else status
            raise DeliveryFailure(status)

        result = AddressList(self._order(found))
        if nexthop.port == SMTP_PORT:
            self._truncate_at_self(result, name, best_preference)
        return result

    def _truncate_at_self(self, result: AddressList, name: str, best_preference: int) -> None:
        """Drop our own preference and worse (smtp_find_self/smtp_truncate_self)."""
        mine = self.local_addresses()
        best_found = result[0].preference if result else best_preference
        for item in result:
            if _normalize(item.address) in mine:
                self_preference = item.preference
                result.found_myself = True
                cut = next(i for i, other in enumerate(result) if other.preference >= self_preference)
                del result[cut:]
                break
        else:
            return
        if result:
            return
        if best_preference != best_found:
            raise DeliveryFailure(Status("4.4.4", f"unable to find primary relay for {name}"), skip_to_next=False)
        transport = self.settings.best_mx_transport.strip()
        if transport:
            # Postfix hands the request to best_mx_transport; we run no other
            # transport, so this is a configuration problem: defer.
            raise DeliveryFailure(
                Status(
                    "4.3.5",
                    f"mail for {name} loops back to myself, and best_mx_transport={transport} "
                    "is not supported by relayagent",
                ),
                skip_to_next=False,
            )
        raise DeliveryFailure(Status("5.4.6", f"mail for {name} loops back to myself"), skip_to_next=False)

    async def _host_addresses(self, nexthop: Nexthop) -> AddressList:
        """smtp_host_addr(): the addresses of one host (no MX lookup)."""
        lookup = await self._lookup_host(nexthop.host)
        if not lookup.addresses:
            raise DeliveryFailure(lookup.error or _no_data_status(nexthop.host, "A"))
        found = [
            MailExchangerAddress(
                nexthop.host, address, family, 0, nexthop.port,
                mx_dnssec_valid=True, host_dnssec_valid=family in lookup.secure_families,
            )
            for family, address in lookup.addresses
        ]
        if nexthop.port == SMTP_PORT:
            mine = self.local_addresses()
            if any(_normalize(item.address) in mine for item in found):
                raise DeliveryFailure(Status("5.4.6", f"mail for {nexthop.host} loops back to myself"), skip_to_next=False)
        return AddressList(self._order(found))

    def _order(self, found: list[MailExchangerAddress]) -> list[MailExchangerAddress]:
        """Sort by preference; within one preference shuffle (when
        smtp_randomize_addresses) and put the preferred family first."""
        by_preference: dict[int, list[MailExchangerAddress]] = {}
        for item in found:
            by_preference.setdefault(item.preference, []).append(item)
        preferred = self.settings.smtp_address_preference
        ordered: list[MailExchangerAddress] = []
        for preference in sorted(by_preference):
            level = by_preference[preference]
            if self.settings.smtp_randomize_addresses:
                self.random.shuffle(level)
            if preferred in ("ipv4", "ipv6"):
                first = socket.AF_INET if preferred == "ipv4" else socket.AF_INET6
                level.sort(key=lambda item: item.family != first)  # stable
            ordered.extend(level)
        return ordered

    async def _lookup_host(self, host: str) -> _HostLookup:
        """One host's addresses: an address literal as is, then DNS (A/AAAA
        per inet_protocols), then the system resolver when configured."""
        literal = host.strip("[]")
        if _is_address_literal(literal):
            address = ipaddress.ip_address(literal)
            family = socket.AF_INET if address.version == 4 else socket.AF_INET6
            if family in self.families:
                return _HostLookup([(family, str(address))])
            return _HostLookup(error=Status("5.4.4", f"{host}: address family disabled by inet_protocols"))

        result = _HostLookup()
        if self.host_lookup_dns:
            queries = [(family, dns.A if family == socket.AF_INET else dns.AAAA) for family in self.families]
            outcomes = await defer.gatherResults(
                [Deferred.fromCoroutine(self._query_or_error(host, rrtype)) for _, rrtype in queries],
                consumeErrors=True,
            )
            not_found = True
            for (family, rrtype), outcome in zip(queries, outcomes, strict=True):
                type_name = "A" if rrtype == dns.A else "AAAA"
                if isinstance(outcome, BaseException):
                    status = _dns_error_status(host, type_name, outcome, hard_dsn="5.4.4")
                    if not isinstance(outcome, DNSNameError):
                        not_found = False
                    result.error = _dominant(result.error, status)
                elif not outcome[0]:
                    result.error = _dominant(result.error, _no_data_status(host, type_name))
                else:
                    records, secure = outcome
                    result.addresses.extend((family, _address_text(rr)) for rr in records)
                    if secure:
                        result.secure_families.add(family)
            if result.addresses or not (not_found and self.host_lookup_native):
                if result.addresses:
                    result.error = None
                return result

        if self.host_lookup_native:
            native = await self._native_lookup(host)
            if native.addresses or result.error is None:
                return native
            result.error = _dominant(result.error, native.error)
        return result

    async def _native_lookup(self, host: str) -> _HostLookup:
        if self.system_resolver is None:
            return _HostLookup(error=Status("4.3.0", f"unable to look up host {host}: no system resolver available"))
        try:
            infos = await self.system_resolver(host)
        except socket.gaierror as exc:
            code = exc.errno
            soft = code in (socket.EAI_AGAIN, socket.EAI_MEMORY, socket.EAI_SYSTEM)
            no_host = code in (socket.EAI_AGAIN, socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
            dsn = ("4.4.4" if no_host else "4.3.0") if soft else ("5.4.4" if no_host else "5.3.0")
            return _HostLookup(error=Status(dsn, f"unable to look up host {host}: {exc.strerror}"))
        except OSError as exc:
            return _HostLookup(error=Status("4.3.0", f"unable to look up host {host}: {exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}"))
        addresses = []
        seen = set()
        for family, address in infos:
            if family not in self.families:
                continue
            address = address.split("%")[0]
            if address not in seen:
                seen.add(address)
                addresses.append((family, address))
        if not addresses:
            return _HostLookup(error=Status("5.4.4", f"{host}: host not found"))
        return _HostLookup(addresses)

    async def _query_validated(self, name: str, rrtype: int) -> tuple[list[dns.RRHeader], bool]:
        """Records of ``rrtype`` for ``name``, through CNAME chains (an
        empty list is NODATA), and whether every reply on the way had the
        AD bit (``smtp_dns_support_level = dnssec``; False otherwise)."""
        lookup = {dns.MX: "lookupMailExchange", dns.A: "lookupAddress", dns.AAAA: "lookupIPV6Address"}[rrtype]
        current = name
        secure = self.dnssec
        for _ in range(MAX_CNAME_HOPS):
            reply = await getattr(self.dns_resolver, lookup)(current)
            secure = secure and is_authentic(reply)
            answers, _authority, _additional = reply
            records, last = _records_through_cnames(current, answers, rrtype)
            if records or last == current.lower().rstrip("."):
                return records, secure
            # The server gave a CNAME without chasing it: ask for the target.
            current = last
        raise DNSFormatError(f"too many CNAME indirections for {name}")

    async def _query_or_error(self, name: str, rrtype: int) -> tuple[list[dns.RRHeader], bool] | BaseException:
        try:
            return await self._query_validated(name, rrtype)
        except Exception as exc:
            return exc


def _dominant(previous: Status | None, new: Status) -> Status:
    """Postfix: a soft error dominates past and future hard errors."""
    if previous is not None and previous.soft and not new.soft:
        return previous
    return new


def _address_text(rr: dns.RRHeader) -> str:
    return rr.payload.dottedQuad() if rr.type == dns.A else socket.inet_ntop(socket.AF_INET6, rr.payload.address)


def _normalize(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.split("%")[0]))
    except ValueError:
        return address
