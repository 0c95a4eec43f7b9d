"""
DANE without a network: TLSA parsing, chain matching, the TLSA lookup
over a fake resolver, the level decisions of dane/dane-only, the
DNSSEC-asking queries and the validation flags of the MX lookup.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.common.status import DeliveryFailure
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.dane import (
    DaneResolver,
    DaneState,
    TLSALookup,
    TLSARecord,
    match_chain,
    record_for,
    tlsa_name,
)
from relayagent.smtp.dnssec import DNSSECResolver, ask_for_dnssec, is_authentic
from relayagent.smtp.mtasts import MTASTSSettings, PolicyStore
from relayagent.smtp.requiretls import TLSDemand
from relayagent.smtp.resolve import Nexthop, NexthopResolver, make_dns_resolver
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tls import (
    TLSLevel,
    TLSOutcome,
    TLSPolicy,
    certificate_matches,
    dane_policy,
    negotiate_tls,
)
from relayagent.smtp.tlsrpt import Recorder
from relayagent.testing import FakeDNSResolver, FakeHTTPClient, FakeTLSSession, LogCapture
from tests.support.certs import CertificateAuthority, IssuedCertificate

CA = CertificateAuthority(common_name="unit CA")
OTHER_CA = CertificateAuthority(common_name="other CA")
NOW = datetime.datetime.now(datetime.timezone.utc)


def names(*accepted: str):
    return lambda leaf: any(certificate_matches(leaf, [name], hostname=name, nexthop=name) for name in accepted)


def der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def forged_leaf(issuer_name: x509.Name, dns_name: str) -> x509.Certificate:
    """A leaf naming the CA as issuer but signed by another key."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )


class TLSARecordTests(SynchronousTestCase):
    def test_parse_rdata(self) -> None:
        record = TLSARecord.from_rdata(b"\x03\x01\x01" + bytes(range(32)))
        self.assertEqual((record.usage, record.selector, record.matching), (3, 1, 1))
        self.assertEqual(record.data, bytes(range(32)))
        self.assertTrue(record.usable)
        self.assertEqual(str(record), "3 1 1 000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
        full = TLSARecord(2, 0, 0, bytes(range(100)))
        self.assertEqual(str(full), f"2 0 0 {bytes(range(32)).hex().upper()}...{bytes(range(68, 100)).hex().upper()}")

    def test_truncated_rdata(self) -> None:
        error = self.assertRaises(ValueError, TLSARecord.from_rdata, b"\x03\x01\x01")
        self.assertEqual(str(error), "truncated TLSA RR length == 3")

    def test_unusable_records(self) -> None:
        self.assertEqual(TLSARecord(0, 0, 1, b"x").problem, "unsupported TLSA certificate usage")
        self.assertEqual(TLSARecord(1, 1, 1, b"x").problem, "unsupported TLSA certificate usage")
        self.assertEqual(TLSARecord(3, 2, 1, b"x").problem, "unsupported TLSA selector")
        self.assertEqual(TLSARecord(3, 1, 255, b"x").problem, "unsupported TLSA matching type")
        # An unusable record matches nothing, even with the right data.
        leaf = CA.issue(["mx.example.com"]).certificate
        self.assertFalse(TLSARecord(1, 1, 1, hashlib.sha256(spki(leaf)).digest()).matches(leaf))

    def test_selectors_and_matching_types(self) -> None:
        leaf = CA.issue(["mx.example.com"]).certificate
        cases = {
            (0, 0): der(leaf),
            (0, 1): hashlib.sha256(der(leaf)).digest(),
            (0, 2): hashlib.sha512(der(leaf)).digest(),
            (1, 0): spki(leaf),
            (1, 1): hashlib.sha256(spki(leaf)).digest(),
            (1, 2): hashlib.sha512(spki(leaf)).digest(),
        }
        for (selector, matching), data in cases.items():
            self.assertTrue(TLSARecord(3, selector, matching, data).matches(leaf), (selector, matching))
            self.assertEqual(record_for(leaf, 3, selector, matching).data, data)
        other = CA.issue(["mx.example.com"]).certificate
        self.assertFalse(record_for(other).matches(leaf))

    def test_tlsa_name(self) -> None:
        self.assertEqual(tlsa_name("MX.Example.COM.", 25), "_25._tcp.mx.example.com")


class MatchChainTests(SynchronousTestCase):
    def test_dane_ee_ignores_names_and_dates(self) -> None:
        leaf = CA.issue(["elsewhere.example"], expired=True).certificate
        match = match_chain([leaf], [record_for(leaf)], name_matches=names("mx.example.com"), now=NOW)
        self.assertTrue(match.verified)
        self.assertEqual(match.depth, 0)
        self.assertTrue(match.description.startswith("Matched DANE EE certificate at depth 0: 3 1 1 "))

    def test_dane_ee_mismatch(self) -> None:
        leaf = CA.issue(["mx.example.com"]).certificate
        other = CA.issue(["mx.example.com"]).certificate
        match = match_chain([leaf], [record_for(other)], name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted or match.verified)
        self.assertEqual(match.reason, "not trusted by local or TLSA policy")
        self.assertEqual(match.description, "")

    def test_dane_ta_in_the_chain(self) -> None:
        leaf = CA.issue(["mx.example.com"]).certificate
        anchor = record_for(CA.certificate, 2, 0, 1)
        match = match_chain([leaf, CA.certificate], [anchor], name_matches=names("mx.example.com"), now=NOW)
        self.assertTrue(match.verified)
        self.assertEqual(match.depth, 1)
        self.assertTrue(match.description.startswith("Matched DANE TA certificate at depth 1: 2 0 1 "))
        # By its public key as well.
        spki_anchor = record_for(CA.certificate, 2, 1, 2)
        self.assertTrue(
            match_chain([leaf, CA.certificate], [spki_anchor], name_matches=names("mx.example.com"), now=NOW).verified
        )

    def test_dane_ta_checks_the_name(self) -> None:
        leaf = CA.issue(["other.example"]).certificate
        anchor = record_for(CA.certificate, 2, 0, 1)
        match = match_chain([leaf, CA.certificate], [anchor], name_matches=names("mx.example.com"), now=NOW)
        self.assertTrue(match.trusted)
        self.assertFalse(match.verified)
        self.assertEqual(match.reason, "server certificate name does not match")

    def test_dane_ta_checks_dates_below_the_anchor(self) -> None:
        leaf = CA.issue(["mx.example.com"], expired=True).certificate
        anchor = record_for(CA.certificate, 2, 0, 1)
        match = match_chain([leaf, CA.certificate], [anchor], name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted)
        self.assertIn("certificate at depth 0 is expired", match.reason)

    def test_dane_ta_needs_a_signature_chain(self) -> None:
        leaf = forged_leaf(CA.certificate.subject, "mx.example.com")
        anchor = record_for(CA.certificate, 2, 0, 1)
        match = match_chain([leaf, CA.certificate], [anchor], name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted)
        self.assertIn("does not verify", match.reason)

    def test_dane_ta_issuers_must_be_cas(self) -> None:
        # A certificate the anchor issued to someone else, used to sign a
        # certificate for our MX host: the signatures verify, but a leaf
        # certificate may not issue.
        other = CA.issue(["other.example"])
        key = ec.generate_private_key(ec.SECP256R1())
        forged = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(other.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.com")]), critical=False)
            .sign(other.key, hashes.SHA256())
        )
        anchor = record_for(CA.certificate, 2, 0, 1)
        chain = [forged, other.certificate, CA.certificate]
        match = match_chain(chain, [anchor], name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted)
        self.assertIn("certificate at depth 1 is not a CA that may issue here", match.reason)
        # Nor may a TA record name a leaf certificate as the anchor.
        match = match_chain(chain[:2], [record_for(other.certificate, 2, 1, 1)], name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted)

    def test_dane_ta_path_length_and_purpose(self) -> None:
        # tests.support.certs' CA has pathLenConstraint 0: a CA under it
        # may not issue.
        sub_key = ec.generate_private_key(ec.SECP256R1())
        sub_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sub CA")])
        sub = (
            x509.CertificateBuilder()
            .subject_name(sub_name)
            .issuer_name(CA.certificate.subject)
            .public_key(sub_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(CA.key, hashes.SHA256())
        )
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(sub_name)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.com")]), critical=False)
            .sign(sub_key, hashes.SHA256())
        )
        chain = [leaf, sub, CA.certificate]
        self.assertFalse(
            match_chain(chain, [record_for(CA.certificate, 2, 0, 1)], name_matches=names("mx.example.com"), now=NOW).trusted
        )
        # The sub CA itself as the anchor is fine.
        self.assertTrue(
            match_chain(chain, [record_for(sub, 2, 1, 1)], name_matches=names("mx.example.com"), now=NOW).verified
        )
        # A client-only certificate is no server's.
        client = CA.issue(["mx.example.com"], client=True).certificate
        match = match_chain([client, CA.certificate], [record_for(CA.certificate, 2, 0, 1)],
                            name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted)
        self.assertIn("not for TLS servers", match.reason)

    def test_dane_ta_does_not_match_the_leaf(self) -> None:
        # A TA record naming the leaf itself is no trust anchor (depth 0).
        leaf = CA.issue(["mx.example.com"]).certificate
        match = match_chain([leaf], [record_for(leaf, 2, 1, 1)], name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted)

    def test_full_trust_anchor_not_sent_by_the_server(self) -> None:
        leaf = CA.issue(["mx.example.com"]).certificate
        anchor = TLSARecord(2, 0, 0, der(CA.certificate))
        self.assertTrue(match_chain([leaf], [anchor], name_matches=names("mx.example.com"), now=NOW).verified)
        other = TLSARecord(2, 0, 0, der(OTHER_CA.certificate))
        self.assertFalse(match_chain([leaf], [other], name_matches=names("mx.example.com"), now=NOW).trusted)

    def test_other_ca_does_not_match(self) -> None:
        leaf = CA.issue(["mx.example.com"]).certificate
        anchor = record_for(OTHER_CA.certificate, 2, 0, 1)
        match = match_chain([leaf, CA.certificate], [anchor], name_matches=names("mx.example.com"), now=NOW)
        self.assertFalse(match.trusted)

    def test_no_certificate(self) -> None:
        match = match_chain([], [TLSARecord(3, 1, 1, b"x")], name_matches=names(), now=NOW)
        self.assertEqual(match.reason, "no server certificate")


OWNER = "_25._tcp.mx.example.com"


class DaneResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dns = FakeDNSResolver()
        self.dns.validate_all = True
        self.dane = DaneResolver(self.dns, enabled=True)
        self.warnings: list[dict] = []
        globalLogPublisher.addObserver(self.warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.warnings.append)

    def lookup(self, mx: bool = True, host: bool = True, port: int = 25) -> TLSALookup:
        return self.successResultOf(
            self.dane.lookup("mx.example.com", port, mx_dnssec_valid=mx, host_dnssec_valid=host)
        )

    def test_usable(self) -> None:
        self.dns.tlsa(OWNER, b"\x03\x01\x01" + b"\xaa" * 32, b"\x00\x00\x01" + b"\xbb" * 32)
        lookup = self.lookup()
        self.assertIs(lookup.state, DaneState.USABLE)
        self.assertTrue(lookup.applies)
        self.assertEqual([r.usage for r in lookup.records], [3])  # PKIX-TA dropped
        self.assertEqual(self.dns.queries, [(OWNER, 52)])
        texts = [formatEvent(event) for event in self.warnings]
        self.assertIn(f"{OWNER} unsupported TLSA certificate usage: 0 0 1 {'BB' * 32}", texts)

    def test_relayhost_port(self) -> None:
        self.dns.tlsa("_587._tcp.mx.example.com", b"\x03\x01\x01" + b"\xaa" * 32)
        self.assertTrue(self.lookup(port=587).applies)

    def test_unusable(self) -> None:
        self.dns.tlsa(OWNER, b"\x01\x01\x01" + b"\xaa" * 32, b"\x03\x01")
        lookup = self.lookup()
        self.assertEqual((lookup.state, lookup.reason), (DaneState.UNUSABLE, "TLSA records unusable"))
        self.assertFalse(lookup.applies)

    def test_not_found(self) -> None:
        lookup = self.lookup()  # NXDOMAIN
        self.assertEqual((lookup.state, lookup.reason), (DaneState.NOT_FOUND, "no TLSA records found"))
        self.dns.records[(OWNER, dns.TXT)] = []
        self.assertIs(self.lookup().state, DaneState.NOT_FOUND)  # NODATA

    def test_unvalidated_tlsa_is_none(self) -> None:
        self.dns.validate_all = False
        self.dns.tlsa(OWNER, b"\x03\x01\x01" + b"\xaa" * 32)
        self.assertIs(self.lookup().state, DaneState.NOT_FOUND)

    def test_lookup_failure(self) -> None:
        self.dns.errors[(OWNER, 52)] = DNSServerError("bogus")
        lookup = self.lookup()
        self.assertEqual((lookup.state, lookup.reason), (DaneState.ERROR, "TLSA lookup error for mx.example.com:25"))
        self.assertFalse(lookup.applies)
        self.assertTrue(any(e.get("log_format", "").startswith("DANE TLSA lookup problem") for e in self.warnings))

    def test_insecure_mx_and_host(self) -> None:
        self.dns.tlsa(OWNER, b"\x03\x01\x01" + b"\xaa" * 32)
        lookup = self.lookup(mx=False)
        self.assertEqual((lookup.state, lookup.reason), (DaneState.INSECURE, "non DNSSEC destination"))
        self.assertIs(self.lookup(host=False).state, DaneState.NOT_FOUND)
        self.assertEqual(self.dns.queries, [])  # no TLSA query for either

    def test_insecure_mx_allowed_for_half_dane(self) -> None:
        self.dns.tlsa(OWNER, b"\x03\x01\x01" + b"\xaa" * 32)
        lookup = self.successResultOf(
            self.dane.lookup("mx.example.com", 25, mx_dnssec_valid=False, host_dnssec_valid=True, insecure_mx_ok=True)
        )
        self.assertIs(lookup.state, DaneState.USABLE)
        self.assertFalse(lookup.mx_secure)
        self.assertFalse(lookup.applies)  # the MX could be forged: not DANE for MTA-STS

    def test_disabled(self) -> None:
        lookup = self.successResultOf(
            DaneResolver(None, enabled=False).lookup("mx.example.com", 25, mx_dnssec_valid=True, host_dnssec_valid=True)
        )
        self.assertTrue(lookup.config_problem)
        self.assertEqual(lookup.reason, "configured with dnssec lookups disabled")

    def test_applies_for_a_server(self) -> None:
        self.dns.tlsa(OWNER, b"\x03\x01\x01" + b"\xaa" * 32)
        secure = ServerInfo("mx.example.com", "192.0.2.1", 25, "example.com", mx_dnssec_valid=True, host_dnssec_valid=True)
        insecure = ServerInfo("mx.example.com", "192.0.2.1", 25, "example.com", mx_dnssec_valid=False, host_dnssec_valid=True)
        self.assertTrue(self.successResultOf(self.dane.applies(secure)))
        self.assertFalse(self.successResultOf(self.dane.applies(insecure)))


def looked_up(state: DaneState, reason: str = "why", records=(), config_problem: bool = False) -> TLSALookup:
    return TLSALookup(state, tuple(records), reason, "mx.example.com", 25, config_problem=config_problem)


class DanePolicyTests(SynchronousTestCase):
    DANE = TLSPolicy(TLSLevel.DANE)
    DANE_ONLY = TLSPolicy(TLSLevel.DANE_ONLY)
    RECORD = TLSARecord(3, 1, 1, b"\xaa" * 32)

    def deferral(self, policy: TLSPolicy, lookup: TLSALookup) -> tuple[str, str]:
        failure = self.assertRaises(DeliveryFailure, dane_policy, policy, lookup)
        return failure.status.dsn, failure.status.text

    def test_usable_records_keep_the_level(self) -> None:
        for policy in (self.DANE, self.DANE_ONLY):
            effective = dane_policy(policy, looked_up(DaneState.USABLE, "", [self.RECORD]))
            self.assertEqual(effective.tlsa, (self.RECORD,))
            self.assertTrue(effective.level.mandatory)

    def test_dane_falls_back(self) -> None:
        for state in (DaneState.INSECURE, DaneState.NOT_FOUND):
            self.assertIs(dane_policy(self.DANE, looked_up(state)).level, TLSLevel.MAY)
        self.assertIs(dane_policy(self.DANE, looked_up(DaneState.UNUSABLE)).level, TLSLevel.ENCRYPT)
        self.assertIs(dane_policy(self.DANE, looked_up(DaneState.NOT_FOUND, config_problem=True)).level, TLSLevel.MAY)

    def test_dane_only_defers(self) -> None:
        for state, reason in (
            (DaneState.INSECURE, "non DNSSEC destination"),
            (DaneState.NOT_FOUND, "no TLSA records found"),
            (DaneState.UNUSABLE, "TLSA records unusable"),
        ):
            self.assertEqual(self.deferral(self.DANE_ONLY, looked_up(state, reason)), ("4.7.5", reason))
        self.assertEqual(
            self.deferral(self.DANE_ONLY, looked_up(DaneState.NOT_FOUND, config_problem=True)),
            ("4.7.5", "client TLS configuration problem"),
        )

    def test_insecure_mx_policy(self) -> None:
        half = TLSALookup(DaneState.USABLE, (self.RECORD,), "", "mx.example.com", 25, mx_secure=False)
        effective = dane_policy(self.DANE, half)  # Postfix's default: dane
        self.assertEqual((effective.tlsa, effective.half_dane), ((self.RECORD,), True))
        self.assertIs(dane_policy(self.DANE, half, "encrypt").level, TLSLevel.ENCRYPT)
        self.assertIs(dane_policy(self.DANE, half, "may").level, TLSLevel.MAY)
        self.assertEqual(self.deferral(self.DANE_ONLY, half), ("4.7.5", "non DNSSEC destination"))

    def test_lookup_errors_defer_both(self) -> None:
        reason = "TLSA lookup error for mx.example.com:25"
        for policy in (self.DANE, self.DANE_ONLY):
            self.assertEqual(self.deferral(policy, looked_up(DaneState.ERROR, reason)), ("4.7.5", reason))

    def test_other_levels_pass(self) -> None:
        policy = TLSPolicy(TLSLevel.VERIFY)
        self.assertIs(dane_policy(policy, looked_up(DaneState.ERROR)), policy)

    def test_outcome_says_dane(self) -> None:
        self.assertTrue(TLSOutcome(active=True, trust="Verified", policy_type="tlsa").verified_by_dane)
        self.assertFalse(TLSOutcome(active=True, trust="Verified").verified_by_dane)
        self.assertFalse(TLSOutcome(active=True, trust="Untrusted", policy_type="tlsa").verified_by_dane)

    def test_plaintext_retry_allowed_for_dane_only_as_may(self) -> None:
        policy = SecurityPolicy(Config.defaults().replace(smtp_tls_security_level="dane"))
        self.assertIs(policy.for_nexthop("example.com").plaintext_fallback().tls_level, TLSLevel.NONE)
        strict = SecurityPolicy(Config.defaults().replace(smtp_tls_security_level="dane-only"))
        self.assertRaises(ValueError, strict.for_nexthop("example.com").plaintext_fallback)

    def test_security_policy_needs_dnssec(self) -> None:
        dns_resolver = FakeDNSResolver()
        plain = SecurityPolicy(Config.defaults().replace(smtp_tls_security_level="dane"), dns_resolver=dns_resolver)
        self.assertFalse(plain.dane.enabled)
        config = Config.defaults().replace(smtp_tls_security_level="dane", smtp_dns_support_level="dnssec")
        self.assertTrue(SecurityPolicy(config, dns_resolver=dns_resolver).dane.enabled)
        ignoring = config.replace(ignore_mx_lookup_error="yes")
        self.assertEqual(
            SecurityPolicy(ignoring, dns_resolver=dns_resolver).dane.disabled_reason,
            "configured with MX lookup errors ignored",
        )


class DNSSECQueryTests(SynchronousTestCase):
    def test_query_asks_for_dnssec(self) -> None:
        message = dns.Message(id=7, recDes=1)
        message.queries = [dns.Query("example.com", dns.MX)]
        wire = ask_for_dnssec(message).toStr()
        parsed = dns._EDNSMessage()
        parsed.fromStr(wire)
        self.assertTrue(parsed.authenticData)
        self.assertTrue(parsed.dnssecOK)
        self.assertEqual(parsed.maxSize, 1232)
        # Twice is once.
        self.assertEqual(len(ask_for_dnssec(message).additional), 1)

    def test_answers_keep_the_ad_bit(self) -> None:
        resolver = DNSSECResolver(servers=[("127.0.0.1", 53)], reactor=Clock())
        for bit in (0, 1):
            reply = dns.Message(id=1, answer=1, authenticData=bit)
            reply.answers = [dns.RRHeader("example.com", dns.A, payload=dns.Record_A("192.0.2.1"))]
            result = resolver.filterAnswers(reply)
            self.assertEqual(is_authentic(result), bool(bit))
            answers, _authority, _additional = result
            self.assertEqual(len(answers), 1)
        self.assertFalse(is_authentic(([], [], [])))


class MakeResolverTests(SynchronousTestCase):
    def test_dnssec_resolver_and_the_remote_server_warning(self) -> None:
        logs = LogCapture(self)
        local = Config.defaults().replace(smtp_dns_support_level="dnssec", dns_nameservers="127.0.0.1:5353")
        self.assertIsInstance(make_dns_resolver(local, Clock()), DNSSECResolver)
        self.assertFalse(any("not on this host" in m for m in logs.messages()))
        remote = local.replace(dns_nameservers="192.0.2.53")
        self.assertIsInstance(make_dns_resolver(remote, Clock()), DNSSECResolver)
        self.assertTrue(any("name server 192.0.2.53 is not on this host" in m for m in logs.messages()))
        plain = Config.defaults().replace(dns_nameservers="127.0.0.1")
        self.assertNotIsInstance(make_dns_resolver(plain, Clock()), DNSSECResolver)


class ValidationFlagTests(SynchronousTestCase):
    def resolver(self, support: str = "dnssec") -> tuple[NexthopResolver, FakeDNSResolver]:
        dns_resolver = FakeDNSResolver()
        dns_resolver.mx("example.com", (10, "mx1.example.com"), (20, "mx2.example.com"))
        dns_resolver.a("mx1.example.com", "192.0.2.1")
        dns_resolver.a("mx2.example.com", "192.0.2.2")
        dns_resolver.aaaa("mx1.example.com", "2001:db8::1")
        config = Config.defaults().replace(smtp_dns_support_level=support, smtp_randomize_addresses="no")
        return NexthopResolver(config, dns_resolver, Clock(), local_addresses=set), dns_resolver

    def addresses(self, resolver: NexthopResolver, nexthop: Nexthop | None = None):
        nexthop = nexthop or Nexthop("example.com", "example.com", 25, True, False)
        return {(a.address, a.mx_dnssec_valid, a.host_dnssec_valid) for a in self.successResultOf(resolver.addresses(nexthop))}

    def test_each_address_says_what_was_validated(self) -> None:
        resolver, dns_resolver = self.resolver()
        dns_resolver.validated = {("example.com", dns.MX), ("mx1.example.com", dns.A)}
        self.assertEqual(
            self.addresses(resolver),
            {("192.0.2.1", True, True), ("2001:db8::1", True, False), ("192.0.2.2", True, False)},
        )
        dns_resolver.validated = {("mx1.example.com", dns.A)}
        self.assertIn(("192.0.2.1", False, True), self.addresses(resolver))

    def test_a_host_nexthop_has_no_mx_to_validate(self) -> None:
        resolver, dns_resolver = self.resolver()
        dns_resolver.validate_all = True
        nexthop = Nexthop("example.com", "mx2.example.com", 587, False, True)
        self.assertEqual(self.addresses(resolver, nexthop), {("192.0.2.2", True, True)})

    def test_without_dnssec_nothing_is_validated(self) -> None:
        resolver, dns_resolver = self.resolver("enabled")
        dns_resolver.validate_all = True
        self.assertTrue(all(not mx and not host for _, mx, host in self.addresses(resolver)))


class DaneNegotiationTests(SynchronousTestCase):
    """SessionSecurity with a fake DNS resolver and a real in-memory
    handshake (FakeTLSSession)."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.dns = FakeDNSResolver()
        self.dns.validate_all = True

    def security(self, level: str, **extra: str):
        settings = {"smtp_tls_loglevel": "2", **extra}
        config = Config.defaults().replace(
            smtp_tls_security_level=level, smtp_dns_support_level="dnssec", **settings
        )
        return SecurityPolicy(config, dns_resolver=self.dns).for_nexthop("example.com")

    def session(
        self, leaf: IssuedCertificate, *, secure: bool = True, mx_secure: bool | None = None,
        with_ca: bool = False, **kwargs,
    ):
        context = leaf.server_context()
        if with_ca:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(CA.certificate))
        session = FakeTLSSession(context, **kwargs)
        session.server = dataclasses.replace(
            session.server, mx_dnssec_valid=secure if mx_secure is None else mx_secure, host_dnssec_valid=secure
        )
        return session

    def publish(self, record: TLSARecord) -> None:
        self.dns.tlsa(OWNER, bytes([record.usage, record.selector, record.matching]) + record.data)

    def test_dane_ee_verified(self) -> None:
        leaf = CA.issue(["anything.example"])
        self.publish(record_for(leaf.certificate))
        security, session = self.security("dane"), self.session(leaf)
        self.successResultOf(security.negotiate(session))
        self.assertTrue(session.tls_outcome.verified_by_dane)
        self.assertEqual(session.tls_outcome.policy_type, "tlsa")
        self.assertEqual(session.sent, [b"STARTTLS", b"EHLO client.example.com"])
        messages = self.logs.messages()
        self.assertTrue(any(m.startswith("Verified TLS connection established to mx.example.com[192.0.2.1]:25: ")
                            for m in messages), messages)
        self.assertTrue(any(m.startswith("mx.example.com[192.0.2.1]:25: Matched DANE EE certificate at depth 0: ")
                            for m in messages), messages)

    def test_the_match_is_logged_from_loglevel_2(self) -> None:
        leaf = CA.issue(["mx.example.com"])
        self.publish(record_for(leaf.certificate))
        self.successResultOf(self.security("dane", smtp_tls_loglevel="1").negotiate(self.session(leaf)))
        levels = {
            formatEvent(event).split(":")[0]: event["log_level"]
            for event in self.logs.events
            if "Matched DANE" in formatEvent(event) or "TLS connection established" in formatEvent(event)
        }
        self.assertEqual(levels["mx.example.com[192.0.2.1]"], LogLevel.debug)
        self.assertEqual(levels["Verified TLS connection established to mx.example.com[192.0.2.1]"], LogLevel.info)

    def test_dane_ta_verified_with_the_chain(self) -> None:
        leaf = CA.issue(["mx.example.com"])
        self.publish(record_for(CA.certificate, 2, 0, 1))
        session = self.session(leaf, with_ca=True)
        self.successResultOf(self.security("dane-only").negotiate(session))
        self.assertTrue(session.tls_outcome.verified_by_dane)

    def test_dane_ta_accepts_the_nexthop_domain(self) -> None:
        leaf = CA.issue(["example.com"])
        self.publish(record_for(CA.certificate, 2, 1, 1))
        session = self.session(leaf, with_ca=True)
        self.successResultOf(self.security("dane").negotiate(session))
        self.assertTrue(session.tls_outcome.verified_by_dane)

    def test_mismatch_defers(self) -> None:
        leaf = CA.issue(["mx.example.com"])
        self.publish(record_for(CA.issue(["mx.example.com"]).certificate))
        session = self.session(leaf)
        failure = self.failureResultOf(self.security("dane").negotiate(session), DeliveryFailure)
        self.assertEqual((failure.value.status.dsn, failure.value.status.text), ("4.7.5", "Server certificate not verified"))
        self.assertFalse(failure.value.status.retry_plaintext)
        self.assertEqual(session.sent, [b"STARTTLS"])
        self.assertEqual((session.tls_outcome.trust, session.tls_outcome.policy_type), ("Untrusted", "tlsa"))
        self.assertIs(session.tlsa_lookup.state, DaneState.USABLE)
        self.assertIn(
            "certificate verification failed for mx.example.com[192.0.2.1]:25: not trusted by local or TLSA policy",
            self.logs.messages(),
        )

    def test_tlsa_makes_tls_mandatory(self) -> None:
        leaf = CA.issue(["mx.example.com"])
        self.publish(record_for(leaf.certificate))
        session = self.session(leaf, offer_starttls=False)
        failure = self.failureResultOf(self.security("dane").negotiate(session), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "4.7.4")

    def test_insecure_destination(self) -> None:
        leaf = CA.issue(["mx.example.com"])
        self.publish(record_for(leaf.certificate))
        session = self.session(leaf, secure=False)
        failure = self.failureResultOf(self.security("dane-only").negotiate(session), DeliveryFailure)
        self.assertEqual((failure.value.status.dsn, failure.value.status.text), ("4.7.5", "non DNSSEC destination"))
        self.assertEqual(session.sent, [])  # decided before STARTTLS
        # dane: opportunistic TLS, nothing verified.
        session = self.session(leaf, secure=False)
        self.successResultOf(self.security("dane").negotiate(session))
        self.assertEqual((session.tls_outcome.trust, session.tls_outcome.policy_type), ("Untrusted", ""))
        self.assertEqual(self.dns.queries, [])

    def test_half_dane(self) -> None:
        # Insecure MX, secure host with TLSA records: enforced (Postfix's
        # smtp_tls_dane_insecure_mx_policy = dane), a match only Trusted.
        leaf = CA.issue(["mx.example.com"])
        self.publish(record_for(leaf.certificate))
        session = self.session(leaf, mx_secure=False)
        self.successResultOf(self.security("dane").negotiate(session))
        outcome = session.tls_outcome
        self.assertEqual((outcome.trust, outcome.policy_type), ("Trusted", "tlsa"))
        self.assertFalse(outcome.verified_by_dane)
        self.assertTrue(outcome.dane_match)
        self.assertIn("Trusted TLS connection established", "\n".join(self.logs.messages()))
        # A mismatch defers.
        self.dns.tlsa(OWNER, b"\x03\x01\x01" + b"\xaa" * 32)
        session = self.session(leaf, mx_secure=False)
        failure = self.failureResultOf(self.security("dane").negotiate(session), DeliveryFailure)
        self.assertEqual(failure.value.status.text, "Server certificate not verified")
        # With the policy at may, the records are not even looked up.
        queries = len(self.dns.queries)
        session = self.session(leaf, mx_secure=False)
        self.successResultOf(
            self.security("dane", smtp_tls_dane_insecure_mx_policy="may").negotiate(session)
        )
        self.assertEqual(session.tls_outcome.policy_type, "")
        self.assertEqual(len(self.dns.queries), queries)

    def test_unresolved_dane_policy_is_refused(self) -> None:
        leaf = CA.issue(["mx.example.com"])
        session = self.session(leaf)
        tls = SecurityPolicy(Config.defaults()).tls
        failure = self.failureResultOf(
            Deferred.fromCoroutine(negotiate_tls(session, TLSPolicy(TLSLevel.DANE), tls, nexthop="example.com")),
            DeliveryFailure,
        )
        self.assertEqual(failure.value.status.text, "client TLS configuration problem")
        self.assertEqual(session.sent, [])


STS_POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmax_age: 604800\r\n"
STS_URL = "https://mta-sts.example.com/.well-known/mta-sts.txt"


class DaneWithTheOtherPoliciesTests(SynchronousTestCase):
    """DANE beside MTA-STS (RFC 8461 section 2), TLSRPT and REQUIRETLS,
    through SessionSecurity with fakes."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dns = FakeDNSResolver()
        self.dns.validate_all = True
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=one")
        self.http = FakeHTTPClient()
        self.http.serve(STS_URL, STS_POLICY)
        cache = os.path.abspath(self.mktemp())
        store_settings = MTASTSSettings(
            smtp_mta_sts_enable=True, smtp_mta_sts_cache_directory=cache, smtp_mta_sts_fetch_timeout=10.0,
            smtp_mta_sts_max_policy_size=65536, smtp_mta_sts_CAfile="", smtp_mta_sts_refresh_margin=86400.0,
            queue_directory=cache,
        )
        self.store = PolicyStore(store_settings, self.dns, self.http, self.clock)
        self.recorder = Recorder(self.mktemp(), self.clock)
        self.leaf = CA.issue(["mx.example.com"])

    def security(self, level: str):
        config = Config.defaults().replace(smtp_tls_security_level=level, smtp_dns_support_level="dnssec")
        policy = SecurityPolicy(config, mta_sts=self.store, tlsrpt=self.recorder, dns_resolver=self.dns)
        return policy.for_nexthop("example.com")

    def session(self, *, mx_secure: bool = True) -> FakeTLSSession:
        session = FakeTLSSession(self.leaf.server_context())
        session.server = dataclasses.replace(
            session.server, policy_domain="example.com", mx_dnssec_valid=mx_secure, host_dnssec_valid=True
        )
        return session

    def publish(self, record: TLSARecord) -> None:
        self.dns.tlsa(OWNER, bytes([record.usage, record.selector, record.matching]) + record.data)

    def counts(self) -> dict[str, dict]:
        period = self.recorder.periods[self.recorder.period_of(self.clock.seconds())]
        return {json.loads(key)[0]: value for key, value in period["example.com"].items()}

    def test_dane_wins_over_mta_sts(self) -> None:
        # mx.example.com is outside the MTA-STS policy (mail.example.com):
        # MTA-STS enforce would refuse it; DANE applies, so it does not ask.
        self.publish(record_for(self.leaf.certificate))
        session = self.session()
        self.successResultOf(self.security("dane").negotiate(session))
        self.assertTrue(session.tls_outcome.verified_by_dane)
        self.assertEqual(self.http.gets, [])
        counts = self.counts()["tlsa"]
        self.assertEqual((counts["success"], counts["failure"]), (1, 0))

    def test_mta_sts_governs_where_dane_does_not_apply(self) -> None:
        # No TLSA records: dane is may, and the MTA-STS policy refuses
        # the MX outside its patterns.
        failure = self.failureResultOf(self.security("dane").negotiate(self.session()), DeliveryFailure)
        self.assertIn("does not match the MTA-STS policy of example.com", failure.value.status.text)
        self.assertEqual(len(self.http.gets), 1)

    def test_half_dane_still_gets_the_mta_sts_mx_check(self) -> None:
        # The MX RRset was not validated: it may be forged, so MTA-STS's
        # MX patterns still count.
        self.publish(record_for(self.leaf.certificate))
        failure = self.failureResultOf(self.security("dane").negotiate(self.session(mx_secure=False)), DeliveryFailure)
        self.assertIn("does not match the MTA-STS policy of example.com", failure.value.status.text)

    def test_tlsrpt_counts_dane_failures(self) -> None:
        self.publish(record_for(CA.issue(["mx.example.com"]).certificate))
        self.failureResultOf(self.security("dane").negotiate(self.session()), DeliveryFailure)
        counts = self.counts()["tlsa"]
        self.assertEqual(counts["failure"], 1)
        self.assertIn('"result-type": "certificate-not-trusted"', next(iter(counts["details"])))

    def test_tlsrpt_counts_a_failed_lookup_and_dane_required(self) -> None:
        self.dns.errors[(OWNER, 52)] = DNSServerError("bogus")
        self.failureResultOf(self.security("dane").negotiate(self.session()), DeliveryFailure)
        self.assertIn('"result-type": "dnssec-invalid"', next(iter(self.counts()["tlsa"]["details"])))
        del self.dns.errors[(OWNER, 52)]
        self.failureResultOf(self.security("dane-only").negotiate(self.session()), DeliveryFailure)
        self.assertIn('"result-type": "dane-required"', next(iter(self.counts()["no-policy-found"]["details"])))

    def test_requiretls_is_satisfied_by_dane(self) -> None:
        self.publish(record_for(self.leaf.certificate))
        session = self.session()
        session.after_tls_extensions = {"PIPELINING": "", "AUTH": "PLAIN", "REQUIRETLS": ""}
        self.successResultOf(self.security("dane").for_demand(TLSDemand.REQUIRETLS).negotiate(session))
        self.assertTrue(session.tls_outcome.verified_by_dane)
        self.assertTrue(session.requiretls_cleared)

    def test_requiretls_without_dane_needs_a_verified_certificate(self) -> None:
        # No TLSA records: dane would be may; REQUIRETLS raises it to
        # verify, and the test CA is not trusted.
        session = self.session()
        session.after_tls_extensions = {"PIPELINING": "", "AUTH": "PLAIN", "REQUIRETLS": ""}
        config = Config.defaults().replace(smtp_tls_security_level="dane", smtp_dns_support_level="dnssec")
        security = SecurityPolicy(config, dns_resolver=self.dns).for_nexthop("example.com")
        failure = self.failureResultOf(security.for_demand(TLSDemand.REQUIRETLS).negotiate(session), DeliveryFailure)
        self.assertIn("REQUIRETLS", failure.value.status.text)
        # Refused in the handshake (verify), not after EHLO (may).
        self.assertEqual(session.sent, [b"STARTTLS"])

    def test_tls_required_no_gets_no_dane(self) -> None:
        self.publish(record_for(CA.issue(["mx.example.com"]).certificate))  # would not match
        session = self.session()
        self.successResultOf(self.security("dane-only").for_demand(TLSDemand.NOT_REQUIRED).negotiate(session))
        self.assertEqual(session.tls_outcome.policy_type, "")
        self.assertEqual(self.dns.queries.count((OWNER, 52)), 0)
