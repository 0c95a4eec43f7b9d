"""Tests for relayagent.smtpd.twistedmail: relayagent as the outbound transport
of a twisted.mail MailService (local maildir domain plus relaying),
driven over StringTransport through Twisted's own ESMTP server."""

from __future__ import annotations

import base64
import hmac
import os

from twisted.cred.checkers import AllowAnonymousAccess, InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.mail import mail, relaymanager
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.smtpd.intake import ClientInfo, Intake, RelayDomain, RelayPolicy, received_header
from relayagent.smtpd.listener import RelayagentESMTP
from relayagent.smtpd.twistedmail import MaildirDomain, install_relayagent
from relayagent.testing import FailingFile, FakeSpool, FakeStatvfs
from tests.support.smtpd import capture_events, codes, warnings_in


def make_config() -> Config:
    return Config.from_text(
        "myhostname = mx.example.org\n"
        "mynetworks = 127.0.0.0/8\n"
    )


class MailServer:
    """A twisted.mail MailService with a local maildir domain
    (local.example, user "user") and relayagent installed, as docs/examples/mailserver.tac."""

    def __init__(self, testcase, *, spool=None, with_twisted_queue=False, install=True):
        self.testcase = testcase
        self.spool = spool if spool is not None else FakeSpool()
        self.triggers: list[int] = []
        self.service = mail.MailService()
        self.service.smtpPortal.registerChecker(AllowAnonymousAccess())
        self.service.smtpPortal.registerChecker(
            InMemoryUsernamePasswordDatabaseDontUse(sender=b"secret"))
        root = testcase.mktemp()
        os.makedirs(root)
        self.local = MaildirDomain(root, ["user"])
        self.service.addDomain(b"local.example", self.local)
        if with_twisted_queue:
            queue_dir = testcase.mktemp()
            os.makedirs(queue_dir)
            self.service.setQueue(relaymanager.Queue(queue_dir))
        self.transport_glue = None
        if install:
            self.transport_glue = install_relayagent(
                self.service, make_config(), spool=self.spool,
                trigger=lambda: self.triggers.append(1), clock=lambda: 1_700_000_000.0,
            )
        self.maildir_root = root

    def connect(self, factory, peer="127.0.0.1"):
        server = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000),
                                    hostAddress=IPv4Address("TCP", "127.0.0.1", 25))
        server.makeConnection(transport)
        self.testcase.addCleanup(server.setTimeout, None)
        return Client(server, transport)

    def delivered_locally(self) -> list[bytes]:
        new = os.path.join(self.maildir_root, "user", "new")
        if not os.path.isdir(new):
            return []
        result = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                result.append(f.read())
        return result


class Client:
    def __init__(self, server, transport):
        self.server = server
        self.transport = transport
        self.transport.clear()

    def send(self, data: bytes) -> list[bytes]:
        self.server.dataReceived(data)
        lines = [line for line in self.transport.value().split(b"\r\n") if line]
        self.transport.clear()
        return lines

    def cram_md5(self, user: bytes, password: bytes) -> list[bytes]:
        lines = self.send(b"AUTH CRAM-MD5\r\n")
        challenge = base64.b64decode(lines[-1][4:])
        digest = hmac.new(password, challenge, "md5").hexdigest().encode()
        return self.send(base64.b64encode(user + b" " + digest) + b"\r\n")


MIXED = (
    b"EHLO client.example.net\r\n"
    b"MAIL FROM:<alice@example.net>\r\n"
    b"RCPT TO:<bob@remote.example>\r\n"
    b"RCPT TO:<user@local.example>\r\n"
    b"RCPT TO:<carol@other.example>\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n\r\nbody\r\n.\r\n"
)


class MailServiceTests(SynchronousTestCase):
    def test_stock_twisted_esmtp_relays_once_and_delivers_locally(self):
        server = MailServer(self)
        client = server.connect(server.service.getESMTPFactory())
        lines = client.send(MIXED)
        self.assertEqual(codes(lines), [250, 250, 250, 250, 250, 354, 250])
        self.assertEqual(len(server.spool.messages), 1)
        message = server.spool.messages[0]
        self.assertEqual(message["recipients"], ["bob@remote.example", "carol@other.example"])
        relayed = message["content"].decode()
        # One header, ours, for two recipients: no "for", no Twisted header.
        self.assertEqual(relayed.count("Received:"), 1)
        self.assertTrue(relayed.startswith("Received: from client.example.net ([127.0.0.1])\r\n"
                                           "\tby mx.example.org (relayagent) with ESMTP;\r\n"))
        self.assertTrue(relayed.endswith("\r\nSubject: hi\r\n\r\nbody\r\n"))
        local = server.delivered_locally()
        self.assertEqual(len(local), 1)
        self.assertIn(b"for <user@local.example>", local[0])  # Twisted's header, locally
        self.assertEqual(server.triggers, [1])

    def test_relayagent_esmtp_factory(self):
        server = MailServer(self)
        factory = server.transport_glue.esmtp_factory()
        client = server.connect(factory)
        self.assertIsInstance(client.server, RelayagentESMTP)
        lines = client.send(MIXED)
        self.assertEqual(codes(lines), [250, 250, 250, 250, 250, 354, 250])
        self.assertIn(b"SIZE 10240000", b"\n".join(lines))
        self.assertEqual(len(server.spool.messages), 1)
        self.assertEqual(len(server.delivered_locally()), 1)

    def test_local_domain_in_any_case(self):
        server = MailServer(self)
        client = server.connect(server.transport_glue.esmtp_factory(), peer="192.0.2.7")
        lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<user@LOCAL.Example>\r\n"
                            b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 250, 354, 250])
        self.assertEqual(len(server.delivered_locally()), 1)
        self.assertEqual(server.spool.messages, [])

    def test_stranger_is_refused_for_remote_but_not_local(self):
        server = MailServer(self)
        client = server.connect(server.transport_glue.esmtp_factory(), peer="192.0.2.7")
        lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<bob@remote.example>\r\n"
                            b"RCPT TO:<user@local.example>\r\n")
        self.assertEqual(lines[-2], b"554 5.7.1 <bob@remote.example>: Relay access denied")
        self.assertEqual(codes(lines)[-1], 250)

    def test_authenticated_stranger_relays_even_with_twisted_queue_set(self):
        # DomainDeliveryBase.validateTo would pick relay.DomainQueuer (and
        # its TypeError) for an authenticated client when service.queue is
        # set; the installed realm sends it to relayagent instead.
        server = MailServer(self, with_twisted_queue=True)
        self.flushLoggedErrors()
        client = server.connect(server.transport_glue.esmtp_factory(), peer="192.0.2.7")
        client.send(b"EHLO client\r\n")
        self.assertEqual(codes(client.cram_md5(b"sender", b"secret")), [235])
        lines = client.send(b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@remote.example>\r\n"
                            b"DATA\r\nSubject: x\r\n\r\nb\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        content = server.spool.messages[0]["content"].decode()
        self.assertIn("with ESMTPA", content)
        self.assertIn("for <bob@remote.example>", content)
        self.assertEqual(os.listdir(server.service.queue.directory), [])

    def test_wrong_password_does_not_relay(self):
        server = MailServer(self)
        client = server.connect(server.transport_glue.esmtp_factory(), peer="192.0.2.7")
        client.send(b"EHLO client\r\n")
        self.assertEqual(codes(client.cram_md5(b"sender", b"wrong")), [535])
        lines = client.send(b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<bob@remote.example>\r\n")
        self.assertEqual(codes(lines), [250, 554])

    def test_spool_failure_451_with_ours_550_with_stock(self):
        spool = FakeSpool(fail=OSError(5, "Input/output error"))
        server = MailServer(self, spool=spool)
        client = server.connect(server.transport_glue.esmtp_factory())
        lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@remote.example>\r\n"
                            b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        # Twisted's stock server turns any receiver failure into a 550.
        client = server.connect(server.service.getESMTPFactory())
        lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@remote.example>\r\n"
                            b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(codes(lines)[-1], 550)
        self.flushLoggedErrors()

    def test_default_domain_alone_replaces_twisteds_header(self):
        # Without install_relayagent: RelayDomain as the default domain
        # behind Twisted's own delivery, which feeds its header per
        # recipient; the transaction drops it and writes its own.
        server = MailServer(self, install=False)
        config = make_config()
        intake = Intake(server.spool, hostname="mx.example.org",
                        relay_policy=RelayPolicy.from_config(config),
                        clock=lambda: 1_700_000_000.0)
        server.service.domains.setDefaultDomain(RelayDomain(intake))
        client = server.connect(server.service.getESMTPFactory())
        lines = client.send(MIXED)
        self.assertEqual(codes(lines)[-1], 250)
        content = server.spool.messages[0]["content"].decode()
        self.assertEqual(content.count("Received:"), 1)
        self.assertIn("(relayagent)", content)


class ReceivedHeaderFormTests(SynchronousTestCase):
    def test_with_keywords(self):
        peer = IPv4Address("TCP", "192.0.2.1", 1)
        for esmtp, tls, auth, keyword in ((False, False, False, "SMTP"),
                                          (True, False, False, "ESMTP"),
                                          (True, True, False, "ESMTPS"),
                                          (True, False, True, "ESMTPA"),
                                          (True, True, True, "ESMTPSA")):
            info = ClientInfo("h", peer, esmtp=esmtp, tls=tls, authenticated=auth)
            lines = received_header(info, "mx.example.org", ["a@b.example"], 0.0, "QID1")
            self.assertEqual(lines[1], f"\tby mx.example.org (relayagent) with {keyword} id QID1"
                             .encode())

    def test_without_helo(self):
        info = ClientInfo(None, IPv4Address("TCP", "192.0.2.1", 1))
        lines = received_header(info, "mx", ["a@b.example"], 0.0)
        self.assertEqual(lines[0], b"Received: from [192.0.2.1] ([192.0.2.1])")


    def test_date_is_computed_once_a_second(self):
        """The date is email.utils' local-time form of the whole second,
        computed once for all the headers of that second."""
        import email.utils

        from relayagent.smtpd import intake

        calls = []
        real = email.utils.formatdate

        def formatdate(timeval, localtime):
            calls.append(timeval)
            return real(timeval, localtime=localtime)

        self.patch(email.utils, "formatdate", formatdate)
        intake._header_date.cache_clear()
        self.addCleanup(intake._header_date.cache_clear)
        info = ClientInfo("h", IPv4Address("TCP", "192.0.2.1", 1))
        dates = [received_header(info, "mx", ["a@b.example"], when)[-1].split(b"; ")[1]
                 for when in (1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.5, 1_800_000_000.5)]
        self.assertEqual(dates[0], dates[1])
        self.assertEqual(dates[0], real(1_800_000_000, localtime=True).encode())
        self.assertEqual(dates[2], real(1_800_000_001, localtime=True).encode())
        self.assertEqual(dates[3], dates[0])
        self.assertEqual(calls, [1_800_000_000, 1_800_000_001])


class AddressSyntaxTests(SynchronousTestCase):
    def test_control_characters_and_eight_bit_are_refused_at_every_door(self):
        server = MailServer(self)
        for factory in (server.transport_glue.esmtp_factory(), server.service.getESMTPFactory()):
            client = server.connect(factory)
            lines = client.send(b'EHLO c\r\nMAIL FROM:<"a\nb"@x.example>\r\n')
            self.assertEqual(lines[-1], b"501 5.1.7 Bad sender address syntax")
            lines = client.send(b"MAIL FROM:<a@x.example>\r\n"
                                b'RCPT TO:<"b\rX-Injected: 1"@remote.example>\r\n'
                                b'RCPT TO:<"user\n"@local.example>\r\n'
                                b'RCPT TO:<"b\xff"@remote.example>\r\n')
            self.assertEqual(lines[1:], [b"501 5.1.3 Bad recipient address syntax",
                                         b"501 5.1.3 Bad recipient address syntax",
                                         b"553 5.6.7 Must declare SMTPUTF8 to send unicode address"])
        self.assertEqual(server.spool.messages, [])
        self.assertEqual(self.flushLoggedErrors(), [])


class DiskFullAndSizeTests(SynchronousTestCase):
    """The glue answers for space and size at every door: relayagent's
    ESMTP server and Twisted's stock one."""

    def server(self, free_bytes: int = 10**9, **kwargs) -> MailServer:
        spool = FakeSpool(directory=self.mktemp())
        server = MailServer(self, spool=spool, **kwargs)
        self.statvfs = FakeStatvfs(free_bytes)
        server.transport_glue.intake.statvfs = self.statvfs
        return server

    def factories(self, server: MailServer):
        return (server.transport_glue.esmtp_factory(), server.service.getESMTPFactory())

    def test_queue_minfree_and_size_limit_come_from_main_cf(self):
        server = MailServer(self)
        intake = server.transport_glue.intake
        self.assertEqual((intake.queue_minfree, intake.message_size_limit), (0, 10240000))

    def test_452_at_mail_from_through_both_servers(self):
        events = capture_events(self)
        server = self.server(free_bytes=10_000_000)
        for factory in self.factories(server):
            client = server.connect(factory)
            lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\n")
            self.assertEqual(lines[-1], b"452 4.3.1 Insufficient system storage")
        self.assertEqual(len(warnings_in(events)), 2)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.statvfs.free_bytes = 10**9
        client = server.connect(server.service.getESMTPFactory())
        self.assertEqual(codes(client.send(MIXED)), [250, 250, 250, 250, 250, 354, 250])

    def test_over_size_limit_is_552_through_both_servers(self):
        server = self.server()
        server.transport_glue.intake.message_size_limit = 1000
        for factory in self.factories(server):
            client = server.connect(factory)
            lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@remote.example>\r\n"
                                b"DATA\r\n" + b"x" * 998 + b"\r\n" + b"y" * 100 + b"\r\n.\r\n")
            self.assertEqual(lines[-1], b"552 5.3.4 Error: message file too big")
        self.assertEqual(server.spool.messages, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_write_failure_is_451_through_both_servers(self):
        import relayagent.smtpd.twistedmail as glue

        self.patch(glue.tempfile, "TemporaryFile", lambda dir=None: FailingFile(room=100))
        server = self.server()
        for factory in self.factories(server):
            client = server.connect(factory)
            lines = client.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@remote.example>\r\n"
                                b"DATA\r\n" + b"x" * 200 + b"\r\n.\r\n")
            self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertEqual(server.spool.messages, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_recipients_are_queued_without_an_invented_orcpt(self):
        from relayagent.spool import Spool

        spool = Spool(self.mktemp())
        spool.ensure_layout()
        server = MailServer(self, spool=spool)
        client = server.connect(server.service.getESMTPFactory())
        self.assertEqual(codes(client.send(MIXED))[-1], 250)
        (queue_id,) = spool.queue_ids("incoming")
        with spool.open(queue_id, "incoming") as queue_file:
            recipients = queue_file.envelope.recipients
        self.assertEqual([(r.address, r.orcpt) for r in recipients],
                         [("bob@remote.example", None), ("carol@other.example", None)])
