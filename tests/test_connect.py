"""
Tests for relayagent.smtp.connect: connection fallback, the IPv4/IPv6 head start
and the per-recipient fallback loop, on MemoryReactorClock (no network).
"""

from __future__ import annotations

import random
import socket

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config, ConfigError
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.connect import ConnectFailure, Connector
from relayagent.smtp.resolve import MailExchangerAddress, Nexthop, NexthopResolver
from relayagent.testing import FakeDNSResolver, FakeSession, FakeSessionFactory


def v4(host: str, address: str, preference: int = 10, port: int = 25) -> MailExchangerAddress:
    return MailExchangerAddress(host, address, socket.AF_INET, preference, port)


def v6(host: str, address: str, preference: int = 10, port: int = 25) -> MailExchangerAddress:
    return MailExchangerAddress(host, address, socket.AF_INET6, preference, port)


NEXTHOP = Nexthop("example.com", "example.com", 25, True, False, "example.com")
RELAY = Nexthop("example.com", "relay.example.net", 25, False, True, "[relay.example.net]")


class ConnectorTestBase(SynchronousTestCase):
    overrides: dict[str, str] = {}

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.sessions: list[FakeSession] = []
        self.config = Config.defaults().replace(**self.overrides)
        self.connector = self.make_connector(self.config)

    def make_connector(self, config: Config) -> Connector:
        return Connector(self.reactor, config, lambda server: FakeSessionFactory(server, self.sessions))

    # Driving the fake network.
    def client(self, number: int):
        host, port, factory, timeout, bind = self.reactor.tcpClients[number]
        return factory

    def refuse(self, number: int) -> None:
        self.client(number).clientConnectionFailed(self.reactor.connectors[number], Failure(ConnectionRefusedError()))

    def time_out(self, number: int) -> None:
        self.client(number).clientConnectionFailed(self.reactor.connectors[number], Failure(TimeoutError()))

    def accept(self, number: int) -> FakeSession:
        protocol = self.client(number).buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return self.sessions[-1]

    def hosts(self) -> list[str]:
        return [entry[0] for entry in self.reactor.tcpClients]


class ConnectTests(ConnectorTestBase):
    overrides = {"smtp_connect_timeout": "7s"}

    def test_first_greeting_wins(self) -> None:
        d = self.connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2")], NEXTHOP)
        self.assertEqual(self.hosts(), ["192.0.2.1"])
        self.assertEqual(self.reactor.tcpClients[0][3], 7.0)
        session = self.accept(0)
        self.assertNoResult(d)
        session.greet()
        self.assertIs(self.successResultOf(d), session)
        self.assertEqual(self.hosts(), ["192.0.2.1"])

    def test_refused_then_timeout_then_success(self) -> None:
        d = self.connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2"), v4("mx3", "192.0.2.3")], NEXTHOP)
        self.refuse(0)
        self.assertEqual(self.hosts(), ["192.0.2.1", "192.0.2.2"])
        self.time_out(1)
        session = self.accept(2)
        session.greet()
        self.assertIs(self.successResultOf(d), session)

    def test_all_fail_keeps_every_reason(self) -> None:
        d = self.connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2")], NEXTHOP)
        self.refuse(0)
        self.time_out(1)
        failure = self.failureResultOf(d, ConnectFailure).value
        self.assertEqual(failure.status.dsn, "4.4.1")
        self.assertEqual(
            [a.status.text for a in failure.attempts],
            ["connect to mx1[192.0.2.1]:25: Connection refused", "connect to mx2[192.0.2.2]:25: Connection timed out"],
        )
        self.assertEqual(failure.status.text, "connect to mx2[192.0.2.2]:25: Connection timed out")
        self.assertFalse(failure.final_server)

    def test_4xx_greeting_skipped(self) -> None:
        d = self.connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2")], NEXTHOP)
        self.accept(0).refuse(421)
        session = self.accept(1)
        session.greet()
        self.assertIs(self.successResultOf(d), session)

    def test_5xx_greeting_skipped_by_default(self) -> None:
        d = self.connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2")], NEXTHOP)
        self.accept(0).refuse(554)
        self.accept(1).refuse(554)
        failure = self.failureResultOf(d, ConnectFailure).value
        # Skipped as if it were 4xx: the last one is a deferral, not a bounce.
        self.assertEqual(failure.status.dsn, "4.0.0")
        self.assertEqual(len(failure.attempts), 2)
        self.assertIn("refused to talk to me: 554", failure.status.text)

    def test_5xx_greeting_is_the_outcome_without_skip(self) -> None:
        connector = self.make_connector(self.config.replace(smtp_skip_5xx_greeting="no"))
        d = connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2")], NEXTHOP)
        self.accept(0).refuse(554)
        failure = self.failureResultOf(d, ConnectFailure).value
        self.assertEqual(failure.status.dsn, "5.0.0")
        self.assertTrue(failure.final_server)
        self.assertEqual(self.hosts(), ["192.0.2.1"])

    def test_hard_ehlo_refusal_is_final(self) -> None:
        d = self.connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2")], NEXTHOP)
        self.accept(0).refuse(550, stage="EHLO")
        self.assertEqual(self.failureResultOf(d, ConnectFailure).value.status.dsn, "5.0.0")

    def test_3xx_greeting_is_final_even_with_the_5xx_skip(self) -> None:
        # smtp_helo() skips only a 5xx greeting; a 354 greeting's 5.5.0
        # (smtp_chat.c) stands and is the outcome.
        d = self.connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2")], NEXTHOP)
        self.accept(0).greeted.errback(DeliveryFailure(Status("5.5.0", "refused", code=354, stage="CONNECT")))
        failure = self.failureResultOf(d, ConnectFailure).value
        self.assertEqual(failure.status.dsn, "5.5.0")
        self.assertTrue(failure.final_server)
        self.assertEqual(self.hosts(), ["192.0.2.1"])

    def test_bind_addresses(self) -> None:
        connector = self.make_connector(self.config.replace(smtp_bind_address="192.0.2.100", smtp_bind_address6="2001:db8::100"))
        connector.connect([v4("mx1", "192.0.2.1"), v6("mx1", "2001:db8::1", preference=20)], NEXTHOP)
        self.assertEqual(self.reactor.tcpClients[0][4], ("192.0.2.100", 0))
        self.refuse(0)
        self.assertEqual(self.reactor.tcpClients[1][0], "2001:db8::1")
        self.assertEqual(self.reactor.tcpClients[1][4], ("2001:db8::100", 0))

    def test_bad_bind_address(self) -> None:
        self.assertRaises(ConfigError, self.make_connector, self.config.replace(smtp_bind_address="2001:db8::1"))
        self.assertRaises(ConfigError, self.make_connector, self.config.replace(smtp_bind_address="not-an-address"))

    def test_every_address_given_is_tried(self) -> None:
        # smtp_mx_address_limit cuts the list in smtp.resolve (test_resolve
        # test_address_limit*), once: the connector tries what it is given.
        connector = self.make_connector(self.config.replace(smtp_mx_address_limit="2"))
        d = connector.connect([v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2"), v4("mx3", "192.0.2.3")], NEXTHOP)
        self.refuse(0)
        self.refuse(1)
        self.refuse(2)
        self.failureResultOf(d, ConnectFailure)
        self.assertEqual(len(self.reactor.tcpClients), 3)


class HeadStartTests(ConnectorTestBase):
    overrides = {"smtp_connection_attempt_delay": "0.25s"}

    def test_other_family_after_head_start(self) -> None:
        d = self.connector.connect([v6("mx", "2001:db8::1"), v4("mx", "192.0.2.1")], NEXTHOP)
        self.assertEqual(self.hosts(), ["2001:db8::1"])
        self.reactor.advance(0.2)
        self.assertEqual(self.hosts(), ["2001:db8::1"])
        self.reactor.advance(0.05)
        self.assertEqual(self.hosts(), ["2001:db8::1", "192.0.2.1"])
        winner = self.accept(1)
        winner.greet()
        self.assertIs(self.successResultOf(d), winner)
        # The IPv6 attempt still connecting is cancelled.
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_no_head_start_race_when_first_connected(self) -> None:
        d = self.connector.connect([v6("mx", "2001:db8::1"), v4("mx", "192.0.2.1")], NEXTHOP)
        session = self.accept(0)
        self.reactor.advance(1)
        self.assertEqual(self.hosts(), ["2001:db8::1"])
        session.greet()
        self.assertIs(self.successResultOf(d), session)

    def test_failure_ends_head_start(self) -> None:
        d = self.connector.connect([v6("mx", "2001:db8::1"), v4("mx", "192.0.2.1")], NEXTHOP)
        self.refuse(0)
        self.assertEqual(self.hosts(), ["2001:db8::1", "192.0.2.1"])
        self.accept(1).greet()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_late_greeting_loser_gets_quit(self) -> None:
        d = self.connector.connect([v6("mx", "2001:db8::1"), v4("mx", "192.0.2.1")], NEXTHOP)
        self.reactor.advance(0.25)
        slow = self.accept(0)
        fast = self.accept(1)
        fast.greet()
        self.assertIs(self.successResultOf(d), fast)
        # The loser was connected and waiting for its greeting: dropped.
        self.assertTrue(slow.transport.disconnecting)
        slow.greeted.callback(slow)  # a greeting arriving after all: QUIT
        self.assertEqual(slow.quits, 1)

    def test_lanes_continue_within_preference_then_next_level(self) -> None:
        addresses = [v6("a", "2001:db8::1"), v6("b", "2001:db8::2"), v4("a", "192.0.2.1"), v4("c", "192.0.2.9", preference=20)]
        d = self.connector.connect(addresses, NEXTHOP)
        self.reactor.advance(0.25)
        self.assertEqual(self.hosts(), ["2001:db8::1", "192.0.2.1"])
        self.refuse(1)  # the IPv4 lane is empty now
        self.time_out(0)
        self.assertEqual(self.hosts()[2], "2001:db8::2")
        self.refuse(2)
        # Preference 10 is done: preference 20 next.
        self.assertEqual(self.hosts()[3], "192.0.2.9")
        self.accept(3).greet()
        self.successResultOf(d)

    def test_single_family_level_has_no_timer(self) -> None:
        self.connector.connect([v4("a", "192.0.2.1"), v4("b", "192.0.2.2")], NEXTHOP)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


def statuses(mapping: dict[int, str]) -> dict[int, Status]:
    return {index: Status(dsn, f"{dsn} said") for index, dsn in mapping.items()}


class DeliverWithFallbackTests(ConnectorTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.transactions: list[tuple[FakeSession, list[int]]] = []
        self.replies: list[dict[int, str] | Exception] = []

    def transact(self, session, indexes):
        self.transactions.append((session, indexes))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            return defer.fail(reply)
        return defer.succeed({i: s for i, s in statuses(reply).items() if i in indexes})

    def three(self):
        return [v4("mx1", "192.0.2.1"), v4("mx2", "192.0.2.2", 20), v4("mx3", "192.0.2.3", 30)]

    def test_soft_on_non_final_moves_recipients(self) -> None:
        self.replies = [{1: "2.0.0", 2: "4.2.0", 3: "5.1.1"}, {2: "2.0.0"}]
        d = self.connector.deliver_with_fallback(self.three(), NEXTHOP, [1, 2, 3], self.transact)
        self.accept(0).greet()
        self.accept(1).greet()
        result = self.successResultOf(d)
        self.assertEqual({i: o.status.dsn for i, o in result.outcomes.items()}, {1: "2.0.0", 2: "2.0.0", 3: "5.1.1"})
        self.assertEqual(result.outcomes[1].server.address, "192.0.2.1")
        self.assertEqual(result.outcomes[2].server.address, "192.0.2.2")
        self.assertEqual(result.outcomes[3].server.address, "192.0.2.1")
        self.assertEqual(self.transactions[1][1], [2])
        self.assertEqual(result.sessions, 2)

    def test_session_limit_makes_server_final(self) -> None:
        self.replies = [{1: "4.2.0"}, {1: "4.2.1"}]
        d = self.connector.deliver_with_fallback(self.three(), NEXTHOP, [1], self.transact)
        self.accept(0).greet()
        self.accept(1).greet()
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[1].status.dsn, "4.2.1")
        self.assertEqual(len(self.reactor.tcpClients), 2)  # mx3 never tried

    def test_connect_failures_do_not_count_as_sessions(self) -> None:
        self.replies = [{1: "4.2.0"}, {1: "2.0.0"}]
        d = self.connector.deliver_with_fallback(self.three(), NEXTHOP, [1], self.transact)
        self.refuse(0)
        self.accept(1).greet()
        self.accept(2).greet()
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[1].status.dsn, "2.0.0")
        self.assertEqual(result.attempts[0].status.text, "connect to mx1[192.0.2.1]:25: Connection refused")

    def test_soft_on_final_server_is_final(self) -> None:
        self.replies = [{1: "4.2.0"}]
        d = self.connector.deliver_with_fallback([v4("mx1", "192.0.2.1")], NEXTHOP, [1], self.transact)
        self.accept(0).greet()
        self.assertEqual(self.successResultOf(d).outcomes[1].status.dsn, "4.2.0")

    def test_session_failure_counts_for_all(self) -> None:
        self.replies = [DeliveryFailure(Status("4.4.2", "lost connection")), {1: "2.0.0", 2: "2.0.0"}]
        d = self.connector.deliver_with_fallback(self.three(), NEXTHOP, [1, 2], self.transact)
        self.accept(0).greet()
        self.accept(1).greet()
        result = self.successResultOf(d)
        self.assertEqual({o.status.dsn for o in result.outcomes.values()}, {"2.0.0"})
        self.assertEqual(result.attempts[-1].status.text, "lost connection")

    def test_all_addresses_fail(self) -> None:
        d = self.connector.deliver_with_fallback(self.three()[:2], NEXTHOP, [1, 2], self.transact)
        self.refuse(0)
        self.time_out(1)
        result = self.successResultOf(d)
        self.assertEqual({o.status.dsn for o in result.outcomes.values()}, {"4.4.1"})
        self.assertIsNone(result.outcomes[1].server)
        self.assertEqual(len(result.attempts), 2)

    def test_relay_hard_refusal_bounces_as_from_any_server(self) -> None:
        # Postfix (run against smtp-sink -f CONNECT, relayhost set,
        # smtp_skip_5xx_greeting = no): "dsn=5.3.0, status=bounced (host ...
        # refused to talk to me: ...)"; 4.3.5 is for a relay not reached.
        connector = self.make_connector(self.config.replace(smtp_skip_5xx_greeting="no"))
        for n, nexthop in enumerate((RELAY, NEXTHOP)):
            d = connector.deliver_with_fallback([v4("relay.example.net", "192.0.2.1")], nexthop, [1], self.transact)
            self.accept(n).refuse(554)
            outcome = self.successResultOf(d).outcomes[1]
            self.assertEqual(outcome.status.dsn, "5.0.0")
            self.assertIn("refused to talk to me", outcome.status.text)
            self.assertEqual(outcome.server.address, "192.0.2.1")

    def test_relay_recipient_rejection_still_bounces(self) -> None:
        # Postfix turns only session-level hard failures of a relay into 4.3.5.
        self.replies = [{1: "5.1.1"}]
        d = self.connector.deliver_with_fallback([v4("relay.example.net", "192.0.2.1")], RELAY, [1], self.transact)
        self.accept(0).greet()
        self.assertEqual(self.successResultOf(d).outcomes[1].status.dsn, "5.1.1")


class DeliverTests(ConnectorTestBase):
    """The nexthop loop: the destination, then the fallback relays."""

    def setUp(self) -> None:
        super().setUp()
        self.fake = FakeDNSResolver()
        self.replies: list[dict[int, str]] = []

    def transact(self, session, indexes):
        return defer.succeed({i: s for i, s in statuses(self.replies.pop(0)).items() if i in indexes})

    def resolver(self, **overrides: str) -> NexthopResolver:
        return NexthopResolver(
            Config.defaults().replace(inet_protocols="ipv4", **overrides),
            self.fake,
            self.reactor,
            random=random.Random(0),
            local_addresses=lambda: {"198.51.100.1"},
            system_resolver=lambda name: defer.fail(OSError("no system resolver in tests")),
        )

    def test_nxdomain_then_fallback_relay(self) -> None:
        self.fake.a("backup.example.net", "192.0.2.77")
        resolver = self.resolver(smtp_fallback_relay="[backup.example.net]")
        self.replies = [{1: "2.0.0"}]
        d = self.connector.deliver(resolver, resolver.nexthops("nowhere.example"), [1], self.transact)
        self.accept(0).greet()
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[1].status.dsn, "2.0.0")
        self.assertEqual(result.attempts[0].status.dsn, "5.4.4")

    def test_hard_lookup_failure_of_fallback_relay_is_4_3_5(self) -> None:
        resolver = self.resolver(smtp_fallback_relay="[gone.example.net]")
        result = self.successResultOf(self.connector.deliver(resolver, resolver.nexthops("nowhere.example"), [1], self.transact))
        self.assertEqual(result.outcomes[1].status.dsn, "4.3.5")
        self.assertIsNone(result.outcomes[1].server)

    def test_relayhost_not_found_is_4_3_5(self) -> None:
        resolver = self.resolver(relayhost="[gone.example.net]")
        result = self.successResultOf(self.connector.deliver(resolver, resolver.nexthops("example.com"), [1], self.transact))
        self.assertEqual(result.outcomes[1].status.dsn, "4.3.5")
        self.assertIn("name=gone.example.net", result.outcomes[1].status.text)

    def test_nxdomain_bounces_without_relays(self) -> None:
        resolver = self.resolver()
        result = self.successResultOf(self.connector.deliver(resolver, resolver.nexthops("nowhere.example"), [1], self.transact))
        self.assertEqual(result.outcomes[1].status.dsn, "5.4.4")

    def test_loop_does_not_use_fallback_relay(self) -> None:
        self.fake.mx("example.com", (10, "me.example.com"))
        self.fake.a("me.example.com", "198.51.100.1")
        self.fake.a("backup.example.net", "192.0.2.77")
        resolver = self.resolver(smtp_fallback_relay="[backup.example.net]")
        result = self.successResultOf(self.connector.deliver(resolver, resolver.nexthops("example.com"), [1], self.transact))
        self.assertEqual(result.outcomes[1].status.dsn, "5.4.6")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_soft_at_destination_goes_to_fallback_relay(self) -> None:
        self.fake.mx("example.com", (10, "mx.example.com"))
        self.fake.a("mx.example.com", "192.0.2.1")
        self.fake.a("backup.example.net", "192.0.2.77")
        resolver = self.resolver(smtp_fallback_relay="[backup.example.net]")
        self.replies = [{1: "4.2.0", 2: "2.0.0"}, {1: "2.0.0"}]
        d = self.connector.deliver(resolver, resolver.nexthops("example.com"), [1, 2], self.transact)
        self.accept(0).greet()
        self.accept(1).greet()
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[1].server.address, "192.0.2.77")
        self.assertEqual(result.outcomes[2].server.address, "192.0.2.1")

    def test_found_myself_means_no_fallback_relay(self) -> None:
        self.fake.mx("example.com", (10, "mx.example.com"), (20, "me.example.com"))
        self.fake.a("mx.example.com", "192.0.2.1")
        self.fake.a("me.example.com", "198.51.100.1")
        self.fake.a("backup.example.net", "192.0.2.77")
        resolver = self.resolver(smtp_fallback_relay="[backup.example.net]")
        d = self.connector.deliver(resolver, resolver.nexthops("example.com"), [1], self.transact)
        self.refuse(0)
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[1].status.dsn, "4.4.1")
        self.assertEqual(self.hosts(), ["192.0.2.1"])
