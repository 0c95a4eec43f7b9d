"""
STARTTLS in the SMTP client with Postfix's TLS security levels
(Postfix: smtp_tls_policy.c, the STARTTLS part of smtp_proto.c, tls_client.c,
tls_verify.c).

Levels, weakest first:

- ``none``: never STARTTLS.
- ``may``: STARTTLS when the server offers it; the certificate is not
  checked.  A server that refuses STARTTLS gets the mail in plaintext on
  the same connection; a failed handshake is a ``DeliveryFailure`` with
  ``status.retry_plaintext`` set: the connection layer
  reconnects to the same address without TLS (``SessionSecurity
  .plaintext_fallback()``), as Postfix does.
- ``encrypt``: STARTTLS is required (4.7.4 "TLS is required, but was not
  offered by host X"); the certificate is not checked.
- ``verify``: the certificate must chain to smtp_tls_CAfile/smtp_tls_CApath
  (the system trust store when neither is set) and match
  smtp_tls_verify_cert_match (default: the MX host name).
- ``secure``: the same, matching smtp_tls_secure_cert_match (default: the
  nexthop domain and its subdomains).

- ``dane``, ``dane-only`` (RFC 7672): per MX host, the DNSSEC-validated
  TLSA records at ``_PORT._tcp.HOST`` (``relayagent.smtp.dane``) decide
  (``dane_policy``, Postfix's dane_init): usable records make TLS
  mandatory and the certificate must match them (DANE-EE: the leaf's key
  or certificate, names and dates ignored; DANE-TA: a trust anchor of the
  chain, the leaf matching the MX host or the nexthop domain).  Without
  DNSSEC (``smtp_dns_support_level = dnssec``, a validated MX RRset and
  host addresses) or TLSA records, ``dane`` is ``may`` and ``dane-only``
  defers (4.7.5 "non DNSSEC destination", "no TLSA records found";
  at level ``dane`` a secure host with TLSA records found through an
  insecure MX lookup follows smtp_tls_dane_insecure_mx_policy: by default
  its records are enforced, a match logged as "Trusted");
  records that are all unusable make ``dane`` ``encrypt``; a failed TLSA
  lookup (SERVFAIL, bogus) defers both (4.7.5 "TLSA lookup error for
  HOST:PORT"), never plaintext.  A match logs "Verified TLS connection
  established" and (smtp_tls_loglevel 2) "Matched DANE EE certificate at
  depth 0: 3 1 1 ...";
  a mismatch "certificate verification failed for HOST[ADDR]:PORT: not
  trusted by local or TLSA policy" and defers.  The outcome says
  ``policy_type = "tlsa"`` (``TLSOutcome.verified_by_dane``).

A certificate that fails ``verify``, ``secure`` or the TLSA records is
4.7.5 "Server certificate not verified".  ``fingerprint`` is not supported
and defers the mail with 4.7.5 "client TLS configuration problem", as an
invalid policy does in Postfix.

``smtp_tls_policy_maps`` is looked up with the nexthop as written
(``[mx.example.net]:587``, ``example.com``); for a plain domain the parent
domains follow as ``.example.com`` keys.  Values are Postfix's: a level
then ``match=``, ``protocols=``, ``ciphers=``, ``exclude=`` attributes
(``example.com secure match=.example.com:example.net``).

Certificate names are matched against subjectAltName DNS names only: RFC
9525 (which replaces RFC 6125) forbids falling back to the subject CN,
which Postfix still does.

Protocols: Postfix 3.7 allows ``>=TLSv1``; our default for both
smtp_tls_protocols and smtp_tls_mandatory_protocols is ``>=TLSv1.2``, since
RFC 8996 deprecates TLS 1.0 and 1.1.

SYNOPSIS

    settings = TLSSettings.from_config(config)        # contexts built once
    policy = PolicyLookup(level, tables).policy_for(nexthop)      # smtp_tls_security_level
    policy = dane_policy(policy, tlsa_lookup)    # dane/dane-only, per MX host
    outcome = await negotiate_tls(session, policy, settings, nexthop=nexthop)
    outcome.trust, outcome.policy_type, outcome.verified_by_dane

DIAGNOSTICS: a bad level, protocol list, cipher grade, policy entry or
certificate/key setting raises ``TLSConfigError`` (a ``ValueError``);
a policy-table entry found bad at lookup is ``TLSPolicyError``.
``negotiate_tls`` fails with ``DeliveryFailure``: 4.7.4 "TLS is
required, but was not offered by host X", the server's STARTTLS
refusal (X.7.4), 4.7.5 "Server certificate not verified", 4.7.5
"client TLS configuration problem", 4.7.5 "Cannot start TLS: ..."
(``retry_plaintext`` at level ``may``).  ``dane_policy`` fails with
``DeliveryFailure`` 4.7.5 and Postfix's DANE reasons (above).

Owns: smtp_tls_security_level, smtp_tls_policy_maps, smtp_tls_CAfile,
smtp_tls_CApath, smtp_tls_cert_file, smtp_tls_key_file, smtp_tls_protocols,
smtp_tls_mandatory_protocols, smtp_tls_ciphers, smtp_tls_mandatory_ciphers,
smtp_tls_verify_cert_match, smtp_tls_secure_cert_match,
smtp_starttls_timeout, smtp_tls_loglevel.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relayagent.common.config import Settings
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.dane import DaneMatch, DaneState, TLSALookup, TLSARecord, match_chain

log = Logger(namespace="relayagent.smtp.tls")

STARTTLS_STAGE = "STARTTLS"
STARTTLS_WHILE = "sending the STARTTLS command"
# Postfix's text for a server certificate the level's check refused
# (tls_verify.c); ``certificate_refused`` tells such a failure by it.
CERTIFICATE_NOT_VERIFIED = "Server certificate not verified"


class TLSConfigError(ValueError):
    """A TLS parameter or policy entry we cannot use."""


class TLSLevel(enum.IntEnum):
    """Postfix's TLS security levels (the values are ours, not Postfix's)."""

    NONE = 0
    MAY = 1
    ENCRYPT = 2
    VERIFY = 3
    SECURE = 4
    # Resolved per MX host (dane_policy): to MAY, ENCRYPT, a deferral, or
    # DANE with the host's TLSA records in TLSPolicy.tlsa.
    DANE = 5
    DANE_ONLY = 6

    @property
    def mandatory(self) -> bool:
        """TLS is required (Postfix's TLS_REQUIRED); for the DANE levels,
        once usable TLSA records are in hand."""
        return self is not TLSLevel.NONE and self is not TLSLevel.MAY

    @property
    def checks_names(self) -> bool:
        """The certificate must chain to a CA and match a name (WebPKI)."""
        return self in (TLSLevel.VERIFY, TLSLevel.SECURE)

    @property
    def is_dane(self) -> bool:
        """``dane`` or ``dane-only``."""
        return self in (TLSLevel.DANE, TLSLevel.DANE_ONLY)

    def __str__(self) -> str:
        return self.name.lower().replace("_", "-")


def parse_level(word: str, source: str = "smtp_tls_security_level") -> TLSLevel:
    """A level word (``may``, ``dane-only``...) to its ``TLSLevel``."""
    word = word.strip().lower()
    if word in ("", "none"):
        return TLSLevel.NONE
    try:
        return TLSLevel[word.upper().replace("-", "_")]
    except KeyError:
        pass
    if word == "fingerprint":
        raise TLSConfigError(f"{source}: TLS security level {word!r} is not supported")
    raise TLSConfigError(
        f"{source}: unknown TLS security level {word!r}; "
        "expected none, may, encrypt, dane, dane-only, verify or secure"
    )


# ----------------------------------------------------------------- protocols

_PROTOCOL_ORDER = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# The ones OpenSSL can still speak, with their version numbers.
_USABLE_PROTOCOLS = {
    "TLSv1": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}
_NO_PROTOCOL_OPTION = {
    "TLSv1": SSL.OP_NO_TLSv1,
    "TLSv1.1": SSL.OP_NO_TLSv1_1,
    "TLSv1.2": SSL.OP_NO_TLSv1_2,
    "TLSv1.3": SSL.OP_NO_TLSv1_3,
}


def _protocol_index(name: str, source: str) -> int:
    for index, known in enumerate(_PROTOCOL_ORDER):
        if known.lower() == name.lower():
            return index
    raise TLSConfigError(f"{source}: unknown TLS protocol {name!r}; expected one of {', '.join(_PROTOCOL_ORDER)}")


def parse_protocols(words: Iterable[str], source: str = "smtp_tls_protocols") -> tuple[str, ...]:
    """Postfix's protocol list syntax -> the protocols allowed, oldest first.

    Forms, mixable: ``>=TLSv1.2``, ``<=TLSv1.3``, ``TLSv1.2 TLSv1.3``
    (only these), ``!TLSv1 !TLSv1.1`` (all but these).  Separators: white
    space, commas or colons (the policy-map form).
    """
    items = [item for word in words for item in word.replace(":", " ").replace(",", " ").split() if item]
    included: set[int] = set()
    excluded: set[int] = set()
    low, high = 0, len(_PROTOCOL_ORDER) - 1
    for item in items:
        if item.startswith(">="):
            low = max(low, _protocol_index(item[2:], source))
        elif item.startswith("<="):
            high = min(high, _protocol_index(item[2:], source))
        elif item.startswith("!"):
            excluded.add(_protocol_index(item[1:], source))
        else:
            included.add(_protocol_index(item, source))
    candidates = included or set(range(len(_PROTOCOL_ORDER)))
    allowed = tuple(
        _PROTOCOL_ORDER[index]
        for index in sorted(candidates)
        if low <= index <= high and index not in excluded and _PROTOCOL_ORDER[index] in _USABLE_PROTOCOLS
    )
    if not allowed:
        raise TLSConfigError(f"{source}: {' '.join(items)!r} leaves no usable TLS protocol")
    return allowed


# The OpenSSL cipher lists behind Postfix's grades.  They apply to TLS 1.2
# and older; TLS 1.3 cipher suites are all strong and not restricted.
CIPHER_GRADES = {
    "high": "HIGH:!aNULL:!eNULL",
    "medium": "HIGH:MEDIUM:!aNULL:!eNULL",
    "low": "HIGH:MEDIUM:LOW:!aNULL:!eNULL",
    "export": "HIGH:MEDIUM:LOW:EXPORT:!aNULL:!eNULL",
    "null": "eNULL:!aNULL",
}


def cipher_list(grade: str, exclude: Sequence[str] = (), source: str = "smtp_tls_ciphers") -> str:
    """The OpenSSL cipher list of a Postfix cipher grade (``high``,
    ``medium`` ...) without the ciphers in ``exclude``.  Raises
    TLSConfigError, naming ``source``, for an unknown grade."""
    try:
        base = CIPHER_GRADES[grade.strip().lower()]
    except KeyError:
        raise TLSConfigError(
            f"{source}: unknown cipher grade {grade!r}; expected one of {', '.join(CIPHER_GRADES)}"
        ) from None
    return ":".join([base] + [f"!{name}" for name in exclude])


# -------------------------------------------------------------------- policy


@dataclass(frozen=True)
class TLSPolicy:
    """The TLS policy for one nexthop."""

    level: TLSLevel
    # Certificate match patterns (hostname, nexthop, dot-nexthop, a name or
    # .domain); empty means the level's parameter decides.
    match: tuple[str, ...] = ()
    protocols: tuple[str, ...] | None = None  # None: the level's parameter
    ciphers: str | None = None  # a grade; None: the level's parameter
    exclude: tuple[str, ...] = ()
    source: str = "smtp_tls_security_level"
    # Level dane/dane-only resolved for one MX host: its usable TLSA
    # records (relayagent.smtp.dane), which the certificate must match.
    tlsa: tuple[TLSARecord, ...] = ()
    # The TLSA records came through an insecure MX lookup (Postfix's
    # half-dane): enforced, but a match is only "Trusted".
    half_dane: bool = False


def dane_policy(policy: TLSPolicy, lookup: TLSALookup, insecure_mx_policy: str = "dane") -> TLSPolicy:
    """The effective policy of level ``dane``/``dane-only`` for one MX
    host, given its TLSA lookup (Postfix: dane_init/dane_incompat).

    ``dane`` becomes ``may`` without DNSSEC or TLSA records and
    ``encrypt`` when the records are all unusable; ``dane-only`` defers
    then (4.7.5 with Postfix's reason); a failed lookup defers both
    (4.7.5 "TLSA lookup error for HOST:PORT").  With usable records the
    level stays (TLS mandatory) and the records come along.  Records of
    a host found through an insecure MX lookup (``lookup.mx_secure``
    False, level ``dane`` only) follow ``insecure_mx_policy``
    (smtp_tls_dane_insecure_mx_policy): ``encrypt``, or ``dane``:
    enforced as "half-dane", a match logged as Trusted.  Raises
    ``DeliveryFailure``.
    """
    if not policy.level.is_dane:
        return policy
    state, reason = lookup.state, lookup.reason
    if state is DaneState.USABLE and not lookup.mx_secure:
        if policy.level is TLSLevel.DANE_ONLY or insecure_mx_policy == "may":
            # DaneResolver.lookup does not get here for these; be safe.
            state, reason = DaneState.INSECURE, "non DNSSEC destination"
        elif insecure_mx_policy == "encrypt":
            log.debug("{host}: Verification not possible, MX RRset is insecure", host=lookup.host)
            return dataclasses.replace(policy, level=TLSLevel.ENCRYPT)
        else:
            return dataclasses.replace(policy, tlsa=lookup.records, half_dane=True)
    if state is DaneState.USABLE:
        return dataclasses.replace(policy, tlsa=lookup.records)
    if state is DaneState.ERROR:
        raise DeliveryFailure(Status(dsn="4.7.5", text=reason, remote_mta=lookup.host or None))
    if lookup.config_problem:
        # Our configuration, not the destination: Postfix warns.
        log.warn("{nexthop}: {tls_level} {reason}", nexthop=lookup.host, tls_level=str(policy.level), reason=reason)
        if policy.level is TLSLevel.DANE_ONLY:
            raise DeliveryFailure(
                Status(dsn="4.7.5", text="client TLS configuration problem"), skip_to_next=False
            )
        return dataclasses.replace(policy, level=TLSLevel.MAY)
    if policy.level is TLSLevel.DANE_ONLY:
        raise DeliveryFailure(Status(dsn="4.7.5", text=reason, remote_mta=lookup.host or None))
    log.debug("{host}: {reason}: level dane is may", host=lookup.host, reason=reason)
    if state is DaneState.UNUSABLE:
        # RFC 7672 section 2.2: TLSA records, none usable: TLS is
        # mandatory but cannot be authenticated.
        return dataclasses.replace(policy, level=TLSLevel.ENCRYPT)
    return dataclasses.replace(policy, level=TLSLevel.MAY)


def parse_policy(value: str, source: str) -> TLSPolicy:
    """A policy map value: ``level [name=value ...]``."""
    words = value.split()
    if not words:
        raise TLSConfigError(f"{source}: empty TLS policy")
    level = parse_level(words[0], source)
    attributes: dict[str, Any] = {}
    for word in words[1:]:
        name, sep, argument = word.partition("=")
        name = name.lower()
        if not sep or not argument:
            raise TLSConfigError(f"{source}: expected name=value, got {word!r}")
        if name in attributes:
            raise TLSConfigError(f"{source}: attribute {name!r} given twice")
        if name == "match":
            attributes["match"] = tuple(part for part in argument.split(":") if part)
        elif name == "protocols":
            parse_protocols([argument], source)  # validate now, not at connect time
            attributes["protocols"] = tuple(argument.split(":"))
        elif name == "ciphers":
            cipher_list(argument, source=source)
            attributes["ciphers"] = argument.lower()
        elif name == "exclude":
            attributes["exclude"] = tuple(part for part in argument.split(":") if part)
        else:
            raise TLSConfigError(
                f"{source}: unsupported attribute {name!r}; expected match, protocols, ciphers or exclude"
            )
    if "match" in attributes and not level.checks_names:
        # Postfix ignores match= below verify; so do we, but say so.
        log.warn("{source}: match= has no effect at level {level}", source=source, level=level)
    return TLSPolicy(level=level, source=source, **attributes)


def policy_keys(nexthop: str) -> list[str]:
    """The smtp_tls_policy_maps keys for a nexthop, in lookup order."""
    key = nexthop.strip().lower()
    if key.startswith("[") or ":" in key:
        # [host], [host]:port, domain:port: exactly that, no parent domains.
        return [key]
    keys = [key]
    dot = key.find(".")
    while dot != -1:
        keys.append(key[dot:])
        dot = key.find(".", dot + 1)
    return keys


def nexthop_domain(nexthop: str) -> str:
    """``[smtp.example.com]:587`` -> ``smtp.example.com``; ``example.com:25``
    -> ``example.com``."""
    text = nexthop.strip()
    if text.startswith("["):
        return text[1 : text.index("]")] if "]" in text else text[1:]
    host, _, port = text.rpartition(":")
    if host and port.isdigit():
        return host
    return text


class TLSPolicyError(Exception):
    """The policy for a nexthop could not be determined (a bad entry)."""


class PolicyLookup:
    """smtp_tls_security_level and smtp_tls_policy_maps."""

    def __init__(self, default_level: str, table: Any = None) -> None:
        self._default = TLSPolicy(parse_level(default_level))
        self._table = table  # an ILookupTable, or None

    def policy_for(self, nexthop: str) -> TLSPolicy:
        """The TLS policy of ``nexthop``: the first smtp_tls_policy_maps entry
        found for it (``policy_keys``), else smtp_tls_security_level.
        Raises TLSPolicyError for an entry that does not parse."""
        if self._table:
            for key in policy_keys(nexthop):
                value = self._table.lookup(key)
                if value is not None:
                    try:
                        return parse_policy(value, f"smtp_tls_policy_maps entry for {key}")
                    except TLSConfigError as exc:
                        raise TLSPolicyError(str(exc)) from None
        return self._default


# ------------------------------------------------------------------ contexts

# OpenSSL X509_V_ERR_* codes we name in logs; others show their number.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsupported certificate purpose",
}


@dataclass(frozen=True)
class TLSFiles:
    """Trust anchors and our client certificate, resolved paths."""

    ca_file: str = ""
    ca_path: str = ""
    cert_file: str = ""
    key_file: str = ""


class ContextCache:
    """OpenSSL contexts, one per (protocols, cipher list); built once.

    The client certificate chain and its key are read here, once: a
    context built later (for a policy entry's ``protocols=`` or
    ``ciphers=``) is built from what was read, since the key is often
    readable by root only and, under twistd ``--chroot``, neither path
    means anything any more.  (The CA file and directory are OpenSSL's
    to read when a context is built; the default contexts are built at
    start where TLS may be used, see ``TLSSettings.from_config``.)
    """

    def __init__(self, files: TLSFiles) -> None:
        self._files = files
        self._contexts: dict[tuple[tuple[str, ...], str], SSL.Context] = {}
        if files.cert_file and not files.key_file:
            raise TLSConfigError("smtp_tls_cert_file is set but smtp_tls_key_file is empty")
        self._client = _load_client_certificate(files) if files.cert_file else None

    def context(self, protocols: tuple[str, ...], ciphers: str) -> SSL.Context:
        """The context for ``protocols`` and ``ciphers`` (an OpenSSL cipher
        list), built on first use with the client certificate read at
        start-up."""
        key = (protocols, ciphers)
        if key not in self._contexts:
            self._contexts[key] = self._build(protocols, ciphers)
        return self._contexts[key]

    def _build(self, protocols: tuple[str, ...], ciphers: str) -> SSL.Context:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        versions = [_USABLE_PROTOCOLS[name] for name in protocols]
        context.set_min_proto_version(min(versions))
        context.set_max_proto_version(max(versions))
        options = SSL.OP_NO_COMPRESSION
        for name, option in _NO_PROTOCOL_OPTION.items():
            # Holes in the range (TLSv1.1 TLSv1.3 without TLSv1.2).
            if min(versions) <= _USABLE_PROTOCOLS[name] <= max(versions) and name not in protocols:
                options |= option
        context.set_options(options)
        try:
            context.set_cipher_list(ciphers.encode("ascii"))
        except SSL.Error:
            raise TLSConfigError(f"no TLS cipher matches {ciphers!r}") from None
        files = self._files
        try:
            if files.ca_file or files.ca_path:
                context.load_verify_locations(files.ca_file or None, files.ca_path or None)
            else:
                context.set_default_verify_paths()
        except SSL.Error as exc:
            raise TLSConfigError(
                f"cannot load smtp_tls_CAfile {files.ca_file!r} / smtp_tls_CApath {files.ca_path!r}: {exc}"
            ) from None
        if self._client is not None:
            certificate, chain, key = self._client
            try:
                context.use_certificate(certificate)
                for extra in chain:
                    context.add_extra_chain_cert(extra)
                context.use_privatekey(key)
                context.check_privatekey()
            except SSL.Error as exc:
                raise TLSConfigError(
                    f"cannot use smtp_tls_cert_file {files.cert_file!r} with smtp_tls_key_file "
                    f"{files.key_file!r}: {exc}"
                ) from None
        return context


def _load_client_certificate(files: TLSFiles) -> tuple[x509.Certificate, list[x509.Certificate], Any]:
    """smtp_tls_cert_file (the certificate, then its chain, PEM) and
    smtp_tls_key_file (an unencrypted PEM key, as Postfix requires; it
    may be the same file), read now; raises TLSConfigError."""
    problem = f"cannot use smtp_tls_cert_file {files.cert_file!r} with smtp_tls_key_file {files.key_file!r}"
    try:
        with open(files.cert_file, "rb") as handle:
            certificates = x509.load_pem_x509_certificates(handle.read())
        with open(files.key_file, "rb") as handle:
            # Other PEM blocks (the certificate, in one file with the key) are skipped.
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except OSError as exc:
        raise TLSConfigError(f"{problem}: cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # Never the file's content: only what the parser says is wrong.
        raise TLSConfigError(f"{problem}: {exc}") from None
    return certificates[0], certificates[1:], key


class CertificateRejected(Exception):
    """The certificate failed the level's check (reported as 4.7.5)."""


@implementer(IOpenSSLClientConnectionCreator)
class ClientConnectionCreator:
    """Our own connection creator: SNI, a chain check that records what
    failed instead of aborting, and the level's decision when the handshake
    is done.

    ``optionsForClientTLS`` always verifies and aborts; opportunistic TLS
    must go on with any certificate.  ``on_handshake(connection, errors)``
    runs when the handshake completes, before a byte of SMTP goes over the
    TLS session; when it raises, the connection is aborted (so no EHLO
    reaches a server whose certificate failed), and ``rejected`` keeps the
    reason.  One creator per handshake.
    """

    def __init__(
        self,
        context: SSL.Context,
        server_name: str | None,
        on_handshake: Callable[[SSL.Connection, list[tuple[int, int]]], None] | None = None,
    ) -> None:
        self._context = context
        self.server_name = server_name
        self._on_handshake = on_handshake
        self.connection: SSL.Connection | None = None
        self.verify_errors: list[tuple[int, int]] = []  # (depth, X509_V_ERR code)
        self.handshake_done = False
        self.rejected: BaseException | None = None
        self._tls_protocol: Any = None

    def _record(self, connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self.verify_errors.append((depth, errno))
        # Go on: the level decides once the handshake is done.
        return True

    def _info(self, connection: SSL.Connection, where: int, ret: int) -> None:
        # TLS 1.3 may report HANDSHAKE_DONE again for session tickets.
        if not where & SSL.SSL_CB_HANDSHAKE_DONE or self.handshake_done:
            return
        self.handshake_done = True
        if self._on_handshake is None:
            return
        try:
            self._on_handshake(connection, self.verify_errors)
        except Exception as exc:  # noqa: BLE001 - any refusal aborts the connection
            self.rejected = exc
            self._tls_protocol.failVerification(Failure(exc))

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self.server_name:
            connection.set_tlsext_host_name(_idna(self.server_name))
        connection.set_verify(SSL.VERIFY_PEER, self._record)
        connection.set_info_callback(self._info)
        self.connection = connection
        self._tls_protocol = tlsProtocol
        return connection

    def __repr__(self) -> str:
        return f"<ClientConnectionCreator sni={self.server_name!r}>"


def _idna(name: str) -> bytes:
    name = name.rstrip(".")
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


def is_ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address rather than a name."""
    return isIPAddress(host) or isIPv6Address(host)


# ---------------------------------------------------------- certificate names


def _dns_names(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)]


def _matches_name(certificate: x509.Certificate, name: str) -> bool:
    """RFC 6125 matching of one reference name (service_identity)."""
    name = name.rstrip(".")
    try:
        if is_ip_literal(name):
            verify_certificate_ip_address(certificate, name)
        else:
            verify_certificate_hostname(certificate, name)
    except (VerificationError, ValueError):
        return False
    except Exception:  # service_identity raises CertificateError for SAN-less certificates
        return False
    return True


def _matches_suffix(certificate: x509.Certificate, suffix: str) -> bool:
    """``.example.com``: any name strictly below example.com (a wildcard
    ``*.example.com`` too)."""
    suffix = suffix.lower().rstrip(".")
    return any(name.endswith(suffix) and len(name) > len(suffix) for name in _dns_names(certificate))


def certificate_matches(
    certificate: x509.Certificate, patterns: Sequence[str], *, hostname: str, nexthop: str
) -> bool:
    """Whether the certificate matches any of Postfix's match patterns:
    ``hostname`` (the MX host), ``nexthop``, ``dot-nexthop``, a name, or a
    ``.domain`` (any subdomain)."""
    for pattern in patterns:
        word = pattern.strip().lower()
        if word == "hostname":
            if _matches_name(certificate, hostname):
                return True
        elif word == "nexthop":
            if _matches_name(certificate, nexthop):
                return True
        elif word == "dot-nexthop":
            if _matches_suffix(certificate, "." + nexthop):
                return True
        elif word.startswith("."):
            if _matches_suffix(certificate, word):
                return True
        elif word and _matches_name(certificate, word):
            return True
    return False


# --------------------------------------------------------------- negotiation


@dataclass(frozen=True, slots=True)
class TLSParameters(Settings):
    """The TLS parameters as main.cf gives them, bound once; ``TLSSettings``
    is what they make (contexts built, protocol lists parsed)."""

    smtp_tls_CAfile: str
    smtp_tls_CApath: str
    smtp_tls_cert_file: str
    smtp_tls_key_file: str
    smtp_tls_protocols: tuple[str, ...]
    smtp_tls_mandatory_protocols: tuple[str, ...]
    smtp_tls_ciphers: str
    smtp_tls_mandatory_ciphers: str
    smtp_tls_verify_cert_match: tuple[str, ...]
    smtp_tls_secure_cert_match: tuple[str, ...]
    smtp_starttls_timeout: float
    smtp_tls_loglevel: int


@dataclass(frozen=True)
class TLSSettings:
    """Everything about TLS that comes from main.cf, for every nexthop."""

    contexts: ContextCache
    protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    mandatory_protocols: tuple[str, ...] = ("TLSv1.2", "TLSv1.3")
    ciphers: str = "medium"
    mandatory_ciphers: str = "medium"
    verify_cert_match: tuple[str, ...] = ("hostname",)
    secure_cert_match: tuple[str, ...] = ("nexthop", "dot-nexthop")
    starttls_timeout: float = 300.0
    loglevel: int = 0

    @classmethod
    def from_config(cls, config: Any, *, build_contexts: bool = True) -> TLSSettings:
        """Read the TLS parameters; raises TLSConfigError naming the bad one.
        ``build_contexts``: False where no session can use TLS (level
        none, no policy table, no MTA-STS: ``security.SecurityPolicy``),
        so the default contexts are not built and the CA file is not
        read."""
        given = TLSParameters.from_config(config)
        files = TLSFiles(
            ca_file=given.smtp_tls_CAfile,
            ca_path=given.smtp_tls_CApath,
            cert_file=given.smtp_tls_cert_file,
            key_file=given.smtp_tls_key_file,
        )
        settings = cls(
            contexts=ContextCache(files),
            protocols=parse_protocols(given.smtp_tls_protocols, "smtp_tls_protocols"),
            mandatory_protocols=parse_protocols(given.smtp_tls_mandatory_protocols, "smtp_tls_mandatory_protocols"),
            ciphers=given.smtp_tls_ciphers,
            mandatory_ciphers=given.smtp_tls_mandatory_ciphers,
            verify_cert_match=given.smtp_tls_verify_cert_match,
            secure_cert_match=given.smtp_tls_secure_cert_match,
            starttls_timeout=given.smtp_starttls_timeout,
            loglevel=given.smtp_tls_loglevel,
        )
        # Build the default contexts now, so a bad certificate or CA file
        # stops relayagent at start-up rather than deferring mail later.
        if build_contexts:
            settings.context_for(TLSPolicy(TLSLevel.MAY))
            settings.context_for(TLSPolicy(TLSLevel.ENCRYPT))
        return settings

    def context_for(self, policy: TLSPolicy) -> SSL.Context:
        """The OpenSSL context for ``policy``: its own ``protocols=`` and
        ``ciphers=``/``exclude=``, else the mandatory or opportunistic
        settings of main.cf, by whether its level is mandatory.  Raises
        TLSConfigError for a bad protocol list or cipher grade."""
        mandatory = policy.level.mandatory
        if policy.protocols is not None:
            protocols = parse_protocols(policy.protocols, policy.source)
        else:
            protocols = self.mandatory_protocols if mandatory else self.protocols
        grade = policy.ciphers or (self.mandatory_ciphers if mandatory else self.ciphers)
        return self.contexts.context(protocols, cipher_list(grade, policy.exclude))

    def match_patterns(self, policy: TLSPolicy) -> tuple[str, ...]:
        """The names to match the server certificate against: the policy's
        ``match=``, else smtp_tls_secure_cert_match (level secure) or
        smtp_tls_verify_cert_match."""
        if policy.match:
            return policy.match
        return self.secure_cert_match if policy.level is TLSLevel.SECURE else self.verify_cert_match


@dataclass
class TLSOutcome:
    """What STARTTLS gave one session."""

    active: bool
    trust: str = ""  # Untrusted, Trusted or Verified
    protocol: str = ""
    cipher: str = ""
    bits: int = 0
    verify_errors: list[str] = field(default_factory=list)
    # For MTA-STS and TLSRPT, whatever the level: the X509_V_ERR codes of
    # the chain check, and whether the chain verified and a name matched
    # the MX host name (what an MTA-STS policy demands).
    verify_codes: tuple[int, ...] = ()
    host_verified: bool = False
    # The policy that authenticated (or was to authenticate) the server:
    # "tlsa" for DANE (RFC 8460's policy-type); "" for none or WebPKI.
    policy_type: str = ""
    # DANE: "Matched DANE EE certificate at depth 0: 3 1 1 ..." when matched.
    dane_match: str = ""

    @classmethod
    def plaintext(cls) -> TLSOutcome:
        """No TLS on this session."""
        return cls(active=False)

    @property
    def verified_by_dane(self) -> bool:
        """The server's certificate matched its DNSSEC-validated TLSA
        records (trust ``Verified`` under policy type ``tlsa``)."""
        return self.active and self.trust == "Verified" and self.policy_type == "tlsa"


def _peer(server: Any) -> str:
    return f"{server.host}[{server.address}]"


def _peer_port(server: Any) -> str:
    return f"{server.host}[{server.address}]:{server.port}"


def _reply_summary(reply: Any) -> str:
    """The reply on one line, codes included (relayagent.smtp.reply.Reply)."""
    return " ".join(reply.text.split())


def _start_tls_method(session: Any) -> Callable[[Any], Deferred]:
    method = getattr(session, "start_tls", None) or getattr(session, "start_tls_handshake", None)
    if method is None:
        raise TypeError(f"{session!r} cannot start TLS")
    return method


async def negotiate_tls(
    session: Any,
    policy: TLSPolicy,
    settings: TLSSettings,
    *,
    nexthop: str,
) -> TLSOutcome:
    """STARTTLS on an EHLO-greeted session, as ``policy`` demands.

    Returns the outcome; raises DeliveryFailure when the level's demands are
    not met.  On success the session has sent EHLO again over TLS.
    """
    server = session.server
    level = policy.level
    if level is TLSLevel.NONE:
        return TLSOutcome.plaintext()
    if level.is_dane and not policy.tlsa:
        # dane_policy() resolves the DANE levels per MX host first; never
        # let an unresolved one pass as something weaker.
        raise DeliveryFailure(
            Status(dsn="4.7.5", text="client TLS configuration problem", stage=STARTTLS_STAGE),
            skip_to_next=False,
        )
    if "STARTTLS" not in session.extensions:
        if level.mandatory:
            raise DeliveryFailure(
                Status(
                    dsn="4.7.4",
                    text=f"TLS is required, but was not offered by host {_peer(server)}",
                    stage=STARTTLS_STAGE,
                    remote_mta=server.host,
                )
            )
        return TLSOutcome.plaintext()

    try:
        context = settings.context_for(policy)
    except TLSConfigError as exc:
        log.error("TLS configuration problem: {reason}", reason=str(exc))
        raise DeliveryFailure(
            Status(dsn="4.7.5", text="client TLS configuration problem", stage=STARTTLS_STAGE),
            skip_to_next=False,
        ) from None

    reply = await session.command(b"STARTTLS", stage=STARTTLS_WHILE, timeout=settings.starttls_timeout)
    if reply.code // 100 != 2:
        if level.mandatory:
            code_class = 5 if reply.code // 100 == 5 else 4
            enhanced = getattr(reply, "enhanced", None)
            raise DeliveryFailure(
                Status(
                    dsn=enhanced if enhanced and enhanced[0] == str(code_class) else f"{code_class}.7.4",
                    text=(
                        f"TLS is required, but host {_peer(server)} refused to start TLS: "
                        f"{_reply_summary(reply)}"
                    ),
                    code=reply.code,
                    stage=STARTTLS_STAGE,
                    reply=_reply_summary(reply),
                    remote_mta=server.host,
                )
            )
        # Opportunistic: the server is still in its pre-STARTTLS state, so
        # the session goes on in plaintext (unlike twisted.mail, which
        # QUITs here).
        log.info(
            "host {peer} refused to start TLS: {reply}; continuing in plaintext",
            peer=_peer(server),
            reply=_reply_summary(reply),
        )
        return TLSOutcome.plaintext()

    outcomes: list[TLSOutcome] = []

    def decide(connection: SSL.Connection, errors: list[tuple[int, int]]) -> None:
        outcome = _examine(connection, errors, policy, settings, server=server, nexthop=nexthop)
        outcomes.append(outcome)
        _log_established(outcome, server, settings.loglevel)
        # Under DANE a TLSA match is what counts (half-dane's is Trusted).
        authenticated = bool(outcome.dane_match) if policy.tlsa else outcome.trust == "Verified"
        if (level.checks_names or policy.tlsa) and not authenticated:
            raise CertificateRejected("; ".join(outcome.verify_errors))

    server_name = None if is_ip_literal(server.host) else server.host
    creator = ClientConnectionCreator(context, server_name, decide)
    try:
        # The session runs the handshake under smtp_starttls_timeout, then
        # EHLO again.
        await _start_tls_method(session)(creator)
    except Exception as exc:  # noqa: BLE001 - every handshake failure is reported alike
        if creator.rejected is not None:
            rejected = DeliveryFailure(
                Status(
                    dsn="4.7.5",
                    text=CERTIFICATE_NOT_VERIFIED,
                    stage=STARTTLS_STAGE,
                    remote_mta=server.host,
                )
            )
            # What was wrong with it, for TLSRPT (relayagent.smtp.security).
            rejected.tls_outcome = outcomes[0] if outcomes else None  # type: ignore[attr-defined]
            raise rejected from None
        if creator.handshake_done:
            # TLS is up; what failed is the conversation after it (EHLO).
            raise
        log.info("TLS handshake with {peer} failed: {reason}", peer=_peer_port(server), reason=_describe(exc))
        status = Status(
            dsn="4.7.5",
            text=f"Cannot start TLS: handshake failure with host {_peer(server)}",
            stage=STARTTLS_STAGE,
            remote_mta=server.host,
            # Postfix retries opportunistic TLS in plaintext on a new
            # connection; the connection layer does that on this flag.
            retry_plaintext=not level.mandatory,
        )
        raise DeliveryFailure(status) from None
    if not outcomes:
        raise DeliveryFailure(
            Status(dsn="4.7.5", text="Cannot start TLS: the handshake did not complete", stage=STARTTLS_STAGE)
        )
    return outcomes[0]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DeliveryFailure):
        return exc.status.text
    return str(exc) or type(exc).__name__


def _examine(
    connection: SSL.Connection,
    verify_errors: list[tuple[int, int]],
    policy: TLSPolicy,
    settings: TLSSettings,
    *,
    server: Any,
    nexthop: str,
) -> TLSOutcome:
    if policy.tlsa:
        return _examine_dane(connection, policy, server=server, nexthop=nexthop)
    certificate = connection.get_peer_certificate(as_cryptography=True)
    errors = [
        f"depth {depth}: {_VERIFY_ERRORS.get(errno, f'verification error {errno}')}"
        for depth, errno in verify_errors
    ]
    chain_ok = certificate is not None and not verify_errors
    if certificate is None:
        errors.append("no server certificate")
    trust = "Trusted" if chain_ok else "Untrusted"
    host_verified = chain_ok and certificate_matches(
        certificate, ("hostname",), hostname=server.host, nexthop=nexthop_domain(nexthop)
    )
    if chain_ok and policy.level.checks_names:
        patterns = settings.match_patterns(policy)
        if certificate_matches(certificate, patterns, hostname=server.host, nexthop=nexthop_domain(nexthop)):
            trust = "Verified"
        else:
            errors.append(f"certificate names do not match {', '.join(patterns)}")
    return _established(
        connection,
        trust=trust,
        verify_errors=errors,
        verify_codes=tuple(errno for _depth, errno in verify_errors),
        host_verified=host_verified,
    )


def certificate_refused(failure: DeliveryFailure) -> bool:
    """Whether ``negotiate_tls`` failed because the server's certificate
    did not pass the level's check (rather than STARTTLS or the handshake
    itself failing)."""
    return failure.status.text == CERTIFICATE_NOT_VERIFIED


def _established(connection: SSL.Connection, **verdict: Any) -> TLSOutcome:
    """The outcome of a completed handshake: the session's protocol and
    cipher, and the verdict (trust, errors...) of the examination."""
    return TLSOutcome(
        active=True,
        protocol=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name() or "",
        bits=connection.get_cipher_bits() or 0,
        **verdict,
    )


def _examine_dane(connection: SSL.Connection, policy: TLSPolicy, *, server: Any, nexthop: str) -> TLSOutcome:
    """DANE: the peer chain against the host's TLSA records (dane.py);
    OpenSSL's own chain verdict does not count here."""
    chain = connection.get_peer_cert_chain(as_cryptography=True) or []
    if not chain:
        leaf = connection.get_peer_certificate(as_cryptography=True)
        chain = [leaf] if leaf is not None else []
    # RFC 7672 section 3.2.2: the TLSA base domain (the MX host) and the
    # nexthop domain are the reference identifiers for DANE-TA.
    match: DaneMatch = match_chain(
        chain,
        policy.tlsa,
        name_matches=lambda leaf: certificate_matches(
            leaf, ("hostname", "nexthop"), hostname=server.host, nexthop=nexthop_domain(nexthop)
        ),
    )
    # Postfix: half-dane is never "Verified", only "Trusted": the MX host
    # name could have been forged.
    trust = "Verified" if match.verified and not policy.half_dane else "Trusted" if match.trusted else "Untrusted"
    return _established(
        connection,
        trust=trust,
        verify_errors=[] if match.verified else [match.reason],
        policy_type="tlsa",
        dane_match=match.description if match.verified else "",
    )


def _log_established(outcome: TLSOutcome, server: Any, loglevel: int) -> None:
    # Postfix logs this line from smtp_tls_loglevel 1; at 0 it is a debug
    # event, so an observer that wants it can still have it.
    emit = log.info if loglevel >= 1 else log.debug
    emit(
        "{trust} TLS connection established to {peer}: {protocol} with cipher {cipher} ({bits}/{bits} bits)",
        trust=outcome.trust,
        peer=_peer_port(server),
        protocol=outcome.protocol,
        cipher=outcome.cipher,
        bits=outcome.bits,
        postfix_tls=True,
    )
    if outcome.policy_type == "tlsa":
        # Postfix's tls_dane.c/tls_verify.c lines: the match from
        # smtp_tls_loglevel 2 (TLS_LOG_VERBOSE), the failure from 1
        # (TLS_LOG_UNTRUSTED).
        if outcome.dane_match:
            (log.info if loglevel >= 2 else log.debug)(
                "{peer}: {match}", peer=_peer_port(server), match=outcome.dane_match
            )
        elif outcome.verify_errors:
            emit(
                "certificate verification failed for {peer}: {reason}",
                peer=_peer_port(server),
                reason="; ".join(outcome.verify_errors),
            )
        return
    if outcome.verify_errors and (loglevel >= 1 or outcome.trust != "Verified"):
        emit(
            "certificate verification for {peer}: {errors}",
            peer=_peer_port(server),
            errors="; ".join(outcome.verify_errors),
        )
