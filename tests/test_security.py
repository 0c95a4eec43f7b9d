"""
Tests for relayagent.smtp.security: a SecurityPolicy built from main.cf text,
STARTTLS then AUTH on a fake session with a real (memory-BIO) handshake,
the plaintext retry contract, and configuration problems.
"""

from __future__ import annotations

import base64
import os

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.common.status import DeliveryFailure
from relayagent.smtp.reply import Reply
from relayagent.smtp.security import SecurityConfigError, SecurityPolicy, SessionSecurity
from relayagent.smtp.tls import TLSLevel
from relayagent.testing import FakeTLSSession, LogCapture, secret_forms
from tests.support.certs import CertificateAuthority

CA = CertificateAuthority()
PASSWORD = "correct horse:battery"


class AuthServerSession(FakeTLSSession):
    """A fake session whose server checks AUTH PLAIN and records lines."""

    def __init__(self, *args, plaintext_auth: str = "PLAIN LOGIN", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extensions["AUTH"] = plaintext_auth
        self.auth_mechanisms = frozenset(plaintext_auth.split())
        self.redacted: list[bool] = []

    def command(self, line: bytes, *, stage: str, timeout: float, redact: bool = False) -> Deferred[Reply]:
        if line.startswith(b"AUTH") or self.redacted:
            self.redacted.append(redact)
        return super().command(line, stage=stage, timeout=timeout, redact=redact)

    def respond(self, line: bytes) -> Deferred[Reply]:
        if line.startswith(b"AUTH PLAIN "):
            ok = base64.b64decode(line.split()[2]) == f"\0alice\0{PASSWORD}".encode()
            code = 235 if ok else 535
            return succeed(Reply(code, f"{code // 100}.7.0" if ok else "5.7.8", (f"{code} {code // 100}.7.{0 if ok else 8} x",)))
        return succeed(Reply(504, None, ("504 unrecognized",)))


class SecurityTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        CA.write(self.directory, "ca.pem")
        self.passwords = os.path.join(self.directory, "sasl_passwd")
        with open(self.passwords, "w") as handle:
            handle.write(f"mx.example.com alice:{PASSWORD}\n")
        os.chmod(self.passwords, 0o600)

    def policy(self, extra: str = "") -> SecurityPolicy:
        text = (
            "smtp_sasl_auth_enable = yes\n"
            "smtp_sasl_password_maps = texthash:sasl_passwd\n"
            "smtp_tls_CAfile = ca.pem\n"
            "smtp_tls_security_level = may\n" + extra
        )
        return SecurityPolicy(Config.from_text(text, base_dir=self.directory))

    def session(self, **kwargs) -> AuthServerSession:
        return AuthServerSession(CA.issue(["mx.example.com"]).server_context(), **kwargs)

    def negotiate(self, security: SessionSecurity, session) -> Deferred[None]:
        return security.negotiate(session)

    def assert_no_secret(self) -> None:
        for form in secret_forms(PASSWORD, f"\0alice\0{PASSWORD}".encode()):
            self.assertNotIn(form, self.logs.text())

    def test_starttls_then_auth_plain_when_tls_options_allow(self) -> None:
        security = self.policy("smtp_sasl_tls_security_options = noanonymous\n").for_nexthop("example.com")
        session = self.session()
        self.assertIsNone(self.successResultOf(self.negotiate(security, session)))
        self.assertEqual([line.split()[0] for line in session.sent], [b"STARTTLS", b"EHLO", b"AUTH"])
        self.assertTrue(security.last_tls.active)
        self.assertEqual(security.last_tls.trust, "Trusted")
        self.assertEqual(session.redacted, [True])
        self.assert_no_secret()

    def test_default_options_refuse_plain_even_over_tls(self) -> None:
        security = self.policy().for_nexthop("example.com")
        failure = self.failureResultOf(self.negotiate(security, self.session()), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "4.7.0")
        self.assertIn("smtp_sasl_tls_security_options refused PLAIN (noplaintext)", failure.value.status.text)

    def test_plain_never_over_plaintext_by_default(self) -> None:
        security = self.policy(
            "smtp_sasl_tls_security_options = noanonymous\nsmtp_tls_security_level = none\n"
        ).for_nexthop("example.com")
        session = self.session()
        failure = self.failureResultOf(self.negotiate(security, session), DeliveryFailure)
        self.assertIn("smtp_sasl_security_options refused PLAIN (noplaintext)", failure.value.status.text)
        self.assertEqual(session.sent, [])

    def test_plaintext_auth_when_the_options_allow_it(self) -> None:
        security = self.policy("smtp_sasl_security_options =\nsmtp_tls_security_level = none\n").for_nexthop(
            "example.com"
        )
        session = self.session()
        self.successResultOf(self.negotiate(security, session))
        self.assertEqual([line.split()[0] for line in session.sent], [b"AUTH"])

    def test_auth_disabled(self) -> None:
        config = Config.from_text("smtp_tls_security_level = may\n", base_dir=self.directory)
        security = SecurityPolicy(config).for_nexthop("example.com")
        session = self.session()
        self.successResultOf(self.negotiate(security, session))
        self.assertEqual([line.split()[0] for line in session.sent], [b"STARTTLS", b"EHLO"])

    def test_policy_map_per_nexthop(self) -> None:
        with open(os.path.join(self.directory, "tls_policy"), "w") as handle:
            handle.write("example.com secure\n[relay.example.net]:587 encrypt protocols=>=TLSv1.3\nexample.org none\n")
        policy = self.policy("smtp_tls_policy_maps = texthash:tls_policy\n")
        self.assertEqual(policy.for_nexthop("example.com").tls_level, TLSLevel.SECURE)
        self.assertEqual(policy.for_nexthop("[relay.example.net]:587").tls_level, TLSLevel.ENCRYPT)
        self.assertEqual(policy.for_nexthop("example.org").tls_level, TLSLevel.NONE)
        self.assertEqual(policy.for_nexthop("example.edu").tls_level, TLSLevel.MAY)

    def test_bad_policy_entry_defers_with_configuration_problem(self) -> None:
        with open(os.path.join(self.directory, "tls_policy"), "w") as handle:
            handle.write("example.com sometimes\n")
        security = self.policy("smtp_tls_policy_maps = texthash:tls_policy\n").for_nexthop("example.com")
        self.assertIn("unknown TLS security level", security.problem)
        session = self.session()
        failure = self.failureResultOf(self.negotiate(security, session), DeliveryFailure)
        self.assertEqual(
            (failure.value.status.dsn, failure.value.status.text), ("4.7.5", "client TLS configuration problem")
        )
        self.assertFalse(failure.value.skip_to_next)
        self.assertEqual(session.sent, [])
        self.assertIn("TLS policy for example.com", self.logs.text())

    def test_plaintext_retry_contract(self) -> None:
        security = self.policy().for_nexthop("example.com")
        context = CA.issue(["mx.example.com"]).server_context()
        context.set_cipher_list(b"aNULL")  # no cipher in common: the handshake fails
        context.set_max_proto_version(0x0303)
        session = AuthServerSession(context)
        failure = self.failureResultOf(self.negotiate(security, session), DeliveryFailure)
        self.assertTrue(failure.value.status.retry_plaintext)
        retry = security.plaintext_fallback()
        self.assertEqual(retry.tls_level, TLSLevel.NONE)
        self.assertEqual(retry.nexthop, "example.com")
        strict = self.policy("smtp_tls_security_level = encrypt\n").for_nexthop("example.com")
        self.assertRaises(ValueError, strict.plaintext_fallback)

    def test_world_readable_password_file_warns(self) -> None:
        os.chmod(self.passwords, 0o644)
        self.policy()
        self.assertIn("sasl_passwd is world-readable", self.logs.text())

    def test_bad_settings(self) -> None:
        self.assertRaises(SecurityConfigError, self.policy, "smtp_tls_CAfile = /nonexistent/ca.pem\n")
        self.assertRaises(SecurityConfigError, self.policy, "smtp_tls_mandatory_protocols = <=SSLv3\n")

    def test_for_nexthop_shortcut_and_repr(self) -> None:
        config = Config.from_text(
            "smtp_sasl_auth_enable = yes\nsmtp_sasl_password_maps = texthash:sasl_passwd\n",
            base_dir=self.directory,
        )
        security = SessionSecurity.for_nexthop(config, "[smtp.example.com]:587")
        self.assertEqual(repr(security), "<SessionSecurity [smtp.example.com]:587 tls=none auth=True>")
        self.assertNotIn(PASSWORD, repr(security.__dict__))


class TLSContextsAtStartTests(SynchronousTestCase):
    """The default TLS contexts are built at start only where a session
    may use TLS (Postfix's smtp(8) initialises TLS only then)."""

    def policy(self, text: str, **kwargs) -> SecurityPolicy:
        return SecurityPolicy(Config.from_text(text), **kwargs)

    def test_level_none_builds_no_context(self) -> None:
        self.assertEqual(self.policy("smtp_tls_security_level = none\n").tls.contexts._contexts, {})
        self.assertEqual(self.policy("").tls.contexts._contexts, {})

    def test_level_none_does_not_read_the_ca_file(self) -> None:
        # Never used at level none: no error at start.
        self.policy("smtp_tls_CAfile = /nonexistent/ca.pem\n")

    def test_a_level_that_may_use_tls_builds_the_contexts(self) -> None:
        # One context when the opportunistic and mandatory settings agree (the defaults).
        self.assertNotEqual(self.policy("smtp_tls_security_level = may\n").tls.contexts._contexts, {})

    def test_a_bad_ca_file_still_stops_the_start_where_tls_may_be_used(self) -> None:
        bad = "smtp_tls_CAfile = /nonexistent/ca.pem\n"
        self.assertRaises(SecurityConfigError, self.policy, bad + "smtp_tls_security_level = may\n")
        self.assertRaises(SecurityConfigError, self.policy, bad + "smtp_tls_policy_maps = inline:{ example.com=encrypt }\n")
        self.assertRaises(SecurityConfigError, self.policy, bad, mta_sts=object())

    def test_a_bad_client_certificate_stops_the_start_at_any_level(self) -> None:
        # Read at start whatever the level: it may be root's only, and
        # its path means nothing after a chroot.
        self.assertRaises(SecurityConfigError, self.policy,
                          "smtp_tls_cert_file = /nonexistent/a.crt\nsmtp_tls_key_file = /nonexistent/a.key\n")
