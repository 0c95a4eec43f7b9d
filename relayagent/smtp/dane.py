"""
DANE for SMTP (RFC 7672, RFC 6698, RFC 7218, RFC 7671): TLSA lookup and
certificate matching (Postfix: tls/tls_dane.c, the dane_init() part of
smtp/smtp_tls_policy.c).

TLSA records are looked up at ``_PORT._tcp.HOST`` (port 25 for an MX
host, the relayhost's port for ``[host]:port``) through the
DNSSEC-asking resolver (``relayagent.smtp.dnssec``), and only when the
MX RRset and the host's address RRset were validated.  twisted.names
knows no TLSA record class: type 52 comes as an ``UnknownRecord`` whose
raw rdata is parsed here (usage, selector, matching type, data).

As in Postfix, usable records are DANE-TA(2) and DANE-EE(3) only (PKIX-TA
and PKIX-EE make no sense without a common set of CAs for SMTP, RFC 7672
section 3.1.3); selectors Cert(0) and SPKI(1); matching types Full(0),
SHA2-256(1) and SHA2-512(2).  Matching is done in Python on the peer's
certificate chain, since pyOpenSSL does not expose OpenSSL's SSL_dane_*:

- DANE-EE: the leaf certificate matches; its names and dates are ignored
  (RFC 7672 section 3.1.1).
- DANE-TA: a certificate of the chain above the leaf matches (or a full
  ``2 0 0`` certificate that issued the top of the chain); each
  certificate below it is signed by the next one and within its dates;
  each issuer up to the anchor is a CA certificate (basicConstraints,
  keyCertSign, path length), the leaf's extended key usage (if any)
  allows TLS servers; the leaf's name must then match one of the
  reference names (the MX host name and the nexthop domain, RFC 7672
  section 3.2.2).  Name constraints are not checked.

With a clock (``DaneResolver(..., clock=reactor)``) the TLSA answers are
kept in a ``TLSACache`` per ``_PORT._tcp.HOST`` for their RRset's TTL
(at most 100 seconds, as Postfix's tls_dane.c), so that the addresses of
one MX host and the sessions that follow share one query; failed
lookups are not kept.

SYNOPSIS

    dane = DaneResolver(dns_resolver, enabled=True, clock=reactor)
    lookup = await dane.lookup(host, port, mx_dnssec_valid=..., host_dnssec_valid=...)
    lookup.state       # insecure, notfound, unusable, usable, error
    lookup.applies     # usable TLSA records under a validated MX: DANE wins
    await dane.applies(server)          # the same for a ServerInfo/MailExchangerAddress
    match = match_chain(chain, lookup.records, name_matches=..., now=...)
    TLSARecord.from_rdata(b"\\x03\\x01\\x01...")

DIAGNOSTICS: ``lookup`` does not fail; a failed TLSA query (SERVFAIL,
which a validating resolver gives for bogus data; a timeout) is the state
``error`` with Postfix's reason "TLSA lookup error for HOST:PORT" (the
TLS layer defers with 4.7.5, never plaintext), and a warning "DANE TLSA
lookup problem: ..." is logged.  Records that are unusable are logged
("unsupported TLSA certificate usage" and the like) and dropped.
``TLSARecord.from_rdata`` raises ``ValueError`` for truncated rdata.

Owns no parameters: ``smtp_dns_support_level`` (resolve) enables it, the
levels ``dane`` and ``dane-only`` (tls) ask for it.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from relayagent.smtp.dnssec import is_authentic

log = Logger(namespace="relayagent.smtp.dane")

TLSA = 52

USAGE_PKIX_TA, USAGE_PKIX_EE, USAGE_DANE_TA, USAGE_DANE_EE = 0, 1, 2, 3
SELECTOR_CERT, SELECTOR_SPKI = 0, 1
MATCHING_FULL, MATCHING_SHA256, MATCHING_SHA512 = 0, 1, 2

# The TLSA cache (TLSACache): how many host:port names, and the longest
# an answer is kept whatever its TTL (Postfix's TLS_DANE_CACHE_TTL_MAX,
# "comparable to max_idle").  Postfix keeps 20 per delivery process; one
# relayagent process delivers to many hosts at once.
TLSA_CACHE_SIZE = 1000
TLSA_CACHE_TTL_MAX = 100

_USAGES = {USAGE_DANE_TA, USAGE_DANE_EE}
_SELECTORS = {SELECTOR_CERT, SELECTOR_SPKI}
_MATCHINGS = {MATCHING_FULL, MATCHING_SHA256, MATCHING_SHA512}


def tlsa_name(host: str, port: int) -> str:
    """The TLSA owner name of a service: ``_25._tcp.mx.example.com``."""
    return f"_{port}._tcp.{host.rstrip('.').lower()}"


@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record: certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    matching: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata: bytes) -> TLSARecord:
        """Parse the wire rdata of a TLSA record (RFC 6698 section 2.1)."""
        if len(rdata) <= 3:
            raise ValueError(f"truncated TLSA RR length == {len(rdata)}")
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    @property
    def problem(self) -> str | None:
        """Why Postfix would drop this record, or None when it is usable."""
        if self.usage not in _USAGES:
            return "unsupported TLSA certificate usage"
        if self.selector not in _SELECTORS:
            return "unsupported TLSA selector"
        if self.matching not in _MATCHINGS:
            return "unsupported TLSA matching type"
        return None

    @property
    def usable(self) -> bool:
        """DANE-TA or DANE-EE, with a selector and matching type we know."""
        return self.problem is None

    def association(self, certificate: x509.Certificate) -> bytes:
        """The certificate's data under this record's selector and
        matching type, to compare with ``data``."""
        if self.selector == SELECTOR_CERT:
            selected = certificate.public_bytes(serialization.Encoding.DER)
        else:
            selected = certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        if self.matching == MATCHING_SHA256:
            return hashlib.sha256(selected).digest()
        if self.matching == MATCHING_SHA512:
            return hashlib.sha512(selected).digest()
        return selected

    def matches(self, certificate: x509.Certificate) -> bool:
        """Whether ``certificate`` is the one this record names."""
        return self.usable and self.association(certificate) == self.data

    def __str__(self) -> str:
        # Postfix's form: "3 1 1 ABCD..."; data longer than 64 octets is
        # shown as its first and last 32 (tls_dane.c's MAX_DUMP_BYTES).
        data = self.data
        text = data.hex().upper() if len(data) <= 64 else f"{data[:32].hex().upper()}...{data[-32:].hex().upper()}"
        return f"{self.usage} {self.selector} {self.matching} {text}"


def record_for(certificate: x509.Certificate, usage: int = USAGE_DANE_EE, selector: int = SELECTOR_SPKI,
               matching: int = MATCHING_SHA256) -> TLSARecord:
    """The TLSA record that names ``certificate`` (for tests and for
    administrators: what to publish)."""
    record = TLSARecord(usage, selector, matching, b"")
    return TLSARecord(usage, selector, matching, record.association(certificate))


# ------------------------------------------------------------------ lookup


class DaneState(str, enum.Enum):
    """What the TLSA lookup for one server found."""

    INSECURE = "insecure"  # the MX RRset was not validated: no DANE
    NOT_FOUND = "notfound"  # no (validated) TLSA records
    UNUSABLE = "unusable"  # TLSA records, none usable
    USABLE = "usable"  # usable TLSA records: DANE applies
    ERROR = "error"  # the lookup failed: defer

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TLSALookup:
    """The outcome of one TLSA lookup: its state, the usable records,
    and the reason in Postfix's words (for logs and statuses)."""

    state: DaneState
    records: tuple[TLSARecord, ...] = ()
    reason: str = ""
    host: str = ""
    port: int = 25
    # Our configuration rules DANE out (no dnssec lookups), not the
    # destination's DNS.
    config_problem: bool = False
    # The MX RRset that named the host was validated (False: the TLSA
    # records of a secure host found through an insecure MX lookup,
    # Postfix's "half-dane").
    mx_secure: bool = True

    @property
    def applies(self) -> bool:
        """DANE authenticates this server: validated MX and host, usable
        TLSA records (MTA-STS must yield then, RFC 8461 section 2)."""
        return self.state is DaneState.USABLE and self.mx_secure


@dataclass(frozen=True)
class TLSAAnswer:
    """What one TLSA query gave, before the MX and host states are put
    to it: ``state`` (notfound, unusable, usable or error), the usable
    ``records``, Postfix's ``reason``, and ``ttl``: the seconds it may be
    kept (None: not at all, as for an error)."""

    state: DaneState
    reason: str = ""
    records: tuple[TLSARecord, ...] = ()
    ttl: int | None = None


class TLSACache:
    """Recent TLSA answers by owner name (``_25._tcp.mx.example.com``:
    one per host and port), so that the addresses of one MX host and the
    sessions soon after share one lookup (Postfix: tls_dane.c's
    ctable).

    An answer is kept for its RRset's TTL (a negative one for the
    zone's SOA negative TTL), at most ``TLSA_CACHE_TTL_MAX`` seconds as
    in Postfix, on ``clock``; a TTL of 0 and a failed lookup are not
    kept.  At most ``size`` names, the least recently used dropped
    first.  Lookups of one name in flight at the same time share one
    query.
    """

    def __init__(self, clock: IReactorTime, size: int = TLSA_CACHE_SIZE) -> None:
        self.clock = clock
        self.size = max(1, size)
        self._answers: OrderedDict[str, tuple[float, TLSAAnswer]] = OrderedDict()
        self._in_flight: dict[str, list[Deferred[TLSAAnswer]]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._answers)

    def cached(self, name: str) -> TLSAAnswer | None:
        """The kept answer for ``name`` while its TTL lasts, else None."""
        kept = self._answers.get(name)
        if kept is None:
            return None
        expires, answer = kept
        if self.clock.seconds() >= expires:
            del self._answers[name]
            return None
        self._answers.move_to_end(name)
        return answer

    async def get(self, name: str, query: Callable[[str], Awaitable[TLSAAnswer]]) -> TLSAAnswer:
        """The answer for ``name``: kept, or ``query(name)`` (which does
        not fail; an exception from it reaches every waiter).  Cancelling
        one caller leaves the query running for the others."""
        answer = self.cached(name)
        if answer is not None:
            self.hits += 1
            return answer
        waiter: Deferred[TLSAAnswer] = Deferred()
        waiters = self._in_flight.get(name)
        if waiters is not None:
            waiters.append(waiter)
        else:
            self.misses += 1
            self._in_flight[name] = [waiter]
            # Not awaited here: no caller's cancellation reaches the query.
            Deferred.fromCoroutine(self._run(name, query))
        return await waiter

    async def _run(self, name: str, query: Callable[[str], Awaitable[TLSAAnswer]]) -> None:
        try:
            answer = await query(name)
        except BaseException:  # noqa: BLE001 - handed to every waiter
            failure = Failure()
            for waiter in self._in_flight.pop(name, []):
                waiter.errback(failure)
            return
        self._keep(name, answer)
        for waiter in self._in_flight.pop(name, []):
            # A cancelled waiter ignores this (Deferred.cancel).
            waiter.callback(answer)

    def _keep(self, name: str, answer: TLSAAnswer) -> None:
        if answer.state is DaneState.ERROR or answer.ttl is None or answer.ttl <= 0:
            return
        ttl = min(answer.ttl, TLSA_CACHE_TTL_MAX)
        self._answers[name] = (self.clock.seconds() + ttl, answer)
        self._answers.move_to_end(name)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)


class DaneResolver:
    """TLSA lookups for the servers of a delivery.

    ``dns_resolver``: a twisted.names resolver whose answers carry the AD
    bit (``relayagent.smtp.dnssec.DNSSECResolver``), or None.
    ``enabled``: ``smtp_dns_support_level = dnssec`` (and DNS in use);
    ``disabled_reason`` says why not, for the warning of a ``dane`` policy
    that cannot work.
    """

    def __init__(self, dns_resolver: Any | None, *, enabled: bool, disabled_reason: str = "",
                 clock: IReactorTime | None = None, cache_size: int = TLSA_CACHE_SIZE) -> None:
        self.dns_resolver = dns_resolver
        self.enabled = enabled and dns_resolver is not None
        self.disabled_reason = disabled_reason or "configured with dnssec lookups disabled"
        # The TLSA answers of recent lookups (none without a clock).
        self.cache = TLSACache(clock, cache_size) if clock is not None else None

    def lookup(
        self, host: str, port: int, *, mx_dnssec_valid: bool, host_dnssec_valid: bool, insecure_mx_ok: bool = False
    ) -> Deferred[TLSALookup]:
        """The TLSA records of ``host``'s ``port`` (Postfix's dane_init
        and tls_dane_resolve): insecure when the MX RRset was not
        validated (unless ``insecure_mx_ok``: level dane with
        smtp_tls_dane_insecure_mx_policy encrypt or dane; the outcome then
        has ``mx_secure`` False), notfound when the host's addresses were
        not validated (no lookup is made), else what the validated
        lookup gives."""
        return Deferred.fromCoroutine(
            self._lookup(host.rstrip(".").lower(), port, mx_dnssec_valid, host_dnssec_valid, insecure_mx_ok)
        )

    def applies(self, server: Any) -> Deferred[bool]:
        """Whether DANE applies to one MX host (a ``ServerInfo`` or a
        ``resolve.MailExchangerAddress``): validated MX and host records
        and usable TLSA records.  A failed lookup is not "applies" (the
        DANE level defers the mail then, see ``TLSALookup.state``)."""
        d = self.lookup(
            server.host,
            server.port,
            mx_dnssec_valid=server.mx_dnssec_valid,
            host_dnssec_valid=server.host_dnssec_valid,
        )
        return d.addCallback(lambda lookup: lookup.applies)

    async def _lookup(self, host: str, port: int, mx_valid: bool, host_valid: bool, insecure_mx_ok: bool) -> TLSALookup:
        def outcome(state: DaneState, reason: str, records: tuple[TLSARecord, ...] = ()) -> TLSALookup:
            return TLSALookup(state, records, reason, host, port, mx_secure=mx_valid)

        if not self.enabled:
            return TLSALookup(DaneState.NOT_FOUND, (), self.disabled_reason, host, port, config_problem=True)
        if not mx_valid and not insecure_mx_ok:
            return outcome(DaneState.INSECURE, "non DNSSEC destination")
        if not host_valid:
            # Postfix: no TLSA lookup for a host in an unsigned zone.
            return outcome(DaneState.NOT_FOUND, "no TLSA records found")
        name = tlsa_name(host, port)
        if self.cache is None:
            answer = await self._query(name)
        else:
            answer = await self.cache.get(name, self._query)
        if answer.state is DaneState.ERROR:
            return outcome(DaneState.ERROR, f"TLSA lookup error for {host}:{port}")
        return outcome(answer.state, answer.reason, answer.records)

    async def _query(self, name: str) -> TLSAAnswer:
        """What the DNS says of one TLSA owner name, with how long it may
        be kept (``TLSAAnswer.ttl``; an error is not kept)."""
        try:
            reply = await self.dns_resolver.query(dns.Query(name, TLSA, dns.IN))
        except DNSNameError as exc:
            return TLSAAnswer(DaneState.NOT_FOUND, "no TLSA records found", ttl=_negative_ttl(exc))
        except Exception as exc:  # noqa: BLE001 - SERVFAIL (bogus), timeout, refused: all defer
            log.warn("DANE TLSA lookup problem: {name}: {reason}", name=name, reason=_describe(exc))
            return TLSAAnswer(DaneState.ERROR, "TLSA lookup error")
        answers = reply[0]
        ttl = min((rr.ttl for rr in answers), default=None)
        if not is_authentic(reply):
            # Postfix: an unvalidated TLSA RRset is as good as none.
            return TLSAAnswer(DaneState.NOT_FOUND, "no TLSA records found",
                              ttl=ttl if answers else _soa_ttl(reply[1]))
        found = [rr for rr in answers if rr.type == TLSA]
        if not found:
            # NODATA: kept as long as the zone's negative TTL says.
            return TLSAAnswer(DaneState.NOT_FOUND, "no TLSA records found", ttl=_soa_ttl(reply[1]))
        usable: list[TLSARecord] = []
        for rr in found:
            try:
                record = TLSARecord.from_rdata(_rdata(rr))
            except ValueError as exc:
                log.warn("{name}: {reason}", name=name, reason=str(exc))
                continue
            if record.problem:
                # Postfix (tlsa_carp): "_25._tcp.mx.example.com unsupported TLSA
                # certificate usage: 1 1 1 ABCD..."
                log.warn("{name} {problem}: {record}", name=name, problem=record.problem, record=str(record))
                continue
            usable.append(record)
        if not usable:
            return TLSAAnswer(DaneState.UNUSABLE, "TLSA records unusable", ttl=ttl)
        return TLSAAnswer(DaneState.USABLE, "", tuple(usable), ttl=ttl)


def _soa_ttl(authority: Sequence[Any]) -> int | None:
    """The negative TTL of a NODATA or NXDOMAIN answer (RFC 2308
    section 5: the smaller of the SOA record's TTL and its minimum),
    or None without an SOA record."""
    for rr in authority or ():
        if getattr(rr, "type", None) == dns.SOA:
            return min(rr.ttl, getattr(rr.payload, "minimum", rr.ttl))
    return None


def _negative_ttl(exc: DNSNameError) -> int | None:
    """The negative TTL of an NXDOMAIN (its message's SOA), if any."""
    message = exc.args[0] if exc.args else None
    return _soa_ttl(getattr(message, "authority", ()))


def _rdata(rr: dns.RRHeader) -> bytes:
    payload = rr.payload
    data = getattr(payload, "data", None)
    if isinstance(data, bytes):
        return data
    raise ValueError("TLSA record without raw data")


def _describe(exc: BaseException) -> str:
    if type(exc).__name__ == "DNSServerError":
        return "Host not found, try again (SERVFAIL)"
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------- matching


@dataclass(frozen=True)
class DaneMatch:
    """How the peer chain fared against the TLSA records.

    ``trusted``: a record matched (the leaf for DANE-EE; a trust anchor
    and a verified chain for DANE-TA).  ``verified``: trusted and, for
    DANE-TA, the leaf's name matched.  ``record`` and ``depth``: the record
    that matched and the chain depth it matched at.  ``reason``: why not,
    when not verified.
    """

    trusted: bool
    verified: bool
    record: TLSARecord | None = None
    depth: int = -1
    reason: str = ""

    @property
    def description(self) -> str:
        """Postfix's "Matched DANE EE certificate at depth 0: 3 1 1 ..."."""
        if self.record is None:
            return ""
        kind = "EE certificate" if self.record.usage == USAGE_DANE_EE else "TA certificate"
        return f"Matched DANE {kind} at depth {self.depth}: {self.record}"


def _signed_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _may_issue(certificate: x509.Certificate, cas_below: int) -> bool:
    """A CA certificate (basicConstraints CA, a path length that allows
    ``cas_below`` CA certificates under it, keyCertSign when it has a key
    usage): without this check any holder of a certificate under the trust
    anchor could sign a certificate for any name with its key."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    if constraints.path_length is not None and cas_below > constraints.path_length:
        return False
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.key_cert_sign


def _for_servers(certificate: x509.Certificate) -> bool:
    """No extended key usage, or one that allows TLS servers (OpenSSL's
    purpose check, which DANE-TA keeps)."""
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.SERVER_AUTH in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


def _in_dates(certificate: x509.Certificate, now: datetime.datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _full_certificate(record: TLSARecord) -> x509.Certificate | None:
    if record.selector != SELECTOR_CERT or record.matching != MATCHING_FULL:
        return None
    try:
        return x509.load_der_x509_certificate(record.data)
    except ValueError:
        return None


def match_chain(
    chain: Sequence[x509.Certificate],
    records: Sequence[TLSARecord],
    *,
    name_matches: Callable[[x509.Certificate], bool],
    now: datetime.datetime | None = None,
) -> DaneMatch:
    """Match the peer's chain (leaf first, as the server sent it) against
    usable TLSA records.  ``name_matches(leaf)``: the reference-name check
    for DANE-TA (the MX host name or the nexthop domain)."""
    if not chain:
        return DaneMatch(False, False, reason="no server certificate")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    usable = [record for record in records if record.usable]
    leaf = chain[0]
    for record in usable:
        if record.usage == USAGE_DANE_EE and record.matches(leaf):
            return DaneMatch(True, True, record, 0)

    reasons: list[str] = []
    anchors = [record for record in usable if record.usage == USAGE_DANE_TA]
    # Candidate trust anchors: certificates of the chain above the leaf,
    # then a full certificate in a "2 0 0" record that issued the top.
    candidates: list[tuple[int, x509.Certificate, TLSARecord]] = []
    for depth in range(1, len(chain)):
        for record in anchors:
            if record.matches(chain[depth]):
                candidates.append((depth, chain[depth], record))
    for record in anchors:
        anchor = _full_certificate(record)
        if anchor is not None and anchor not in chain and _signed_by(chain[-1], anchor):
            candidates.append((len(chain), anchor, record))
    for depth, anchor, record in candidates:
        path = list(chain[:depth]) + [anchor]
        if not all(_signed_by(path[i], path[i + 1]) for i in range(depth)):
            reasons.append(f"chain to the trust anchor at depth {depth} does not verify")
            continue
        not_ca = [i for i in range(1, depth + 1) if not _may_issue(path[i], i - 1)]
        if not_ca:
            reasons.append(f"certificate at depth {not_ca[0]} is not a CA that may issue here")
            continue
        if not _for_servers(leaf):
            reasons.append("certificate at depth 0 is not for TLS servers (extended key usage)")
            continue
        expired = [i for i in range(depth) if not _in_dates(path[i], now)]
        if expired:
            reasons.append(f"certificate at depth {expired[0]} is expired or not yet valid")
            continue
        if not name_matches(leaf):
            return DaneMatch(True, False, record, depth, reason="server certificate name does not match")
        return DaneMatch(True, True, record, depth)
    reasons.insert(0, "not trusted by local or TLSA policy")
    return DaneMatch(False, False, reason="; ".join(reasons))
