"""Tests for relayagent.smtpd.replies: the listener's replies written
through to the socket when nothing waits before them, held together for
the lines of one read, and never ahead of bytes the transport still has.

WriterTests and ListenerTests are deterministic: the socket is a real socket object whose ``send`` is
replaced by a recording one (it takes what the test says it takes), the
transport a StringTransport that hands it out as a TCP connection does
(``getHandle``) and is a consumer as Twisted's are (``registerProducer``
calls a pull producer's ``resumeProducing`` at once; the test says when
the buffer is empty).  RealConnectionTests runs the writer on Twisted's
own TCP transport over loopback."""

from __future__ import annotations

import errno
import socket

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import alsoProvides, implementer

from relayagent.smtpd.intake import Intake
from relayagent.smtpd.listener import ListenerFactory
from relayagent.smtpd.replies import ReplyWriter
from relayagent.testing import FakeSpool
from tests.test_smtpd import TRANSACTION
from tests.test_smtpd import make_config as plain_config
from tests.test_smtpd_tls import Certificates
from tests.test_smtpd_tls import make_config as tls_config


class RecordingSocket(socket.socket):
    """A socket whose ``send`` records the data and takes at most
    ``takes`` bytes of it (all when None), or raises ``error``."""

    takes: int | None = None
    error: OSError | None = None

    def __init__(self, testcase: SynchronousTestCase) -> None:
        one, other = socket.socketpair()
        testcase.addCleanup(other.close)
        super().__init__(fileno=one.detach())
        testcase.addCleanup(self.close)
        self.sent: list[bytes] = []

    def send(self, data, flags=0):  # noqa: ARG002 - socket.send's signature
        if self.error is not None:
            raise self.error
        taken = bytes(data) if self.takes is None else bytes(data[:self.takes])
        self.sent.append(taken)
        return len(taken)


@implementer(ITLSTransport)
class SocketTransport(StringTransport):
    """A StringTransport with a TCP connection's socket and consumer
    behaviour (module docstring); ``startTLS`` records the order."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(hostAddress=IPv4Address("TCP", "127.0.0.1", 10587),
                         peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.sock = sock
        # What had reached the socket when TLS started.
        self.sent_before_tls: list[bytes] | None = None

    def getHandle(self):
        return self.sock

    def registerProducer(self, producer, streaming):
        super().registerProducer(producer, streaming)
        if not streaming:
            producer.resumeProducing()  # as FileDescriptor does

    def buffer_emptied(self) -> None:
        """What doWrite does once it has written everything."""
        if self.producer is not None and not self.streaming:
            self.producer.resumeProducing()

    def startTLS(self, contextFactory, beNormal=True):
        self.sent_before_tls = list(self.sock.sent)
        alsoProvides(self, ISSLTransport)


class WriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sock = RecordingSocket(self)
        self.transport = SocketTransport(self.sock)
        self.writer = ReplyWriter(self.transport)

    def test_written_through_when_nothing_waits(self) -> None:
        self.writer.write(b"220 hello\r\n")
        self.writer.write(b"250 Ok\r\n")
        self.assertEqual(self.sock.sent, [b"220 hello\r\n", b"250 Ok\r\n"])
        self.assertEqual(self.transport.value(), b"")

    def test_a_batch_goes_out_in_one_send_at_its_end(self) -> None:
        with self.writer.batch():
            self.writer.write(b"250 2.1.0 Ok\r\n")
            with self.writer.batch():
                self.writer.write(b"250 2.1.5 Ok\r\n")
            self.assertEqual(self.sock.sent, [])
            self.writer.write(b"354 End data\r\n")
        self.assertEqual(self.sock.sent, [b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n"])

    def test_what_the_kernel_does_not_take_goes_to_the_transport_and_the_rest_after_it(self) -> None:
        self.sock.takes = 4
        self.writer.write(b"250-first\r\n")
        self.assertEqual(self.sock.sent, [b"250-"])
        self.assertEqual(self.transport.value(), b"first\r\n")
        self.assertIs(self.transport.producer, self.writer)
        self.sock.takes = None
        # The socket would take it now, but the transport still holds bytes
        # given before: this one must not overtake them.
        self.writer.write(b"250 second\r\n")
        self.assertEqual(self.sock.sent, [b"250-"])
        self.assertEqual(self.transport.value(), b"first\r\n250 second\r\n")
        self.transport.buffer_emptied()
        self.assertIsNone(self.transport.producer)
        self.writer.write(b"250 third\r\n")
        self.assertEqual(self.sock.sent, [b"250-", b"250 third\r\n"])

    def test_a_full_socket_gives_everything_to_the_transport(self) -> None:
        self.sock.error = BlockingIOError(errno.EAGAIN, "would block")
        self.writer.write(b"250 Ok\r\n")
        self.assertEqual(self.transport.value(), b"250 Ok\r\n")
        self.assertIs(self.transport.producer, self.writer)

    def test_a_failing_send_leaves_the_error_to_the_transport_for_good(self) -> None:
        self.sock.error = ConnectionResetError(errno.ECONNRESET, "reset")
        self.writer.write(b"250 Ok\r\n")
        self.sock.error = None
        self.writer.write(b"221 Bye\r\n")
        self.assertEqual(self.sock.sent, [])
        self.assertEqual(self.transport.value(), b"250 Ok\r\n221 Bye\r\n")
        self.assertIsNone(self.transport.producer)

    def test_a_closing_transport_is_written_to(self) -> None:
        # loseConnection inside a batch (QUIT's 221): the transport sends
        # what it is given before it closes.
        with self.writer.batch():
            self.writer.write(b"221 Bye\r\n")
            self.transport.loseConnection()
        self.assertEqual(self.sock.sent, [])
        self.assertEqual(self.transport.value(), b"221 Bye\r\n")

    def test_a_transport_with_a_producer_of_its_own_is_never_written_through_again(self) -> None:
        class Other:
            def resumeProducing(self): pass
            def stopProducing(self): pass
        self.transport.registerProducer(Other(), True)
        self.sock.takes = 1
        self.writer.write(b"250 Ok\r\n")
        self.sock.takes = None
        self.writer.write(b"250 again\r\n")
        self.assertEqual(self.sock.sent, [b"2"])
        self.assertEqual(self.transport.value(), b"50 Ok\r\n250 again\r\n")

    def test_after_stop_writing_through_everything_goes_to_the_transport_at_once(self) -> None:
        self.writer.stop_writing_through()
        with self.writer.batch():
            self.writer.write(b"250 Ok\r\n")
            self.assertEqual(self.transport.value(), b"250 Ok\r\n")
        self.assertEqual(self.sock.sent, [])

    def test_stop_writing_through_sends_what_the_batch_holds_first(self) -> None:
        with self.writer.batch():
            self.writer.write(b"250 Ok\r\n220 Ready to start TLS\r\n")
            self.writer.stop_writing_through()
            self.assertEqual(self.sock.sent, [b"250 Ok\r\n220 Ready to start TLS\r\n"])
            self.writer.write(b"250 after\r\n")
        self.assertEqual(self.transport.value(), b"250 after\r\n")
        self.assertEqual(len(self.sock.sent), 1)

    def test_no_socket_of_its_own_for_tls_and_test_transports(self) -> None:
        tls = SocketTransport(self.sock)
        alsoProvides(tls, ISSLTransport)
        for transport in (tls, StringTransport()):
            writer = ReplyWriter(transport)
            with writer.batch():
                writer.write(b"250 Ok\r\n")
                self.assertEqual(transport.value(), b"250 Ok\r\n")
        self.assertEqual(self.sock.sent, [])


class ListenerTests(SynchronousTestCase):
    """The listener's replies through its ReplyWriter."""

    def session(self, config) -> tuple[RecordingSocket, SocketTransport, object]:
        sock = RecordingSocket(self)
        transport = SocketTransport(sock)
        server = ListenerFactory(Intake.from_config(config, FakeSpool()), config).buildProtocol(
            transport.getPeer())
        server.makeConnection(transport)
        self.addCleanup(server.setTimeout, None)
        return sock, transport, server

    def test_the_replies_to_a_pipelined_read_go_out_in_one_send(self) -> None:
        sock, transport, server = self.session(plain_config())
        self.assertEqual(len(sock.sent), 1)  # the greeting, at once
        self.assertTrue(sock.sent[0].startswith(b"220 "), sock.sent)
        server.dataReceived(TRANSACTION)
        self.assertEqual(len(sock.sent), 2, sock.sent)
        codes = [line[:4] for line in sock.sent[1].split(b"\r\n") if line[3:4] == b" "]
        # EHLO, MAIL, three RCPTs, DATA, the message queued.
        self.assertEqual(codes, [b"250 ", b"250 ", b"250 ", b"250 ", b"250 ", b"354 ", b"250 "])
        self.assertEqual(transport.value(), b"")
        # QUIT closes the transport inside the read: its 221 is handed to
        # the transport, which sends it before it closes.
        server.dataReceived(b"QUIT\r\n")
        self.assertEqual(len(sock.sent), 2, sock.sent)
        self.assertTrue(transport.value().startswith(b"221 "), transport.value())
        self.assertTrue(transport.disconnecting)

    def test_the_starttls_reply_is_sent_in_plaintext_before_the_handshake_and_nothing_after(self) -> None:
        certs = Certificates(self.mktemp())
        sock, transport, server = self.session(tls_config(certs))
        server.dataReceived(b"EHLO client.example\r\nSTARTTLS\r\n")
        self.assertIsNotNone(transport.sent_before_tls)
        self.assertEqual(transport.sent_before_tls, sock.sent)
        self.assertTrue(sock.sent[-1].endswith(b"\r\n220 2.0.0 Ready to start TLS\r\n"), sock.sent)
        sent = list(sock.sent)
        server.dataReceived(b"EHLO client.example\r\n")
        self.assertEqual(sock.sent, sent)
        self.assertTrue(transport.value().startswith(b"250-mx.example.org"), transport.value())


class RealConnectionTests(TestCase):
    """The writer on Twisted's own TCP transport over loopback: more than
    the kernel takes at once, more again once the client has read some,
    then loseConnection; every byte arrives in order and the connection
    closes (the transport's buffer drained, the writer unregistered, the
    close that waited for it done).  Whether a byte could overtake is
    WriterTests' to show: here the transport refills the socket as fast
    as the client empties it, so the moment it would happen is a race."""

    timeout = 30

    async def test_more_than_the_socket_takes_then_close(self) -> None:
        # 1 KB replies, each numbered: 16 MB, then 1 MB more.
        pieces = [b"%06d" % n + b"x" * 1018 for n in range(17 * 1024)]
        first, second = pieces[:16 * 1024], pieces[16 * 1024:]
        server_lost: Deferred[None] = Deferred()
        client_lost: Deferred[bytes] = Deferred()
        client_read: Deferred[None] = Deferred()
        servers: list[Protocol] = []

        class Server(Protocol):
            def connectionMade(self) -> None:
                servers.append(self)

            def connectionLost(self, reason) -> None:
                server_lost.callback(None)

        class Client(Protocol):
            def __init__(self) -> None:
                self.received: list[bytes] = []

            def dataReceived(self, data: bytes) -> None:
                self.received.append(data)
                if not client_read.called:
                    client_read.callback(None)

            def connectionLost(self, reason) -> None:
                client_lost.callback(b"".join(self.received))

        port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Client))
        while not servers:
            await deferLater(reactor, 0.01)
        server = servers[0]
        writer = ReplyWriter(server.transport)
        self.assertIsNotNone(writer._socket)
        for piece in first:
            writer.write(piece)
        self.assertTrue(writer._behind_transport)  # the kernel did not take 16 MB
        await client_read
        for piece in second:
            writer.write(piece)
        server.transport.loseConnection()
        received = await client_lost
        await server_lost
        self.assertEqual(len(received), len(b"".join(pieces)))
        self.assertEqual(received, b"".join(pieces))
