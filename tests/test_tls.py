"""
Tests for relayagent.smtp.tls: levels, protocol and cipher settings, policy
maps, certificate name matching, and STARTTLS at every level against a
fake session whose handshake is real (two OpenSSL connections joined by
memory BIOs, with certificates from a test CA).
"""

from __future__ import annotations

import os
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.common.maps import open_maps
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.reply import Reply
from relayagent.smtp.tls import (
    ContextCache,
    PolicyLookup,
    TLSConfigError,
    TLSFiles,
    TLSLevel,
    TLSPolicy,
    TLSPolicyError,
    TLSSettings,
    certificate_matches,
    cipher_list,
    negotiate_tls,
    nexthop_domain,
    parse_level,
    parse_policy,
    parse_protocols,
    policy_keys,
)
from relayagent.testing import FakeTLSSession, LogCapture
from tests.support.certs import CertificateAuthority, self_signed

CA = CertificateAuthority()


def reply(code: int, text: str = "") -> Reply:
    return Reply(code=code, enhanced=None, lines=(f"{code} {text}".rstrip(),))


def settings(ca_file: str = "", **overrides: Any) -> TLSSettings:
    files = TLSFiles(
        ca_file=ca_file,
        ca_path=overrides.pop("ca_path", ""),
        cert_file=overrides.pop("cert_file", ""),
        key_file=overrides.pop("key_file", ""),
    )
    return TLSSettings(contexts=ContextCache(files), **overrides)


class LevelAndProtocolTests(SynchronousTestCase):
    def test_levels(self) -> None:
        self.assertIs(parse_level(""), TLSLevel.NONE)
        for word in ("none", "may", "encrypt", "verify", "secure", "dane", "dane-only"):
            self.assertEqual(str(parse_level(word.upper())), word)
        self.assertIs(parse_level("dane"), TLSLevel.DANE)
        self.assertIs(parse_level("dane-only"), TLSLevel.DANE_ONLY)
        self.assertFalse(TLSLevel.DANE.checks_names)
        for word in ("fingerprint", "bogus"):
            error = self.assertRaises(TLSConfigError, parse_level, word)
            self.assertIn(word, str(error))
        self.assertTrue(TLSLevel.ENCRYPT.mandatory and not TLSLevel.MAY.mandatory)
        self.assertTrue(TLSLevel.VERIFY.checks_names and not TLSLevel.ENCRYPT.checks_names)

    def test_protocols(self) -> None:
        self.assertEqual(parse_protocols([">=TLSv1.2"]), ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(parse_protocols(["!SSLv2", "!SSLv3"]), ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"))
        self.assertEqual(parse_protocols(["TLSv1.3"]), ("TLSv1.3",))
        self.assertEqual(parse_protocols([">=TLSv1:<=TLSv1.2:!TLSv1.1"]), ("TLSv1", "TLSv1.2"))
        self.assertEqual(parse_protocols(["tlsv1.2, tlsv1.3"]), ("TLSv1.2", "TLSv1.3"))

    def test_bad_protocols(self) -> None:
        error = self.assertRaises(TLSConfigError, parse_protocols, [">=TLSv1.2", "<=TLSv1.1"], "smtp_tls_protocols")
        self.assertIn("no usable TLS protocol", str(error))
        error = self.assertRaises(TLSConfigError, parse_protocols, ["TLSv9"], "smtp_tls_mandatory_protocols")
        self.assertIn("smtp_tls_mandatory_protocols: unknown TLS protocol 'TLSv9'", str(error))
        self.assertRaises(TLSConfigError, parse_protocols, ["SSLv3"])

    def test_ciphers(self) -> None:
        self.assertEqual(cipher_list("HIGH"), "HIGH:!aNULL:!eNULL")
        self.assertEqual(cipher_list("medium", ["RC4", "3DES"]), "HIGH:MEDIUM:!aNULL:!eNULL:!RC4:!3DES")
        self.assertRaises(TLSConfigError, cipher_list, "strong")


class PolicyTests(SynchronousTestCase):
    def test_parse_policy(self) -> None:
        policy = parse_policy("secure match=.example.com:example.net", "t")
        self.assertEqual(policy.level, TLSLevel.SECURE)
        self.assertEqual(policy.match, (".example.com", "example.net"))
        policy = parse_policy("encrypt protocols=>=TLSv1.2 ciphers=high exclude=3DES:RC4", "t")
        self.assertEqual((policy.protocols, policy.ciphers, policy.exclude), ((">=TLSv1.2",), "high", ("3DES", "RC4")))
        self.assertEqual(parse_policy("none", "t"), TLSPolicy(TLSLevel.NONE, source="t"))

    def test_bad_policies(self) -> None:
        for value, complaint in (
            ("", "empty TLS policy"),
            ("sometimes", "unknown TLS security level"),
            ("secure match", "expected name=value"),
            ("secure match=", "expected name=value"),
            ("secure match=a match=b", "given twice"),
            ("secure tafile=/x", "unsupported attribute 'tafile'"),
            ("encrypt protocols=TLSv7", "unknown TLS protocol"),
            ("encrypt ciphers=ultra", "unknown cipher grade"),
        ):
            error = self.assertRaises(TLSConfigError, parse_policy, value, "entry for example.com")
            self.assertIn(complaint, str(error), value)
            self.assertIn("entry for example.com", str(error))

    def test_policy_keys(self) -> None:
        self.assertEqual(policy_keys("Mail.Example.COM"), ["mail.example.com", ".example.com", ".com"])
        self.assertEqual(policy_keys("[mx.example.net]:587"), ["[mx.example.net]:587"])
        self.assertEqual(policy_keys("[mx.example.net]"), ["[mx.example.net]"])
        self.assertEqual(policy_keys("example.com:587"), ["example.com:587"])

    def test_nexthop_domain(self) -> None:
        self.assertEqual(nexthop_domain("[smtp.example.com]:587"), "smtp.example.com")
        self.assertEqual(nexthop_domain("[smtp.example.com]"), "smtp.example.com")
        self.assertEqual(nexthop_domain("example.com:25"), "example.com")
        self.assertEqual(nexthop_domain("example.com"), "example.com")

    def test_lookup(self) -> None:
        table = open_maps(
            [
                "inline:{ {example.com = secure match=.example.com}, "
                "{ [mx.example.net]:587 = encrypt protocols=>=TLSv1.2 }, "
                "{ example.org = none }, { .example.edu = verify }, { bad.example = sometimes } }"
            ]
        )
        lookup = PolicyLookup("may", table)
        self.assertEqual(lookup.policy_for("example.com").level, TLSLevel.SECURE)
        self.assertEqual(lookup.policy_for("example.com").match, (".example.com",))
        self.assertEqual(lookup.policy_for("[mx.example.net]:587").level, TLSLevel.ENCRYPT)
        self.assertEqual(lookup.policy_for("[mx.example.net]").level, TLSLevel.MAY)
        self.assertEqual(lookup.policy_for("example.org").level, TLSLevel.NONE)
        self.assertEqual(lookup.policy_for("mail.cs.example.edu").level, TLSLevel.VERIFY)
        self.assertEqual(lookup.policy_for("example.edu").level, TLSLevel.MAY)
        self.assertEqual(lookup.policy_for("elsewhere.test").level, TLSLevel.MAY)
        error = self.assertRaises(TLSPolicyError, lookup.policy_for, "bad.example")
        self.assertIn("smtp_tls_policy_maps entry for bad.example", str(error))
        self.assertEqual(PolicyLookup("").policy_for("x").level, TLSLevel.NONE)


class NameMatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mx = CA.issue(["mx.example.com"]).certificate
        self.wild = CA.issue(["*.example.net"]).certificate
        self.domain = CA.issue(["example.com"]).certificate
        self.ip = CA.issue([], ip_addresses=["192.0.2.1"]).certificate
        self.cn_only = CA.issue([], common_name="mx.example.com").certificate

    def matches(self, certificate, patterns, host="mx.example.com", nexthop="example.com") -> bool:
        return certificate_matches(certificate, patterns, hostname=host, nexthop=nexthop)

    def test_hostname(self) -> None:
        self.assertTrue(self.matches(self.mx, ["hostname"]))
        self.assertTrue(self.matches(self.mx, ["hostname"], host="MX.example.com."))
        self.assertFalse(self.matches(self.mx, ["hostname"], host="other.example.com"))

    def test_nexthop_and_dot_nexthop(self) -> None:
        self.assertFalse(self.matches(self.mx, ["nexthop"]))
        self.assertTrue(self.matches(self.mx, ["nexthop", "dot-nexthop"]))
        self.assertTrue(self.matches(self.domain, ["nexthop", "dot-nexthop"]))
        self.assertFalse(self.matches(self.domain, ["dot-nexthop"]))
        self.assertFalse(self.matches(self.mx, ["nexthop", "dot-nexthop"], nexthop="example.org"))

    def test_literal_names_and_suffixes(self) -> None:
        self.assertTrue(self.matches(self.mx, ["example.org", "mx.example.com"], host="x"))
        self.assertTrue(self.matches(self.mx, [".example.com"], host="x"))
        self.assertFalse(self.matches(self.mx, [".mx.example.com"], host="x"))
        self.assertTrue(self.matches(self.wild, [".example.net"], host="x"))
        self.assertTrue(self.matches(self.wild, ["a.example.net"], host="x"))
        self.assertFalse(self.matches(self.wild, ["a.b.example.net"], host="x"))

    def test_ip_address_and_no_cn_fallback(self) -> None:
        self.assertTrue(self.matches(self.ip, ["hostname"], host="192.0.2.1"))
        self.assertFalse(self.matches(self.ip, ["hostname"], host="192.0.2.2"))
        # RFC 9525: the subject CN is never used.
        self.assertFalse(self.matches(self.cn_only, ["hostname"]))


class NegotiationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        directory = self.mktemp()
        os.makedirs(directory)
        self.directory = directory
        self.ca_file = CA.write(directory)
        self.trusting = settings(self.ca_file)

    def negotiate(self, session, level, tls_settings=None, nexthop="example.com", **policy: Any):
        return Deferred.fromCoroutine(
            negotiate_tls(session, TLSPolicy(level, **policy), tls_settings or self.trusting, nexthop=nexthop)
        )

    def session_for(self, names, **kwargs) -> FakeTLSSession:
        return FakeTLSSession(CA.issue(names).server_context(), **kwargs)

    def established(self) -> list[str]:
        return [line for line in self.logs.messages() if "TLS connection established" in line]

    def test_none_sends_nothing(self) -> None:
        session = self.session_for(["mx.example.com"])
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.NONE))
        self.assertFalse(outcome.active)
        self.assertEqual(session.sent, [])

    def test_may_without_starttls_goes_on(self) -> None:
        session = self.session_for(["mx.example.com"], offer_starttls=False)
        self.assertFalse(self.successResultOf(self.negotiate(session, TLSLevel.MAY)).active)
        self.assertEqual(session.sent, [])

    def test_encrypt_without_starttls_is_474(self) -> None:
        for level in (TLSLevel.ENCRYPT, TLSLevel.VERIFY, TLSLevel.SECURE):
            session = self.session_for(["mx.example.com"], offer_starttls=False)
            failure = self.failureResultOf(self.negotiate(session, level), DeliveryFailure)
            self.assertEqual(failure.value.status.dsn, "4.7.4")
            self.assertEqual(
                failure.value.status.text, "TLS is required, but was not offered by host mx.example.com[192.0.2.1]"
            )
            self.assertEqual(session.sent, [])

    def test_starttls_refused(self) -> None:
        session = self.session_for(["mx.example.com"], starttls_reply=reply(454, "4.7.0 TLS not available"))
        self.assertFalse(self.successResultOf(self.negotiate(session, TLSLevel.MAY)).active)
        self.assertEqual(session.sent, [b"STARTTLS"])
        session = self.session_for(["mx.example.com"], starttls_reply=reply(454, "4.7.0 TLS not available"))
        failure = self.failureResultOf(self.negotiate(session, TLSLevel.ENCRYPT), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "4.7.4")
        self.assertEqual(
            failure.value.status.text,
            "TLS is required, but host mx.example.com[192.0.2.1] refused to start TLS: 454 4.7.0 TLS not available",
        )

    def test_may_with_an_untrusted_certificate(self) -> None:
        session = FakeTLSSession(self_signed(["other.example.org"]).server_context())
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.MAY))
        self.assertTrue(outcome.active)
        self.assertEqual(outcome.trust, "Untrusted")
        self.assertEqual(session.sni, [b"mx.example.com"])
        self.assertEqual(session.sent, [b"STARTTLS", b"EHLO client.example.com"])
        self.assertIn("STARTTLS", session.sent[0].decode())
        self.assertEqual(session.extensions["AUTH"], "PLAIN LOGIN")
        self.assertEqual(
            self.established(),
            [
                f"Untrusted TLS connection established to mx.example.com[192.0.2.1]:25: "
                f"{outcome.protocol} with cipher {outcome.cipher} ({outcome.bits}/{outcome.bits} bits)"
            ],
        )
        self.assertEqual(outcome.protocol, "TLSv1.3")

    def test_log_level(self) -> None:
        session = self.session_for(["mx.example.com"])
        self.successResultOf(self.negotiate(session, TLSLevel.MAY))
        session = self.session_for(["mx.example.com"])
        self.successResultOf(self.negotiate(session, TLSLevel.MAY, settings(self.ca_file, loglevel=1)))
        levels = [event["log_level"] for event in self.logs.events if event.get("postfix_tls")]
        self.assertEqual(levels, [LogLevel.debug, LogLevel.info])

    def test_encrypt_reports_trusted_without_checking_names(self) -> None:
        session = self.session_for(["somewhere.else"])
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.ENCRYPT))
        self.assertEqual(outcome.trust, "Trusted")
        self.assertTrue(self.established()[0].startswith("Trusted TLS connection established to "))

    def test_verify_matches_the_mx_host(self) -> None:
        session = self.session_for(["mx.example.com"])
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.VERIFY))
        self.assertEqual(outcome.trust, "Verified")
        self.assertTrue(
            self.established()[0].startswith(
                "Verified TLS connection established to mx.example.com[192.0.2.1]:25: TLSv1.3 with cipher TLS_"
            )
        )

    def _assert_not_verified(self, session: FakeTLSSession, level=TLSLevel.VERIFY, **kwargs) -> None:
        failure = self.failureResultOf(self.negotiate(session, level, **kwargs), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "4.7.5")
        self.assertEqual(failure.value.status.text, "Server certificate not verified")
        self.assertFalse(failure.value.status.retry_plaintext)
        # The connection was aborted before any EHLO went over it.
        self.assertIsNotNone(session.tls_protocol.verification_failure)
        self.assertEqual(session.sent, [b"STARTTLS"])

    def test_verify_with_a_certificate_for_another_name(self) -> None:
        self._assert_not_verified(self.session_for(["other.example.org"]))
        self.assertIn("Trusted TLS connection established", self.logs.text())
        self.assertIn("certificate names do not match hostname", self.logs.text())

    def test_verify_with_an_untrusted_chain(self) -> None:
        self._assert_not_verified(FakeTLSSession(self_signed(["mx.example.com"]).server_context()))
        self.assertIn("unable to get local issuer certificate", self.logs.text())

    def test_verify_with_an_expired_certificate(self) -> None:
        self._assert_not_verified(FakeTLSSession(CA.issue(["mx.example.com"], expired=True).server_context()))
        self.assertIn("certificate has expired", self.logs.text())

    def test_verify_with_the_system_trust_store(self) -> None:
        # No CAfile: our test CA is in no system store.
        self._assert_not_verified(self.session_for(["mx.example.com"]), tls_settings=settings())

    def test_secure_matches_the_nexthop(self) -> None:
        for names in (["example.com"], ["mx.example.com"], ["*.example.com"]):
            session = self.session_for(names)
            self.assertEqual(self.successResultOf(self.negotiate(session, TLSLevel.SECURE)).trust, "Verified")
        # The MX host name alone is not enough at secure.
        session = self.session_for(["mx.example.net"], host="mx.example.net")
        self._assert_not_verified(session, TLSLevel.SECURE)

    def test_secure_with_a_bracketed_nexthop(self) -> None:
        session = self.session_for(["smtp.example.net"], host="smtp.example.net", nexthop="[smtp.example.net]:587")
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.SECURE, nexthop="[smtp.example.net]:587"))
        self.assertEqual(outcome.trust, "Verified")

    def test_policy_match_overrides(self) -> None:
        session = self.session_for(["relay.example.org"])
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.SECURE, match=(".example.org",)))
        self.assertEqual(outcome.trust, "Verified")
        self._assert_not_verified(self.session_for(["mx.example.com"]), TLSLevel.SECURE, match=("example.org",))

    def test_verify_cert_match_setting(self) -> None:
        tls_settings = settings(self.ca_file, verify_cert_match=("nexthop",))
        self._assert_not_verified(self.session_for(["mx.example.com"]), tls_settings=tls_settings)
        session = self.session_for(["example.com"])
        self.assertEqual(self.successResultOf(self.negotiate(session, TLSLevel.VERIFY, tls_settings)).trust, "Verified")

    def test_ip_literal_host_sends_no_sni(self) -> None:
        session = FakeTLSSession(CA.issue([], ip_addresses=["192.0.2.1"]).server_context(), host="192.0.2.1")
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.VERIFY))
        self.assertEqual(outcome.trust, "Verified")
        self.assertEqual(session.sni, [None])

    def _failing_handshake(self) -> FakeTLSSession:
        # The server speaks only TLS 1.2, we only 1.3.
        context = CA.issue(["mx.example.com"]).server_context()
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        return FakeTLSSession(context)

    def test_failed_handshake_at_may_asks_for_plaintext_retry(self) -> None:
        session = self._failing_handshake()
        failure = self.failureResultOf(self.negotiate(session, TLSLevel.MAY, protocols=("TLSv1.3",)), DeliveryFailure)
        status = failure.value.status
        self.assertEqual(status.dsn, "4.7.5")
        self.assertEqual(status.text, "Cannot start TLS: handshake failure with host mx.example.com[192.0.2.1]")
        self.assertTrue(status.retry_plaintext)
        self.assertTrue(failure.value.skip_to_next)

    def test_failed_handshake_at_encrypt_does_not_retry(self) -> None:
        session = self._failing_handshake()
        failure = self.failureResultOf(self.negotiate(session, TLSLevel.ENCRYPT, protocols=("TLSv1.3",)), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "4.7.5")
        self.assertFalse(failure.value.status.retry_plaintext)

    def test_protocol_floor(self) -> None:
        # Our default floor is TLS 1.2: a TLS 1.1-only server fails.
        context = CA.issue(["mx.example.com"]).server_context()
        context.set_min_proto_version(SSL.TLS1_1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        failure = self.failureResultOf(self.negotiate(FakeTLSSession(context), TLSLevel.ENCRYPT), DeliveryFailure)
        self.assertIn("Cannot start TLS", failure.value.status.text)

    def test_tls12_only_server(self) -> None:
        context = CA.issue(["mx.example.com"]).server_context()
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        outcome = self.successResultOf(self.negotiate(FakeTLSSession(context), TLSLevel.VERIFY))
        self.assertEqual((outcome.protocol, outcome.trust), ("TLSv1.2", "Verified"))

    def test_failure_after_the_handshake_is_passed_on(self) -> None:
        lost = DeliveryFailure(Status("4.4.2", "lost connection with mx.example.com[192.0.2.1] while performing the EHLO handshake"))
        session = self.session_for(["mx.example.com"], ehlo_after_tls=lost)
        failure = self.failureResultOf(self.negotiate(session, TLSLevel.MAY), DeliveryFailure)
        self.assertIs(failure.value, lost)
        self.assertFalse(failure.value.status.retry_plaintext)

    def test_client_certificate(self) -> None:
        client_cert = CA.issue(["client.example.com"], client=True)
        cert_path, key_path = client_cert.write(self.directory, stem="client")
        context = CA.issue(["mx.example.com"]).server_context()
        context.set_verify(SSL.VERIFY_PEER, lambda *args: True)
        session = FakeTLSSession(context)
        tls_settings = settings(self.ca_file, cert_file=cert_path, key_file=key_path)
        self.successResultOf(self.negotiate(session, TLSLevel.VERIFY, tls_settings))
        self.assertEqual(session.client_certificate.get_subject().CN, "client.example.com")

    def test_unusable_policy_protocols_defer_with_configuration_problem(self) -> None:
        session = self.session_for(["mx.example.com"])
        failure = self.failureResultOf(
            self.negotiate(session, TLSLevel.ENCRYPT, ciphers="null", exclude=("eNULL",)), DeliveryFailure
        )
        self.assertEqual(failure.value.status.text, "client TLS configuration problem")
        self.assertFalse(failure.value.skip_to_next)
        self.assertEqual(session.sent, [])


class SettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def config(self, text: str) -> Config:
        return Config.from_text(text, base_dir=self.directory)

    def test_defaults(self) -> None:
        tls_settings = TLSSettings.from_config(Config.defaults())
        self.assertEqual(tls_settings.protocols, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(tls_settings.mandatory_protocols, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(tls_settings.verify_cert_match, ("hostname",))
        self.assertEqual(tls_settings.secure_cert_match, ("nexthop", "dot-nexthop"))
        self.assertEqual(tls_settings.starttls_timeout, 300.0)

    def test_relative_paths_resolve_against_base_dir(self) -> None:
        CA.write(self.directory, "ca.pem")
        leaf = CA.issue(["client.example.com"], client=True)
        leaf.write(self.directory, stem="client")
        tls_settings = TLSSettings.from_config(
            self.config("smtp_tls_CAfile = ca.pem\nsmtp_tls_cert_file = client.crt\nsmtp_tls_key_file = client.key\n")
        )
        self.assertIsNotNone(tls_settings.context_for(TLSPolicy(TLSLevel.VERIFY)))

    def test_bad_files(self) -> None:
        error = self.assertRaises(TLSConfigError, TLSSettings.from_config, self.config("smtp_tls_CAfile = missing.pem\n"))
        self.assertIn("smtp_tls_CAfile", str(error))
        with open(os.path.join(self.directory, "junk.pem"), "w") as handle:
            handle.write("not a certificate\n")
        error = self.assertRaises(TLSConfigError, TLSSettings.from_config, self.config("smtp_tls_cert_file = junk.pem\n"))
        self.assertIn("smtp_tls_cert_file", str(error))

    def test_key_read_once_for_contexts_built_later(self) -> None:
        # A context for a policy's own ciphers is built at its first use,
        # after the privilege drop or the chroot: from the key read at start.
        leaf = CA.issue(["client.example.com"], client=True)
        cert_path, key_path = leaf.write(self.directory, stem="client")
        with open(cert_path, "ab") as handle:  # a chain after the certificate
            handle.write(CA.cert_pem)
        tls_settings = TLSSettings.from_config(
            self.config("smtp_tls_cert_file = client.crt\nsmtp_tls_key_file = client.key\n")
        )
        os.unlink(key_path)
        os.unlink(cert_path)
        context = tls_settings.context_for(TLSPolicy(TLSLevel.ENCRYPT, ciphers="high", source="test"))
        connection = SSL.Connection(context, None)
        self.assertEqual(connection.get_certificate().get_subject().CN, "client.example.com")

    def test_key_and_certificate_in_one_file(self) -> None:
        leaf = CA.issue(["client.example.com"], client=True)
        path = os.path.join(self.directory, "client.pem")
        with open(path, "wb") as handle:
            handle.write(leaf.key_pem + leaf.cert_pem)
        tls_settings = TLSSettings.from_config(self.config("smtp_tls_cert_file = client.pem\n"))
        self.assertIsNotNone(tls_settings.context_for(TLSPolicy(TLSLevel.MAY)))

    def test_a_key_that_does_not_load_is_named_not_shown(self) -> None:
        leaf = CA.issue(["client.example.com"], client=True)
        cert_path, key_path = leaf.write(self.directory, stem="client")
        with open(key_path, "wb") as handle:
            handle.write(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ1dC1icm9rZW4=\n-----END PRIVATE KEY-----\n")
        config = self.config("smtp_tls_cert_file = client.crt\nsmtp_tls_key_file = client.key\n")
        error = self.assertRaises(TLSConfigError, TLSSettings.from_config, config)
        self.assertIn("smtp_tls_key_file", str(error))
        self.assertNotIn("c2VjcmV0", str(error))
        os.unlink(key_path)
        error = self.assertRaises(TLSConfigError, TLSSettings.from_config, config)
        self.assertIn("cannot read", str(error))

    def test_bad_protocols(self) -> None:
        error = self.assertRaises(TLSConfigError, TLSSettings.from_config, self.config("smtp_tls_protocols = TLSv1.4\n"))
        self.assertIn("smtp_tls_protocols", str(error))


def _issue(
    issuer_key: Any,
    issuer_name: Any,
    names: list[str],
    *,
    not_before_days: float = -1,
    not_after_days: float = 30,
    eku: Any = None,
    ca: bool = False,
    subject: str | None = None,
    key: Any = None,
) -> tuple[Any, Any]:
    """A certificate (cryptography) and its key, signed by ``issuer_key``;
    ``issuer_key=None`` signs it with its own key (self-signed)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject or (names or ["leaf"])[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name if issuer_key is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=not_before_days))
        .not_valid_after(now + datetime.timedelta(days=not_after_days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([eku or ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def _server_context(certificate: Any, key: Any, chain: tuple[Any, ...] = ()) -> SSL.Context:
    from OpenSSL import crypto

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate(crypto.X509.from_cryptography(certificate))
    context.use_privatekey(crypto.PKey.from_cryptography_key(key))
    for extra in chain:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    return context


class CertificateMatrixTests(SynchronousTestCase):
    """verify and secure against the certificates an attacker or a broken
    server may present: each is refused before any EHLO goes over it,
    and never retried in plaintext."""

    setUp = NegotiationTests.setUp
    negotiate = NegotiationTests.negotiate
    session_for = NegotiationTests.session_for
    _assert_not_verified = NegotiationTests._assert_not_verified

    def leaf(self, names: list[str], **kwargs: Any) -> FakeTLSSession:
        certificate, key = _issue(CA.key, CA.certificate.subject, names, **kwargs)
        return FakeTLSSession(_server_context(certificate, key))

    def test_wildcard(self) -> None:
        outcome = self.successResultOf(self.negotiate(self.session_for(["*.example.com"]), TLSLevel.VERIFY))
        self.assertEqual(outcome.trust, "Verified")
        # One label only, and never a wildcard of a public suffix.
        self._assert_not_verified(self.session_for(["*.example.com"], host="a.mx.example.com"))
        self._assert_not_verified(self.session_for(["*.com"]))
        self._assert_not_verified(self.session_for(["*"]))

    def test_name_only_in_the_common_name(self) -> None:
        self._assert_not_verified(FakeTLSSession(CA.issue([], common_name="mx.example.com").server_context()))
        self._assert_not_verified(
            FakeTLSSession(CA.issue([], common_name="example.com").server_context()), TLSLevel.SECURE
        )

    def test_ip_address_certificate_for_a_host_name(self) -> None:
        session = FakeTLSSession(CA.issue([], ip_addresses=["192.0.2.1"]).server_context())
        self._assert_not_verified(session)  # the MX is mx.example.com, not its address

    def test_not_yet_valid(self) -> None:
        self._assert_not_verified(self.leaf(["mx.example.com"], not_before_days=1, not_after_days=30))
        self.assertIn("certificate is not yet valid", self.logs.text())

    def test_self_signed_leaf(self) -> None:
        certificate, key = _issue(None, None, ["mx.example.com"])
        self._assert_not_verified(FakeTLSSession(_server_context(certificate, key)))
        self.assertIn("self-signed certificate", self.logs.text())

    def test_wrong_extended_key_usage(self) -> None:
        from cryptography.x509.oid import ExtendedKeyUsageOID

        self._assert_not_verified(self.leaf(["mx.example.com"], eku=ExtendedKeyUsageOID.CLIENT_AUTH))
        self._assert_not_verified(self.leaf(["mx.example.com"], eku=ExtendedKeyUsageOID.CODE_SIGNING))
        self.assertIn("unsupported certificate purpose", self.logs.text())

    def test_leaf_signed_by_a_leaf(self) -> None:
        # A trusted server certificate is not a CA: what it signs is not trusted.
        middle, middle_key = _issue(CA.key, CA.certificate.subject, ["evil.example.org"])
        certificate, key = _issue(middle_key, middle.subject, ["mx.example.com"])
        self._assert_not_verified(FakeTLSSession(_server_context(certificate, key, (middle,))))

    def test_chain_missing_an_intermediate(self) -> None:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        root_key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matrix root")])
        now = datetime.datetime.now(datetime.timezone.utc)
        root = (
            x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .sign(root_key, hashes.SHA256())
        )
        intermediate, intermediate_key = _issue(root_key, root_name, [], ca=True, subject="matrix intermediate")
        certificate, key = _issue(intermediate_key, intermediate.subject, ["mx.example.com"])
        from cryptography.hazmat.primitives import serialization

        root_file = os.path.join(self.directory, "root.pem")
        with open(root_file, "wb") as handle:
            handle.write(root.public_bytes(serialization.Encoding.PEM))
        trusting_root = settings(root_file)
        # With the intermediate: verified (the control).
        session = FakeTLSSession(_server_context(certificate, key, (intermediate,)))
        outcome = self.successResultOf(self.negotiate(session, TLSLevel.VERIFY, trusting_root))
        self.assertEqual(outcome.trust, "Verified")
        # Without it: refused.
        session = FakeTLSSession(_server_context(certificate, key))
        self._assert_not_verified(session, tls_settings=trusting_root)
        self.assertIn("unable to get local issuer certificate", self.logs.text())

    def test_sni_is_sent_at_may(self) -> None:
        session = self.session_for(["mx.example.com"])
        self.successResultOf(self.negotiate(session, TLSLevel.MAY))
        self.assertEqual(session.sni, [b"mx.example.com"])

    def test_starttls_refused_or_dropped_never_plaintext_when_mandatory(self) -> None:
        for level in (TLSLevel.ENCRYPT, TLSLevel.VERIFY, TLSLevel.SECURE):
            for starttls_reply in (reply(454, "4.7.0 TLS not available"), reply(554, "5.7.0 no")):
                session = self.session_for(["mx.example.com"], starttls_reply=starttls_reply)
                failure = self.failureResultOf(self.negotiate(session, level), DeliveryFailure)
                self.assertFalse(failure.value.status.retry_plaintext)
                self.assertEqual(session.sent, [b"STARTTLS"])
            # The connection dropped at STARTTLS: the session's failure
            # is passed on as it is, with no plaintext retry flag.
            session = self.session_for(["mx.example.com"])
            lost = DeliveryFailure(Status("4.4.2", "lost connection while sending the STARTTLS command"))
            session.command = lambda line, lost=lost, **kwargs: fail(lost)  # type: ignore[method-assign]
            failure = self.failureResultOf(self.negotiate(session, level), DeliveryFailure)
            self.assertIs(failure.value, lost)
            self.assertFalse(failure.value.status.retry_plaintext)
