"""Tests for relayagent.smtpd.listener: the built-in listener, driven over
StringTransport (Twisted's ESMTP server with our glue behind it)."""

from __future__ import annotations

import errno
import os
import re
import types

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.common.envelope import BodyType
from relayagent.smtpd.intake import Intake, RelayPolicy, describe_client, parse_mynetworks
from relayagent.smtpd.listener import (
    ListenerFactory,
    RelayagentESMTP,
    make_listener_services,
    parse_esmtp_parameters,
)
from relayagent.spool import Spool
from relayagent.spool import spool as spool_module
from relayagent.spool.nonblocking import ThreadedSpool
from relayagent.testing import FailingFile, FakeSpool, FakeStatvfs
from tests.support.smtpd import capture_events, codes, warnings_in


def make_config(**overrides: str) -> Config:
    settings = {
        "myhostname": "mx.example.org",
        "mynetworks": "127.0.0.0/8 [::1]/128",
        "message_size_limit": "10240000",
    }
    settings.update(overrides)
    return Config.from_text("".join(f"{k} = {v}\n" for k, v in settings.items()))


class Session:
    """One server protocol on a StringTransport."""

    def __init__(self, testcase, *, peer="127.0.0.1", spool=None, trigger=None, statvfs=os.statvfs,
                 **config):
        self.config = make_config(**config)
        self.spool = spool if spool is not None else FakeSpool()
        self.triggers = []
        self.intake = Intake(
            self.spool,
            hostname=self.config["myhostname"],
            relay_policy=RelayPolicy.from_config(self.config),
            message_size_limit=self.config["message_size_limit"],
            hopcount_limit=self.config["hopcount_limit"],
            trigger=trigger or (lambda: self.triggers.append(1)),
            clock=lambda: 1_700_000_000.0,
            queue_minfree=self.config["queue_minfree"],
            statvfs=statvfs,
        )
        factory = ListenerFactory(self.intake, self.config)
        address_type = IPv6Address if ":" in peer else IPv4Address
        self.peer = address_type("TCP", peer, 40000)
        self.server = factory.buildProtocol(self.peer)
        self.transport = StringTransport(
            hostAddress=address_type("TCP", "127.0.0.1" if ":" not in peer else "::1", 10587),
            peerAddress=self.peer,
        )
        self.server.makeConnection(self.transport)
        testcase.addCleanup(self.close)

    def close(self):
        if not self.transport.disconnecting:
            self.server.connectionLost(None)
        self.server.setTimeout(None)

    def send(self, data: bytes) -> list[bytes]:
        """Send; return the reply lines written since the last call."""
        self.transport.clear()
        self.server.dataReceived(data)
        return self.replies()

    def replies(self) -> list[bytes]:
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in lines if line]


TRANSACTION = (
    b"EHLO client.example.net\r\n"
    b"MAIL FROM:<alice@example.net>\r\n"
    b"RCPT TO:<bob@remote.example>\r\n"
    b"RCPT TO:<carol@remote.example>\r\n"
    b"RCPT TO:<dave@elsewhere.example>\r\n"
    b"DATA\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"..a line that starts with a dot\r\n"
    b"body\r\n"
    b".\r\n"
)


class GreetingTests(SynchronousTestCase):
    def test_banner_is_smtpd_banner(self):
        session = Session(self)
        banner = session.replies()
        expected = session.config["smtpd_banner"].encode()
        self.assertTrue(expected.startswith(b"mx.example.org ESMTP "), expected)
        self.assertEqual(banner, [b"220 " + expected])

    def test_ehlo_advertises_size_8bitmime_pipelining(self):
        session = Session(self, message_size_limit="5000")
        session.replies()
        lines = session.send(b"EHLO client.example.net\r\n")
        keywords = {line[4:] for line in lines}
        self.assertIn(b"SIZE 5000", keywords)
        self.assertIn(b"8BITMIME", keywords)
        self.assertIn(b"PIPELINING", keywords)
        self.assertEqual(codes(lines), [250])

    def test_size_without_limit(self):
        session = Session(self, message_size_limit="0")
        session.replies()
        lines = session.send(b"EHLO c\r\n")
        self.assertIn(b"SIZE", {line[4:] for line in lines})


class TransactionTests(SynchronousTestCase):
    def test_one_enqueue_for_several_recipients(self):
        session = Session(self)
        session.replies()
        lines = session.send(TRANSACTION)
        self.assertEqual(codes(lines), [250, 250, 250, 250, 250, 354, 250])
        self.assertEqual(len(session.spool.messages), 1)
        message = session.spool.messages[0]
        self.assertEqual(message["sender"], "alice@example.net")
        self.assertEqual(message["recipients"],
                         ["bob@remote.example", "carol@remote.example", "dave@elsewhere.example"])
        self.assertIn(b"\r\nSubject: hello\r\n\r\n.a line that starts with a dot\r\nbody\r\n",
                      message["content"])
        self.assertTrue(lines[-1].startswith(b"250 2.0.0 Ok: queued as Q00001"), lines[-1])
        self.assertEqual(session.triggers, [1])

    def test_duplicate_recipients_are_queued_once(self):
        session = Session(self)
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                     b"RCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(session.spool.messages[0]["recipients"], ["b@y.example"])

    def test_two_transactions_on_one_connection(self):
        session = Session(self)
        session.replies()
        lines = session.send(
            b"EHLO c\r\n"
            b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\none\r\n.\r\n"
            b"MAIL FROM:<>\r\nRCPT TO:<c@z.example>\r\nRCPT TO:<d@z.example>\r\n"
            b"DATA\r\ntwo\r\n.\r\nQUIT\r\n"
        )
        self.assertEqual(codes(lines), [250, 250, 250, 354, 250, 250, 250, 250, 354, 250, 221])
        self.assertEqual([m["recipients"] for m in session.spool.messages],
                         [["b@y.example"], ["c@z.example", "d@z.example"]])
        self.assertEqual(session.spool.messages[1]["sender"], "")
        self.assertTrue(session.spool.messages[1]["content"].endswith(b"\r\ntwo\r\n"))

    def test_rset_starts_over(self):
        session = Session(self)
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRSET\r\n"
                     b"MAIL FROM:<a@x.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual([m["recipients"] for m in session.spool.messages], [["c@y.example"]])

    def test_451_when_enqueue_raises(self):
        events = capture_events(self)
        session = Session(self, spool=FakeSpool(fail=OSError(28, "No space left on device")))
        session.replies()
        lines = session.send(TRANSACTION)
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertEqual(session.triggers, [])
        # A full disk is one warning line, no traceback.
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(warnings_in(events), [
            "warning: DATA from unknown[127.0.0.1]: 451 4.3.0 Error: queue file write error: "
            "No space left on device",
        ])

    def test_a_bug_in_the_spool_is_still_a_traceback(self):
        session = Session(self, spool=FakeSpool(fail=RuntimeError("a bug")))
        session.replies()
        lines = session.send(TRANSACTION)
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bare_user_without_domain_is_refused(self):
        session = Session(self)
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<postmaster>\r\n")
        self.assertEqual(codes(lines)[-1], 550)

    def test_body_8bitmime_is_recorded(self):
        session = Session(self)
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example> BODY=8BITMIME\r\n"
                             b"RCPT TO:<b@y.example>\r\nDATA\r\n\xc3\xa9t\xc3\xa9\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 250, 354, 250])
        self.assertEqual(session.spool.messages[0]["body_type"], BodyType.EIGHT_BIT_MIME)
        self.assertIn(b"\xc3\xa9t\xc3\xa9\r\n", session.spool.messages[0]["content"])

    def test_unknown_parameters_are_refused(self):
        session = Session(self)
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example> FOO=BAR\r\n")
        self.assertEqual(lines[-1], b"555 5.5.4 Unsupported option: FOO")
        lines = session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example> XYZZY\r\n")
        self.assertEqual(lines[-1], b"555 5.5.4 Unsupported option: XYZZY")
        lines = session.send(b"MAIL FROM:<a@x.example> BODY=BINARYMIME\r\n")
        self.assertEqual(codes(lines), [503])  # the sender is already set

    def test_parse_esmtp_parameters(self):
        self.assertEqual(parse_esmtp_parameters(b"SIZE=10 body=8BITMIME"),
                         [("SIZE", "10"), ("BODY", "8BITMIME")])
        self.assertRaises(ValueError, parse_esmtp_parameters, b"SIZE=a=b=")
        self.assertEqual(parse_esmtp_parameters(None), [])


class RelayTests(SynchronousTestCase):
    def test_stranger_gets_554_and_nothing_is_queued(self):
        session = Session(self, peer="192.0.2.7")
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@remote.example>\r\n"
                             b"DATA\r\n")
        self.assertEqual(lines[-2], b"554 5.7.1 <b@remote.example>: Relay access denied")
        self.assertEqual(codes(lines)[-1], 503)  # DATA without a recipient
        self.assertEqual(session.spool.messages, [])

    def test_each_policy_answers_for_its_own_networks_asked_again(self):
        # The answers are remembered per client address and per policy.
        narrow = RelayPolicy(parse_mynetworks(["127.0.0.1/32"]))
        wide = RelayPolicy(parse_mynetworks(["127.0.0.0/8", "[::1]/128"]))
        for _ in range(2):
            for host, in_narrow, in_wide in (("127.0.0.1", True, True), ("127.0.0.2", False, True),
                                              ("::ffff:127.0.0.2", False, True), ("::1", False, True),
                                              ("192.0.2.7", False, False), ("not an address", False, False)):
                peer = IPv6Address("TCP", host, 1) if ":" in host else IPv4Address("TCP", host, 1)
                self.assertEqual((narrow.in_mynetworks(peer), wide.in_mynetworks(peer)),
                                 (in_narrow, in_wide), host)
        self.assertEqual(describe_client(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "unknown[192.0.2.1]")
        self.assertEqual(describe_client(IPv6Address("TCP", "2001:db8::1", 1)), "unknown[2001:db8::1]")
        self.assertEqual(describe_client(None), "unknown[unknown]")

    def test_loopback_is_accepted(self):
        session = Session(self, peer="127.0.0.1", mynetworks="127.0.0.1/32")
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@remote.example>\r\n")
        self.assertEqual(codes(lines)[-1], 250)

    def test_second_loopback_address_outside_mynetworks(self):
        session = Session(self, peer="127.0.0.2", mynetworks="127.0.0.1/32")
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@remote.example>\r\n")
        self.assertEqual(codes(lines)[-1], 554)

    def test_ipv6_loopback_and_mapped_ipv4(self):
        for peer, expected in (("::1", 250), ("::ffff:127.0.0.1", 250), ("2001:db8::1", 554)):
            session = Session(self, peer=peer)
            session.replies()
            lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@r.example>\r\n")
            self.assertEqual(codes(lines)[-1], expected, peer)

    def test_parse_mynetworks(self):
        networks = parse_mynetworks(["127.0.0.0/8", "[::1]/128", "[2001:db8::1]", "192.0.2.1"])
        self.assertEqual([str(n) for n in networks],
                         ["127.0.0.0/8", "::1/128", "2001:db8::1/128", "192.0.2.1/32"])
        self.assertRaises(ValueError, parse_mynetworks, ["not-an-address"])

    def test_host_bits_in_mynetworks_are_an_error(self):
        # "192.168.1.5/0" was silently 0.0.0.0/0: an open relay from a
        # typo.  Postfix refuses it ("non-null host address bits").
        for item, suggestion in (("192.168.1.5/0", "0.0.0.0/0"), ("127.0.0.1/8", "127.0.0.0/8"),
                                 ("[2001:db8::1]/32", "[2001:db8::]/32")):
            with self.assertRaisesRegex(ValueError, "non-null host address bits") as caught:
                parse_mynetworks([item])
            self.assertIn(suggestion, str(caught.exception))


class SizeTests(SynchronousTestCase):
    def test_mail_from_size_over_limit(self):
        session = Session(self, message_size_limit="1000")
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example> SIZE=1001\r\n")
        self.assertEqual(lines[-1], b"552 5.3.4 Message size exceeds fixed limit")
        lines = session.send(b"MAIL FROM:<a@x.example> SIZE=999\r\n")
        self.assertEqual(codes(lines), [250])

    def test_data_over_limit_is_refused_and_not_stored(self):
        session = Session(self, message_size_limit="2000")
        session.replies()
        written = []
        original = session.intake.spool.enqueue
        session.intake.spool.enqueue = lambda *a, **k: written.append(1) or original(*a, **k)
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        transaction = session.intake._transactions[session.server]
        lines = session.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n")
        self.assertEqual(lines, [])
        data_file = transaction._file
        self.assertIsNotNone(data_file)
        for _ in range(100):
            session.server.dataReceived(b"y" * 70 + b"\r\n")
        # The file was closed (discarded) at the limit, well before 7 kB.
        self.assertTrue(data_file.closed)
        self.assertLessEqual(transaction._size, 2000 + 72)
        lines = session.send(b".\r\n")
        self.assertEqual(lines, [b"552 5.3.4 Error: message file too big"])
        self.assertEqual(written, [])
        self.assertEqual(session.spool.messages, [])
        # The session goes on.
        lines = session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                             b"DATA\r\nsmall\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])


class ReceivedHeaderTests(SynchronousTestCase):
    def test_form_with_one_recipient(self):
        session = Session(self)
        session.replies()
        session.send(b"EHLO client.example.net\r\nMAIL FROM:<a@x.example>\r\n"
                     b"RCPT TO:<b@y.example>\r\nDATA\r\nSubject: s\r\n\r\nb\r\n.\r\n")
        content = session.spool.messages[0]["content"]
        header, _, rest = content.partition(b"\r\nSubject: s")
        self.assertRegex(
            header.decode(),
            r"^Received: from client\.example\.net \(\[127\.0\.0\.1\]\)\r\n"
            r"\tby mx\.example\.org \(relayagent\) with ESMTP\r\n"
            r"\tfor <b@y\.example>; \w{3}, \d\d \w{3} 2023 \d\d:\d\d:\d\d [+-]\d{4}$",
        )

    def test_form_with_several_recipients_and_helo(self):
        session = Session(self)
        session.replies()
        session.send(b"HELO client\r\nMAIL FROM:<a@x.example>\r\n"
                     b"RCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\nb\r\n.\r\n")
        content = session.spool.messages[0]["content"].decode()
        first = content.split("\r\n")[:3]
        self.assertEqual(first[0], "Received: from client ([127.0.0.1])")
        self.assertEqual(first[1], "\tby mx.example.org (relayagent) with SMTP;")
        self.assertNotIn("for <", content)
        # Twisted puts a blank line between our header and a headerless body.
        self.assertEqual(content.split("\r\n")[3:5], ["", "b"])

    def test_ipv6_literal_and_unsafe_helo(self):
        session = Session(self, peer="::1")
        session.replies()
        session.send(b"EHLO bad;name\nX-Forged: yes\r\nMAIL FROM:<a@x.example>\r\n"
                     b"RCPT TO:<b@y.example>\r\nDATA\r\nb\r\n.\r\n")
        content = session.spool.messages[0]["content"].decode()
        self.assertTrue(content.startswith("Received: from bad?name?X-Forged:?yes ([IPv6:::1])\r\n"),
                        content)

    def test_hop_count(self):
        session = Session(self, hopcount_limit="5")
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        lines = session.send(b"Received: from a\r\n" * 3 + b"Subject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(lines), [250])  # 3 + ours = 4 < 5
        session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        lines = session.send(b"Received: from a\r\n\tby b\r\n" * 4 + b"\r\nbody\r\n.\r\n")
        self.assertEqual(lines, [b"554 5.4.0 Error: too many hops"])
        self.assertEqual(len(session.spool.messages), 1)

    def test_received_in_body_does_not_count(self):
        session = Session(self, hopcount_limit="2")
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                             b"DATA\r\nSubject: x\r\n\r\nReceived: x\r\nReceived: y\r\n.\r\n")
        self.assertEqual(codes(lines)[-1], 250)


class PipeliningTests(SynchronousTestCase):
    def test_replies_wait_for_a_slow_enqueue(self):
        spool = FakeSpool(deferred=True)
        session = Session(self, spool=spool)
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                             b"DATA\r\nbody\r\n.\r\nQUIT\r\n")
        # Nothing after 354 until the enqueue is durable: QUIT is held.
        self.assertEqual(codes(lines), [250, 250, 250, 354])
        self.assertFalse(session.transport.disconnecting)
        deferred, queue_id = spool.pending.pop()
        deferred.callback(queue_id)
        lines = session.replies()
        self.assertEqual(codes(lines), [250, 221])
        self.assertTrue(session.transport.disconnecting)

    def test_many_held_lines_pause_reading(self):
        spool = FakeSpool(deferred=True)
        session = Session(self, spool=spool)
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                     b"DATA\r\nbody\r\n.\r\n" + b"NOOP\r\n" * 1500)
        self.assertEqual(session.transport.producerState, "paused")
        deferred, queue_id = spool.pending.pop()
        deferred.callback(queue_id)
        self.assertEqual(session.transport.producerState, "producing")
        self.assertEqual(codes(session.replies()).count(500), 1500)  # NOOP unknown to Twisted

    def test_overlong_line_ends_the_session(self):
        session = Session(self)
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        lines = session.send(b"x" * (RelayagentESMTP.MAX_LENGTH + 10))
        self.assertEqual(lines, [b"552 5.3.4 Error: line too long; closing connection"])
        self.assertTrue(session.transport.disconnecting)
        self.assertEqual(session.spool.messages, [])


class SessionLifetimeTests(SynchronousTestCase):
    def test_a_closed_session_is_not_kept(self):
        """Once its connection is lost, nothing of a session stays in the
        intake: its protocol is the key of a weak map whose value (the
        transaction) must not hold it, or every session that queued mail
        stays in memory for the daemon's life."""
        import gc
        import weakref

        session = Session(self)
        session.replies()
        lines = session.send(TRANSACTION + b"QUIT\r\n")
        self.assertEqual(codes(lines)[-2:], [250, 221])
        intake, server = session.intake, weakref.ref(session.server)
        session.close()
        # The cleanup's close finds a closed session.
        session.server = types.SimpleNamespace(setTimeout=lambda timeout: None)
        session.transport = types.SimpleNamespace(disconnecting=True)
        gc.collect()
        self.assertIsNone(server(), "the protocol outlived its connection")
        self.assertEqual(len(intake._transactions), 0)


class ServicesTests(SynchronousTestCase):
    def test_no_endpoints_no_services(self):
        self.assertEqual(make_listener_services(make_config(), spool=FakeSpool()), [])

    def test_one_service_per_endpoint(self):
        config = make_config(smtpd_endpoints="tcp:10587:interface=127.0.0.1, unix:/tmp/x.sock")
        services = make_listener_services(config, spool=FakeSpool())
        self.assertEqual(len(services), 2)
        self.assertTrue(all(re.match("StreamServerEndpointService", type(s).__name__)
                            for s in services))


class QuietFactoryTests(SynchronousTestCase):
    def test_start_and_stop_say_nothing(self):
        # Its events are relayagent's and would reach the maillog.
        factory = Session(self).server.factory
        events = []
        globalLogPublisher.addObserver(events.append)
        try:
            factory.doStart()
            factory.doStop()
        finally:
            globalLogPublisher.removeObserver(events.append)
        self.assertEqual([e.get("log_format") for e in events if "actory" in str(e.get("log_format"))], [])


class AddressSyntaxTests(SynchronousTestCase):
    """Client data that would break a header or an SMTP command line
    later (the Received header, the queue file, RCPT TO to the next hop)
    never gets into the spool, and never costs a traceback."""

    def send_one(self, rcpt: bytes, *, sender: bytes = b"<a@x.example>", peer: str = "127.0.0.1"):
        session = Session(self, peer=peer)
        session.replies()
        session.send(b"EHLO c\r\n")
        lines = session.send(b"MAIL FROM:" + sender + b"\r\nRCPT TO:" + rcpt + b"\r\n")
        return session, lines

    def test_control_characters_in_a_quoted_recipient(self):
        for rcpt in (b'<"a\nX-Injected: 1"@remote.example>', b'<"a\rRSET"@remote.example>',
                     b'<"a\x00b"@remote.example>', b'<"a\x7fb"@remote.example>',
                     b'<"a\tb"@remote.example>'):
            session, lines = self.send_one(rcpt)
            self.assertEqual(lines[-1], b"501 5.1.3 Bad recipient address syntax", rcpt)
            session.send(b"DATA\r\nx\r\n.\r\n")
            self.assertEqual(session.spool.messages, [], rcpt)

    def test_control_characters_in_a_quoted_sender(self):
        for sender in (b'<"a\nX-Injected: 1"@x.example>', b'<"a\rb"@x.example>', b'<"a\x00"@x.example>'):
            session, lines = self.send_one(b"<b@remote.example>", sender=sender)
            self.assertEqual(lines[0], b"501 5.1.7 Bad sender address syntax", sender)
            self.assertEqual(codes(lines)[-1], 503, sender)  # no sender, so no RCPT
            session.send(b"DATA\r\nx\r\n.\r\n")
            self.assertEqual(session.spool.messages, [], sender)

    def test_eight_bit_addresses_without_smtputf8(self):
        # We do not offer SMTPUTF8 (RFC 6531): an 8-bit address is refused
        # as Postfix refuses it, and str() of it never raises.
        for peer in ("127.0.0.1", "192.0.2.7"):
            session, lines = self.send_one(b'<"a\xffb"@remote.example>', peer=peer)
            self.assertEqual(lines[-1], b"553 5.6.7 Must declare SMTPUTF8 to send unicode address")
            session, lines = self.send_one(b"<b@remote.example>", sender=b'<"\xc3\xa9"@x.example>',
                                           peer=peer)
            self.assertEqual(lines[0], b"553 5.6.7 Must declare SMTPUTF8 to send unicode address")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_odd_but_valid_addresses_from_mynetworks(self):
        # A source route is dropped (RFC 5321 appendix C); quoted local
        # parts and "%" are left to the next hop, as Postfix relays them.
        for rcpt, queued in ((b"<@a.example,@b.example:u@remote.example>", "u@remote.example"),
                             (b"<u%remote.example@relay.example>", "u%remote.example@relay.example"),
                             (b'<"u@remote.example"@relay.example>', '"u@remote.example"@relay.example'),
                             (b"<u@remote.example.>", "u@remote.example.")):
            session, lines = self.send_one(rcpt)
            session.send(b"DATA\r\nx\r\n.\r\n")
            self.assertEqual([m["recipients"] for m in session.spool.messages], [[queued]], rcpt)

    def test_no_route_relays_for_a_stranger(self):
        for rcpt in (b"<@mx.example.org:u@remote.example>", b"<u%remote.example@mx.example.org>",
                     b'<"u@remote.example"@mx.example.org>', b"<u@remote.example.>",
                     b"<U@REMOTE.EXAMPLE>", b"<u@mx.example.org.>", b"<u@xn--bcher-kva.example>"):
            session, lines = self.send_one(rcpt, peer="192.0.2.7")
            self.assertEqual(codes(lines)[-1], 554, rcpt)
            session.send(b"DATA\r\nx\r\n.\r\n")
            self.assertEqual(session.spool.messages, [], rcpt)


class DiskFullTests(SynchronousTestCase):
    """The queue file system short of space: 452 4.3.1 at MAIL FROM, as
    Postfix's smtpd_check_queue; a write failing later: 451 4.3.0 at the
    final "."; one warning line each, and the session goes on."""

    MAIL = b"EHLO c\r\nMAIL FROM:<a@x.example>\r\n"

    def session(self, free_bytes: int, **config: str) -> Session:
        self.statvfs = FakeStatvfs(free_bytes)
        session = Session(self, spool=FakeSpool(directory=self.mktemp()), statvfs=self.statvfs, **config)
        session.replies()
        return session

    def test_below_one_and_a_half_size_limits(self):
        events = capture_events(self)
        session = self.session(15_000_000)  # < 1.5 * 10240000
        lines = session.send(self.MAIL)
        self.assertEqual(lines[-1], b"452 4.3.1 Insufficient system storage")
        self.assertEqual(self.statvfs.asked, [session.spool.directory])
        self.assertEqual(warnings_in(events), [
            "warning: not enough free space in mail queue: 14999552 bytes < "
            "1.5*message size limit (10240000 bytes)",
        ])
        self.assertEqual(self.flushLoggedErrors(), [])
        # No transaction began: RCPT needs a MAIL first.
        lines = session.send(b"RCPT TO:<b@y.example>\r\n")
        self.assertEqual(codes(lines), [503])

    def test_enough_room_is_accepted(self):
        session = self.session(16_000_000)
        lines = session.send(self.MAIL + b"RCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 250, 354, 250])

    def test_below_queue_minfree(self):
        events = capture_events(self)
        session = self.session(50_000_000, queue_minfree="60000000")
        lines = session.send(self.MAIL)
        self.assertEqual(lines[-1], b"452 4.3.1 Insufficient system storage")
        self.assertIn("< queue_minfree (60000000 bytes)", warnings_in(events)[0])

    def test_no_size_limit_no_minfree_refuses_only_a_full_disk(self):
        # Postfix's sums in blocks: 0 >= free blocks only when none is free.
        session = self.session(4096, message_size_limit="0")
        self.assertEqual(codes(session.send(self.MAIL)), [250, 250])
        session = self.session(4095, message_size_limit="0")
        self.assertEqual(session.send(self.MAIL)[-1], b"452 4.3.1 Insufficient system storage")

    def test_space_returns(self):
        session = self.session(1_000_000)
        self.assertEqual(session.send(self.MAIL)[-1][:3], b"452")
        self.statvfs.free_bytes = 100_000_000
        lines = session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                             b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        self.assertEqual(len(session.spool.messages), 1)

    def test_size_over_limit_is_552_before_the_space_check(self):
        # Postfix: smtpd_check_size (552, permanent) before smtpd_check_queue.
        session = self.session(1_000_000)
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example> SIZE=20000000\r\n")
        self.assertEqual(lines[-1], b"552 5.3.4 Message size exceeds fixed limit")
        self.assertEqual(self.statvfs.asked, [])

    def test_statvfs_failure_is_not_a_refusal(self):
        def failing(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

        session = Session(self, spool=FakeSpool(directory=self.mktemp()), statvfs=failing)
        session.replies()
        self.assertEqual(codes(session.send(self.MAIL)), [250, 250])

    def patch_temporary_file(self, room: int) -> list[FailingFile]:
        import relayagent.smtpd.twistedmail as glue

        made: list[FailingFile] = []

        def temporary_file(dir=None):
            made.append(FailingFile(room))
            return made[-1]

        self.patch(glue.tempfile, "TemporaryFile", temporary_file)
        return made

    def test_write_failing_during_data_is_451_and_one_line(self):
        events = capture_events(self)
        made = self.patch_temporary_file(room=500)
        session = self.session(100_000_000)
        session.send(self.MAIL + b"RCPT TO:<b@y.example>\r\nDATA\r\n")
        lines = session.send(b"Subject: x\r\n\r\n" + b"y" * 70 * 100 + b"\r\n" * 50)
        self.assertEqual(lines, [])  # the rest of the data is read and dropped
        self.assertTrue(made[0].closed)
        lines = session.send(b".\r\n")
        self.assertEqual(lines, [b"451 4.3.0 Error: queue file write error"])
        self.assertEqual(session.spool.messages, [])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(warnings_in(events), [
            "warning: DATA from unknown[127.0.0.1]: 451 4.3.0 Error: queue file write error: "
            "No space left on device",
        ])
        # The session goes on, and so does the next transaction once
        # there is room.
        made_before = len(made)
        self.patch_temporary_file(room=10**6)
        lines = session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                             b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        self.assertEqual(len(session.spool.messages), 1)
        self.assertEqual(made_before, 1)

    def test_temporary_file_cannot_be_made(self):
        import relayagent.smtpd.twistedmail as glue

        def temporary_file(dir=None):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(glue.tempfile, "TemporaryFile", temporary_file)
        session = self.session(100_000_000)
        lines = session.send(self.MAIL + b"RCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_flush_failing_at_the_dot(self):
        class FailingFlush(FailingFile):
            def flush(self) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            def close(self) -> None:
                self.closed = True
                self.flush()  # as a buffered file's close does

        import relayagent.smtpd.twistedmail as glue

        made: list[FailingFile] = []
        self.patch(glue.tempfile, "TemporaryFile", lambda dir=None: made.append(FailingFlush(10**6)) or made[-1])
        session = self.session(100_000_000)
        lines = session.send(self.MAIL + b"RCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertTrue(made[0].closed)
        self.assertEqual(session.spool.messages, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_session_closed_by_the_client_after_a_failed_write(self):
        made = self.patch_temporary_file(room=10)
        session = self.session(100_000_000)
        session.send(self.MAIL + b"RCPT TO:<b@y.example>\r\nDATA\r\n" + b"z" * 100 + b"\r\n")
        session.server.connectionLost(None)
        self.assertTrue(made[0].closed)
        self.assertEqual(self.flushLoggedErrors(), [])



class ManualThreadPool:
    """A thread pool that runs each call only when the test says so."""

    def __init__(self):
        self.calls = []

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        self.calls.append((on_result, function, args, kwargs))

    def run_next(self):
        on_result, function, args, kwargs = self.calls.pop(0)
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class ImmediateReactor:
    """What deferToThreadPool needs of a reactor: callFromThread, at once."""

    def callFromThread(self, function, *args, **kwargs):
        function(*args, **kwargs)


class QueueFileWrittenOnceTests(SynchronousTestCase):
    """With the spool's writer (``Spool.new_message``) DATA goes once,
    into the queue file, with no temporary file; the 250 only after the
    file's fsync, its link and the fsync of incoming/."""

    def setUp(self):
        self.events = []
        self.spool = Spool(self.mktemp(), fsync_directory=self.fsync_directory)
        self.spool.ensure_layout()
        real_fsync = os.fsync

        def fsync(fd):
            self.events.append("fsync file")
            real_fsync(fd)

        self.patch(spool_module.os, "fsync", fsync)
        self.session = None

    def fsync_directory(self, path):
        entries = sorted(os.listdir(path))
        acknowledged = self.session is not None and b"queued as" in self.session.transport.value()
        self.events.append((f"fsync {os.path.basename(path)}", len(entries), acknowledged))

    def tmp_entries(self):
        return os.listdir(os.path.join(self.spool.directory, "tmp"))

    def test_no_temporary_file_and_nothing_acknowledged_before_the_fsyncs(self):
        def no_temporary_file(dir=None):
            raise AssertionError("a temporary file was made")

        import relayagent.smtpd.intake as intake_module

        self.patch(intake_module.tempfile, "TemporaryFile", no_temporary_file)
        self.session = Session(self, spool=self.spool)
        self.session.replies()
        lines = self.session.send(TRANSACTION)
        self.assertEqual(codes(lines), [250, 250, 250, 250, 250, 354, 250])
        (queue_id,) = self.spool.queue_ids("incoming")
        self.assertTrue(lines[-1].endswith(b"queued as " + queue_id.encode()), lines[-1])
        # The file's fsync, then the directory's with the entry in it,
        # both before the 250 was written.
        self.assertEqual(self.events, ["fsync file", ("fsync incoming", 1, False)])
        with self.spool.open(queue_id, "incoming") as queue_file:
            queue_file.verify_content()
            self.assertEqual(len(queue_file.envelope.recipients), 3)
            with queue_file.open_content() as content:
                data = content.read()
        self.assertTrue(data.startswith(b"Received: from client.example.net"), data[:40])
        self.assertTrue(data.endswith(b"\r\nSubject: hello\r\n\r\n.a line that starts with a dot\r\nbody\r\n"),
                        data)
        self.assertEqual(self.tmp_entries(), [])

    def threaded_session(self):
        self.pool = ManualThreadPool()
        self.session = Session(self, spool=ThreadedSpool(self.spool, ImmediateReactor(), self.pool))
        self.session.replies()
        return self.session

    def test_through_the_thread_pool_one_hand_off_and_no_250_before_it_returns(self):
        session = self.threaded_session()
        real_write = os.write
        writes = []
        self.patch(spool_module.os, "write",
                   lambda fd, data: writes.append(len(data)) or real_write(fd, data))
        lines = session.send(TRANSACTION + b"QUIT\r\n")
        self.assertEqual(codes(lines), [250, 250, 250, 250, 250, 354])  # QUIT held
        self.assertEqual(len(self.pool.calls), 1)  # one hand-off for the message
        # Written out here, in one write, the whole file; not yet fsynced
        # nor queued: the fsyncs and the link are all in the pool's call.
        self.assertEqual(len(writes), 1)
        (name,) = self.tmp_entries()
        self.assertEqual(os.path.getsize(os.path.join(self.spool.directory, "tmp", name)), writes[0])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        self.assertEqual(self.events, [])
        self.pool.run_next()
        self.assertEqual(len(writes), 1)
        self.assertEqual(self.events, ["fsync file", ("fsync incoming", 1, False)])
        self.assertEqual(codes(session.replies()), [250, 221])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [name])
        self.assertEqual(self.tmp_entries(), [])

    def test_through_the_thread_pool_a_failed_write_out_is_451_at_once(self):
        events = capture_events(self)
        session = self.threaded_session()
        real_write = os.write

        def full_disk(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(spool_module.os, "write", full_disk)
        lines = session.send(TRANSACTION)
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertEqual(self.pool.calls, [])  # nothing handed to the pool
        self.assertEqual(self.tmp_entries(), [])
        self.assertEqual(warnings_in(events), [
            "warning: DATA from unknown[127.0.0.1]: 451 4.3.0 Error: queue file write error: "
            "No space left on device",
        ])
        self.patch(spool_module.os, "write", real_write)
        session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        self.pool.run_next()
        self.assertEqual(codes(session.replies()), [250])
        self.assertEqual(len(list(self.spool.queue_ids("incoming"))), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_through_the_thread_pool_a_failed_file_fsync_is_451_and_nothing_left(self):
        events = capture_events(self)
        session = self.threaded_session()
        session.send(TRANSACTION)

        def failing(fd):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(spool_module.os, "fsync", failing)
        self.pool.run_next()
        self.assertEqual(session.replies(), [b"451 4.3.0 Error: queue file write error"])
        self.assertEqual(self.tmp_entries(), [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        self.assertEqual(warnings_in(events), [
            "warning: DATA from unknown[127.0.0.1]: 451 4.3.0 Error: queue file write error: "
            "Input/output error",
        ])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_commit_failing_is_451_and_nothing_left(self):
        def failing(path):
            raise OSError(errno.EIO, "Input/output error")

        events = capture_events(self)
        spool = Spool(self.mktemp(), fsync_directory=failing)
        spool.ensure_layout()
        session = Session(self, spool=spool)
        session.replies()
        lines = session.send(TRANSACTION)
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertEqual(list(spool.queue_ids("incoming")), [])
        self.assertEqual(os.listdir(os.path.join(spool.directory, "tmp")), [])
        self.assertEqual(warnings_in(events), [
            "warning: DATA from unknown[127.0.0.1]: 451 4.3.0 Error: queue file write error: "
            "Input/output error",
        ])
        self.assertEqual(self.flushLoggedErrors(), [])

    def big_message_spool(self, memory_limit=1000):
        spool = self.spool

        class SmallMemory:
            directory = spool.directory

            def new_message(self, *args, **kwargs):
                return spool.new_message(*args, memory_limit=memory_limit, **kwargs)

        return SmallMemory()

    def test_past_the_memory_limit_the_content_streams_into_the_file(self):
        session = Session(self, spool=self.big_message_spool())
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        session.send(b"Subject: big\r\n\r\n" + (b"z" * 700 + b"\r\n") * 100 + b"..dot\r\n" * 100)
        self.assertEqual(len(self.tmp_entries()), 1)  # spilled, not queued
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        lines = session.send(b".\r\n")
        self.assertEqual(codes(lines), [250])
        (queue_id,) = self.spool.queue_ids("incoming")
        with self.spool.open(queue_id, "incoming") as queue_file:
            queue_file.verify_content()
            with queue_file.open_content() as content:
                data = content.read()
        self.assertTrue(data.endswith(b"\r\nSubject: big\r\n\r\n" + (b"z" * 700 + b"\r\n") * 100 + b".dot\r\n" * 100))
        self.assertEqual(self.tmp_entries(), [])

    def test_over_the_size_limit_nothing_is_kept(self):
        session = Session(self, spool=self.big_message_spool(), message_size_limit="5000")
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
                             + (b"y" * 998 + b"\r\n") * 10 + b".\r\n")
        self.assertEqual(lines[-1], b"552 5.3.4 Error: message file too big")
        self.assertEqual(self.tmp_entries(), [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])

    def test_write_failing_past_the_memory_limit_is_451_and_the_session_goes_on(self):
        events = capture_events(self)
        session = Session(self, spool=self.big_message_spool())
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
        real_write = os.write

        def full_disk(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(spool_module.os, "write", full_disk)
        self.assertEqual(session.send(b"Subject: x\r\n\r\n" + (b"y" * 700 + b"\r\n") * 100), [])
        self.assertEqual(session.send(b".\r\n"), [b"451 4.3.0 Error: queue file write error"])
        self.assertEqual(self.tmp_entries(), [])
        self.assertEqual(warnings_in(events), [
            "warning: DATA from unknown[127.0.0.1]: 451 4.3.0 Error: queue file write error: "
            "No space left on device",
        ])
        self.patch(spool_module.os, "write", real_write)
        lines = session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\nx\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        self.assertEqual(len(list(self.spool.queue_ids("incoming"))), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_during_data_leaves_nothing(self):
        session = Session(self, spool=self.big_message_spool())
        session.replies()
        session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"
                     + (b"z" * 700 + b"\r\n") * 100)
        self.assertEqual(len(self.tmp_entries()), 1)
        session.server.connectionLost(None)
        self.assertEqual(self.tmp_entries(), [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])

    def test_envelope_the_spool_refuses_is_451(self):
        class Refusing:
            directory = self.spool.directory

            def new_message(self, *args, **kwargs):
                raise ValueError("recipient address refused")

        session = Session(self, spool=Refusing())
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                             b"DATA\r\nx\r\n.\r\n")
        self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_the_writer_gets_a_small_message_in_one_piece(self):
        spool = self.spool
        pieces = []

        class Counting:
            directory = spool.directory

            def new_message(self, *args, **kwargs):
                message = spool.new_message(*args, **kwargs)
                real_write = message.write
                message.write = lambda data: pieces.append(len(data)) or real_write(data)
                return message

        session = Session(self, spool=Counting())
        session.replies()
        self.assertEqual(codes(session.send(TRANSACTION))[-1], 250)
        self.assertEqual(len(pieces), 1)

    def test_envelope_refused_by_the_writer_is_451_and_leaves_nothing(self):
        spool = self.spool

        class NoRecipients:
            directory = spool.directory

            def new_message(self, sender, recipients, **kwargs):
                return spool.new_message(sender, [], memory_limit=10, **kwargs)

        for body in (b"x\r\n", b"Subject: s\r\n\r\n" + (b"y" * 700 + b"\r\n") * 100):
            session = Session(self, spool=NoRecipients())
            session.replies()
            lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                                 b"DATA\r\n" + body + b".\r\n")
            self.assertEqual(lines[-1], b"451 4.3.0 Error: queue file write error")
            self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
            self.assertEqual(self.tmp_entries(), [])
            self.assertEqual(list(self.spool.queue_ids("incoming")), [])

    def test_empty_message_is_its_received_header(self):
        session = Session(self, spool=self.spool)
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n.\r\n")
        self.assertEqual(codes(lines)[-1], 250)
        (queue_id,) = self.spool.queue_ids("incoming")
        with self.spool.open(queue_id, "incoming") as queue_file, queue_file.open_content() as content:
            self.assertTrue(content.read().startswith(b"Received: from c"))



class DataInBulkTests(SynchronousTestCase):
    """Past its first line, DATA goes to the intake in one call per read
    for the header and one for the body (``RelayagentESMTP._data_in_bulk``):
    the queued content and the replies are what Twisted's line-by-line
    path makes of the same input, however the input is cut."""

    MANY_BODY_LINES = (b"Subject: s\r\n\r\n" + b"".join(b"line %d\r\n.%d\r\n" % (n, n) for n in range(300))
                       + b".\r\n")
    MANY_HEADER_LINES = b"Subject: s\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(300)) + b"\r\nb\r\n.\r\n"
    MESSAGES = [
        b"Subject: s\r\n\r\nbody\r\n..dot\r\n.\r\n",
        b"Subject: s\r\n\r\n..\r\n...\r\n.x\r\n\r\n\r\nend\r\n.\r\n",
        b"no header line\r\n..dot\r\nmore\r\n.\r\n",
        b"Subject: s\r\nX-A: b\r\n\r\na\rb\nc\r\n\r\r\n.\r\r\n.\r\n",
        b"Subject: only a header\r\n.\r\n",
        b".\r\n",
        MANY_BODY_LINES,
        # Header lines: folded, dot-stuffed, the Message-ID, Received.
        b"Received: from a\r\n\tby b\r\nMessage-ID: <m@x>\r\n..X-Dot: d\r\n"
        b"Subject: s\r\n\r\nbody\r\n.\r\n",
        MANY_HEADER_LINES,
        b"Subject: s\r\nX-A: b\r\n.\r\n",
        b"Subject: s\r\n..\r\nX-A: b\r\n\r\n.\r\n",
    ]
    ENVELOPE = b"EHLO c\r\nMAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nRCPT TO:<c@y.example>\r\nDATA\r\n"

    def queued(self, message, cut, *, bulk=True):
        if not bulk:
            self.patch(RelayagentESMTP, "_data_in_bulk", lambda self: False)
        session = Session(self)
        session.replies()
        data = self.ENVELOPE + message + b"QUIT\r\n"
        replies = []
        for start in range(0, len(data), cut):
            replies += session.send(data[start:start + cut])
        if not bulk:
            self.patch(RelayagentESMTP, "_data_in_bulk", DataInBulkTests.real_bulk)
        return codes(replies), [m["content"] for m in session.spool.messages]

    real_bulk = RelayagentESMTP._data_in_bulk

    def test_same_content_as_line_by_line(self):
        for message in self.MESSAGES:
            expected = self.queued(message, 1 << 20, bulk=False)
            self.assertEqual(expected[0], [250, 250, 250, 250, 354, 250, 221])
            for cut in (1, 2, 3, 7, 64, 1000, 1 << 20):
                self.assertEqual(self.queued(message, cut), expected, (message[:40], cut))

    def test_bulk_is_taken_for_the_body(self):
        calls = []
        real = RelayagentESMTP._data_in_bulk

        def counting(server):
            taken = real(server)
            calls.append(taken)
            return taken

        self.patch(RelayagentESMTP, "_data_in_bulk", counting)
        self.queued(self.MANY_BODY_LINES, 1 << 20)
        # The header's empty line, then 600 body lines in one piece.
        self.assertEqual(calls.count(True), 2)

    def test_bulk_is_taken_for_the_header(self):
        from relayagent.smtpd import intake

        lines = []
        real = intake._Transaction.line

        def counting(transaction, receiver, line):
            lines.append(line)
            return real(transaction, receiver, line)

        self.patch(intake._Transaction, "line", counting)
        codes_, (content,) = self.queued(self.MANY_HEADER_LINES, 1 << 20)
        self.assertEqual(codes_[-2:], [250, 221])
        # Only the first line takes Twisted's path, once per recipient;
        # the 300 header lines after it and the body do not.
        self.assertEqual(lines, [b"Subject: s", b"Subject: s"])
        self.assertIn(b"\r\nX-H299: v\r\n\r\nb\r\n", content)

    def test_too_many_hops_in_bulk(self):
        message = b"Subject: s\r\n" + b"Received: from a\r\n\tby b\r\n" * 60 + b"\r\nbody\r\n.\r\n"
        expected = self.queued(message, 1 << 20, bulk=False)
        self.assertEqual(expected, ([250, 250, 250, 250, 354, 554, 221], []))
        for cut in (1, 5, 64, 1 << 20):
            self.assertEqual(self.queued(message, cut), expected, cut)

    def test_size_limit_in_bulk(self):
        session = Session(self, message_size_limit="3000")
        session.replies()
        lines = session.send(self.ENVELOPE + b"Subject: s\r\n\r\n" + (b"y" * 100 + b"\r\n") * 40)
        self.assertEqual(codes(lines), [250, 250, 250, 250, 354])
        lines = session.send((b"y" * 100 + b"\r\n") * 40 + b".\r\nMAIL FROM:<a@x.example>\r\n")
        self.assertEqual(lines, [b"552 5.3.4 Error: message file too big", b"250 Sender address accepted"])
        self.assertEqual(session.spool.messages, [])


class OriginalRecipientTests(SynchronousTestCase):
    """The listener offers DSN (RFC 3461): what a client gives is kept, and
    nothing is invented for the queue file when it gives nothing (the
    ESMTP client and the DSN writer derive rfc822;<address>)."""

    def test_queued_recipients_have_no_invented_orcpt(self):
        from relayagent.spool import Spool

        spool = Spool(self.mktemp())
        spool.ensure_layout()
        session = Session(self, spool=spool)
        session.replies()
        lines = session.send(TRANSACTION)
        self.assertEqual(codes(lines)[-1], 250)
        (queue_id,) = spool.queue_ids("incoming")
        with spool.open(queue_id, "incoming") as queue_file:
            recipients = queue_file.envelope.recipients
        self.assertEqual([(r.address, r.orcpt) for r in recipients], [
            ("bob@remote.example", None),
            ("carol@remote.example", None),
            ("dave@elsewhere.example", None),
        ])


def dsn_spool(testcase):
    from relayagent.spool import Spool

    spool = Spool(testcase.mktemp())
    spool.ensure_layout()
    return spool


def queued_envelope(spool):
    (queue_id,) = spool.queue_ids("incoming")
    with spool.open(queue_id, "incoming") as queue_file:
        return queue_file.envelope


class DSNTests(SynchronousTestCase):
    """RET, ENVID, NOTIFY and ORCPT are offered, checked and queued."""

    def test_dsn_in_ehlo(self):
        session = Session(self)
        session.replies()
        keywords = {line[4:].split(b" ")[0] for line in session.send(b"EHLO c\r\n")}
        self.assertIn(b"DSN", keywords)
        self.assertNotIn(b"XRELAYAGENT-ARRIVAL", keywords)

    def test_parameters_reach_the_queue_file(self):
        from relayagent.common.envelope import Notify, Ret

        spool = dsn_spool(self)
        session = Session(self, spool=spool)
        session.replies()
        lines = session.send(
            b"EHLO c\r\nMAIL FROM:<a@x.example> RET=HDRS ENVID=QQ+2B1\r\n"
            b"RCPT TO:<b@y.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B+2Bold@y.example\r\n"
            b"RCPT TO:<c@y.example> NOTIFY=NEVER\r\n"
            b"RCPT TO:<d@y.example>\r\n"
            b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 250, 250, 250, 354, 250])
        envelope = queued_envelope(spool)
        self.assertEqual(envelope.ret, Ret.HDRS)
        self.assertEqual(envelope.envid, "QQ+1")
        self.assertEqual([(r.address, r.orcpt, r.notify) for r in envelope.recipients], [
            ("b@y.example", "rfc822;B+old@y.example", Notify.SUCCESS | Notify.DELAY),
            ("c@y.example", None, Notify.NEVER),
            ("d@y.example", None, Notify.DEFAULT),
        ])

    def test_malformed_parameters_are_501(self):
        session = Session(self)
        session.replies()
        for command, reply in [
            (b"MAIL FROM:<a@x.example> RET=SOME", b"501 5.5.4 Bad RET parameter syntax"),
            (b"MAIL FROM:<a@x.example> ENVID=a+zz", b"501 5.5.4 Bad ENVID parameter syntax"),
            (b"MAIL FROM:<a@x.example> RET=FULL RET=HDRS", b"501 5.5.4 Duplicate MAIL parameter: RET"),
        ]:
            self.assertEqual(session.send(b"RSET\r\n" + command + b"\r\n")[-1], reply)
        session.send(b"RSET\r\nMAIL FROM:<a@x.example>\r\n")
        for command, reply in [
            (b"RCPT TO:<b@y.example> NOTIFY=NEVER,SUCCESS", b"501 5.5.4 Bad NOTIFY parameter syntax"),
            (b"RCPT TO:<b@y.example> ORCPT=rfc822", b"501 5.5.4 Bad ORCPT parameter syntax"),
            (b"RCPT TO:<b@y.example> ORCPT=rfc822;a+0Ab@y", b"501 5.5.4 Bad ORCPT parameter syntax"),
        ]:
            self.assertEqual(session.send(command + b"\r\n")[-1], reply)

    def test_arrival_is_refused_without_auth(self):
        session = Session(self)
        session.replies()
        lines = session.send(b"EHLO c\r\nMAIL FROM:<a@x.example> ARRIVAL=1600000000\r\n")
        self.assertEqual(lines[-1], b"555 5.5.4 Unsupported option: ARRIVAL")


def cram_md5_response(challenge_line: bytes, username: bytes, password: bytes) -> bytes:
    import base64
    import hashlib
    import hmac

    challenge = base64.b64decode(challenge_line[4:])
    digest = hmac.new(password, challenge, hashlib.md5).hexdigest().encode()
    return base64.b64encode(username + b" " + digest)


class AuthTests(SynchronousTestCase):
    """AUTH CRAM-MD5 against smtpd_sasl_password_maps; an authenticated
    client relays from outside mynetworks and may give ARRIVAL=."""

    def auth_session(self, **config):
        config.setdefault("smtpd_sasl_auth_enable", "yes")
        config.setdefault("smtpd_sasl_password_maps", "inline:{ node-a=s3cret }")
        return Session(self, peer="192.0.2.9", mynetworks="127.0.0.0/8", **config)

    def test_auth_off_by_default(self):
        session = Session(self)
        session.replies()
        keywords = {line[4:].split(b" ")[0] for line in session.send(b"EHLO c\r\n")}
        self.assertNotIn(b"AUTH", keywords)
        # Postfix: "503 5.5.1 Error: authentication not enabled".
        self.assertEqual(codes(session.send(b"AUTH CRAM-MD5\r\n")), [503])

    def test_wrong_password_is_535_and_no_relay(self):
        session = self.auth_session()
        session.replies()
        ehlo = session.send(b"EHLO c\r\n")
        self.assertIn(b"250-AUTH CRAM-MD5", ehlo)
        events = capture_events(self)
        challenge = session.send(b"AUTH CRAM-MD5\r\n")[-1]
        reply = session.send(cram_md5_response(challenge, b"node-a", b"wrong") + b"\r\n")
        self.assertEqual(reply, [b"535 5.7.8 Error: authentication failed"])
        text = "\n".join(warnings_in(events))
        self.assertIn("SASL CRAM-MD5 authentication failed for user node-a", text)
        self.assertNotIn("wrong", text)
        lines = session.send(b"MAIL FROM:<a@x.example> ARRIVAL=1600000000\r\n")
        self.assertEqual(lines[-1], b"555 5.5.4 Unsupported option: ARRIVAL")
        lines = session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n")
        self.assertEqual(lines[-1], b"554 5.7.1 <b@y.example>: Relay access denied")

    def test_authenticated_peer_relays_with_its_arrival_time(self):
        from relayagent.common import maillog as ralog

        events = capture_events(self)
        spool = dsn_spool(self)
        session = self.auth_session(spool=spool)
        session.replies()
        self.assertNotIn(b"250 XRELAYAGENT-ARRIVAL", session.send(b"EHLO c\r\n"))
        challenge = session.send(b"AUTH CRAM-MD5\r\n")[-1]
        self.assertEqual(codes([challenge]), [334])
        reply = session.send(cram_md5_response(challenge, b"node-a", b"s3cret") + b"\r\n")
        self.assertEqual(codes(reply), [235])
        ehlo = session.send(b"EHLO c\r\n")
        self.assertIn(b"XRELAYAGENT-ARRIVAL", b"".join(line[4:] + b"|" for line in ehlo).split(b"|"))
        lines = session.send(b"MAIL FROM:<a@x.example> ARRIVAL=1600000000\r\n"
                             b"RCPT TO:<b@y.example>\r\nDATA\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        self.assertEqual(queued_envelope(spool).arrival_time, 1_600_000_000.0)
        self.assertIn("client=unknown[192.0.2.9], sasl_method=CRAM-MD5, sasl_username=node-a\n",
                      "".join(ralog.render(e) + "\n" for e in events))

    def test_arrival_in_the_future_is_now(self):
        spool = dsn_spool(self)
        session = self.auth_session(spool=spool)
        session.replies()
        session.send(b"EHLO c\r\n")
        challenge = session.send(b"AUTH CRAM-MD5\r\n")[-1]
        session.send(cram_md5_response(challenge, b"node-a", b"s3cret") + b"\r\n")
        lines = session.send(b"MAIL FROM:<a@x.example> ARRIVAL=1800000000\r\n"
                             b"RCPT TO:<b@y.example>\r\nDATA\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(codes(lines), [250, 250, 354, 250])
        self.assertEqual(queued_envelope(spool).arrival_time, 1_700_000_000.0)
        self.assertEqual(codes(session.send(b"MAIL FROM:<a@x.example> ARRIVAL=12x\r\n")), [501])

    def test_malformed_response_is_535(self):
        import base64

        session = self.auth_session()
        session.replies()
        session.send(b"EHLO c\r\n")
        session.send(b"AUTH CRAM-MD5\r\n")
        reply = session.send(base64.b64encode(b"nospace") + b"\r\n")
        self.assertEqual(codes(reply), [535])
        self.assertEqual(self.flushLoggedErrors(), [])
class SmtpdLogLineTests(SynchronousTestCase):
    """smtpd's and cleanup's lines, as Postfix's smtpd.c, smtpd_check.c
    and cleanup_message.c write them."""

    def setUp(self):
        from twisted.logger import globalLogPublisher

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self):
        from relayagent.common import maillog as ralog

        return [(event["ralog_service"], ralog.render(event)) for event in self.events
                if event.get("ralog_event") == ralog.LINE]

    def test_a_relayed_transaction(self):
        session = Session(self)
        session.send(TRANSACTION + b"QUIT\r\n")
        session.server.connectionLost(None)  # the client hung up after QUIT
        (queue_id,) = [text.split(":")[0] for _, text in self.lines() if "client=" in text]
        self.assertEqual(self.lines(), [
            ("smtpd", "connect from unknown[127.0.0.1]"),
            ("smtpd", f"{queue_id}: client=unknown[127.0.0.1]"),
            ("cleanup", f"{queue_id}: message-id=<>"),
            ("smtpd", "disconnect from unknown[127.0.0.1] ehlo=1 mail=1 rcpt=3 data=1 quit=1 commands=7"),
        ])

    def test_relay_denied(self):
        session = Session(self, peer="2001:db8::7")
        session.send(b"EHLO stranger.example\r\nMAIL FROM:<s@stranger.example>\r\n"
                     b"RCPT TO:<b@remote.example>\r\nBOGUS\r\nQUIT\r\n")
        session.server.connectionLost(None)
        self.assertEqual(self.lines(), [
            ("smtpd", "connect from unknown[2001:db8::7]"),
            ("smtpd", "NOQUEUE: reject: RCPT from unknown[2001:db8::7]: 554 5.7.1 <b@remote.example>: "
                      "Relay access denied; from=<s@stranger.example> to=<b@remote.example> proto=ESMTP "
                      "helo=<stranger.example>"),
            ("smtpd", "disconnect from unknown[2001:db8::7] ehlo=1 mail=1 rcpt=0/1 quit=1 unknown=0/1 "
                      "commands=3/5"),
        ])

    def test_message_id(self):
        session = Session(self)
        session.send(TRANSACTION.replace(b"Subject: hello\r\n", b"Subject: hello\r\nMessage-ID: <m@x.example>\r\n"))
        self.assertIn("message-id=<m@x.example>", " ".join(text for _, text in self.lines()))

    def test_command_stats(self):
        from relayagent.smtpd.listener import format_command_stats

        self.assertEqual(format_command_stats({}), " commands=0/0")
        self.assertEqual(format_command_stats({"quit": [1, 1], "ehlo": [1, 1], "rcpt": [2, 3]}),
                         " ehlo=1 rcpt=2/3 quit=1 commands=4/5")
