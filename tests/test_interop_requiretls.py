"""
Interop: REQUIRETLS (RFC 8689) and ``TLS-Required: No`` against real
servers on loopback.

Delivery: aiosmtpd servers with STARTTLS and a certificate from a test CA
(``tests.support.certs``; the CA is ``smtp_tls_CAfile``), one of them
offering REQUIRETLS after STARTTLS (a handler hook adds the EHLO keyword,
a server subclass takes the MAIL parameter); each records the MAIL FROM
parameters it got.  A message goes from a real spool through the queue
manager's delivery step (``qmgr.delivery.DeliveryAgent``) and smtp's
entry point with the real connector, security policy and sessions; a
bounce is read back from the spool's incoming queue.  The MX list comes
from the shipped resolver double (two MX hosts, 127.0.0.2 and 127.0.0.3).

Intake: the listener on an implicit-TLS endpoint (``ssl:``) and on a
plaintext one, driven by the standard library's smtplib in a thread.
"""

from __future__ import annotations

import email
import email.policy
import logging
import os
import smtplib
import socket
import ssl
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from relayagent import testing
from relayagent.common.config import Config
from relayagent.qmgr.delivery import DeliveryAgent
from relayagent.qmgr.scheduler import ActiveMessage, DeliveryRequest
from relayagent.smtp.deliver import SmtpAgent
from relayagent.smtp.resolve import MailExchangerAddress, Nexthop
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtpd.listener import make_listener_services
from relayagent.spool import ACTIVE, INCOMING, Spool
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port

try:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP
except ImportError:  # pragma: no cover - the venv has it; CI installs it
    Controller = None
    SMTP = object

CA = CertificateAuthority()
BODY_SECRET = b"The body that must not go back in plaintext."
CONTENT = b"From: a@example.org\nTo: b@example.com\nSubject: requiretls test\n\n" + BODY_SECRET + b"\n"


class RecordingHandler:
    """Accepts mail; records each message's MAIL FROM parameters.  With
    ``requiretls``, EHLO over TLS offers REQUIRETLS."""

    def __init__(self, *, requiretls: bool) -> None:
        self.requiretls = requiretls
        self.received: list[tuple[list[str], bytes]] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: N802 - aiosmtpd's name
        session.host_name = hostname
        if self.requiretls and session.ssl is not None:
            responses.insert(len(responses) - 1, "250-REQUIRETLS")
        return responses

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        self.received.append((list(envelope.mail_options), envelope.content))
        return "250 2.0.0 Ok: queued"


class RequireTLSServer(SMTP):  # type: ignore[misc, valid-type]
    """aiosmtpd, taking the REQUIRETLS parameter of MAIL over TLS (it
    refuses every parameter it does not know with 555)."""

    def _getparams(self, params):
        result = super()._getparams(params)
        if result is not None and self.session.ssl is not None:
            result.pop("REQUIRETLS", None)
        return result


if Controller is not None:

    class RequireTLSController(Controller):
        """Builds ``RequireTLSServer`` sessions."""

        def factory(self):
            return RequireTLSServer(self.handler, **self.SMTP_kwargs)


class InteropTestCase(unittest.TestCase):
    def setUp(self) -> None:
        if Controller is None:
            raise unittest.SkipTest("aiosmtpd is not installed (pip install aiosmtpd)")
        # aiosmtpd logs a traceback for each handshake our client aborts
        # (a certificate it refuses): keep the test output readable.
        server_log = logging.getLogger("mail.log")
        self.addCleanup(server_log.setLevel, server_log.level)
        server_log.setLevel(logging.CRITICAL)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        CA.write(self.directory, "ca.pem")
        self.spool = Spool(os.path.join(self.directory, "spool"))
        self.spool.ensure_layout()
        self.logs = testing.LogCapture(self)

    def start_server(self, handler: RecordingHandler, address: str, names: list[str]) -> Deferred[int]:
        port = free_port(address)
        context = CA.issue(names).ssl_context(self.directory)
        controller = RequireTLSController(handler, hostname=address, port=port, tls_context=context,
                                          require_starttls=False)
        self.addCleanup(lambda: threads.deferToThread(controller.stop))
        return threads.deferToThread(controller.start).addCallback(lambda _: port)


class DeliveryTests(InteropTestCase):
    async def servers(self, first_requiretls: bool, second_requiretls: bool, *, second_names=None):
        self.mx1 = RecordingHandler(requiretls=first_requiretls)
        self.mx2 = RecordingHandler(requiretls=second_requiretls)
        port1 = await self.start_server(self.mx1, "127.0.0.2", ["mx1.example.com"])
        port2 = await self.start_server(self.mx2, "127.0.0.3", second_names or ["mx2.example.com"])
        self.addresses = [
            MailExchangerAddress("mx1.example.com", "127.0.0.2", socket.AF_INET, 10, port1),
            MailExchangerAddress("mx2.example.com", "127.0.0.3", socket.AF_INET, 20, port2),
        ]

    def config(self, extra: str = "") -> Config:
        text = (
            "myhostname = relay.test\n"
            "smtp_tls_CAfile = ca.pem\n"
            "smtp_tls_loglevel = 1\n"
            "smtp_connect_timeout = 5s\n"
            "smtp_helo_timeout = 10s\n"
            "smtp_starttls_timeout = 10s\n" + extra
        )
        return Config.from_text(text, base_dir=self.directory)

    async def deliver(self, content: bytes = CONTENT, *, requiretls: bool, extra: str = "smtp_tls_security_level = may\n"):
        config = self.config(extra)
        resolver = testing.FakeNexthopResolver(
            {"example.com": [Nexthop("example.com", "example.com", 25, True, False, "example.com")]},
            {"example.com": self.addresses},
        )
        smtp_agent = SmtpAgent.from_config(config, reactor, resolver=resolver, security=SecurityPolicy(config))
        self.addCleanup(smtp_agent.close)
        agent = DeliveryAgent(config, self.spool, reactor, smtp=smtp_agent)
        queue_id = self.spool.enqueue("a@example.org", ["b@example.com"], content, requiretls=requiretls)
        self.spool.move(queue_id, INCOMING, ACTIVE)
        queue_file = self.spool.open(queue_id, ACTIVE)
        self.addCleanup(queue_file.close)
        message = ActiveMessage(queue_id, queue_file, queue_file.envelope, activated=reactor.seconds())
        recipients = message.envelope.pending()
        request = DeliveryRequest(message, "example.com", "example.com", recipients, dispatched=reactor.seconds())
        await agent.deliver(request)
        agent.finish(message)
        return queue_id

    def bounces(self) -> list[email.message.Message]:
        found = []
        for queue_id in self.spool.queue_ids(INCOMING):
            with self.spool.open(queue_id, INCOMING) as queue_file:
                envelope = queue_file.envelope
                self.assertFalse(envelope.requiretls)  # the notice itself is not REQUIRETLS
                with envelope.open_content() as stream:
                    found.append(email.message_from_bytes(stream.read(), policy=email.policy.default))
        return found

    def delivery_lines(self) -> list[str]:
        return [line for line in self.logs.messages() if "status=" in line]

    def assert_bounced_with_5730(self, expected_text: str) -> email.message.Message:
        (bounce,) = self.bounces()
        self.assertEqual(bounce["Subject"], "Undelivered Mail Returned to Sender")
        status_part = bounce.get_payload()[1].as_string()
        self.assertIn("Status: 5.7.30", status_part)
        self.assertIn(expected_text, bounce.as_string().replace("\n ", " ").replace("\n\t", " "))
        # RFC 8689 section 5: headers only, never the body.
        self.assertEqual(bounce.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: requiretls test", bounce.get_payload()[2].as_string())
        self.assertNotIn(BODY_SECRET.decode(), bounce.as_string())
        self.assertTrue(any("status=bounced" in line and "dsn=5.7.30" in line for line in self.delivery_lines()),
                        self.delivery_lines())
        return bounce

    async def _delivered_to_the_server_with_requiretls(self) -> None:
        await self.servers(False, True)
        await self.deliver(requiretls=True)
        # mx1 (no REQUIRETLS) got nothing; mx2 got it with REQUIRETLS on MAIL FROM.
        self.assertEqual(self.mx1.received, [])
        self.assertEqual(len(self.mx2.received), 1)
        options, content = self.mx2.received[0]
        self.assertIn("REQUIRETLS", options)
        self.assertIn(BODY_SECRET, content)
        self.assertEqual(self.bounces(), [])
        self.assertTrue(any("Verified TLS connection established to mx2.example.com" in line
                            for line in self.logs.messages()))
        self.assertTrue(any("status=sent" in line for line in self.delivery_lines()))

    def test_delivered_with_requiretls_after_trying_mx1(self):
        return Deferred.fromCoroutine(self._delivered_to_the_server_with_requiretls())

    async def _no_server_offers_it(self) -> None:
        await self.servers(False, False)
        await self.deliver(requiretls=True)
        self.assertEqual(self.mx1.received + self.mx2.received, [])
        self.assert_bounced_with_5730("Sender requested REQUIRETLS, but no server was found that supports "
                                      "REQUIRETLS. The last attempted server was mx2.example.com[127.0.0.3]")
        # Both MX hosts were tried (RFC 8689 4.2.1): the first's reason is logged.
        self.assertTrue(any("mx1.example.com[127.0.0.2]" in line and "REQUIRETLS" in line
                            for line in self.logs.messages()), self.logs.messages())

    def test_bounces_with_5730_when_no_server_offers_requiretls(self):
        return Deferred.fromCoroutine(self._no_server_offers_it())

    async def _not_verified(self) -> None:
        # mx2 offers REQUIRETLS but its certificate has another name.
        await self.servers(False, True, second_names=["other.example.net"])
        await self.deliver(requiretls=True)
        self.assertEqual(self.mx1.received + self.mx2.received, [])
        self.assert_bounced_with_5730("Sender requested REQUIRETLS, but no matching server certificate was found. "
                                      "The last attempted server was mx2.example.com[127.0.0.3]")

    def test_bounces_with_5730_without_a_verified_certificate(self):
        return Deferred.fromCoroutine(self._not_verified())

    async def _ordinary_mail_unchanged(self) -> None:
        # The same servers take ordinary mail from mx1, with no REQUIRETLS.
        await self.servers(False, True, second_names=["other.example.net"])
        await self.deliver(requiretls=False)
        self.assertEqual(len(self.mx1.received), 1)
        self.assertNotIn("REQUIRETLS", self.mx1.received[0][0])
        self.assertEqual(self.bounces(), [])

    def test_ordinary_mail_is_unchanged(self):
        return Deferred.fromCoroutine(self._ordinary_mail_unchanged())

    async def _none_policy(self) -> None:
        await self.servers(True, True)
        await self.deliver(requiretls=True, extra="smtp_tls_security_level = none\n")
        self.assertEqual(self.mx1.received + self.mx2.received, [])
        self.assert_bounced_with_5730("my configured TLS security level 'none' disables encryption")

    def test_level_none_bounces(self):
        return Deferred.fromCoroutine(self._none_policy())

    async def _opportunistic_starttls(self) -> None:
        # smtp_requiretls_policy relaxes it for example.com: TLS (any
        # certificate) is enough, REQUIRETLS sent only where offered.
        await self.servers(False, True, second_names=["other.example.net"])
        self.addresses[0] = MailExchangerAddress("mx1.example.org", "127.0.0.2", socket.AF_INET, 10,
                                                 self.addresses[0].port)
        await self.deliver(requiretls=True, extra=(
            "smtp_tls_security_level = may\n"
            "smtp_requiretls_policy = inline:{ {example.com = opportunistic+starttls} }, enforce\n"
        ))
        self.assertEqual(len(self.mx1.received), 1)
        self.assertNotIn("REQUIRETLS", self.mx1.received[0][0])
        self.assertEqual(self.bounces(), [])
        self.assertTrue(any("REQUIRETLS support was not offered by host mx1.example.org[127.0.0.2]" in line
                            for line in self.logs.messages()))

    def test_smtp_requiretls_policy_opportunistic_starttls(self):
        return Deferred.fromCoroutine(self._opportunistic_starttls())

    async def _tls_required_no(self) -> None:
        # Level verify and certificates for other names: ordinary mail is
        # deferred (4.7.5), a TLS-Required: No message is delivered.
        await self.servers(False, False, second_names=["other.example.net"])
        self.addresses[0] = MailExchangerAddress("mx1.example.org", "127.0.0.2", socket.AF_INET, 10,
                                                 self.addresses[0].port)
        verify = "smtp_tls_security_level = verify\n"
        await self.deliver(requiretls=False, extra=verify)
        self.assertEqual(self.mx1.received + self.mx2.received, [])
        self.assertTrue(any("status=deferred" in line and "dsn=4.7.5" in line for line in self.delivery_lines()))
        header_no = b"TLS-Required: No\n" + CONTENT
        await self.deliver(header_no, requiretls=False, extra=verify)
        self.assertEqual(len(self.mx1.received), 1)
        self.assertTrue(any("TLS-Required: No: ignoring the mandatory TLS level verify of example.com" in line
                            for line in self.logs.messages()))
        # REQUIRETLS wins over the header: that one is returned.
        await self.deliver(header_no, requiretls=True, extra=verify)
        self.assertEqual(len(self.mx1.received), 1)
        self.assertEqual(len(self.bounces()), 1)

    def test_tls_required_no_makes_a_mandatory_level_opportunistic(self):
        return Deferred.fromCoroutine(self._tls_required_no())


class ListenerTests(InteropTestCase):
    """The listener: REQUIRETLS offered and taken only on a TLS endpoint."""

    async def start_listener(self) -> tuple[int, int]:
        leaf = CA.issue(["relay.test"], ip_addresses=["127.0.0.1"])
        cert_path, key_path = leaf.write(self.directory)
        tls_port, plain_port = free_port("127.0.0.1"), free_port("127.0.0.1")
        config = Config.from_text(
            "myhostname = relay.test\n"
            f"smtpd_endpoints = ssl:{tls_port}:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path},"
            f" tcp:{plain_port}:interface=127.0.0.1\n",
            base_dir=self.directory,
        )
        for service in make_listener_services(config, self.spool, reactor=reactor):
            service.startService()
            self.addCleanup(service.stopService)
        return tls_port, plain_port

    def client_session(self, port: int, tls: bool) -> dict[str, Any]:
        """One session in a thread: EHLO, MAIL FROM with REQUIRETLS, RCPT, DATA."""
        if tls:
            context = ssl.create_default_context(cafile=os.path.join(self.directory, "ca.pem"))
            client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10)
        else:
            client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            client.ehlo("client.example")
            offered = client.has_extn("requiretls")
            mail = client.mail("a@example.org", ["REQUIRETLS"])
            data = None
            if mail[0] == 250:
                client.rcpt("b@example.com")
                data = client.data(CONTENT)
            return {"offered": offered, "mail": mail, "data": data}
        finally:
            client.close()

    async def _listener(self) -> None:
        tls_port, plain_port = await self.start_listener()
        plain = await threads.deferToThread(self.client_session, plain_port, False)
        self.assertFalse(plain["offered"])
        self.assertEqual(plain["mail"], (555, b"5.5.4 Unsupported option: REQUIRETLS"))
        self.assertEqual(list(self.spool.queue_ids(INCOMING)), [])
        over_tls = await threads.deferToThread(self.client_session, tls_port, True)
        self.assertTrue(over_tls["offered"])
        self.assertEqual(over_tls["mail"][0], 250)
        self.assertEqual(over_tls["data"][0], 250)
        (queue_id,) = self.spool.queue_ids(INCOMING)
        with self.spool.open(queue_id, INCOMING) as queue_file:
            self.assertTrue(queue_file.envelope.requiretls)
            with queue_file.envelope.open_content() as stream:
                self.assertIn(b"with ESMTPS", stream.read())

    def test_requiretls_only_over_tls_and_kept_in_the_queue_file(self):
        return Deferred.fromCoroutine(self._listener())
