"""
A throw-away certificate authority for TLS tests, made with ``cryptography``
when a test runs (nothing secret or expiring is kept in the repository).

    ca = CertificateAuthority()
    leaf = ca.issue(["mx.example.com"])          # any DNS names / IPs
    paths = leaf.write(directory)                # cert.pem, key.pem, chain
    ca.write(directory)                          # the CA certificate, PEM
    leaf.server_context()                        # pyOpenSSL, for Twisted
    leaf.ssl_context()                           # stdlib ssl, for aiosmtpd

EC P-256 keys: generated in microseconds, unlike RSA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

_ONE_DAY = datetime.timedelta(days=1)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass
class IssuedCertificate:
    """A leaf certificate, its key, and the CA that signed it."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    ca_certificate: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def write(self, directory: str, stem: str = "server") -> tuple[str, str]:
        """Write ``stem.crt`` and ``stem.key``; returns the two paths."""
        cert_path = os.path.join(directory, f"{stem}.crt")
        key_path = os.path.join(directory, f"{stem}.key")
        with open(cert_path, "wb") as handle:
            handle.write(self.cert_pem)
        with open(key_path, "wb") as handle:
            handle.write(self.key_pem)
        os.chmod(key_path, 0o600)
        return cert_path, key_path

    def server_context(self) -> SSL.Context:
        """A pyOpenSSL server context presenting this certificate."""
        from OpenSSL import crypto

        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(crypto.X509.from_cryptography(self.certificate))
        context.use_privatekey(crypto.PKey.from_cryptography_key(self.key))
        context.check_privatekey()
        return context

    def ssl_context(self, directory: str) -> ssl.SSLContext:
        """A stdlib server context (aiosmtpd's ``tls_context``)."""
        cert_path, key_path = self.write(directory, stem=f"ssl-{self.certificate.serial_number}")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        return context


class CertificateAuthority:
    """A self-signed root that issues leaf certificates for any name."""

    def __init__(self, common_name: str = "relayagent test CA") -> None:
        self.key = _key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 30 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: str, name: str = "ca.crt") -> str:
        path = os.path.join(directory, name)
        with open(path, "wb") as handle:
            handle.write(self.cert_pem)
        return path

    def issue(
        self,
        dns_names: Iterable[str] = (),
        *,
        ip_addresses: Iterable[str] = (),
        common_name: str | None = None,
        expired: bool = False,
        client: bool = False,
    ) -> IssuedCertificate:
        dns_names = list(dns_names)
        ip_addresses = list(ip_addresses)
        key = _key()
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name or (dns_names or ip_addresses or ["leaf"])[0])]
        )
        now = _now()
        if expired:
            not_before, not_after = now - 10 * _ONE_DAY, now - _ONE_DAY
        else:
            not_before, not_after = now - _ONE_DAY, now + 30 * _ONE_DAY
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in ip_addresses]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self.key, hashes.SHA256())
        return IssuedCertificate(certificate=certificate, key=key, ca_certificate=self.certificate)


def self_signed(dns_names: Iterable[str]) -> IssuedCertificate:
    """A certificate from a CA nobody trusts."""
    return CertificateAuthority(common_name="untrusted").issue(dns_names)
