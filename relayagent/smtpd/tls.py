"""
STARTTLS on the listener, with Postfix's smtpd parameters (Postfix:
the TLS part of smtpd.c, tls_server.c, permit_tls_clientcerts in
smtpd_check.c).

``smtpd_tls_security_level``: ``none`` (the default: no STARTTLS),
``may`` (STARTTLS offered) or ``encrypt`` (required: every command but
EHLO, HELO, STARTTLS, NOOP, QUIT and HELP gets "530 5.7.0 Must issue a
STARTTLS command first", and AUTH is offered only after STARTTLS).  The
server certificate is ``smtpd_tls_cert_file`` with its key in
``smtpd_tls_key_file`` (unencrypted PEM; the same file will do), read
once at start-up: a missing or bad file stops relayagent with one fatal
line.  Protocols are ``smtpd_tls_protocols`` (``>=TLSv1.2``, as the
client side's, RFC 8996).

Client certificates: with ``smtpd_tls_ask_ccert = yes`` the server asks
for one (a client may send none); it is *Trusted* when it chains to
``smtpd_tls_CAfile``, else *Untrusted*, and either way its
``smtpd_tls_fingerprint_digest`` fingerprints (of the certificate and of
its public key, ``AB:CD:...``) are looked up in ``relay_clientcerts``:
a listed client may relay as an authenticated one does (Postfix's
``permit_tls_clientcerts``; the fingerprint is the pin, so the issuer
need not be trusted).  An unlisted certificate relays for nobody.

After the handshake smtpd's line::

    Anonymous TLS connection established from unknown[192.0.2.1]: TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)

(``Trusted`` or ``Untrusted`` with a client certificate).

SYNOPSIS::

    tls = ServerTLS.from_config(config)     # None at level none
    creator = tls.connection_creator()      # for transport.startTLS, one per session
    examined = tls.examine(creator.connection)   # trust, fingerprints, protocol, cipher
    tls.permits_relay(examined)             # relay_clientcerts lists it
    certificate_fingerprint(cert, "sha256"), public_key_fingerprint(cert, "sha256")

DIAGNOSTICS: ``ServerTLS.from_config`` raises ``TLSConfigError`` (a
``ValueError``) naming the parameter: a bad level, an unreadable or
malformed certificate or key, a key that does not match, a bad CA file,
a bad protocol list or digest.

Owns: smtpd_tls_security_level, smtpd_tls_cert_file, smtpd_tls_key_file,
smtpd_tls_CAfile, smtpd_tls_ask_ccert, smtpd_tls_auth_only,
smtpd_tls_protocols, smtpd_tls_fingerprint_digest, relay_clientcerts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from relayagent.common.config import Config, Settings
from relayagent.common.maps import MapList, open_maps
from relayagent.smtp.tls import (
    _NO_PROTOCOL_OPTION,
    _USABLE_PROTOCOLS,
    TLSConfigError,
    parse_protocols,
)

LEVELS = ("none", "may", "encrypt")
DIGESTS = ("sha256", "sha384", "sha512", "sha1", "md5")

# Commands allowed before STARTTLS at level encrypt (smtpd.c's
# SMTPD_CMD_FLAG_PRE_TLS).
PRE_TLS_COMMANDS = frozenset({"helo", "ehlo", "starttls", "noop", "quit", "help", "xclient"})
MUST_STARTTLS = (530, b"5.7.0 Must issue a STARTTLS command first")


@dataclass(frozen=True, slots=True)
class ServerTLSSettings(Settings):
    """The listener's TLS parameters, bound once."""

    smtpd_tls_security_level: str
    smtpd_tls_cert_file: str
    smtpd_tls_key_file: str
    smtpd_tls_CAfile: str
    smtpd_tls_ask_ccert: bool
    smtpd_tls_auth_only: bool
    smtpd_tls_protocols: tuple[str, ...]
    smtpd_tls_fingerprint_digest: str
    relay_clientcerts: tuple[str, ...]
    base_dir: str | None = None


def _fingerprint(data: bytes, digest: str) -> str:
    value = hashlib.new(digest, data).hexdigest().upper()
    return ":".join(value[i:i + 2] for i in range(0, len(value), 2))


def certificate_fingerprint(certificate: x509.Certificate, digest: str = "sha256") -> str:
    """Postfix's certificate fingerprint: the digest of the DER
    certificate, upper-case hex pairs joined by colons."""
    return _fingerprint(certificate.public_bytes(serialization.Encoding.DER), digest)


def public_key_fingerprint(certificate: x509.Certificate, digest: str = "sha256") -> str:
    """Postfix's public-key fingerprint: the digest of the DER
    SubjectPublicKeyInfo (it survives a renewal with the same key)."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _fingerprint(spki, digest)


@dataclass(frozen=True)
class ExaminedTLS:
    """What a completed handshake gave one session."""

    trust: str  # Anonymous, Untrusted or Trusted
    protocol: str
    cipher: str
    cipher_bits: int
    fingerprints: tuple[str, ...] = ()  # certificate's, then public key's

    def describe(self, client: str) -> str:
        """smtpd's line: ``Trusted TLS connection established from ...``."""
        return (f"{self.trust} TLS connection established from {client}: {self.protocol} "
                f"with cipher {self.cipher} ({self.cipher_bits}/{self.cipher_bits} bits)")


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnectionCreator:
    """One STARTTLS handshake's connection: keeps it so that the session
    can examine the client certificate once the handshake is done."""

    def __init__(self, context: SSL.Context, ask_ccert: bool) -> None:
        self._context = context
        self._ask_ccert = ask_ccert
        self.connection: SSL.Connection | None = None

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A new server connection; a client certificate is asked for,
        never required, and any is taken: ``examine`` judges it."""
        connection = SSL.Connection(self._context, None)
        if self._ask_ccert:
            connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, lambda *args: True)
        self.connection = connection
        return connection


class ServerTLS:
    """The listener's TLS, built once at start-up (``from_config``)."""

    def __init__(self, settings: ServerTLSSettings, context: SSL.Context, store: crypto.X509Store | None,
                 relay_clientcerts: MapList) -> None:
        self.level = settings.smtpd_tls_security_level or "none"
        self.required = self.level == "encrypt"
        # Postfix: smtpd_enforce_tls implies smtpd_tls_auth_only.
        self.auth_only = settings.smtpd_tls_auth_only or self.required
        self.ask_ccert = settings.smtpd_tls_ask_ccert
        self.digest = settings.smtpd_tls_fingerprint_digest
        self.context = context
        self._store = store
        self.relay_clientcerts = relay_clientcerts

    @classmethod
    def from_config(cls, config: Config) -> ServerTLS | None:
        """The listener's TLS, or None at level none; raises
        TLSConfigError naming the parameter that cannot be used."""
        settings = ServerTLSSettings.from_config(config)
        level = (settings.smtpd_tls_security_level or "none").lower()
        if level not in LEVELS:
            raise TLSConfigError(f"smtpd_tls_security_level: unknown level {level!r}; expected none, may or encrypt")
        if level == "none":
            return None
        if settings.smtpd_tls_fingerprint_digest not in DIGESTS:
            raise TLSConfigError(f"smtpd_tls_fingerprint_digest: unknown digest "
                                 f"{settings.smtpd_tls_fingerprint_digest!r}; expected one of {', '.join(DIGESTS)}")
        if not settings.smtpd_tls_cert_file:
            raise TLSConfigError(f"smtpd_tls_security_level = {level} needs smtpd_tls_cert_file")
        protocols = parse_protocols(settings.smtpd_tls_protocols, "smtpd_tls_protocols")
        context = _server_context(settings, protocols)
        store = _ca_store(settings.smtpd_tls_CAfile) if settings.smtpd_tls_CAfile else None
        tables = open_maps(settings.relay_clientcerts, base_dir=settings.base_dir)
        return cls(settings, context, store, tables)

    def connection_creator(self) -> ServerConnectionCreator:
        """A creator for one session's ``transport.startTLS``."""
        return ServerConnectionCreator(self.context, self.ask_ccert)

    def examine(self, connection: SSL.Connection | None) -> ExaminedTLS:
        """Trust, fingerprints, protocol and cipher of a handshake done."""
        if connection is None:
            return ExaminedTLS("Anonymous", "unknown", "unknown", 0)
        protocol = connection.get_protocol_version_name() or "unknown"
        cipher = connection.get_cipher_name() or "unknown"
        bits = connection.get_cipher_bits() or 0
        peer = connection.get_peer_certificate()
        if peer is None:
            return ExaminedTLS("Anonymous", protocol, cipher, bits)
        certificate = peer.to_cryptography()
        fingerprints = (certificate_fingerprint(certificate, self.digest),
                        public_key_fingerprint(certificate, self.digest))
        trust = "Trusted" if self._verifies(peer, connection) else "Untrusted"
        return ExaminedTLS(trust, protocol, cipher, bits, fingerprints)

    def _verifies(self, peer: crypto.X509, connection: SSL.Connection) -> bool:
        if self._store is None:
            return False
        chain = [c for c in (connection.get_peer_cert_chain() or []) if c.digest("sha256") != peer.digest("sha256")]
        try:
            crypto.X509StoreContext(self._store, peer, chain or None).verify_certificate()
        except crypto.X509StoreContextError:
            return False
        return True

    def permits_relay(self, examined: ExaminedTLS) -> bool:
        """``permit_tls_clientcerts``: a fingerprint of the client's
        certificate is a key of ``relay_clientcerts``."""
        if not self.relay_clientcerts:
            return False
        return any(self.relay_clientcerts.lookup(fingerprint) is not None for fingerprint in examined.fingerprints)


def _server_context(settings: ServerTLSSettings, protocols: tuple[str, ...]) -> SSL.Context:
    cert_file, key_file = settings.smtpd_tls_cert_file, settings.smtpd_tls_key_file or settings.smtpd_tls_cert_file
    problem = f"cannot use smtpd_tls_cert_file {cert_file!r} with smtpd_tls_key_file {key_file!r}"
    try:
        with open(cert_file, "rb") as handle:
            certificates = x509.load_pem_x509_certificates(handle.read())
        with open(key_file, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except OSError as exc:
        raise TLSConfigError(f"{problem}: cannot read {exc.filename}: {exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # Never the file's content: only what the parser says is wrong.
        raise TLSConfigError(f"{problem}: {exc}") from None
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    versions = [_USABLE_PROTOCOLS[name] for name in protocols]
    context.set_min_proto_version(min(versions))
    context.set_max_proto_version(max(versions))
    options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
    for name, option in _NO_PROTOCOL_OPTION.items():
        if min(versions) <= _USABLE_PROTOCOLS[name] <= max(versions) and name not in protocols:
            options |= option
    context.set_options(options)
    try:
        context.use_certificate(crypto.X509.from_cryptography(certificates[0]))
        for extra in certificates[1:]:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        context.use_privatekey(crypto.PKey.from_cryptography_key(key))  # type: ignore[arg-type]
        context.check_privatekey()
    except (SSL.Error, TypeError) as exc:
        raise TLSConfigError(f"{problem}: {exc}") from None
    if settings.smtpd_tls_CAfile:
        try:
            # The CA names sent with the certificate request.
            with open(settings.smtpd_tls_CAfile, "rb") as handle:
                cas = x509.load_pem_x509_certificates(handle.read())
            context.set_client_ca_list([crypto.X509.from_cryptography(ca).get_subject() for ca in cas])
        except (OSError, ValueError) as exc:
            raise TLSConfigError(f"cannot load smtpd_tls_CAfile {settings.smtpd_tls_CAfile!r}: {exc}") from None
    # Session tickets would let a client resume without showing its
    # certificate again; the judgement is per handshake.
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def _ca_store(ca_file: str) -> crypto.X509Store:
    store = crypto.X509Store()
    try:
        with open(ca_file, "rb") as handle:
            for ca in x509.load_pem_x509_certificates(handle.read()):
                store.add_cert(crypto.X509.from_cryptography(ca))
    except (OSError, ValueError) as exc:
        raise TLSConfigError(f"cannot load smtpd_tls_CAfile {ca_file!r}: {exc}") from None
    return store
