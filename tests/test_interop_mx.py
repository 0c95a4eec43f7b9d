"""
Interop: MX lookup over a real DNS server on loopback (twisted.names'
server, named in dns_nameservers) and connection fallback across real
servers on 127.0.0.2-6: a closed port, a listener that never greets, a 4xx
greeting, a 5xx greeting and Postfix's smtp-sink, which gets the mail.
Also null MX (5.1.0), NXDOMAIN (5.4.4) and SERVFAIL (4.4.3).
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.names import dns
from twisted.trial import unittest

from relayagent.common import maillog as ralog
from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure
from relayagent.smtp.channel import SessionSettings
from relayagent.smtp.connect import Connector
from relayagent.smtp.resolve import NexthopResolver, make_dns_resolver
from relayagent.smtp.session import SMTPSessionFactory
from tests.support.dnsserver import LoopbackDNSServer
from tests.support.ports import free_port_on, start_retrying_while_in_use
from tests.support.sink import SmtpSink

MESSAGE = b"From: a@example.org\nTo: u0@mx.test\nSubject: mx interop\n\nhello\n"

HOSTS = {
    "closed.mx.test": "127.0.0.2",
    "silent.mx.test": "127.0.0.3",
    "busy.mx.test": "127.0.0.4",
    "reject.mx.test": "127.0.0.5",
    "sink.mx.test": "127.0.0.6",
}

# The servers that answer with a greeting of their own choosing (none: a
# server that never speaks), each on its HOSTS address.
GREETINGS = {
    "silent.mx.test": b"",
    "busy.mx.test": b"421 4.3.2 busy.mx.test Service not available, try later\r\n",
    "reject.mx.test": b"554 5.7.1 reject.mx.test no mail from you\r\n",
}


def zone_records() -> list[tuple[str, object]]:
    records: list[tuple[str, object]] = []
    for preference, host in enumerate(HOSTS, start=1):
        records.append(("mx.test", dns.Record_MX(preference * 10, host.encode())))
        records.append((host, dns.Record_A(HOSTS[host])))
    records.append(("nullmx.mx.test", dns.Record_MX(0, b"")))
    records.append(("nullmx.mx.test", dns.Record_A("127.0.0.6")))
    return records


class Greeter(Protocol):
    """Says one greeting line (or nothing) and waits."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        if self.factory.greeting:
            self.transport.write(self.factory.greeting)

    def connectionLost(self, reason: object = None) -> None:
        if self in self.factory.connections:
            self.factory.connections.remove(self)


class GreeterFactory(Factory):
    protocol = Greeter

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.connections: list[Greeter] = []


def envelope(count: int = 2) -> Envelope:
    return Envelope(
        queue_id="MXTEST1",
        sender="a@example.org",
        recipients=tuple(Recipient(f"u{i}@mx.test", index=i) for i in range(count)),
        arrival_time=reactor.seconds(),
        content_size=len(MESSAGE),
        open_content=lambda: io.BytesIO(MESSAGE),
    )


class MXInteropTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> Deferred:
        self.dns_server = LoopbackDNSServer.from_records("mx.test", zone_records(), servfail=["servfail.test"])
        self.dns_server.start(reactor)
        self.addCleanup(self.dns_server.stop)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return Deferred.fromCoroutine(self._start_servers())

    async def _start_servers(self) -> None:
        # The greeters share the sink's port on their own addresses (one
        # smtp_tcp_port for every exchanger), and a port free on one address
        # may be taken on another.
        self.sink: SmtpSink | None = None
        await start_retrying_while_in_use(self._start_servers_once)

    async def _start_servers_once(self) -> None:
        """The sink and the greeters on a new shared port; on failure, what
        started is stopped."""
        sink: SmtpSink | None = None
        if SmtpSink.available():
            sink = SmtpSink(host=HOSTS["sink.mx.test"])
            await sink.start(reactor)
            port_number = sink.port
        else:
            port_number = free_port_on(*(HOSTS[host] for host in GREETINGS))
        listeners: list[tuple[Any, GreeterFactory]] = []
        try:
            for host, greeting in GREETINGS.items():
                factory = GreeterFactory(greeting)
                listeners.append((reactor.listenTCP(port_number, factory, interface=HOSTS[host]), factory))
        except CannotListenError:
            for port, factory in listeners:
                await self._close_listener(port, factory)
            if sink is not None:
                await sink.stop(reactor)
            raise
        self.smtp_port = port_number
        if sink is not None:
            self.sink = sink
            self.addCleanup(lambda: Deferred.fromCoroutine(sink.stop(reactor)))
        for port, factory in listeners:
            self.addCleanup(self._close_listener, port, factory)

    def _close_listener(self, port, factory: GreeterFactory) -> Deferred:
        for connection in list(factory.connections):
            connection.transport.abortConnection()
        return port.stopListening()

    def config(self, **overrides: str) -> Config:
        settings = dict(
            dns_nameservers=self.dns_server.nameserver,
            smtp_tcp_port=str(self.smtp_port),
            inet_protocols="ipv4",
            smtp_connect_timeout="1s",
            smtp_helo_timeout="1s",
            smtp_helo_name="client.example",
            smtp_randomize_addresses="no",
        )
        settings.update(overrides)
        return Config.defaults().replace(**settings)

    def make(self, config: Config):

        greeting_times: dict[str, float] = {}

        def factory_for(server):
            factory = SMTPSessionFactory(SessionSettings.from_config(config), reactor, server)
            build = factory.buildProtocol

            def build_and_time(addr):
                session = build(addr)
                started = reactor.seconds()

                def done(result):
                    greeting_times[server.address] = reactor.seconds() - started
                    return result

                session.greeted.addBoth(done)
                return session

            factory.buildProtocol = build_and_time
            return factory

        dns_resolver = make_dns_resolver(config, reactor)
        resolver = NexthopResolver(config, dns_resolver, reactor, local_addresses=lambda: set())
        return resolver, Connector(reactor, config, factory_for), greeting_times

    async def transact_with(self, env: Envelope, session, indexes):
        recipients = [r for r in env.recipients if r.index in indexes]
        result = await session.deliver(env, recipients, last=True)
        await session.quit()
        return result.recipients

    async def _fallback_to_working_server(self) -> None:
        if self.sink is None:
            raise unittest.SkipTest(SmtpSink.missing_reason)
        config = self.config()
        resolver, connector, greeting_times = self.make(config)
        env = envelope()
        started = reactor.seconds()
        result = await connector.deliver(
            resolver, resolver.nexthops("mx.test"), [0, 1], lambda s, i: Deferred.fromCoroutine(self.transact_with(env, s, i))
        )
        elapsed = reactor.seconds() - started
        for index in (0, 1):
            outcome = result.outcomes[index]
            self.assertEqual(outcome.status.dsn, "2.0.0", outcome.status.text)
            self.assertEqual((outcome.server.host, outcome.server.address), ("sink.mx.test", "127.0.0.6"))
        [dumped] = await self.sink.wait_for_messages(reactor, 1)
        self.assertEqual(len(dumped.rcpt_args), 2)

        reasons = [attempt.status.text for attempt in result.attempts]
        port = self.smtp_port
        self.assertEqual(len(reasons), 4, reasons)
        self.assertEqual(reasons[0], f"connect to closed.mx.test[127.0.0.2]:{port}: Connection refused")
        self.assertIn("silent.mx.test[127.0.0.3]", reasons[1])
        self.assertIn("timed out", reasons[1])
        self.assertIn("busy.mx.test[127.0.0.4] refused to talk to me: 421", reasons[2])
        self.assertIn("reject.mx.test[127.0.0.5] refused to talk to me: 554", reasons[3])
        # Each skipped address is logged with its reason.
        logged = [e.get("reason") for e in self.events if e.get("log_namespace") == "relayagent.smtp.connect"]
        for reason in reasons:
            self.assertIn(reason, logged)

        # The silent server cost smtp_helo_timeout (1s): measured, with a
        # generous margin for a loaded machine.
        silent = greeting_times["127.0.0.3"]
        self.assertGreaterEqual(silent, 0.9)
        self.assertLess(silent, 5.0)
        self.assertLess(greeting_times["127.0.0.4"], 1.0)
        self.assertGreaterEqual(elapsed, silent)

    def test_fallback_to_working_server(self):
        return Deferred.fromCoroutine(self._fallback_to_working_server())

    async def _deliver_status(self, domain: str):
        config = self.config()
        resolver, connector, _ = self.make(config)
        result = await connector.deliver(resolver, resolver.nexthops(domain), [0], lambda s, i: None)
        return result.outcomes[0]

    async def _null_mx(self) -> None:
        outcome = await self._deliver_status("nullmx.mx.test")
        self.assertEqual(outcome.status.dsn, "5.1.0")
        self.assertEqual(outcome.status.text, "Domain nullmx.mx.test does not accept mail (nullMX)")
        self.assertIsNone(outcome.server)

    def test_null_mx_bounces(self):
        return Deferred.fromCoroutine(self._null_mx())

    async def _nxdomain(self) -> None:
        outcome = await self._deliver_status("nosuch.mx.test")
        self.assertEqual(outcome.status.dsn, "5.4.4")
        self.assertEqual(
            outcome.status.text, "Host or domain name not found. Name service error for name=nosuch.mx.test type=MX: Host not found"
        )
        # The recipients' lines say it; as Postfix, no line of its own.
        said = [event for event in self.events if outcome.status.text in str(event.get("reason", ""))]
        self.assertEqual(said, [])

    def test_nxdomain_bounces(self):
        return Deferred.fromCoroutine(self._nxdomain())

    async def _servfail(self) -> None:
        outcome = await self._deliver_status("servfail.test")
        self.assertEqual(outcome.status.dsn, "4.4.3")
        self.assertIn("name=servfail.test type=MX: Host not found, try again", outcome.status.text)
        self.assertIn(("servfail.test", dns.MX), self.dns_server.queries)

    def test_servfail_defers(self):
        return Deferred.fromCoroutine(self._servfail())

    async def _servfail_ignored(self) -> None:
        # ignore_mx_lookup_error=yes goes on to the A lookup, which fails the same way.
        config = self.config(ignore_mx_lookup_error="yes")
        resolver, connector, _ = self.make(config)
        result = await connector.deliver(resolver, resolver.nexthops("servfail.test"), [0], lambda s, i: None)
        self.assertEqual(result.outcomes[0].status.dsn, "4.4.3")
        self.assertIn(("servfail.test", dns.A), self.dns_server.queries)

    def test_servfail_with_ignore_mx_lookup_error(self):
        return Deferred.fromCoroutine(self._servfail_ignored())


ZONE_FILE = """\
$ORIGIN zone.test.
$TTL 60
@       IN SOA ns.zone.test. hostmaster.zone.test. 1 60 60 60 60
@       IN MX 10 mx1.zone.test.
@       IN MX 10 mx2.zone.test.
mx1     IN A 127.0.0.2
mx2     IN A 127.0.0.3
alias   IN CNAME zone.test.
null    IN MX 0 .
"""


class ZoneFileTests(unittest.TestCase):
    """The DNS server loaded from a BIND zone file, through twisted.names' client."""

    timeout = 30

    def setUp(self) -> None:
        path = self.mktemp()
        os.makedirs(path)
        zone = os.path.join(path, "zone.test")
        with open(zone, "w", encoding="ascii") as handle:
            handle.write(ZONE_FILE)
        self.server = LoopbackDNSServer.from_zone_file(zone)
        self.server.start(reactor)
        self.addCleanup(self.server.stop)
        config = Config.defaults().replace(dns_nameservers=self.server.nameserver, inet_protocols="ipv4", smtp_tcp_port="2525")
        self.resolver = NexthopResolver(config, make_dns_resolver(config, reactor), reactor, local_addresses=lambda: set())

    async def _lookups(self) -> None:
        (hop,) = self.resolver.nexthops("zone.test")
        found = await self.resolver.addresses(hop)
        self.assertEqual(sorted(a.address for a in found), ["127.0.0.2", "127.0.0.3"])
        self.assertEqual({a.port for a in found}, {2525})
        (hop,) = self.resolver.nexthops("alias.zone.test")
        found = await self.resolver.addresses(hop)
        self.assertEqual(sorted(a.host for a in found), ["mx1.zone.test", "mx2.zone.test"])
        (hop,) = self.resolver.nexthops("null.zone.test")
        try:
            await self.resolver.addresses(hop)
        except DeliveryFailure as failure:
            self.assertEqual(failure.status.dsn, "5.1.0")
        else:
            self.fail("null MX was not reported")

    def test_lookups(self):
        return Deferred.fromCoroutine(self._lookups())

    async def _quiet(self) -> None:
        stock, ours = io.StringIO(), io.StringIO()
        observers = [textFileLogObserver(stock), ralog.TwistdLogObserver(ours)]
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            for level in ("", "dnssec"):
                config = Config.defaults().replace(dns_nameservers=self.server.nameserver, inet_protocols="ipv4",
                                                   smtp_dns_support_level=level)
                resolver = NexthopResolver(config, make_dns_resolver(config, reactor), reactor,
                                           local_addresses=lambda: set())
                (hop,) = resolver.nexthops("zone.test")
                self.assertEqual(len(await resolver.addresses(hop)), 2)
            # Each query's port is closed a reactor turn after its answer.
            await task.deferLater(reactor, 0.1, lambda: None)
        finally:
            globalLogPublisher.removeObserver(events.append)
        for event in events:
            for observer in observers:
                observer(dict(event))
        # Twisted announced the query ports (twistd's own observer has
        # them), but not the protocols, and relayagent's observer has none.
        self.assertGreaterEqual(stock.getvalue().count(" starting on "), 6)  # MX, A, A per level
        self.assertGreaterEqual(stock.getvalue().count("Closed)"), 6)
        self.assertNotIn("Starting protocol", stock.getvalue())
        self.assertNotIn("Stopping protocol", stock.getvalue())
        self.assertNotIn("DatagramProtocol", ours.getvalue())
        self.assertNotIn("UDP Port", ours.getvalue())

    def test_queries_leave_twistds_log_quiet(self):
        # Each query's UDP port would put four lines of Twisted's in
        # twistd's log (relayagent.smtp.dnsclient).
        return Deferred.fromCoroutine(self._quiet())
