"""
Interop: STARTTLS and AUTH against aiosmtpd on loopback, through the real
ESMTP session (relayagent.smtp.session) and connection layer (relayagent.smtp.connect).

aiosmtpd offers STARTTLS with a certificate from a test CA made in the test
(tests.support.certs) and AUTH with a real password check (its
``authenticator``); CRAM-MD5 and SCRAM-SHA-256 are added as aiosmtpd
handler mechanisms with server sides written here.  Each server runs in
aiosmtpd's Controller thread with its own asyncio loop and is stopped in
cleanup.  After every test, every log event and session transcript it
produced is searched for the passwords and their base64 forms.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import logging
import os
import secrets
import socket
import ssl
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure
from relayagent.smtp.channel import ServerInfo, SessionSettings
from relayagent.smtp.connect import Connector
from relayagent.smtp.deliver import SessionFactories
from relayagent.smtp.resolve import MailExchangerAddress
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.session import SMTPSessionFactory
from relayagent.testing import LogCapture, secret_forms
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port

try:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword
except ImportError:  # pragma: no cover - the venv has it; CI installs it
    Controller = None

USER = "alice"
PASSWORD = "tr0ub4dor&3:x"
WRONG_PASSWORD = "not-the-password"
CA = CertificateAuthority()


def envelope() -> Envelope:
    content = b"From: a@example.org\nTo: b@example.com\nSubject: security\n\nhello\n"
    return Envelope(
        queue_id="SEC1",
        sender="a@example.org",
        recipients=(Recipient("b@example.com", index=0),),
        arrival_time=reactor.seconds(),
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
    )


def scram_server_keys(password: str, salt: bytes, iterations: int, hash_name: str) -> tuple[bytes, bytes]:
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return stored_key, server_key


class Handler:
    """Accepts mail; records what it saw; SCRAM and CRAM-MD5 server sides."""

    def __init__(self, password: str = PASSWORD, *, lie_in_server_final: bool = False) -> None:
        self.password = password
        self.lie = lie_in_server_final
        self.seen_auth: list[tuple[str, bool]] = []
        self.messages: list[tuple[bool, bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((bool(session.authenticated), envelope.content))
        return "250 2.0.0 Ok: queued"

    def authenticator(self, server, session, envelope, mechanism, auth_data):
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode() and (
            auth_data.password == self.password.encode()
        )
        self.seen_auth.append((mechanism, ok))
        return AuthResult(success=ok)

    async def auth_CRAM__MD5(self, server, args):
        challenge = f"<{secrets.token_hex(8)}@mx.example.com>".encode()
        response = await server.challenge_auth(challenge)
        if not isinstance(response, bytes):
            return AuthResult(success=False, handled=True)
        user, _, digest = response.partition(b" ")
        expected = hmac.new(self.password.encode(), challenge, hashlib.md5).hexdigest().encode()
        ok = user == USER.encode() and hmac.compare_digest(digest, expected)
        self.seen_auth.append(("CRAM-MD5", ok))
        # handled=False: aiosmtpd sends 535 itself.
        return AuthResult(success=ok, handled=False)

    async def auth_SCRAM__SHA__256(self, server, args):
        client_first = base64.b64decode(args[1]).decode()
        assert client_first.startswith("n,,"), client_first
        bare = client_first[3:]
        fields = dict(part.split("=", 1) for part in bare.split(","))
        nonce = fields["r"] + secrets.token_urlsafe(12)
        salt = secrets.token_bytes(16)
        server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i=4096"
        client_final = await server.challenge_auth(server_first)
        if not isinstance(client_final, bytes):
            return AuthResult(success=False, handled=True)
        without_proof, _, proof_b64 = client_final.decode().rpartition(",p=")
        auth_message = f"{bare},{server_first},{without_proof}".encode()
        stored_key, server_key = scram_server_keys(self.password, salt, 4096, "sha256")
        signature = hmac.new(stored_key, auth_message, "sha256").digest()
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof_b64), signature, strict=True))
        ok = fields["n"] == USER and hashlib.sha256(client_key).digest() == stored_key
        self.seen_auth.append(("SCRAM-SHA-256", ok))
        if not ok:
            return AuthResult(success=False, handled=False)
        server_signature = hmac.new(server_key, auth_message, "sha256").digest()
        if self.lie:
            server_signature = bytes(32)
        final = await server.challenge_auth(f"v={base64.b64encode(server_signature).decode()}")
        if final is not None and not isinstance(final, bytes):
            # The client cancelled with "*": aiosmtpd already said 501.
            self.seen_auth.append(("SCRAM-SHA-256 cancelled", False))
            return AuthResult(success=False, handled=True)
        return AuthResult(success=True)


class ClosingAfterPasswordHandler(Handler):
    """Drops the connection right after reading the LOGIN password."""

    async def auth_LOGIN(self, server, args):
        await server.challenge_auth("Username:")
        await server.challenge_auth("Password:")
        server.transport.close()
        return AuthResult(success=False, handled=True)


class SecurityInteropTests(unittest.TestCase):
    timeout = 60

    if Controller is None:
        skip = "aiosmtpd is not installed"

    def setUp(self) -> None:
        # aiosmtpd logs through the logging module (and prints tracebacks for
        # the failed handshake we provoke); keep test output readable.
        server_log = logging.getLogger("mail.log")
        self.addCleanup(server_log.setLevel, server_log.level)
        server_log.setLevel(logging.CRITICAL)
        self.logs = LogCapture(self)
        self.sessions: list[Any] = []
        self.failures: list[DeliveryFailure] = []
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.ca_file = CA.write(self.directory, "ca.pem")
        self.passwords = os.path.join(self.directory, "sasl_passwd")
        with open(self.passwords, "w") as handle:
            handle.write(f"example.com {USER}:{PASSWORD}\n")
        os.chmod(self.passwords, 0o600)
        # Runs after the test and its other cleanups (LIFO: added first).
        self.addCleanup(self.assert_no_secret_anywhere)

    def assert_no_secret_anywhere(self) -> None:
        forms = secret_forms(
            PASSWORD, f"\0{USER}\0{PASSWORD}".encode(), f"{USER}\0{PASSWORD}".encode()
        )
        haystack = [self.logs.text()]
        haystack += ["\n".join(session.transcript.lines()) for session in self.sessions]
        haystack += [f"{failure} {failure.status!r} {failure.status.notify_class}" for failure in self.failures]
        # Case-insensitive: an upper-cased base64 payload is still a leak.
        text = "\n".join(haystack).lower()
        self.assertTrue(text)  # something was logged or transcribed
        for form in forms:
            self.assertNotIn(form.lower(), text)

    # -- servers ---------------------------------------------------------

    def start_server(
        self,
        handler: Handler,
        *,
        address: str = "127.0.0.2",
        certificate_names: list[str] | None = None,
        tls_max: ssl.TLSVersion | None = None,
        auth_require_tls: bool = True,
    ) -> Deferred[int]:
        port = free_port(address)
        kwargs: dict[str, Any] = {}
        if certificate_names is not None:
            context = CA.issue(certificate_names).ssl_context(self.directory)
            if tls_max is not None:
                context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                context.maximum_version = tls_max
            kwargs["tls_context"] = context
        controller = Controller(
            handler,
            hostname=address,
            port=port,
            authenticator=handler.authenticator,
            auth_require_tls=auth_require_tls,
            **kwargs,
        )
        self.addCleanup(lambda: threads.deferToThread(controller.stop))
        return threads.deferToThread(controller.start).addCallback(lambda _: port)

    # -- the client ------------------------------------------------------

    def config(self, extra: str = "") -> Config:
        text = (
            "smtp_helo_name = client.example\n"
            "smtp_sasl_auth_enable = yes\n"
            "smtp_sasl_password_maps = texthash:sasl_passwd\n"
            "smtp_tls_CAfile = ca.pem\n"
            "smtp_tls_loglevel = 1\n"
            "smtp_connect_timeout = 5s\n"
            "smtp_helo_timeout = 10s\n"
            "smtp_starttls_timeout = 10s\n" + extra
        )
        return Config.from_text(text, base_dir=self.directory)

    async def session(
        self, port: int, extra: str = "", *, address: str = "127.0.0.2", host: str = "mx.example.com", security=None
    ):
        config = self.config(extra)
        if security is None:
            security = SecurityPolicy(config).for_nexthop("example.com")
        server = ServerInfo(host, address, port, "example.com")
        factory = SMTPSessionFactory(SessionSettings.from_config(config), reactor, server, security=security)
        session = await TCP4ClientEndpoint(reactor, address, port, timeout=5).connect(factory)
        self.sessions.append(session)
        self.addCleanup(lambda: session.transport.loseConnection())
        try:
            await session.greeted
        except DeliveryFailure as failure:
            self.failures.append(failure)
            raise
        return session

    async def deliver(self, session) -> None:
        message = envelope()
        result = await session.deliver(message, message.recipients, last=True)
        self.assertTrue(all(status.ok for status in result.recipients.values()), result)

    async def expect_failure(self, coroutine) -> DeliveryFailure:
        try:
            await coroutine
        except DeliveryFailure as failure:
            return failure
        self.fail("the session was expected to fail")

    def established(self) -> list[str]:
        return [line for line in self.logs.messages() if "TLS connection established" in line]

    # -- the cases --------------------------------------------------------

    async def _verify_wrong_name(self) -> None:
        handler = Handler()
        port = await self.start_server(handler, certificate_names=["other.example.org"])
        failure = await self.expect_failure(self.session(port, "smtp_tls_security_level = verify\n"))
        self.assertEqual(failure.status.dsn, "4.7.5")
        self.assertEqual(failure.status.text, "Server certificate not verified")
        self.assertTrue(failure.status.soft)
        self.assertEqual(handler.seen_auth, [])
        self.assertEqual(handler.messages, [])
        self.assertEqual(len(self.established()), 1)
        self.assertTrue(self.established()[0].startswith(f"Trusted TLS connection established to mx.example.com[127.0.0.2]:{port}: TLSv1.3 with cipher TLS_"))

    def test_verify_with_a_certificate_for_another_name_is_475(self):
        return Deferred.fromCoroutine(self._verify_wrong_name())

    async def _may_same_certificate(self) -> None:
        handler = Handler()
        port = await self.start_server(handler, certificate_names=["other.example.org"])
        session = await self.session(
            port,
            "smtp_tls_security_level = may\nsmtp_sasl_tls_security_options = noanonymous\n"
            "smtp_sasl_mechanism_filter = plain\n",
        )
        await self.deliver(session)
        self.assertEqual(handler.messages[0][0], True)
        self.assertEqual(handler.seen_auth, [("PLAIN", True)])
        self.assertRegex(
            self.established()[0],
            rf"^Trusted TLS connection established to mx\.example\.com\[127\.0\.0\.2\]:{port}: "
            r"TLSv1\.3 with cipher TLS_\w+ \(\d+/\d+ bits\)$",
        )
        self.assertIn("Out: AUTH PLAIN <redacted>", session.transcript.lines())

    def test_may_with_the_same_certificate_delivers(self):
        return Deferred.fromCoroutine(self._may_same_certificate())

    async def _verify_right_name(self) -> None:
        handler = Handler()
        port = await self.start_server(handler, certificate_names=["mx.example.com"])
        session = await self.session(port, "smtp_tls_security_level = verify\n")
        self.assertTrue(self.established()[0].startswith("Verified TLS connection established"))
        # Default options over TLS refuse PLAIN and LOGIN too; aiosmtpd
        # with our handler offers CRAM-MD5 and SCRAM-SHA-256: SCRAM wins.
        self.assertEqual(handler.seen_auth, [("SCRAM-SHA-256", True)])
        await self.deliver(session)
        self.assertEqual(handler.messages[0][0], True)

    def test_verify_with_the_right_name_and_scram(self):
        return Deferred.fromCoroutine(self._verify_right_name())

    async def _plain_not_over_plaintext(self) -> None:
        handler = Handler()
        port = await self.start_server(handler, auth_require_tls=False)
        failure = await self.expect_failure(
            self.session(port, "smtp_tls_security_level = none\nsmtp_sasl_mechanism_filter = plain, login\n")
        )
        self.assertEqual(failure.status.dsn, "4.7.0")
        self.assertIn("server offered ", failure.status.text)
        self.assertIn("smtp_sasl_mechanism_filter removed CRAM-MD5 SCRAM-SHA-256", failure.status.text)
        self.assertIn("server offered CRAM-MD5 LOGIN PLAIN SCRAM-SHA-256", failure.status.text)
        self.assertIn("smtp_sasl_security_options refused PLAIN (noplaintext), LOGIN (noplaintext)", failure.status.text)
        self.assertEqual(handler.seen_auth, [])
        self.assertFalse(any("AUTH" in line for line in self.sessions[0].transcript.lines() if line.startswith("Out:")))

    def test_plain_is_not_used_over_plaintext_by_default(self):
        return Deferred.fromCoroutine(self._plain_not_over_plaintext())

    async def _encrypt_without_starttls(self) -> None:
        handler = Handler()
        port = await self.start_server(handler, auth_require_tls=False)
        failure = await self.expect_failure(self.session(port, "smtp_tls_security_level = encrypt\n"))
        self.assertEqual(failure.status.dsn, "4.7.4")
        self.assertEqual(failure.status.text, "TLS is required, but was not offered by host mx.example.com[127.0.0.2]")
        self.assertEqual(handler.seen_auth, [])

    def test_encrypt_without_starttls_is_474(self):
        return Deferred.fromCoroutine(self._encrypt_without_starttls())

    async def _wrong_password_next_mx(self) -> None:
        wrong = Handler(password=WRONG_PASSWORD)
        right = Handler()
        port2 = await self.start_server(wrong, address="127.0.0.2", certificate_names=["mx1.example.com"])
        port3 = await self.start_server(right, address="127.0.0.3", certificate_names=["mx2.example.com"])
        config = self.config("smtp_tls_security_level = verify\n")
        security = SecurityPolicy(config).for_nexthop("example.com")
        created: list[Any] = []

        def factory_for(server: ServerInfo):
            factory = SMTPSessionFactory(SessionSettings.from_config(config), reactor, server, security=security)
            build = factory.buildProtocol

            def recording(addr):
                session = build(addr)
                created.append(session)
                self.sessions.append(session)
                return session

            factory.buildProtocol = recording
            return factory

        addresses = [
            MailExchangerAddress("mx1.example.com", "127.0.0.2", socket.AF_INET, 10, port2),
            MailExchangerAddress("mx2.example.com", "127.0.0.3", socket.AF_INET, 20, port3),
        ]
        connector = Connector(reactor, config, factory_for)
        session = await connector.connect(addresses, "example.com")
        self.addCleanup(lambda: session.transport.loseConnection())
        self.assertEqual(session.server.host, "mx2.example.com")
        self.assertEqual(wrong.seen_auth, [("SCRAM-SHA-256", False)])
        self.assertEqual(right.seen_auth, [("SCRAM-SHA-256", True)])
        await self.deliver(session)

        # Only the server with the other password: the mail is deferred.
        try:
            await connector.connect(addresses[:1], "example.com")
        except DeliveryFailure as failure:
            self.failures.append(failure)
            self.assertTrue(failure.status.soft, failure.status)
            self.assertIn("SASL authentication failed; server mx1.example.com[127.0.0.2] said: 535", failure.status.text)
        else:
            self.fail("the wrong password was accepted")

    def test_wrong_password_tries_the_next_mx_then_defers(self):
        return Deferred.fromCoroutine(self._wrong_password_next_mx())

    async def _scram_lying_server(self) -> None:
        handler = Handler(lie_in_server_final=True)
        port = await self.start_server(handler, certificate_names=["mx.example.com"])
        failure = await self.expect_failure(self.session(port, "smtp_tls_security_level = verify\n"))
        self.assertEqual(failure.status.dsn, "4.7.0")
        self.assertIn("bad server signature", failure.status.text)
        self.assertEqual(handler.seen_auth[0], ("SCRAM-SHA-256", True))
        # We cancelled with "*" (redacted in the transcript like every AUTH
        # line) and aiosmtpd confirmed.
        self.assertIn("In: 501 5.7.0 Auth aborted", self.sessions[0].transcript.lines())
        self.assertEqual(handler.messages, [])

    def test_scram_server_without_the_password_fails(self):
        return Deferred.fromCoroutine(self._scram_lying_server())

    async def _cram_md5(self) -> None:
        handler = Handler()
        port = await self.start_server(handler, certificate_names=["mx.example.com"])
        session = await self.session(
            port, "smtp_tls_security_level = secure\nsmtp_sasl_mechanism_filter = cram-md5\n"
        )
        self.assertEqual(handler.seen_auth, [("CRAM-MD5", True)])
        await self.deliver(session)

    def test_cram_md5_at_level_secure(self):
        return Deferred.fromCoroutine(self._cram_md5())

    async def _plaintext_retry(self) -> None:
        handler = Handler()
        # The server speaks at most TLS 1.1; our floor is TLS 1.2.
        port = await self.start_server(
            handler, certificate_names=["mx.example.com"], tls_max=ssl.TLSVersion.TLSv1_1, auth_require_tls=False
        )
        config = self.config("smtp_tls_security_level = may\n")
        security = SecurityPolicy(config).for_nexthop("example.com")
        failure = await self.expect_failure(self.session(port, security=security))
        self.assertEqual(failure.status.dsn, "4.7.5")
        self.assertTrue(failure.status.retry_plaintext)
        self.assertIn("Out: STARTTLS", self.sessions[0].transcript.lines())

        # The connection layer, with the daemon's factories, retries the
        # same address once without STARTTLS.
        connector = Connector(reactor, config, SessionFactories(config, reactor, SecurityPolicy(config)))
        address = MailExchangerAddress("mx.example.com", "127.0.0.2", socket.AF_INET, 10, port)
        session = await connector.connect([address], "example.com")
        self.addCleanup(lambda: session.transport.loseConnection())
        self.assertEqual(session.server.address, "127.0.0.2")
        self.assertNotIn("Out: STARTTLS", session.transcript.lines())
        self.assertEqual(handler.seen_auth, [("SCRAM-SHA-256", True)])
        await self.deliver(session)

    def test_failed_handshake_at_may_is_retried_in_plaintext(self):
        return Deferred.fromCoroutine(self._plaintext_retry())

    async def _lost_during_auth(self) -> None:
        handler = ClosingAfterPasswordHandler()
        port = await self.start_server(handler, certificate_names=["mx.example.com"])
        failure = await self.expect_failure(
            self.session(
                port,
                "smtp_tls_security_level = may\nsmtp_sasl_tls_security_options =\n"
                "smtp_sasl_mechanism_filter = login\n",
            )
        )
        self.assertEqual(failure.status.dsn, "4.4.2")
        self.assertEqual(
            failure.status.text,
            "lost connection with mx.example.com[127.0.0.2] while performing the SASL authentication",
        )
        # Checked here as well as by the cleanup: the stage name once
        # carried the base64 password of an AUTH continuation line.
        self.failures.remove(failure)
        secret = base64.b64encode(PASSWORD.encode()).decode().lower()
        self.assertNotIn(secret, repr(failure.status).lower())

    def test_connection_lost_after_the_password(self):
        return Deferred.fromCoroutine(self._lost_during_auth())

