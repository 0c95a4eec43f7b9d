"""
MTA-STS (relayagent.smtp.mtasts): policy and TXT parsing with RFC 8461's
examples and malformed ones, the durable cache (atomic write, restart,
corrupt file, expiry, TXT id change, a blocked fetch that cannot
downgrade), the precedence decision, and the security hook's enforce and
testing modes over fake sessions, with a fake clock, resolver and HTTP
client.
"""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.names.error import DNSServerError
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.status import DeliveryFailure
from relayagent.smtp import mtasts
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.https import HTTPError
from relayagent.smtp.mtasts import (
    Mode,
    MTASTSSettings,
    PolicyError,
    PolicyStore,
    decide,
    mx_pattern_matches,
    parse_policy,
    parse_txt_record,
    sts_policy_domain,
)
from relayagent.smtp.resolve import Nexthop
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tls import TLSLevel, TLSPolicy
from relayagent.smtp.tlsrpt import Recorder
from relayagent.testing import FakeDNSResolver, FakeHTTPClient, FakeSession

# RFC 8461 section 3.2's example.
RFC_POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n"
URL = "https://mta-sts.example.com/.well-known/mta-sts.txt"


class ParsingTests(unittest.TestCase):
    def test_the_rfc_example(self):
        policy = parse_policy(RFC_POLICY)
        self.assertEqual(policy.mode, Mode.ENFORCE)
        self.assertEqual(policy.mx, ("mail.example.com", "*.example.net", "backupmx.example.com"))
        self.assertEqual(policy.max_age, 604800)
        self.assertEqual(policy.lines()[0], "version: STSv1")

    def test_lf_line_ends_unknown_keys_and_first_of_a_duplicate(self):
        policy = parse_policy("version: STSv1\nmode: testing\nfoo: bar\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n")
        self.assertEqual(policy.mode, Mode.TESTING)

    def test_mode_none_needs_no_mx(self):
        self.assertEqual(parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx, ())

    def test_malformed_policies(self):
        for text in (
            "",
            "version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 86400\n",  # no mx
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
            "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
            "version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
            "version: STSv1\nmode enforce\nmx: a.example\nmax_age: 1\n",
            "<html>not a policy</html>",
        ):
            with self.assertRaises(PolicyError, msg=text):
                parse_policy(text)

    def test_max_age_limit_is_allowed(self):
        self.assertEqual(parse_policy("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557600\n").max_age,
                         31557600)

    def test_mx_patterns(self):
        self.assertTrue(mx_pattern_matches("mail.example.com", "MAIL.example.com."))
        self.assertTrue(mx_pattern_matches("*.example.net", "mx1.example.net"))
        self.assertFalse(mx_pattern_matches("*.example.net", "example.net"))
        self.assertFalse(mx_pattern_matches("*.example.net", "a.b.example.net"))
        self.assertFalse(mx_pattern_matches("mail.example.com", "mail.example.com.evil.test"))

    def test_txt_records(self):
        self.assertEqual(parse_txt_record(["v=STSv1; id=20160831085700Z;"]), "20160831085700Z")
        self.assertEqual(parse_txt_record(["v=STSv1; ", "id=abc"]), "abc")
        for text in ("v=STSv2; id=1", "v=STSv1;", "v=STSv1; id=bad-id!", "id=1; v=STSv1", "v=STSv1; id=" + "a" * 33):
            with self.assertRaises(PolicyError, msg=text):
                parse_txt_record([text])

    def test_policy_domain_only_for_mx_delivery_to_the_domain(self):
        self.assertEqual(sts_policy_domain(Nexthop("example.com", "example.com", 25, True, False)), "example.com")
        self.assertEqual(sts_policy_domain(Nexthop("example.com", "mx.example.com", 25, False, False)), "")
        self.assertEqual(sts_policy_domain(Nexthop("example.com", "relay.test", 25, True, True)), "")
        self.assertEqual(sts_policy_domain(Nexthop("example.com", "other.test", 25, True, False)), "")


def settings(directory: str, **overrides) -> MTASTSSettings:
    values = dict(
        smtp_mta_sts_enable=True,
        smtp_mta_sts_cache_directory=os.path.abspath(directory),
        smtp_mta_sts_fetch_timeout=10.0,
        smtp_mta_sts_max_policy_size=65536,
        smtp_mta_sts_CAfile="",
        smtp_mta_sts_refresh_margin=86400.0,
        queue_directory=os.path.abspath(directory),
    )
    values.update(overrides)
    return MTASTSSettings(**values)


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dns = FakeDNSResolver()
        self.http = FakeHTTPClient()
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=one")
        self.http.serve(URL, RFC_POLICY)

    def store(self, **overrides) -> PolicyStore:
        store = PolicyStore(settings(self.directory, **overrides), self.dns, self.http, self.clock)
        store.load()
        return store

    def lookup(self, store: PolicyStore, domain: str = "example.com") -> mtasts.PolicyState:
        results = []
        store.policy_for(domain).addCallback(results.append)
        self.assertEqual(len(results), 1)
        return results[0]

    def test_fetch_is_cached_in_a_file_and_survives_a_restart(self):
        state = self.lookup(self.store())
        self.assertEqual(state.mode, Mode.ENFORCE)
        path = os.path.join(self.directory, "example.com.json")
        with open(path) as handle:
            data = json.load(handle)
        self.assertEqual(data["id"], "one")
        self.assertEqual(data["expires"], 1_000_000 + 604800)
        self.assertEqual([n for n in os.listdir(self.directory) if n.startswith(".")], [])  # no temporary left
        # Restart with the policy server gone: the cached policy holds.
        del self.http.responses[URL]
        state = self.lookup(self.store())
        self.assertEqual(state.mode, Mode.ENFORCE)
        self.assertEqual(len(self.http.gets), 1)

    def test_a_blocked_fetch_after_a_new_id_keeps_the_known_policy(self):
        store = self.store()
        self.lookup(store)
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=two")
        self.http.responses[URL] = HTTPError("blocked")
        self.clock.advance(mtasts.TXT_RECHECK_INTERVAL + 1)
        state = self.lookup(store)
        self.assertEqual(state.mode, Mode.ENFORCE)
        self.assertEqual(state.failure, mtasts.FETCH_ERROR)

    def test_a_blocked_txt_lookup_keeps_the_known_policy(self):
        store = self.store()
        self.lookup(store)
        self.dns.errors[("_mta-sts.example.com", 16)] = DNSServerError("SERVFAIL")
        self.clock.advance(mtasts.TXT_RECHECK_INTERVAL + 1)
        self.assertEqual(self.lookup(store).mode, Mode.ENFORCE)
        del self.dns.records[("_mta-sts.example.com", 16)]
        del self.dns.errors[("_mta-sts.example.com", 16)]
        self.clock.advance(mtasts.TXT_RECHECK_INTERVAL + 1)
        self.assertEqual(self.lookup(store).mode, Mode.ENFORCE)

    def test_a_new_id_fetches_again(self):
        store = self.store()
        self.lookup(store)
        self.http.serve(URL, RFC_POLICY.replace("enforce", "testing"))
        self.lookup(store)
        self.assertEqual(len(self.http.gets), 1)  # the TXT answer is remembered
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=two")
        self.clock.advance(mtasts.TXT_RECHECK_INTERVAL + 1)
        self.assertEqual(self.lookup(store).mode, Mode.TESTING)
        self.assertEqual(len(self.http.gets), 2)

    def test_expiry_drops_the_policy(self):
        store = self.store()
        self.lookup(store)
        del self.dns.records[("_mta-sts.example.com", 16)]
        self.clock.advance(604800 + 1)
        self.assertIsNone(self.lookup(store).policy)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "example.com.json")))

    def test_background_refresh_before_expiry(self):
        store = self.store()
        self.lookup(store)
        self.clock.advance(604800 - 3600)
        store.refresh_expiring()
        self.assertEqual(len(self.http.gets), 2)
        self.assertEqual(store.policies["example.com"].expires, self.clock.seconds() + 604800)

    def test_corrupt_cache_file_is_ignored(self):
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, "example.com.json"), "w") as handle:
            handle.write("{not json")
        with open(os.path.join(self.directory, "other.test.json"), "w") as handle:
            json.dump({"domain": "other.test", "id": "1", "policy": "garbage", "fetched": 0, "expires": 9e12}, handle)
        store = self.store()
        self.assertEqual(store.policies, {})
        self.assertEqual(self.lookup(store).mode, Mode.ENFORCE)  # fetched anew

    def test_no_record_no_fetch(self):
        state = self.lookup(self.store(), "nopolicy.test")
        self.assertIsNone(state.policy)
        self.assertEqual(self.http.gets, [])

    def test_fetch_problems_have_their_result_types(self):
        for answer, expected in (
            (HTTPError("bad certificate", webpki=True), mtasts.WEBPKI_INVALID),
            ("version: STSv1\nmode: enforce\n", mtasts.POLICY_INVALID),
        ):
            store = self.store(smtp_mta_sts_cache_directory=self.mktemp())
            store.cache = mtasts.PolicyCache(self.mktemp())
            if isinstance(answer, Exception):
                self.http.responses[URL] = answer
            else:
                self.http.serve(URL, answer)
            state = self.lookup(store)
            self.assertIsNone(state.policy)
            self.assertEqual(state.failure, expected)
        self.http.serve(URL, RFC_POLICY, media_type="text/html")
        store = PolicyStore(settings(self.mktemp()), self.dns, self.http, self.clock)
        self.assertEqual(self.lookup(store).failure, mtasts.FETCH_ERROR)

    def test_mode_none_withdraws_the_policy(self):
        store = self.store()
        self.lookup(store)
        self.http.serve(URL, "version: STSv1\nmode: none\nmax_age: 86400\n")
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=two")
        self.clock.advance(mtasts.TXT_RECHECK_INTERVAL + 1)
        self.assertIsNone(self.lookup(store).policy)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "example.com.json")))


class DecisionTests(unittest.TestCase):
    def state(self, text: str = RFC_POLICY) -> mtasts.PolicyState:
        policy = parse_policy(text)
        return mtasts.PolicyState("example.com", mtasts.CachedPolicy("example.com", "1", policy, 0, 1e12))

    def test_enforce(self):
        default = TLSPolicy(TLSLevel.MAY)
        refused = decide(self.state(), "mx.evil.test", default, dane=False)
        self.assertEqual(refused.refusal.dsn, "4.7.5")
        self.assertEqual(refused.refusal.text,
                         "MX host mx.evil.test does not match the MTA-STS policy of example.com")
        allowed = decide(self.state(), "mail.example.com", default, dane=False)
        self.assertIsNone(allowed.refusal)
        self.assertEqual(allowed.tls_policy.level, TLSLevel.VERIFY)
        self.assertEqual(allowed.tls_policy.match, ("hostname",))

    def test_a_level_raised_for_requiretls_keeps_the_mx_patterns(self):
        raised = TLSPolicy(TLSLevel.VERIFY, source="smtp_tls_security_level raised to verify by REQUIRETLS")
        refused = decide(self.state(), "mx.evil.test", raised, dane=False)
        self.assertEqual(refused.refusal.text,
                         "MX host mx.evil.test does not match the MTA-STS policy of example.com")

    def test_precedence(self):
        mapped = TLSPolicy(TLSLevel.ENCRYPT, source="smtp_tls_policy_maps entry for example.com")
        self.assertFalse(decide(self.state(), "mx.evil.test", mapped, dane=False).applies)
        self.assertFalse(decide(self.state(), "mx.evil.test", TLSPolicy(TLSLevel.MAY), dane=True).applies)
        testing = decide(self.state(RFC_POLICY.replace("enforce", "testing")), "mx.evil.test",
                         TLSPolicy(TLSLevel.MAY), dane=False)
        self.assertTrue(testing.testing)
        self.assertIsNone(testing.refusal)
        self.assertIsNone(testing.tls_policy)


class SecurityHookTests(unittest.TestCase):
    """The decision point in relayagent.smtp.security over fake sessions."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dns = FakeDNSResolver()
        self.http = FakeHTTPClient()
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=one")
        self.store = PolicyStore(settings(self.mktemp()), self.dns, self.http, self.clock)
        self.recorder = Recorder(self.mktemp(), self.clock)

    def negotiate(self, mx_host: str, *, mode: str = "enforce", dane: bool = False) -> Deferred:
        self.http.serve(URL, RFC_POLICY.replace("enforce", mode))
        policy = SecurityPolicy(Config.defaults().replace(smtp_tls_security_level="may"),
                                mta_sts=self.store, tlsrpt=self.recorder, dane_applies=lambda host: dane)
        security = policy.for_nexthop("example.com")
        server = ServerInfo(mx_host, "192.0.2.1", 25, "example.com", policy_domain="example.com")
        session = FakeSession(server, extensions={})  # no STARTTLS offered
        return security.negotiate(session)

    def counts(self) -> dict:
        period = self.recorder.periods[self.recorder.period_of(self.clock.seconds())]
        (counts,) = period["example.com"].values()
        return counts

    def test_enforce_refuses_an_mx_outside_the_policy(self):
        failure = self.failureResultOf(self.negotiate("mx.evil.test"), DeliveryFailure)
        self.assertIn("MX host mx.evil.test does not match the MTA-STS policy of example.com",
                      failure.value.status.text)
        self.assertEqual(self.counts()["failure"], 1)

    def test_enforce_refuses_plaintext(self):
        failure = self.failureResultOf(self.negotiate("mail.example.com"), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "4.7.4")
        self.assertIn('"result-type": "starttls-not-supported"', next(iter(self.counts()["details"])))

    def test_testing_delivers_and_counts_the_failure(self):
        self.successResultOf(self.negotiate("mx.evil.test", mode="testing"))
        self.assertEqual(self.counts()["failure"], 1)

    def test_dane_wins(self):
        self.successResultOf(self.negotiate("mx.evil.test", dane=True))
        self.assertEqual(self.http.gets, [])


class InterfaceTests(unittest.TestCase):
    def test_the_http_clients_provide_the_interface(self):
        from twisted.internet import reactor
        from zope.interface.verify import verifyObject

        from relayagent.smtp.https import HTTPSClient
        from relayagent.smtp.interfaces import IHTTPClient

        self.assertTrue(verifyObject(IHTTPClient, FakeHTTPClient()))
        self.assertTrue(verifyObject(IHTTPClient, HTTPSClient(reactor)))


class WorkerTests(unittest.TestCase):
    """Two stores on one cache directory, as two worker processes."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dns = FakeDNSResolver()
        self.http = FakeHTTPClient()
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=one")
        self.http.serve(URL, RFC_POLICY)

    def store(self) -> PolicyStore:
        return PolicyStore(settings(self.directory), self.dns, self.http, self.clock)

    def test_a_policy_refreshed_by_one_worker_is_not_expired_by_the_other(self):
        first, second = self.store(), self.store()
        first.policy_for("example.com")
        second.policy_for("example.com")
        self.assertEqual(len(self.http.gets), 1)  # the second read the first's file
        self.clock.advance(604800 - 3600)
        first.refresh_expiring()
        self.clock.advance(7200)  # the second's memory is now expired
        self.assertIsNotNone(second.current("example.com"))
        self.assertTrue(os.path.exists(os.path.join(self.directory, "example.com.json")))

    def test_a_new_id_fetched_by_one_worker_is_read_by_the_other(self):
        first, second = self.store(), self.store()
        first.policy_for("example.com")
        second.policy_for("example.com")
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=two")
        self.clock.advance(mtasts.TXT_RECHECK_INTERVAL + 1)
        first.policy_for("example.com")
        second.policy_for("example.com")
        self.assertEqual(len(self.http.gets), 2)
        self.assertEqual(second.policies["example.com"].policy_id, "two")
