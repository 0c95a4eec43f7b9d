"""
The TLS decision before the connection (relayagent.smtp.security
``SessionSecurity.prepare``, used by relayagent.smtp.connect through
``deliver.SessionFactories``): a host that a TLSA lookup failure,
``dane-only`` without usable TLSA records or an MTA-STS policy in mode
enforce rules out gets no TCP connection and the next MX is tried; the
TLSA cache (relayagent.smtp.dane ``TLSACache``) on a fake clock; a cached
session is reused only under the decision it was made under.

The connections are counted on a MemoryReactorClock (no network) and, in
``LoopbackTests``, at real servers on 127.0.0.1 started here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.conncache import CachedSession, ConnectionCache
from relayagent.smtp.connect import ConnectFailure, Connector
from relayagent.smtp.dane import TLSA, DaneResolver, DaneState, TLSAAnswer, TLSACache, record_for
from relayagent.smtp.deliver import SessionFactories, SmtpAgent, SmtpRequest
from relayagent.smtp.dnssec import AuthenticatedAnswer
from relayagent.smtp.mtasts import MTASTSSettings, PolicyStore
from relayagent.smtp.resolve import MailExchangerAddress, Nexthop
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tls import TLSLevel
from relayagent.smtp.tlsrpt import Recorder
from relayagent.testing import (
    FakeConnector,
    FakeDNSResolver,
    FakeHTTPClient,
    FakeSession,
    FakeTLSSession,
    LogCapture,
)
from tests.support.certs import CertificateAuthority
from tests.support.countingsink import CountingSink

NEXTHOP = Nexthop("example.com", "example.com", 25, True, False, "example.com")
STS_URL = "https://mta-sts.example.com/.well-known/mta-sts.txt"
STS_POLICY = "version: STSv1\r\nmode: {mode}\r\nmx: mail.example.com\r\nmax_age: 604800\r\n"
CA = CertificateAuthority(common_name="relayagent preconnect test CA")


def mx(host: str, address: str, *, preference: int = 10, port: int = 25, secure: bool = True,
       family: int = socket.AF_INET) -> MailExchangerAddress:
    return MailExchangerAddress(host, address, family, preference, port,
                                mx_dnssec_valid=secure, host_dnssec_valid=secure)


def owner(host: str, port: int = 25) -> str:
    return f"_{port}._tcp.{host}"


def tlsa_rdata(record) -> bytes:
    return bytes([record.usage, record.selector, record.matching]) + record.data


def set_ttl(resolver: FakeDNSResolver, name: str, rrtype: int, ttl: int) -> None:
    for rr in resolver.records[(name, rrtype)]:
        rr.ttl = ttl


class _World:
    """Fake DNS (validated), HTTPS policy server, policy store and TLSRPT
    recorder on one MemoryReactorClock, and the security policy and
    connector over them."""

    def make_world(self, case: unittest.SynchronousTestCase) -> None:
        self.logs = LogCapture(case)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_000_000)
        self.dns = FakeDNSResolver()
        self.dns.validate_all = True
        self.http = FakeHTTPClient()
        cache = os.path.abspath(case.mktemp())
        settings = MTASTSSettings(
            smtp_mta_sts_enable=True, smtp_mta_sts_cache_directory=cache, smtp_mta_sts_fetch_timeout=10.0,
            smtp_mta_sts_max_policy_size=65536, smtp_mta_sts_CAfile="", smtp_mta_sts_refresh_margin=86400.0,
            queue_directory=cache,
        )
        self.store = PolicyStore(settings, self.dns, self.http, self.reactor)
        self.recorder = Recorder(case.mktemp(), self.reactor)

    def publish_sts(self, mode: str = "enforce") -> None:
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=one")
        self.http.serve(STS_URL, STS_POLICY.format(mode=mode))

    def policy(self, level: str = "may") -> SecurityPolicy:
        config = Config.defaults().replace(smtp_tls_security_level=level, smtp_dns_support_level="dnssec")
        return SecurityPolicy(config, mta_sts=self.store, tlsrpt=self.recorder, dns_resolver=self.dns,
                              clock=self.reactor)

    def connector(self, level: str = "may", connect_reactor: object = None) -> Connector:
        policy = self.policy(level)
        config = Config.defaults().replace(smtp_tls_security_level=level, smtp_dns_support_level="dnssec")
        on = connect_reactor or self.reactor
        return Connector(on, config, SessionFactories(config, on, policy))

    def connected_to(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def failures(self) -> list[dict]:
        details = []
        for period in self.recorder.periods.values():
            for counts in period.get("example.com", {}).values():
                details += [json.loads(detail) for detail in counts["details"]]
        return details

    def counts(self) -> dict[str, int]:
        total = {"success": 0, "failure": 0}
        for period in self.recorder.periods.values():
            for counts in period.get("example.com", {}).values():
                total["success"] += counts["success"]
                total["failure"] += counts["failure"]
        return total


class SkipBeforeConnectingTests(_World, unittest.SynchronousTestCase):
    """Connections counted on the fake reactor."""

    def setUp(self) -> None:
        self.make_world(self)

    def test_a_tlsa_lookup_error_skips_the_host_unconnected(self) -> None:
        self.dns.errors[(owner("mx1.example.com"), TLSA)] = DNSServerError("bogus")
        d = self.connector("dane").connect(
            [mx("mx1.example.com", "192.0.2.1"), mx("mx2.example.com", "192.0.2.2", preference=20)], NEXTHOP
        )
        self.assertNoResult(d)
        # No connection to mx1; mx2 (no TLSA records: dane is may) is tried.
        self.assertEqual(self.connected_to(), [("192.0.2.2", 25)])
        self.assertIn("TLS policy lookup for example.com/mx1.example.com: TLSA lookup error for mx1.example.com:25",
                      self.logs.messages())
        self.assertIn("TLSA lookup error for mx1.example.com:25", self.logs.messages())
        # Counted once for TLSRPT, with no sending address (no connection).
        (failure,) = self.failures()
        self.assertEqual(failure["result-type"], "dnssec-invalid")
        self.assertEqual(failure["receiving-mx-hostname"], "mx1.example.com")
        self.assertNotIn("sending-mta-ip", failure)

    def test_dane_only_without_tlsa_connects_to_nothing(self) -> None:
        d = self.connector("dane-only").connect(
            [mx("mx1.example.com", "192.0.2.1"), mx("mx2.example.com", "192.0.2.2", preference=20)], NEXTHOP
        )
        failure = self.failureResultOf(d, ConnectFailure).value
        self.assertEqual(self.connected_to(), [])
        self.assertEqual((failure.status.dsn, failure.status.text), ("4.7.5", "no TLSA records found"))
        self.assertEqual([a.server.host for a in failure.attempts], ["mx1.example.com", "mx2.example.com"])
        self.assertIn("TLS policy lookup for example.com/mx2.example.com: no TLSA records found", self.logs.messages())
        self.assertEqual([f["result-type"] for f in self.failures()], ["dane-required", "dane-required"])

    def test_dane_only_for_an_insecure_mx_connects_to_nothing(self) -> None:
        d = self.connector("dane-only").connect([mx("mx1.example.com", "192.0.2.1", secure=False)], NEXTHOP)
        failure = self.failureResultOf(d, ConnectFailure).value
        self.assertEqual(self.connected_to(), [])
        self.assertEqual(failure.status.text, "non DNSSEC destination")
        self.assertEqual(self.dns.queries, [])  # no TLSA lookup either

    def test_usable_tlsa_records_are_connected_to(self) -> None:
        leaf = CA.issue(["mx1.example.com"])
        self.dns.tlsa(owner("mx1.example.com"), tlsa_rdata(record_for(leaf.certificate)))
        self.assertNoResult(self.connector("dane-only").connect([mx("mx1.example.com", "192.0.2.1")], NEXTHOP))
        self.assertEqual(self.connected_to(), [("192.0.2.1", 25)])

    def test_sts_enforce_skips_an_mx_outside_the_policy_unconnected(self) -> None:
        self.publish_sts("enforce")
        d = self.connector("may").connect(
            [mx("mx.evil.test", "192.0.2.66"), mx("mail.example.com", "192.0.2.1", preference=20)], NEXTHOP
        )
        self.assertNoResult(d)
        self.assertEqual(self.connected_to(), [("192.0.2.1", 25)])
        self.assertIn("MX name 'mx.evil.test' does not match STS MX pattern for 'example.com'", self.logs.messages())
        self.assertIn("MX host mx.evil.test does not match the MTA-STS policy of example.com", self.logs.messages())
        (failure,) = self.failures()
        self.assertEqual((failure["result-type"], failure["receiving-mx-hostname"]),
                         ("validation-failure", "mx.evil.test"))
        self.assertEqual(self.counts(), {"success": 0, "failure": 1})

    def test_sts_enforce_with_only_outside_hosts_connects_to_nothing(self) -> None:
        self.publish_sts("enforce")
        d = self.connector("may").connect([mx("mx.evil.test", "192.0.2.66")], NEXTHOP)
        failure = self.failureResultOf(d, ConnectFailure).value
        self.assertEqual(self.connected_to(), [])
        self.assertEqual((failure.status.dsn, failure.status.text),
                         ("4.7.5", "MX host mx.evil.test does not match the MTA-STS policy of example.com"))

    def test_a_broken_policy_entry_connects_to_nothing(self) -> None:
        # Postfix (smtp_connect.c) warns and skips each host unconnected;
        # the mail is deferred with the configuration problem.
        table = os.path.abspath(self.mktemp())
        with open(table, "w") as handle:
            handle.write("example.com sometimes\n")
        config = Config.defaults().replace(smtp_tls_policy_maps=f"texthash:{table}")
        policy = SecurityPolicy(config, dns_resolver=self.dns, clock=self.reactor)
        connector = Connector(self.reactor, config, SessionFactories(config, self.reactor, policy))
        d = connector.connect(
            [mx("mx1.example.com", "192.0.2.1"), mx("mx2.example.com", "192.0.2.2", preference=20)], NEXTHOP
        )
        failure = self.failureResultOf(d, ConnectFailure).value
        self.assertEqual(self.connected_to(), [])
        self.assertEqual((failure.status.dsn, failure.status.text), ("4.7.5", "client TLS configuration problem"))
        self.assertEqual([a.server.host for a in failure.attempts], ["mx1.example.com", "mx2.example.com"])
        for host in ("mx1.example.com", "mx2.example.com"):
            self.assertIn(f"TLS policy lookup error for example.com/{host}: client TLS configuration problem",
                          self.logs.messages())

    def test_sts_testing_still_connects(self) -> None:
        self.publish_sts("testing")
        self.assertNoResult(self.connector("may").connect([mx("mx.evil.test", "192.0.2.66")], NEXTHOP))
        self.assertEqual(self.connected_to(), [("192.0.2.66", 25)])

    def test_both_addresses_of_a_host_share_one_tlsa_lookup(self) -> None:
        leaf = CA.issue(["mx1.example.com"])
        name = owner("mx1.example.com")
        self.dns.tlsa(name, tlsa_rdata(record_for(leaf.certificate)))
        set_ttl(self.dns, name, TLSA, 300)
        self.assertNoResult(self.connector("dane").connect(
            [mx("mx1.example.com", "192.0.2.1"), mx("mx1.example.com", "2001:db8::1", family=socket.AF_INET6)],
            NEXTHOP,
        ))
        self.reactor.advance(1)  # the IPv4 head start is over: IPv6 beside it
        self.assertEqual([host for host, _ in self.connected_to()], ["192.0.2.1", "2001:db8::1"])
        self.assertEqual(self.dns.queries.count((name, TLSA)), 1)

    def test_the_requiretls_error_action_is_still_decided_after_ehlo(self) -> None:
        # REQUIRETLS interplay unchanged: nothing decided before the
        # connection for a refusal that holds for every server.
        from relayagent.smtp.requiretls import RequireTLSAction, TLSDemand

        security = self.policy("may").for_nexthop("example.com").for_demand(TLSDemand.REQUIRETLS)
        security.requiretls_action = RequireTLSAction.ERROR
        server = ServerInfo("mx.evil.test", "192.0.2.66", 25, "example.com", policy_domain="example.com")
        self.publish_sts("enforce")
        preparation = self.successResultOf(security.prepare(server))
        self.assertIsNone(preparation.tls_policy)
        self.assertEqual(self.http.gets, [])
        session = FakeSession(server, extensions={"STARTTLS": ""})
        session.tls_preparation = preparation
        failure = self.failureResultOf(security.negotiate(session), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn[2:], "7.10")


class _Wrapper:
    """A hook wrapping another and passing on what it does not know (as
    qmgr.transfer's PeerSessionSecurity does)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def for_nexthop(self, nexthop: str) -> _Wrapper:
        return _Wrapper(self.inner.for_nexthop(nexthop))

    def for_demand(self, demand) -> _Wrapper:
        return self

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class SessionFactoriesTests(_World, unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.make_world(self)

    def test_the_session_carries_the_decision_and_a_wrapping_hook_stays(self) -> None:
        config = Config.defaults()
        factories = SessionFactories(config, self.reactor, _Wrapper(self.policy("may")))
        server = ServerInfo("mx.example.com", "192.0.2.1", 25, "example.com")
        factory = self.successResultOf(factories(server))
        self.assertIsInstance(factory.security, _Wrapper)
        session = factory.buildProtocol(None)
        self.assertEqual(session.tls_preparation.server, server)
        self.assertEqual(session.tls_preparation.tls_policy.level, TLSLevel.MAY)


class PreparedNegotiationTests(_World, unittest.SynchronousTestCase):
    """The prepared hook's negotiate uses the decision made before."""

    def setUp(self) -> None:
        self.make_world(self)
        self.leaf = CA.issue(["mx.example.com"])

    def session(self) -> FakeTLSSession:
        session = FakeTLSSession(self.leaf.server_context())
        session.server = dataclasses.replace(session.server, policy_domain="example.com",
                                             mx_dnssec_valid=True, host_dnssec_valid=True)
        return session

    def test_dane_decided_before_is_used_after_ehlo_and_counted_once(self) -> None:
        name = owner("mx.example.com")
        self.dns.tlsa(name, tlsa_rdata(record_for(self.leaf.certificate)))
        security = self.policy("dane").for_nexthop("example.com")
        session = self.session()
        preparation = self.successResultOf(security.prepare(session.server))
        self.assertEqual(preparation.tls_policy.tlsa, (record_for(self.leaf.certificate),))
        queries = len(self.dns.queries)
        session.tls_preparation = preparation
        self.successResultOf(security.negotiate(session))
        self.assertEqual(len(self.dns.queries), queries)  # no second lookup after EHLO
        self.assertTrue(session.tls_outcome.verified_by_dane)
        self.assertIs(session.tlsa_lookup.state, DaneState.USABLE)
        self.assertIs(session.tls_preparation, preparation)
        self.assertEqual(self.counts(), {"success": 1, "failure": 0})

    def test_sts_enforce_decided_before_demands_a_verified_certificate(self) -> None:
        self.publish_sts("enforce")
        security = self.policy("may").for_nexthop("example.com")
        session = self.session()
        session.server = dataclasses.replace(session.server, host="mail.example.com")
        preparation = self.successResultOf(security.prepare(session.server))
        self.assertEqual(preparation.tls_policy.level, TLSLevel.VERIFY)
        session.tls_preparation = preparation
        failure = self.failureResultOf(security.negotiate(session), DeliveryFailure)
        self.assertEqual(failure.value.status.text, "Server certificate not verified")
        self.assertEqual(len(self.http.gets), 1)  # fetched once, before connecting
        self.assertEqual(self.counts(), {"success": 0, "failure": 1})


class _Resolver:
    """A resolver for TLSA queries answering from ``answers`` (a list of
    results or exceptions, one per query, or one Deferred left pending)."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.queries: list[str] = []

    def query(self, query: dns.Query):
        self.queries.append(query.name.name.decode())
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, defer.Deferred):
            return answer
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)


def tlsa_answer(name: str, ttl: int, *records) -> AuthenticatedAnswer:
    rrs = [dns.RRHeader(name, TLSA, ttl=ttl, payload=dns.UnknownRecord(tlsa_rdata(r))) for r in records]
    return AuthenticatedAnswer((rrs, [], []), True)


class TLSACacheTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.record = record_for(CA.issue(["mx.example.com"]).certificate)

    def resolver(self, *answers, cache_size: int = 1000) -> tuple[DaneResolver, _Resolver]:
        dns_resolver = _Resolver(*answers)
        return DaneResolver(dns_resolver, enabled=True, clock=self.clock, cache_size=cache_size), dns_resolver

    def lookup(self, dane: DaneResolver, host: str = "mx.example.com", port: int = 25):
        return self.successResultOf(dane.lookup(host, port, mx_dnssec_valid=True, host_dnssec_valid=True))

    def test_an_answer_is_kept_for_its_ttl(self) -> None:
        dane, dns_resolver = self.resolver(tlsa_answer(owner("mx.example.com"), 60, self.record))
        self.assertEqual(self.lookup(dane).records, (self.record,))
        self.clock.advance(59)
        self.assertEqual(self.lookup(dane).state, DaneState.USABLE)
        self.assertEqual(len(dns_resolver.queries), 1)
        self.clock.advance(1)
        self.lookup(dane)
        self.assertEqual(len(dns_resolver.queries), 2)
        self.assertEqual((dane.cache.hits, dane.cache.misses), (1, 2))

    def test_a_long_ttl_is_kept_at_most_100_seconds(self) -> None:
        dane, dns_resolver = self.resolver(tlsa_answer(owner("mx.example.com"), 86400, self.record))
        self.lookup(dane)
        self.clock.advance(99)
        self.lookup(dane)
        self.assertEqual(len(dns_resolver.queries), 1)
        self.clock.advance(1)
        self.lookup(dane)
        self.assertEqual(len(dns_resolver.queries), 2)

    def test_ttl_zero_and_errors_are_not_kept(self) -> None:
        dane, dns_resolver = self.resolver(tlsa_answer(owner("mx.example.com"), 0, self.record))
        self.lookup(dane)
        self.lookup(dane)
        self.assertEqual(len(dns_resolver.queries), 2)
        dane, dns_resolver = self.resolver(DNSServerError("bogus"))
        self.assertEqual(self.lookup(dane).state, DaneState.ERROR)
        self.assertEqual(self.lookup(dane).reason, "TLSA lookup error for mx.example.com:25")
        self.assertEqual(len(dns_resolver.queries), 2)
        self.assertEqual(len(dane.cache), 0)

    def test_nodata_is_kept_for_the_negative_ttl(self) -> None:
        soa = dns.RRHeader("example.com", dns.SOA, ttl=3600, payload=dns.Record_SOA(minimum=30))
        dane, dns_resolver = self.resolver(AuthenticatedAnswer(([], [soa], []), True))
        self.assertEqual(self.lookup(dane).state, DaneState.NOT_FOUND)
        self.clock.advance(29)
        self.lookup(dane)
        self.assertEqual(len(dns_resolver.queries), 1)
        self.clock.advance(1)
        self.lookup(dane)
        self.assertEqual(len(dns_resolver.queries), 2)

    def test_kept_per_host_and_port(self) -> None:
        dane, dns_resolver = self.resolver(tlsa_answer("any", 60, self.record))
        self.lookup(dane, port=25)
        self.lookup(dane, port=587)
        self.lookup(dane, host="mx2.example.com")
        self.lookup(dane, port=25)
        self.assertEqual(dns_resolver.queries,
                         [owner("mx.example.com"), owner("mx.example.com", 587), owner("mx2.example.com")])

    def test_the_size_is_bounded_least_recently_used_first(self) -> None:
        dane, dns_resolver = self.resolver(tlsa_answer("any", 60, self.record), cache_size=2)
        self.lookup(dane, host="a.example")
        self.lookup(dane, host="b.example")
        self.lookup(dane, host="a.example")  # a is now the most recent
        self.lookup(dane, host="c.example")  # b goes
        self.assertEqual(len(dane.cache), 2)
        self.lookup(dane, host="a.example")
        self.lookup(dane, host="b.example")
        self.assertEqual(dns_resolver.queries, [owner(h) for h in ("a.example", "b.example", "c.example", "b.example")])

    def test_lookups_in_flight_share_one_query(self) -> None:
        pending: defer.Deferred = defer.Deferred()
        dane, dns_resolver = self.resolver(pending)
        first = dane.lookup("mx.example.com", 25, mx_dnssec_valid=True, host_dnssec_valid=True)
        second = dane.lookup("mx.example.com", 25, mx_dnssec_valid=True, host_dnssec_valid=True)
        self.assertEqual(len(dns_resolver.queries), 1)
        pending.callback(tlsa_answer(owner("mx.example.com"), 60, self.record))
        self.assertEqual(self.successResultOf(first).records, (self.record,))
        self.assertEqual(self.successResultOf(second).records, (self.record,))

    def test_a_cancelled_lookup_leaves_the_shared_query_to_the_others(self) -> None:
        pending: defer.Deferred = defer.Deferred()
        dane, dns_resolver = self.resolver(pending)
        first = dane.lookup("mx.example.com", 25, mx_dnssec_valid=True, host_dnssec_valid=True)
        second = dane.lookup("mx.example.com", 25, mx_dnssec_valid=True, host_dnssec_valid=True)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertNoResult(pending)  # the query goes on
        pending.callback(tlsa_answer(owner("mx.example.com"), 60, self.record))
        self.assertEqual(self.successResultOf(second).records, (self.record,))
        self.assertEqual(len(dane.cache), 1)

    def test_the_mx_state_is_applied_to_a_kept_answer(self) -> None:
        dane, dns_resolver = self.resolver(tlsa_answer(owner("mx.example.com"), 60, self.record))
        self.lookup(dane)
        half = self.successResultOf(dane.lookup("mx.example.com", 25, mx_dnssec_valid=False,
                                                host_dnssec_valid=True, insecure_mx_ok=True))
        self.assertEqual((half.state, half.mx_secure, half.applies), (DaneState.USABLE, False, False))
        self.assertEqual(len(dns_resolver.queries), 1)

    def test_without_a_clock_nothing_is_kept(self) -> None:
        dns_resolver = _Resolver(tlsa_answer(owner("mx.example.com"), 60, self.record))
        dane = DaneResolver(dns_resolver, enabled=True)
        self.assertIsNone(dane.cache)
        self.lookup(dane)
        self.lookup(dane)
        self.assertEqual(len(dns_resolver.queries), 2)

    def test_the_cache_drops_an_expired_answer(self) -> None:
        cache = TLSACache(self.clock, size=1)
        answer = self.successResultOf(defer.Deferred.fromCoroutine(
            cache.get("x", lambda name: defer.succeed(TLSAAnswer(DaneState.USABLE, "", (self.record,), ttl=5)))
        ))
        self.assertIs(cache.cached("x"), answer)
        self.clock.advance(5)
        self.assertIsNone(cache.cached("x"))
        self.assertEqual(len(cache), 0)


class CachedSessionTests(_World, unittest.SynchronousTestCase):
    """A cached session is reused only under the decision it was made under."""

    def setUp(self) -> None:
        self.make_world(self)
        self.leaf = CA.issue(["mx.example.com"])
        self.name = owner("mx.example.com")
        self.dns.tlsa(self.name, tlsa_rdata(record_for(self.leaf.certificate)))
        set_ttl(self.dns, self.name, TLSA, 60)
        self.security = self.policy("dane").for_nexthop("example.com")
        self.server = ServerInfo("mx.example.com", "192.0.2.1", 25, "example.com", policy_domain="example.com",
                                 mx_dnssec_valid=True, host_dnssec_valid=True)

    def cached_session(self) -> FakeSession:
        preparation = self.successResultOf(self.security.prepare(self.server))
        session = FakeSession(self.server, greeted=True)
        session.security, session.tls_preparation = self.security, preparation
        return session

    def test_still_holds_while_the_records_are_the_same(self) -> None:
        session = self.cached_session()
        self.assertTrue(self.successResultOf(session.security.still_holds(session)))
        self.reactor.advance(61)  # looked up again: the same records
        self.assertTrue(self.successResultOf(session.security.still_holds(session)))
        failures = self.counts()["failure"]
        # New TLSA records (a key rollover), or none that can be had.
        self.dns.tlsa(self.name, tlsa_rdata(record_for(CA.issue(["mx.example.com"]).certificate)))
        self.reactor.advance(61)
        self.assertFalse(self.successResultOf(session.security.still_holds(session)))
        self.dns.errors[(self.name, TLSA)] = DNSServerError("bogus")
        self.assertFalse(self.successResultOf(session.security.still_holds(session)))
        self.assertEqual(self.counts()["failure"], failures)  # a check is not a session: not counted

    def test_an_sts_policy_now_ruling_the_host_out(self) -> None:
        security = self.policy("may").for_nexthop("example.com")
        server = dataclasses.replace(self.server, host="mx.evil.test")
        preparation = self.successResultOf(security.prepare(server))  # no policy yet
        session = FakeSession(server, greeted=True)
        session.security, session.tls_preparation = security, preparation
        self.assertTrue(self.successResultOf(session.security.still_holds(session)))
        self.publish_sts("enforce")
        self.reactor.advance(24 * 3600)  # the TXT record is looked at again
        self.assertFalse(self.successResultOf(session.security.still_holds(session)))

    def agent_with(self, session: FakeSession) -> tuple[SmtpAgent, FakeConnector]:
        connector = FakeConnector(server=self.server)
        cache = ConnectionCache(self.reactor, idle_limit=300, reuse_time_limit=300)
        cache.store(CachedSession(session, nexthop="example.com", created=self.reactor.seconds()))
        agent = SmtpAgent(self.reactor, nexthops=lambda domain: ["example.com"], connector=connector, cache=cache)
        return agent, connector

    def request(self) -> SmtpRequest:
        recipients = (Recipient("u@example.com", index=0),)
        envelope = Envelope("Q1", "s@example.org", recipients, 0.0, 0, open_content=lambda: None)
        return SmtpRequest(envelope, "example.com", recipients)

    def test_the_agent_reuses_a_session_whose_decision_holds(self) -> None:
        session = self.cached_session()
        agent, connector = self.agent_with(session)
        result = self.successResultOf(agent.deliver(self.request()))
        self.assertEqual(result.outcomes[0].status.dsn, "2.0.0")
        self.assertEqual(len(session.deliveries), 1)
        self.assertEqual(connector.calls, [])

    def test_the_agent_drops_a_session_whose_decision_changed(self) -> None:
        session = self.cached_session()
        self.dns.errors[(self.name, TLSA)] = DNSServerError("bogus")
        self.reactor.advance(61)
        agent, connector = self.agent_with(session)
        self.successResultOf(agent.deliver(self.request()))
        self.assertEqual(session.deliveries, [])
        self.assertEqual(session.quits, 1)
        self.assertEqual(connector.calls, [[0]])  # a new connection instead


# -- real servers on loopback ------------------------------------------------


class LoopbackTests(_World, unittest.TestCase):
    """The connector and SessionFactories on the real reactor, against
    servers on 127.0.0.1 that count what connects to them; DNS, policy
    server and clock are the fakes (decisions come at once)."""

    timeout = 30

    def setUp(self) -> None:
        self.make_world(self)
        self.servers = []
        for _ in range(2):
            server = CountingSink()
            port = server.listen(reactor)
            self.addCleanup(port.stopListening)
            self.addCleanup(server.close_all)
            server.port = port.getHost().port
            self.servers.append(server)

    def addresses(self, first: str, second: str) -> list[MailExchangerAddress]:
        return [mx(first, "127.0.0.1", port=self.servers[0].port),
                mx(second, "127.0.0.1", port=self.servers[1].port, preference=20)]

    async def _tlsa_error(self) -> None:
        first, second = self.servers
        self.dns.errors[(owner("mx1.example.com", first.port), TLSA)] = DNSServerError("bogus")
        connector = self.connector("dane", connect_reactor=reactor)
        session = await connector.connect(self.addresses("mx1.example.com", "mx2.example.com"), NEXTHOP)
        self.assertEqual(session.server.host, "mx2.example.com")
        self.assertEqual((first.accepted, second.accepted), (0, 1))
        self.assertIn(f"TLS policy lookup for example.com/mx1.example.com: TLSA lookup error for "
                      f"mx1.example.com:{first.port}", self.logs.messages())
        await session.quit()

    def test_no_connection_to_a_host_whose_tlsa_lookup_failed(self):
        return defer.Deferred.fromCoroutine(self._tlsa_error())

    async def _dane_only(self) -> None:
        connector = self.connector("dane-only", connect_reactor=reactor)
        with self.assertRaises(ConnectFailure) as caught:
            await connector.connect(self.addresses("mx1.example.com", "mx2.example.com"), NEXTHOP)
        self.assertEqual(caught.exception.status.text, "no TLSA records found")
        self.assertEqual([server.accepted for server in self.servers], [0, 0])

    def test_no_connection_for_dane_only_without_tlsa(self):
        return defer.Deferred.fromCoroutine(self._dane_only())

    async def _sts_enforce(self) -> None:
        self.publish_sts("enforce")
        first, second = self.servers
        connector = self.connector("may", connect_reactor=reactor)
        with self.assertRaises(ConnectFailure) as caught:
            await connector.connect(self.addresses("mx.evil.test", "mail.example.com"), NEXTHOP)
        # mail.example.com is in the policy: connected to, and refused
        # for offering no STARTTLS; mx.evil.test never saw a SYN.
        failure = caught.exception
        self.assertEqual((first.accepted, second.accepted), (0, 1))
        self.assertEqual(failure.status.dsn, "4.7.4")
        self.assertEqual([attempt.status.text for attempt in failure.attempts][0],
                         "MX host mx.evil.test does not match the MTA-STS policy of example.com")

    def test_no_connection_to_an_mx_outside_an_enforced_sts_policy(self):
        return defer.Deferred.fromCoroutine(self._sts_enforce())


class ServiceTests(unittest.TestCase):
    """The service gives the security policy its DNS resolver and clock,
    at start-up and after a reload (DANE was off after a reload, with no
    DNS resolver)."""

    def test_dane_and_its_cache_survive_a_reload(self) -> None:
        from relayagent.master.service import build_service

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "main.cf")

        def write(extra: str) -> None:
            with open(path, "w") as handle:
                handle.write(f"queue_directory = {base}/spool\nrelayagent_workers = 1\n"
                             "smtp_dns_support_level = dnssec\ndns_nameservers = 127.0.0.1\n" + extra)

        write("smtp_tls_security_level = dane\n")
        service = build_service(Config.load(path), reactor)
        self.addCleanup(lambda: service.smtp.close())
        self.assertTrue(service.security.dane.enabled)
        self.assertIs(service.security.dane.cache.clock, reactor)
        write("smtp_tls_security_level = dane-only\n")
        ok, text = service.reload()
        self.assertTrue(ok, text)
        self.assertTrue(service.security.dane.enabled, service.security.dane.disabled_reason)
        self.assertIsNotNone(service.security.dane.cache)
