"""Tests for relayagent.smtpd.tls and the listener's STARTTLS: unit tests
over a StringTransport that records ``startTLS``, and loopback tests
with a real client (Python's smtplib, ssl) against a listener on
127.0.0.1."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl

from twisted.internet import defer, endpoints, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import alsoProvides, implementer

from relayagent.common import maillog as ralog
from relayagent.common.config import Config
from relayagent.smtp.tls import TLSConfigError
from relayagent.smtpd.intake import Intake
from relayagent.smtpd.listener import ListenerFactory
from relayagent.smtpd.tls import ServerTLS, certificate_fingerprint, public_key_fingerprint
from relayagent.testing import FakeSpool
from tests.support.certs import CertificateAuthority, self_signed
from tests.support.smtpd import capture_events, codes


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the creator
    and from then on says it is an ISSLTransport."""

    creator = None

    def startTLS(self, contextFactory, beNormal=True):
        self.creator = contextFactory
        alsoProvides(self, ISSLTransport)


class Certificates:
    """A CA, the listener's certificate and two client certificates
    (one from the CA, one self-signed), written to a directory."""

    def __init__(self, directory: str) -> None:
        import os

        os.makedirs(directory, exist_ok=True)
        self.ca = CertificateAuthority()
        self.ca_file = self.ca.write(directory)
        self.server = self.ca.issue(["mx.example.org", "localhost"], ip_addresses=["127.0.0.1"])
        self.cert_file, self.key_file = self.server.write(directory, "server")
        self.client = self.ca.issue(["node-a.example.org"], client=True)
        self.client_cert, self.client_key = self.client.write(directory, "client")
        self.stranger = self_signed(["stranger.example"])
        self.stranger_cert, self.stranger_key = self.stranger.write(directory, "stranger")


def make_config(certs: Certificates, **overrides: str) -> Config:
    settings = {
        "myhostname": "mx.example.org",
        "mynetworks": "192.0.2.0/24",  # not loopback: relaying needs AUTH or a certificate
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": certs.cert_file,
        "smtpd_tls_key_file": certs.key_file,
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_password_maps": "inline:{ node-a=s3cret }",
    }
    settings.update(overrides)
    return Config.from_text("".join(f"{k} = {v}\n" for k, v in settings.items()))


class Session:
    """One listener protocol on a TLSStringTransport, client 198.51.100.7."""

    def __init__(self, testcase, config: Config) -> None:
        self.spool = FakeSpool()
        intake = Intake.from_config(config, self.spool)
        factory = ListenerFactory(intake, config)
        peer = IPv4Address("TCP", "198.51.100.7", 40000)
        self.server = factory.buildProtocol(peer)
        self.transport = TLSStringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 25), peerAddress=peer)
        self.server.makeConnection(self.transport)
        self.transport.clear()
        testcase.addCleanup(self.close)

    def close(self):
        if not self.transport.disconnecting:
            self.server.connectionLost(None)
        self.server.setTimeout(None)

    def send(self, data: bytes) -> list[bytes]:
        self.transport.clear()
        self.server.dataReceived(data)
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in lines if line]

    def ehlo_keywords(self) -> set[bytes]:
        return {line[4:] for line in self.send(b"EHLO client.example\r\n")}

    def starttls(self) -> None:
        assert self.send(b"STARTTLS\r\n") == [b"220 2.0.0 Ready to start TLS"]
        self.server.handshakeCompleted()  # what the TLS layer calls


class UnitTests(SynchronousTestCase):
    def setUp(self):
        self.certs = Certificates(self.mktemp())

    def session(self, **overrides):
        return Session(self, make_config(self.certs, **overrides))

    def test_level_none_offers_no_starttls(self):
        session = self.session(smtpd_tls_security_level="none")
        self.assertNotIn(b"STARTTLS", session.ehlo_keywords())
        self.assertEqual(session.send(b"STARTTLS\r\n"), [b"502 5.5.1 Error: command not implemented"])

    def test_may_offers_starttls_and_cram_md5_only_in_plaintext(self):
        session = self.session()
        keywords = session.ehlo_keywords()
        self.assertIn(b"STARTTLS", keywords)
        self.assertIn(b"AUTH CRAM-MD5", keywords)
        self.assertNotIn(b"REQUIRETLS", keywords)
        self.assertEqual(session.send(b"AUTH PLAIN AG5vZGUtYQBzM2NyZXQ=\r\n"),
                         [b"504 5.5.4 Unsupported authentication mechanism"])

    def test_after_starttls_plain_login_requiretls_and_no_second_starttls(self):
        session = self.session()
        session.ehlo_keywords()
        events = capture_events(self)
        session.starttls()
        self.assertIsNotNone(session.transport.creator)
        self.assertIn("Anonymous TLS connection established from unknown[198.51.100.7]",
                      "\n".join(ralog.render(e) for e in events))
        keywords = session.ehlo_keywords()
        self.assertIn(b"AUTH CRAM-MD5 PLAIN LOGIN", keywords)
        self.assertIn(b"REQUIRETLS", keywords)
        self.assertNotIn(b"STARTTLS", keywords)
        self.assertEqual(session.send(b"STARTTLS\r\n"), [b"554 5.5.1 Error: TLS already active"])

    def test_plain_after_tls_relays_and_says_esmtpsa(self):
        session = self.session()
        session.ehlo_keywords()
        session.starttls()
        session.ehlo_keywords()
        events = capture_events(self)
        token = base64.b64encode(b"\0node-a\0s3cret")
        self.assertEqual(session.send(b"AUTH PLAIN " + token + b"\r\n"), [b"235 2.7.0 Authentication successful"])
        self.assertIn(b"XRELAYAGENT-ARRIVAL", session.ehlo_keywords())
        lines = session.send(b"MAIL FROM:<a@example.net> REQUIRETLS\r\nRCPT TO:<b@remote.example>\r\n"
                             b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        [message] = session.spool.messages
        self.assertTrue(message["requiretls"])
        self.assertIn(b"with ESMTPSA", message["content"])
        text = "\n".join(ralog.render(e) for e in events)
        self.assertIn("sasl_method=PLAIN, sasl_username=node-a", text)
        self.assertNotIn("s3cret", text)

    def test_wrong_plain_password(self):
        session = self.session()
        session.ehlo_keywords()
        session.starttls()
        session.ehlo_keywords()
        token = base64.b64encode(b"\0node-a\0wrong")
        self.assertEqual(session.send(b"AUTH PLAIN " + token + b"\r\n"),
                         [b"535 5.7.8 Error: authentication failed"])
        self.assertEqual(codes(session.send(b"AUTH PLAIN " + base64.b64encode(b"junk") + b"\r\n")), [535])
        lines = session.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@remote.example>\r\n")
        self.assertEqual(lines[-1], b"554 5.7.1 <b@remote.example>: Relay access denied")

    def test_pipelined_commands_after_starttls_are_dropped(self):
        session = self.session()
        session.ehlo_keywords()
        # The command-injection attack: the MAIL was sent in plaintext
        # and must not be taken as part of the TLS session.
        lines = session.send(b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\n")
        self.assertEqual(lines, [b"220 2.0.0 Ready to start TLS"])
        session.server.handshakeCompleted()
        self.assertIsNone(session.server._from)
        lines = session.send(b"EHLO c\r\nMAIL FROM:<good@example.net>\r\n")
        self.assertEqual(lines[-1][:3], b"250")
        self.assertEqual(str(session.server._from), "good@example.net")

    def test_starttls_discards_the_plaintext_session(self):
        session = self.session(mynetworks="198.51.100.0/24")
        session.send(b"EHLO c\r\nMAIL FROM:<a@example.net>\r\n")
        session.starttls()
        self.assertIsNone(session.server._helo)
        self.assertIsNone(session.server._from)

    def test_encrypt_level_refuses_mail_before_starttls(self):
        session = self.session(smtpd_tls_security_level="encrypt")
        keywords = session.ehlo_keywords()
        self.assertIn(b"STARTTLS", keywords)
        self.assertFalse(any(k.startswith(b"AUTH") for k in keywords), keywords)
        for command in (b"MAIL FROM:<a@example.net>", b"AUTH CRAM-MD5", b"RCPT TO:<b@x.example>", b"DATA"):
            self.assertEqual(session.send(command + b"\r\n"),
                             [b"530 5.7.0 Must issue a STARTTLS command first"], command)
        session.starttls()
        session.ehlo_keywords()
        self.assertEqual(codes(session.send(b"MAIL FROM:<a@example.net>\r\n")), [250])

    def test_auth_only(self):
        session = self.session(smtpd_tls_auth_only="yes")
        self.assertFalse(any(k.startswith(b"AUTH") for k in session.ehlo_keywords()))
        self.assertEqual(session.send(b"AUTH CRAM-MD5\r\n"), [b"530 5.7.0 Must issue a STARTTLS command first"])
        session.starttls()
        self.assertIn(b"AUTH CRAM-MD5 PLAIN LOGIN", session.ehlo_keywords())

    def test_twisted_context_factory_still_works_without_smtpd_tls(self):
        # A twisted.mail server that gives Twisted's ESMTP its own ``ctx``.
        session = self.session(smtpd_tls_security_level="none")
        session.server.ctx = object()
        session.server.connectionMade()
        session.transport.clear()
        self.assertIn(b"STARTTLS", session.ehlo_keywords())
        self.assertEqual(session.send(b"STARTTLS\r\nNOOP\r\n"), [b"220 2.0.0 Ready to start TLS"])
        self.assertIs(session.transport.creator, session.server.ctx)
        self.assertIn(b"REQUIRETLS", session.ehlo_keywords())

    def test_bad_certificate_files_are_one_clear_error(self):
        with self.assertRaises(TLSConfigError) as caught:
            ServerTLS.from_config(make_config(self.certs, smtpd_tls_cert_file="/nonexistent/cert.pem"))
        self.assertIn("cannot use smtpd_tls_cert_file '/nonexistent/cert.pem'", str(caught.exception))
        self.assertIn("No such file", str(caught.exception))
        with self.assertRaises(TLSConfigError) as caught:
            ServerTLS.from_config(make_config(self.certs, smtpd_tls_key_file=self.certs.client_key))
        self.assertIn("cannot use smtpd_tls_cert_file", str(caught.exception))
        with self.assertRaises(TLSConfigError):
            ServerTLS.from_config(make_config(self.certs, smtpd_tls_cert_file=""))
        self.assertIsNone(ServerTLS.from_config(make_config(self.certs, smtpd_tls_security_level="")))

    def test_fingerprints(self):
        from cryptography.hazmat.primitives import hashes

        certificate = self.certs.client.certificate
        expected = certificate.fingerprint(hashes.SHA256()).hex().upper()
        self.assertEqual(certificate_fingerprint(certificate).replace(":", ""), expected)
        self.assertEqual(len(certificate_fingerprint(certificate).split(":")), 32)
        self.assertNotEqual(public_key_fingerprint(certificate), certificate_fingerprint(certificate))


# -- loopback: a real listener, real clients -----------------------------


class LoopbackTests(TestCase):
    """The listener on 127.0.0.1, smtplib (in a thread) as the client."""

    timeout = 30

    def setUp(self):
        self.certs = Certificates(self.mktemp())
        self.events = capture_events(self)

    @defer.inlineCallbacks
    def listen(self, **overrides):
        config = make_config(self.certs, **overrides)
        self.spool = FakeSpool()
        factory = ListenerFactory(Intake.from_config(config, self.spool), config)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def client_context(self, cert=None, key=None):
        context = ssl.create_default_context(cafile=self.certs.ca_file)
        context.check_hostname = False
        if cert:
            context.load_cert_chain(cert, key)
        return context

    def lines(self) -> str:
        return "\n".join(ralog.render(e) for e in self.events)

    def smtp(self, job):
        def run():
            client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
            try:
                return job(client)
            finally:
                try:
                    client.quit()
                except (smtplib.SMTPException, OSError):
                    client.close()
        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_starttls_plain_auth_and_requiretls(self):
        yield self.listen(smtpd_tls_auth_only="yes")

        def job(client):
            client.ehlo("client.example")
            before = client.has_extn("auth")
            client.starttls(context=self.client_context())
            client.ehlo("client.example")
            auth = client.esmtp_features.get("auth", "")
            requiretls = client.has_extn("requiretls")
            client.login("node-a", "s3cret")
            client.sendmail("a@example.net", ["b@remote.example"], b"Subject: t\r\n\r\nbody\r\n",
                            mail_options=["REQUIRETLS"])
            return before, auth, requiretls

        before, auth, requiretls = yield self.smtp(job)
        self.assertFalse(before)
        self.assertEqual(auth.split(), ["CRAM-MD5", "PLAIN", "LOGIN"])
        self.assertTrue(requiretls)
        [message] = self.spool.messages
        self.assertTrue(message["requiretls"])
        self.assertIn(b"with ESMTPSA", message["content"])
        self.assertRegex(self.lines(), r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: "
                                       r"TLSv1\.[23] with cipher \S+ \(\d+/\d+ bits\)")

    @defer.inlineCallbacks
    def test_plain_login_over_tls(self):
        yield self.listen()

        def job(client):
            client.starttls(context=self.client_context())
            client.ehlo("c")
            code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0node-a\0s3cret").decode())
            return code

        code = yield self.smtp(job)
        self.assertEqual(code, 235)

    @defer.inlineCallbacks
    def test_encrypt_refuses_plaintext_mail(self):
        yield self.listen(smtpd_tls_security_level="encrypt")

        def job(client):
            client.ehlo("c")
            return client.docmd("MAIL", "FROM:<a@example.net>")

        code, text = yield self.smtp(job)
        self.assertEqual((code, text), (530, b"5.7.0 Must issue a STARTTLS command first"))

    @defer.inlineCallbacks
    def test_command_injection_is_dropped(self):
        yield self.listen()

        def job():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                reader = raw.makefile("rb")
                reader.readline()
                raw.sendall(b"EHLO c\r\n")
                while reader.readline()[3:4] == b"-":
                    pass
                raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.net>\r\n")
                starttls_reply = reader.readline()
                tls = self.client_context().wrap_socket(raw, server_hostname="mx.example.org")
                tls_reader = tls.makefile("rb")
                tls.sendall(b"EHLO c\r\n")
                while tls_reader.readline()[3:4] == b"-":
                    pass
                # Had the injected MAIL been taken, this would be 503.
                tls.sendall(b"MAIL FROM:<good@example.net>\r\n")
                mail_reply = tls_reader.readline()
                tls.sendall(b"QUIT\r\n")
                tls_reader.readline()
                return starttls_reply, mail_reply

        starttls_reply, mail_reply = yield threads.deferToThread(job)
        self.assertEqual(starttls_reply, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(mail_reply[:3], b"250")

    @defer.inlineCallbacks
    def test_failed_handshake_is_one_warning(self):
        yield self.listen()

        def job():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                reader = raw.makefile("rb")
                reader.readline()
                raw.sendall(b"STARTTLS\r\n")
                reader.readline()
                raw.sendall(b"this is no TLS client hello\r\n" * 4)
                return reader.read()  # until the server closes

        yield threads.deferToThread(job)
        yield self.server_gone()
        warnings = [line for line in self.lines().splitlines() if "SSL_accept error" in line]
        self.assertEqual(len(warnings), 1, self.lines())
        self.assertIn("SSL_accept error from unknown[127.0.0.1]: ", warnings[0])

    def server_gone(self):
        """Fires once the server has logged the end of its session."""
        if any("disconnect from" in ralog.render(e) for e in self.events):
            return defer.succeed(None)
        waiter = defer.Deferred()

        def watch(event):
            if "disconnect from" in ralog.render(event) and not waiter.called:
                waiter.callback(None)
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(watch)
        waiter.addBoth(lambda result: (globalLogPublisher.removeObserver(watch), result)[1])
        return waiter

    def relay_with_certificate(self, cert, key):
        def job(client):
            client.starttls(context=self.client_context(cert, key))
            client.ehlo("node-a.example.org")
            arrival = client.has_extn("xrelayagent-arrival")
            client.mail("a@example.net")
            code, text = client.rcpt("b@remote.example")
            return arrival, code, text
        return self.smtp(job)

    @defer.inlineCallbacks
    def test_listed_client_certificate_relays(self):
        listed = certificate_fingerprint(self.certs.client.certificate)
        yield self.listen(smtpd_tls_ask_ccert="yes", smtpd_tls_CAfile=self.certs.ca_file,
                          relay_clientcerts=f"inline:{{ {listed}=node-a }}")
        arrival, code, _ = yield self.relay_with_certificate(self.certs.client_cert, self.certs.client_key)
        self.assertTrue(arrival)
        self.assertEqual(code, 250)
        self.assertIn("Trusted TLS connection established from unknown[127.0.0.1]", self.lines())

    @defer.inlineCallbacks
    def test_listed_public_key_of_an_untrusted_certificate_relays(self):
        listed = public_key_fingerprint(self.certs.stranger.certificate)
        yield self.listen(smtpd_tls_ask_ccert="yes", smtpd_tls_CAfile=self.certs.ca_file,
                          relay_clientcerts=f"inline:{{ {listed}=stranger }}")
        arrival, code, _ = yield self.relay_with_certificate(self.certs.stranger_cert, self.certs.stranger_key)
        self.assertEqual((arrival, code), (True, 250))
        self.assertIn("Untrusted TLS connection established", self.lines())

    @defer.inlineCallbacks
    def test_unlisted_certificate_cannot_relay(self):
        listed = certificate_fingerprint(self.certs.client.certificate)
        yield self.listen(smtpd_tls_ask_ccert="yes", smtpd_tls_CAfile=self.certs.ca_file,
                          relay_clientcerts=f"inline:{{ {listed}=node-a }}")
        # Trusted by the CA, but not listed: no relaying, no ARRIVAL.
        other = self.certs.ca.issue(["node-b.example.org"], client=True)
        cert, key = other.write(self.certs_dir(), "other")
        arrival, code, text = yield self.relay_with_certificate(cert, key)
        self.assertFalse(arrival)
        self.assertEqual((code, text), (554, b"5.7.1 <b@remote.example>: Relay access denied"))
        self.assertEqual(self.spool.messages, [])

    def certs_dir(self):
        import os

        return os.path.dirname(self.certs.ca_file)


class SwaksTests(TestCase):
    """swaks (Debian package swaks) as the client: STARTTLS, AUTH PLAIN."""

    timeout = 60

    @defer.inlineCallbacks
    def test_swaks_tls_auth_plain(self):
        import shutil

        from twisted.internet import utils

        swaks = shutil.which("swaks")
        if swaks is None:
            raise SkipTest("swaks (Debian package swaks) is not installed")
        certs = Certificates(self.mktemp())
        config = make_config(certs, smtpd_tls_auth_only="yes")
        spool = FakeSpool()
        factory = ListenerFactory(Intake.from_config(config, spool), config)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        out, err, code = yield utils.getProcessOutputAndValue(swaks, [
            "--server", f"127.0.0.1:{port.getHost().port}", "--tls", "--auth", "PLAIN",
            "--auth-user", "node-a", "--auth-password", "s3cret", "--from", "a@example.net",
            "--to", "b@remote.example", "--helo", "client.example", "--timeout", "20",
        ])
        transcript = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, transcript + err.decode("utf-8", "replace"))
        plaintext, _, encrypted = transcript.partition("<-  220 2.0.0 Ready to start TLS")
        self.assertTrue(encrypted, transcript)
        self.assertNotIn("AUTH", plaintext)  # smtpd_tls_auth_only
        self.assertIn("<~  250-AUTH CRAM-MD5 PLAIN LOGIN", encrypted)
        self.assertIn("<~  235 ", encrypted)
        [message] = spool.messages
        self.assertEqual(message["recipients"], ["b@remote.example"])
        self.assertIn(b"with ESMTPSA", message["content"])
