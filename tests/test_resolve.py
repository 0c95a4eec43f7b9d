"""
Tests for relayagent.smtp.resolve: nexthop selection and MX/A/AAAA address lists,
with a fake twisted.names resolver (no network).
"""

from __future__ import annotations

import random
import socket

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config, ConfigError
from relayagent.common.status import DeliveryFailure
from relayagent.smtp.resolve import (
    MailExchangerAddress,
    Nexthop,
    NexthopResolver,
    parse_nexthop,
)
from relayagent.testing import FakeDNSResolver


def make_config(**overrides: str) -> Config:
    return Config.defaults().replace(**overrides)


def make_resolver(fake, *, seed=1, local=(), system=None, **overrides) -> NexthopResolver:
    return NexthopResolver(
        make_config(**overrides),
        fake,
        Clock(),
        random=random.Random(seed),
        local_addresses=lambda: set(local),
        system_resolver=system,
    )


def domain_nexthop(domain: str, port: int = 25) -> Nexthop:
    return Nexthop(destination=domain, host=domain, port=port, mx_lookup=True, is_relay=False, as_written=domain)


class NexthopTests(SynchronousTestCase):
    def test_domain_is_default(self) -> None:
        (hop,) = make_resolver(None).nexthops("Example.COM")
        self.assertEqual((hop.destination, hop.host, hop.port, hop.mx_lookup, hop.is_relay), ("example.com", "example.com", 25, True, False))

    def test_idna_domain_to_a_label(self) -> None:
        (hop,) = make_resolver(None).nexthops("bücher.example")
        self.assertEqual(hop.host, "xn--bcher-kva.example")
        self.assertEqual(hop.destination, "xn--bcher-kva.example")

    def test_bad_idna_domain(self) -> None:
        failure = self.assertRaises(DeliveryFailure, make_resolver(None).nexthops, "a\u200dbad..example")
        self.assertEqual(failure.status.dsn, "5.1.2")

    def test_relayhost_bracketed_with_port(self) -> None:
        (hop,) = make_resolver(None, relayhost="[smtp.example.net]:587").nexthops("example.com")
        self.assertEqual((hop.host, hop.port, hop.mx_lookup, hop.is_relay, hop.as_written), ("smtp.example.net", 587, False, True, "[smtp.example.net]:587"))
        self.assertEqual(hop.destination, "example.com")

    def test_relayhost_domain_with_service_name(self) -> None:
        (hop,) = make_resolver(None, relayhost="relay.example.net:submission").nexthops("example.com")
        self.assertEqual((hop.host, hop.port, hop.mx_lookup), ("relay.example.net", 587, True))

    def test_smtp_tcp_port_default(self) -> None:
        (hop,) = make_resolver(None, smtp_tcp_port="2525").nexthops("example.com")
        self.assertEqual(hop.port, 2525)

    def test_ipv6_literal(self) -> None:
        (hop,) = make_resolver(None, relayhost="[ipv6:2001:db8::1]:26").nexthops("example.com")
        self.assertEqual((hop.host, hop.port, hop.mx_lookup), ("2001:db8::1", 26, False))

    def test_fallback_relays_appended(self) -> None:
        hops = make_resolver(None, fallback_relay="[backup1.example.net], backup2.example.net:26").nexthops("example.com")
        self.assertEqual([h.as_written for h in hops], ["example.com", "[backup1.example.net]", "backup2.example.net:26"])
        self.assertEqual([h.is_relay for h in hops], [False, True, True])
        self.assertEqual([h.is_fallback for h in hops], [False, True, True])

    def test_relayhost_list(self) -> None:
        hops = make_resolver(None, relayhost="[a.example.net], [b.example.net]:26").nexthops("example.com")
        self.assertEqual([(h.host, h.port, h.is_relay) for h in hops], [("a.example.net", 25, True), ("b.example.net", 26, True)])

    def test_transport_maps_exact_parent_and_star(self) -> None:
        resolver = make_resolver(
            None,
            relayhost="[relay.example.net]",
            transport_maps="inline:{ example.com=smtp:[mail.example.com]:587 .example.org=relay:[sub.example.org] }",
        )
        (hop,) = resolver.nexthops("example.com")
        self.assertEqual((hop.host, hop.port, hop.mx_lookup, hop.is_relay), ("mail.example.com", 587, False, False))
        (hop,) = resolver.nexthops("a.b.example.org")
        self.assertEqual(hop.host, "sub.example.org")
        # ".example.org" matches subdomains only, as in transport(5).
        (hop,) = resolver.nexthops("example.org")
        self.assertEqual((hop.host, hop.is_relay), ("relay.example.net", True))
        resolver = make_resolver(None, transport_maps="inline:{ *=smtp:[star.example.net] }")
        self.assertEqual(resolver.nexthops("anything.example")[0].host, "star.example.net")

    def test_transport_empty_nexthop_keeps_default(self) -> None:
        resolver = make_resolver(None, relayhost="[relay.example.net]", transport_maps="inline:{ example.com=smtp: }")
        (hop,) = resolver.nexthops("example.com")
        self.assertEqual(hop.host, "relay.example.net")

    def test_other_transport_is_configuration_error(self) -> None:
        resolver = make_resolver(None, transport_maps="inline:{ example.com=lmtp:unix:/x }")
        error = self.assertRaises(ConfigError, resolver.nexthops, "example.com")
        self.assertIn("lmtp", str(error))
        self.assertIn("example.com", str(error))

    def test_default_transport_nexthop_beats_relayhost(self) -> None:
        resolver = make_resolver(None, relayhost="[relay.example.net]", default_transport="smtp:[dt.example.net]")
        self.assertEqual(resolver.nexthops("example.com")[0].host, "dt.example.net")

    def test_bad_nexthop_syntax(self) -> None:
        for text in ("[unclosed", "[x]junk", "host:99999", "host:nosuchservice", "2001:db8::1"):
            self.assertRaises(ConfigError, parse_nexthop, text, destination="d", default_port=25, mx_lookup_allowed=True, where="relayhost")

    def test_dns_disabled_means_no_mx_lookup(self) -> None:
        (hop,) = make_resolver(None, disable_dns_lookups="yes").nexthops("example.com")
        self.assertFalse(hop.mx_lookup)
        (hop,) = make_resolver(None, smtp_dns_support_level="disabled").nexthops("example.com")
        self.assertFalse(hop.mx_lookup)


class AddressTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeDNSResolver()

    def addresses(self, resolver: NexthopResolver, nexthop: Nexthop) -> list[MailExchangerAddress]:
        return self.successResultOf(resolver.addresses(nexthop))

    def failure(self, resolver: NexthopResolver, nexthop: Nexthop) -> DeliveryFailure:
        return self.failureResultOf(resolver.addresses(nexthop), DeliveryFailure).value

    def test_mx_sorted_by_preference(self) -> None:
        self.fake.mx("example.com", (20, "mx2.example.com"), (10, "mx1.example.com"))
        self.fake.a("mx1.example.com", "192.0.2.1")
        self.fake.a("mx2.example.com", "192.0.2.2")
        result = self.addresses(make_resolver(self.fake, inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(
            result,
            [
                MailExchangerAddress("mx1.example.com", "192.0.2.1", socket.AF_INET, 10, 25),
                MailExchangerAddress("mx2.example.com", "192.0.2.2", socket.AF_INET, 20, 25),
            ],
        )
        self.assertNotIn(("example.com", dns.ALL_RECORDS), self.fake.queries)

    def test_equal_preferences_randomized_with_seed(self) -> None:
        hosts = [f"mx{i}.example.com" for i in range(6)]
        self.fake.mx("example.com", *((10, h) for h in hosts), (20, "backup.example.com"))
        for i, host in enumerate(hosts):
            self.fake.a(host, f"192.0.2.{i}")
        self.fake.a("backup.example.com", "192.0.2.99")
        orders = set()
        for seed in range(8):
            result = self.addresses(make_resolver(self.fake, seed=seed, inet_protocols="ipv4", smtp_mx_address_limit="0"), domain_nexthop("example.com"))
            self.assertEqual(result[-1].host, "backup.example.com")
            self.assertEqual(sorted(a.host for a in result[:-1]), hosts)
            orders.add(tuple(a.host for a in result))
        self.assertGreater(len(orders), 1)
        # The same seed gives the same order.
        first = self.addresses(make_resolver(self.fake, seed=3, inet_protocols="ipv4", smtp_mx_address_limit="0"), domain_nexthop("example.com"))
        again = self.addresses(make_resolver(self.fake, seed=3, inet_protocols="ipv4", smtp_mx_address_limit="0"), domain_nexthop("example.com"))
        self.assertEqual(first, again)

    def test_no_randomization(self) -> None:
        self.fake.mx("example.com", (10, "b.example.com"), (10, "a.example.com"))
        self.fake.a("a.example.com", "192.0.2.1")
        self.fake.a("b.example.com", "192.0.2.2")
        for seed in range(5):
            result = self.addresses(
                make_resolver(self.fake, seed=seed, inet_protocols="ipv4", smtp_randomize_addresses="no"), domain_nexthop("example.com")
            )
            self.assertEqual([a.host for a in result], ["b.example.com", "a.example.com"])

    def test_unresolvable_mx_host_ignored(self) -> None:
        self.fake.mx("example.com", (10, "gone.example.com"), (20, "mx2.example.com"))
        self.fake.a("mx2.example.com", "192.0.2.2")
        result = self.addresses(make_resolver(self.fake), domain_nexthop("example.com"))
        self.assertEqual([a.address for a in result], ["192.0.2.2"])

    def test_no_mx_host_with_an_address_bounces_or_defers(self) -> None:
        # smtp_defer_if_no_mx_address_found (Postfix, smtp_addr.c): the same
        # text, the hard status made soft.
        self.fake.mx("example.com", (10, "gone1.example.com"), (20, "gone2.example.com"))
        status = self.failure(make_resolver(self.fake), domain_nexthop("example.com")).status
        self.assertTrue(status.hard, status)
        deferred = self.failure(make_resolver(self.fake, smtp_defer_if_no_mx_address_found="yes"),
                                domain_nexthop("example.com")).status
        self.assertEqual((deferred.dsn, deferred.text), ("4" + status.dsn[1:], status.text))

    def test_no_mx_falls_back_to_address(self) -> None:
        self.fake.records[("example.com", dns.MX)] = []
        self.fake.a("example.com", "192.0.2.7")
        self.fake.aaaa("example.com", "2001:db8::7")
        result = self.addresses(make_resolver(self.fake, smtp_address_preference="ipv6"), domain_nexthop("example.com"))
        self.assertEqual([(a.address, a.family, a.preference) for a in result], [("2001:db8::7", socket.AF_INET6, 0), ("192.0.2.7", socket.AF_INET, 0)])

    def test_nxdomain(self) -> None:
        failure = self.failure(make_resolver(self.fake), domain_nexthop("nowhere.example"))
        self.assertEqual(failure.status.dsn, "5.4.4")
        self.assertEqual(failure.status.text, "Host or domain name not found. Name service error for name=nowhere.example type=MX: Host not found")

    def test_servfail(self) -> None:
        self.fake.errors[("example.com", dns.MX)] = DNSServerError("SERVFAIL")
        self.fake.a("example.com", "192.0.2.7")
        failure = self.failure(make_resolver(self.fake), domain_nexthop("example.com"))
        self.assertEqual(failure.status.dsn, "4.4.3")
        self.assertEqual(
            failure.status.text, "Host or domain name not found. Name service error for name=example.com type=MX: Host not found, try again"
        )

    def test_timeout_is_temporary(self) -> None:
        self.fake.errors[("example.com", dns.MX)] = defer.TimeoutError("timeout")
        self.assertEqual(self.failure(make_resolver(self.fake), domain_nexthop("example.com")).status.dsn, "4.4.3")

    def test_servfail_ignored_with_ignore_mx_lookup_error(self) -> None:
        self.fake.errors[("example.com", dns.MX)] = DNSServerError("SERVFAIL")
        self.fake.a("example.com", "192.0.2.7")
        result = self.addresses(make_resolver(self.fake, ignore_mx_lookup_error="yes", inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual([a.address for a in result], ["192.0.2.7"])

    def test_null_mx(self) -> None:
        self.fake.mx("example.com", (0, ""))
        self.fake.a("example.com", "192.0.2.7")
        failure = self.failure(make_resolver(self.fake), domain_nexthop("example.com"))
        self.assertEqual(failure.status.dsn, "5.1.0")
        self.assertEqual(failure.status.text, "Domain example.com does not accept mail (nullMX)")
        self.assertNotIn(("example.com", dns.A), self.fake.queries)

    def test_cname_chain_in_answer(self) -> None:
        # The server chased the chain: CNAME, CNAME, then the MX.
        self.fake.records[("alias.example.com", dns.MX)] = [
            dns.RRHeader("alias.example.com", dns.CNAME, payload=dns.Record_CNAME("alias2.example.com")),
            dns.RRHeader("alias2.example.com", dns.CNAME, payload=dns.Record_CNAME("real.example.com")),
            dns.RRHeader("real.example.com", dns.MX, payload=dns.Record_MX(5, "mx.real.example.com")),
        ]
        self.fake.cname("mx.real.example.com", "host.example.net", dns.A)
        self.fake.a("host.example.net", "192.0.2.9")
        result = self.addresses(make_resolver(self.fake, inet_protocols="ipv4"), domain_nexthop("alias.example.com"))
        self.assertEqual([(a.host, a.address, a.preference) for a in result], [("mx.real.example.com", "192.0.2.9", 5)])

    def test_cname_loop_is_bounded(self) -> None:
        self.fake.cname("a.example.com", "b.example.com", dns.MX)
        self.fake.cname("b.example.com", "a.example.com", dns.MX)
        failure = self.failure(make_resolver(self.fake), domain_nexthop("a.example.com"))
        self.assertEqual(failure.status.dsn, "5.4.3")
        self.assertLess(len(self.fake.queries), 20)

    def test_ipv6_only_host_with_ipv4_protocols(self) -> None:
        self.fake.mx("example.com", (10, "mx6.example.com"))
        self.fake.aaaa("mx6.example.com", "2001:db8::25")
        failure = self.failure(make_resolver(self.fake, inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(failure.status.dsn, "5.4.4")
        self.assertIn("name=mx6.example.com type=A", failure.status.text)
        self.assertNotIn(("mx6.example.com", dns.AAAA), self.fake.queries)

    def test_soft_error_dominates_when_no_mx_host_resolves(self) -> None:
        self.fake.mx("example.com", (10, "a.example.com"), (20, "b.example.com"))
        self.fake.errors[("a.example.com", dns.A)] = DNSServerError("SERVFAIL")
        failure = self.failure(make_resolver(self.fake, inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(failure.status.dsn, "4.4.3")

    def test_address_preference_and_families(self) -> None:
        self.fake.mx("example.com", (10, "mx.example.com"))
        self.fake.a("mx.example.com", "192.0.2.1", "192.0.2.2")
        self.fake.aaaa("mx.example.com", "2001:db8::1")
        result = self.addresses(make_resolver(self.fake, smtp_address_preference="ipv4"), domain_nexthop("example.com"))
        self.assertEqual([a.family for a in result], [socket.AF_INET, socket.AF_INET, socket.AF_INET6])
        result = self.addresses(make_resolver(self.fake, inet_protocols="ipv6"), domain_nexthop("example.com"))
        self.assertEqual([a.address for a in result], ["2001:db8::1"])

    def test_self_truncation(self) -> None:
        self.fake.mx("example.com", (10, "mx1.example.com"), (20, "me.example.com"), (30, "mx3.example.com"))
        self.fake.a("mx1.example.com", "192.0.2.1")
        self.fake.a("me.example.com", "198.51.100.1")
        self.fake.a("mx3.example.com", "192.0.2.3")
        result = self.successResultOf(
            make_resolver(self.fake, local=["198.51.100.1"], inet_protocols="ipv4").addresses(domain_nexthop("example.com"))
        )
        self.assertEqual([a.host for a in result], ["mx1.example.com"])
        self.assertTrue(result.found_myself)

    def test_self_truncation_only_on_port_25(self) -> None:
        self.fake.mx("example.com", (10, "me.example.com"))
        self.fake.a("me.example.com", "198.51.100.1")
        result = self.addresses(make_resolver(self.fake, local=["198.51.100.1"], inet_protocols="ipv4"), domain_nexthop("example.com", 2525))
        self.assertEqual(len(result), 1)

    def test_loops_back_to_myself(self) -> None:
        self.fake.mx("example.com", (10, "me.example.com"), (20, "mx2.example.com"))
        self.fake.a("me.example.com", "198.51.100.1")
        self.fake.a("mx2.example.com", "192.0.2.2")
        failure = self.failure(make_resolver(self.fake, local=["198.51.100.1"], inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(failure.status.dsn, "5.4.6")
        self.assertEqual(failure.status.text, "mail for example.com loops back to myself")
        self.assertFalse(failure.skip_to_next)

    def test_unable_to_find_primary_relay(self) -> None:
        # The best MX does not resolve; we are the next one.
        self.fake.mx("example.com", (10, "gone.example.com"), (20, "me.example.com"))
        self.fake.a("me.example.com", "198.51.100.1")
        failure = self.failure(make_resolver(self.fake, local=["198.51.100.1"], inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(failure.status.dsn, "4.4.4")
        self.assertEqual(failure.status.text, "unable to find primary relay for example.com")

    def test_proxy_interfaces_counted_as_self_via_local_addresses(self) -> None:
        # local_addresses is the injected union of inet_ and proxy_interfaces.
        self.fake.records[("example.com", dns.MX)] = []
        self.fake.a("example.com", "203.0.113.5")
        failure = self.failure(make_resolver(self.fake, local=["203.0.113.5"], inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(failure.status.dsn, "5.4.6")

    def test_address_limit(self) -> None:
        self.fake.mx("example.com", *((10 * i, f"mx{i}.example.com") for i in range(1, 5)))
        for i in range(1, 5):
            self.fake.a(f"mx{i}.example.com", f"192.0.2.{i}", f"192.0.2.{i + 100}")
        result = self.addresses(make_resolver(self.fake, smtp_mx_address_limit="3", inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(len(result), 3)
        self.assertEqual([a.preference for a in result], [10, 10, 20])
        result = self.addresses(make_resolver(self.fake, smtp_mx_address_limit="0", inet_protocols="ipv4"), domain_nexthop("example.com"))
        self.assertEqual(len(result), 8)

    def test_address_limit_of_a_host_without_mx_lookup(self) -> None:
        # [host]: no MX lookup, the host's own addresses, cut the same way.
        self.fake.a("relay.example.net", "192.0.2.1", "192.0.2.2", "192.0.2.3")
        result = self.addresses(make_resolver(self.fake, smtp_mx_address_limit="2", inet_protocols="ipv4"),
                                Nexthop(destination="relay.example.net", host="relay.example.net", port=25,
                                        mx_lookup=False, is_relay=True, as_written="[relay.example.net]"))
        self.assertEqual(len(result), 2)

    def test_bracketed_host_skips_mx(self) -> None:
        self.fake.mx("relay.example.net", (10, "other.example.net"))
        self.fake.a("relay.example.net", "192.0.2.50")
        resolver = make_resolver(self.fake, relayhost="[relay.example.net]", inet_protocols="ipv4")
        (hop,) = resolver.nexthops("example.com")
        self.assertEqual([a.address for a in self.addresses(resolver, hop)], ["192.0.2.50"])
        self.assertNotIn(("relay.example.net", dns.MX), self.fake.queries)

    def test_address_literal_nexthop(self) -> None:
        resolver = make_resolver(self.fake, relayhost="[192.0.2.60]:2525")
        (hop,) = resolver.nexthops("example.com")
        self.assertEqual([(a.address, a.port) for a in self.addresses(resolver, hop)], [("192.0.2.60", 2525)])
        self.assertEqual(self.fake.queries, [])

    def test_dns_disabled_uses_system_resolver(self) -> None:
        calls = []

        def system(name):
            calls.append(name)
            return defer.succeed([(socket.AF_INET, "192.0.2.77"), (socket.AF_INET6, "2001:db8::77"), (socket.AF_INET, "192.0.2.77")])

        resolver = make_resolver(self.fake, system=system, disable_dns_lookups="yes")
        (hop,) = resolver.nexthops("example.com")
        self.assertEqual(sorted(a.address for a in self.addresses(resolver, hop)), ["192.0.2.77", "2001:db8::77"])
        self.assertEqual(calls, ["example.com"])
        self.assertEqual(self.fake.queries, [])

    def test_native_host_lookup_for_mx_hosts(self) -> None:
        self.fake.mx("example.com", (10, "mx.example.com"))

        def system(name):
            return defer.succeed([(socket.AF_INET, "192.0.2.88")])

        resolver = make_resolver(self.fake, system=system, smtp_host_lookup="native")
        self.assertEqual([a.address for a in self.addresses(resolver, domain_nexthop("example.com"))], ["192.0.2.88"])
        self.assertNotIn(("mx.example.com", dns.A), self.fake.queries)

    def test_dns_then_native(self) -> None:
        self.fake.mx("example.com", (10, "mx.example.com"))

        def system(name):
            return defer.succeed([(socket.AF_INET, "192.0.2.89")])

        resolver = make_resolver(self.fake, system=system, smtp_host_lookup="dns, native")
        self.assertEqual([a.address for a in self.addresses(resolver, domain_nexthop("example.com"))], ["192.0.2.89"])
        self.assertIn(("mx.example.com", dns.A), self.fake.queries)

    def test_native_not_found(self) -> None:
        def system(name):
            return defer.fail(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

        resolver = make_resolver(None, system=system, disable_dns_lookups="yes")
        (hop,) = resolver.nexthops("example.com")
        failure = self.failure(resolver, hop)
        self.assertEqual(failure.status.dsn, "5.4.4")
        self.assertEqual(failure.status.text, "unable to look up host example.com: Name or service not known")

    def test_native_try_again(self) -> None:
        def system(name):
            return defer.fail(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))

        resolver = make_resolver(None, system=system, disable_dns_lookups="yes")
        (hop,) = resolver.nexthops("example.com")
        self.assertEqual(self.failure(resolver, hop).status.dsn, "4.4.4")


class MakeDNSResolverTests(SynchronousTestCase):
    def test_nameservers_with_ports(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from relayagent.smtp.resolve import make_dns_resolver

        config = make_config(dns_nameservers="127.0.0.1:5353, 192.0.2.53 [2001:db8::53]:5300")
        resolver = make_dns_resolver(config, MemoryReactorClock())
        self.assertEqual(resolver.servers, [("127.0.0.1", 5353), ("192.0.2.53", 53), ("2001:db8::53", 5300)])

    def test_system_name_servers_are_read_once(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from relayagent.smtp.resolve import make_dns_resolver

        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("# comment\nsearch example.com\nnameserver 192.0.2.1\nnameserver ::1\nnameserver bogus\n")
        reactor = MemoryReactorClock()
        resolver = make_dns_resolver(make_config(), reactor, resolv_conf=path)
        self.assertEqual(resolver.servers, [("192.0.2.1", 53), ("::1", 53)])
        # No periodic re-read: nothing scheduled on the reactor.
        self.assertEqual(reactor.getDelayedCalls(), [])
        missing = make_dns_resolver(make_config(), reactor, resolv_conf=path + ".missing")
        self.assertEqual(missing.servers, [("127.0.0.1", 53)])

    def test_nameserver_must_be_an_address(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from relayagent.smtp.resolve import make_dns_resolver

        error = self.assertRaises(ConfigError, make_dns_resolver, make_config(dns_nameservers="ns.example.com"), MemoryReactorClock())
        self.assertIn("dns_nameservers", str(error))
