"""Tests for relayagent.qmgr.rates and relayagent.qmgr.limits (GCRA, keys
and rollup, shaping) and their use by the queue manager, on a fake clock;
and split_limits's share of the rates per worker."""

from __future__ import annotations

import os

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relayagent.common.config import Config, ConfigError
from relayagent.common.status import Status
from relayagent.master.worker import split_limits
from relayagent.qmgr.delivery import connections_made, server_replies
from relayagent.qmgr.interfaces import ILimiter
from relayagent.qmgr.limits import (
    BUILTIN_PROVIDERS,
    SLOT_RETRY,
    Keyer,
    LimitSettings,
    LocalLimiter,
    load_shaping,
    parse_shaping,
)
from relayagent.qmgr.rates import Gcra, Rate
from relayagent.qmgr.scheduler import QueueManager, RequestResult
from relayagent.qmgr.shared import check_limits, make_limiter, mx_hosts_from
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.result import AttemptFailure, RecipientOutcome, SmtpResult, Transmission
from relayagent.spool import Spool
from relayagent.testing import FakeDeliveryAgent, FakeDNSResolver, FakeLimiter, LogCapture

START = 1_700_000_000.0
GMAIL_RATE = Status(
    "4.7.28",
    "host gmail-smtp-in.l.google.com[192.0.2.1] said: 421-4.7.28 Our system has detected an unusual "
    "rate of unsolicited mail originating from your IP address. (in reply to end of DATA command)",
    code=421, stage="end of DATA",
    reply="421-4.7.28 Our system has detected an unusual rate of unsolicited mail originating from "
          "your IP address. To protect our users from spam, mail sent from your IP address has been "
          "temporarily rate limited. - gsmtp",
)


def settings(**overrides: object) -> LimitSettings:
    config = Config.defaults().replace(**{k: str(v) for k, v in overrides.items()})
    return LimitSettings.from_config(config)


class RateTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(Rate.parse("100/m", name="x").interval, 0.6)
        self.assertEqual(Rate.parse(" 5 / S ", name="x").interval, 0.2)
        self.assertEqual(Rate.parse("2/h", name="x").interval, 1800)
        self.assertIsNone(Rate.parse("", name="x"))
        self.assertEqual(str(Rate.parse("100/m", name="x").scaled(0.5)), "50/m")
        for bad in ("100", "100/w", "0/s", "-1/s", "x/m", "1/m/s"):
            with self.assertRaises(ValueError) as caught:
                Rate.parse(bad, name="smtp_destination_rate_limit")
            self.assertIn("smtp_destination_rate_limit = ", str(caught.exception))

    def test_gcra_spaces_units_after_a_burst_of_two(self) -> None:
        clock = Clock()
        cell = Gcra(Rate.parse("10/s", name="x"), clock)
        self.assertEqual([cell.take(), cell.take()], [0.0, 0.0])
        self.assertAlmostEqual(cell.take(), 0.1)
        clock.advance(0.1)
        self.assertEqual(cell.take(), 0.0)
        self.assertAlmostEqual(cell.due(), 0.1)

    def test_gcra_long_run_rate_is_the_limit(self) -> None:
        # Take whenever allowed, waking 3 ms late each time: 1000 units
        # in (1000 - burst) intervals, no drift from the lateness.
        clock = Clock()
        cell = Gcra(Rate.parse("50/s", name="x"), clock)
        taken = 0
        while taken < 1000:
            wait = cell.take()
            if wait == 0:
                taken += 1
            else:
                clock.advance(wait + 0.003)
        self.assertLess(abs(clock.seconds() - 998 * 0.02), 0.05)

    def test_charge_counts_after_the_fact(self) -> None:
        clock = Clock()
        cell = Gcra(Rate.parse("1/s", name="x"), clock, burst=1)
        cell.charge(3)
        self.assertAlmostEqual(cell.due(), 3.0)


class KeyTests(SynchronousTestCase):
    def key(self, keyer: Keyer, nexthop: str, domain: str) -> str:
        found = []
        keyer.key(nexthop, domain).addCallback(found.append)
        return found[0]

    def test_nexthop_by_default_and_rolled_up_by_parent_domain(self) -> None:
        keyer = Keyer(settings(smtp_destination_rollup_maps="inline:{ .google.com=google }"))
        self.assertEqual(self.key(keyer, "example.net", "example.net"), "example.net")
        self.assertEqual(self.key(keyer, "aspmx.l.google.com", "x.org"), "google")
        self.assertEqual(self.key(keyer, "google.com", "x.org"), "google.com")  # .google.com: below it

    def test_domain_mode_with_a_regexp_table(self) -> None:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("# providers\n/(^|\\.)outlook\\.com$/ microsoft\n")
        keyer = Keyer(settings(smtp_destination_limit_key="domain",
                               smtp_destination_rollup_maps=f"regexp:{os.path.abspath(path)}"))
        self.assertEqual(self.key(keyer, "[127.0.0.1]:25", "Outlook.COM"), "microsoft")
        self.assertEqual(self.key(keyer, "[127.0.0.1]:25", "example.org"), "example.org")

    def test_mx_mode_rolls_up_the_mx_host_set(self) -> None:
        mx = {
            "gmail.com": ["gmail-smtp-in.l.google.com.", "alt1.gmail-smtp-in.l.google.com."],
            "hosted.example": ["aspmx.l.google.com"],
            "small.example": ["mx2.small.example", "mx1.small.example"],
            "none.example": [],
        }
        asked = []

        def mx_hosts(domain: str):
            asked.append(domain)
            if domain == "broken.example":
                return fail(RuntimeError("SERVFAIL"))
            return succeed(mx[domain])

        clock = Clock()
        keyer = Keyer(settings(smtp_destination_limit_key="mx",
                               smtp_destination_rollup_maps="inline:{ .google.com=google }"),
                      mx_hosts=mx_hosts, clock=clock)
        self.assertEqual(self.key(keyer, "gmail.com", "gmail.com"), "google")
        self.assertEqual(self.key(keyer, "hosted.example", "hosted.example"), "google")
        # KumoMTA's site name: the sorted host set.
        self.assertEqual(self.key(keyer, "small.example", "small.example"),
                         "mx1.small.example,mx2.small.example")
        self.assertEqual(self.key(keyer, "none.example", "none.example"), "none.example")
        self.assertEqual(self.key(keyer, "broken.example", "broken.example"), "broken.example")
        self.key(keyer, "gmail.com", "gmail.com")
        self.assertEqual(asked.count("gmail.com"), 1)  # cached

    def test_bad_mode(self) -> None:
        self.assertRaises(ConfigError, Config.defaults().replace, smtp_destination_limit_key="mx2")


class ShapingTableTests(SynchronousTestCase):
    def test_rules_and_their_errors(self) -> None:
        rules = parse_shaping(
            "# c\n/^421[ -]4\\.7\\.28 / rate 50/m 1h\ngoogle /TSS04/ suspend 30m\n"
            "* /Rate Limited/I concurrency 2 10m\n", "t")
        self.assertEqual([(r.action, r.duration, r.key) for r in rules],
                         [("rate", 3600, None), ("suspend", 1800, "google"), ("concurrency", 600, None)])
        self.assertEqual(str(rules[0].rate), "50/m")
        self.assertTrue(rules[1].matches("google", "421 4.7.0 [tss04] deferred"))  # case-insensitive
        self.assertFalse(rules[1].matches("other", "421 4.7.0 [TSS04] deferred"))
        self.assertFalse(rules[2].matches("x", "451 4.7.650 rate limited"))  # I: case-sensitive
        self.assertTrue(rules[2].matches("x", "451 4.7.650 Rate Limited"))
        for bad, what in (("/x/ slow 1h", "expected suspend"), ("/x/ rate fast 1h", "bad value"),
                          ("/x/ suspend forever", "bad duration"), ("/(/ suspend 1h", "bad pattern"),
                          ("x suspend 1h", "expected [KEY]"), ("/x/ concurrency 0 1h", "bad value")):
            with self.assertRaises(ConfigError) as caught:
                parse_shaping("# first\n" + bad, "table")
            self.assertIn("table, line 2: " + what, str(caught.exception))

    def test_the_shipped_table_matches_the_providers_texts(self) -> None:
        rules = load_shaping([BUILTIN_PROVIDERS])
        limiter = LocalLimiter(settings(), Clock(), rules=rules)
        cases = {
            "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail": "rate",
            "421-4.7.0 Our system has detected an unusual rate of unsolicited mail": "rate",
            "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation": "concurrency",
            "451 4.7.500 Server busy. Please try again later": "suspend",
            "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume": "rate",
            "421 4.7.1 [TS03] All messages from 192.0.2.1 permanently deferred": "suspend",
        }
        for text, action in cases.items():
            code = int(text[:3])
            rule = limiter.rule_for("k", Status(text[4:9].strip() if text[3] == " " else text[4:10].strip(),
                                                "x", code=code, reply=text))
            self.assertIsNotNone(rule, text)
            self.assertEqual(rule.action, action, text)
        tls = Status("4.7.0", "x", code=421, reply="421 4.7.0 TLS required for this domain")
        self.assertIsNone(limiter.rule_for("k", tls))
        self.assertIsNone(limiter.rule_for("k", Status("4.4.1", "connect to x: refused")))

    def test_a_table_file_and_a_bad_type(self) -> None:
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("/x/ suspend 1m\n")
        self.assertEqual(len(load_shaping([path, f"regexp:{path}"])), 2)
        self.assertRaises(ConfigError, load_shaping, ["texthash:/etc/x"])
        self.assertRaises(ConfigError, load_shaping, ["/nonexistent/shaping"])


class LocalLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.logs = LogCapture(self)

    def acquire(self, limiter: LocalLimiter, key: str):
        found = []
        limiter.acquire(key).addCallback(found.append)
        return found[0]

    def test_interface(self) -> None:
        verifyObject(ILimiter, LocalLimiter(settings(), self.clock))

    def test_concurrency_per_key_and_release(self) -> None:
        limiter = LocalLimiter(settings(smtp_destination_concurrency_limit=2), self.clock)
        first, second = self.acquire(limiter, "a"), self.acquire(limiter, "a")
        self.assertTrue(first.ok and second.ok)
        third = self.acquire(limiter, "a")
        self.assertEqual((third.ok, third.wait), (False, None))
        self.assertTrue(self.acquire(limiter, "b").ok)
        limiter.release("a", first)
        self.assertTrue(self.acquire(limiter, "a").ok)

    def test_one_at_a_time_the_rate_holds(self) -> None:
        # Each delivery ends before the next: the key's state outlives
        # its last delivery while units are owed.
        limiter = LocalLimiter(settings(smtp_destination_rate_limit="10/s"), self.clock)
        sent = 0
        for _ in range(100):
            grant = self.acquire(limiter, "k")
            if grant.ok:
                sent += 1
                limiter.release("k", grant)
            self.clock.advance(0.02)
        self.assertEqual(sent, 2 * 10 + 1)  # 2 s at 10/s, and the burst's second
        self.assertFalse(limiter.keys["k"].idle)  # units owed: remembered
        self.clock.advance(1)
        self.assertTrue(limiter.keys["k"].idle)  # nothing owed: may be forgotten

    def test_message_and_connection_rates(self) -> None:
        limiter = LocalLimiter(settings(smtp_destination_rate_limit="2/s",
                                        smtp_connection_rate_limit="1/s"), self.clock)
        grant = self.acquire(limiter, "a")
        limiter.release("a", grant, connections=3)  # three connections: 1 s each, burst 2
        waiting = self.acquire(limiter, "a")
        self.assertFalse(waiting.ok)
        self.assertAlmostEqual(waiting.wait, 2.0)
        self.clock.advance(2.0)
        self.assertTrue(self.acquire(limiter, "a").ok)

    def test_shaping_lowers_the_rate_for_the_time_then_restores_it(self) -> None:
        rules = parse_shaping("/^421[ -]4\\.7\\.28 / rate 6/m 1h\n", "t")
        limiter = LocalLimiter(settings(smtp_destination_rate_limit="60/s"), self.clock, rules=rules)
        self.assertIsNotNone(limiter.shape("google", GMAIL_RATE))
        self.assertIsNone(limiter.shape("google", Status("4.4.1", "no code")))
        limiter.shape("google", GMAIL_RATE)  # in force already: no second line
        lines = [m for m in self.logs.messages() if m.startswith("destination google")]
        self.assertEqual(lines, ['destination google: rate lowered to 6/m for 1h after '
                                 '"421-4.7.28 Our system has detected an unusual rate of unsolicited '
                                 'mail origin..."'])
        # No burst right after the reply: one every 10 s from now.
        self.assertAlmostEqual(self.acquire(limiter, "google").wait, 10.0, places=3)
        self.clock.advance(10)
        self.assertTrue(self.acquire(limiter, "google").ok)
        self.assertAlmostEqual(self.acquire(limiter, "google").wait, 10.0, places=3)
        self.clock.advance(3590)
        lines = [m for m in self.logs.messages() if m.startswith("destination google")]
        self.assertEqual(lines[1:], ["destination google: rate back to 60/s"])
        self.assertTrue(self.acquire(limiter, "google").ok)

    def test_a_shaped_rate_without_a_configured_one_follows_the_share(self) -> None:
        rules = parse_shaping("/4\\.7\\.28/ rate 6/m 1h\n", "t")
        limiter = LocalLimiter(settings(), self.clock, rules=rules)
        self.assertTrue(self.acquire(limiter, "g").ok)
        limiter.shape("g", GMAIL_RATE)
        self.assertAlmostEqual(self.acquire(limiter, "g").wait, 10.0, places=3)  # 6/m
        limiter.set_share(0.5)  # 3/m from now on
        self.assertTrue(self.acquire(limiter, "g").ok)
        self.assertAlmostEqual(self.acquire(limiter, "g").wait, 20.0, places=3)
        self.clock.advance(20)
        self.assertTrue(self.acquire(limiter, "g").ok)
        self.assertAlmostEqual(self.acquire(limiter, "g").wait, 20.0, places=3)
        self.clock.advance(3600)
        self.assertIn("destination g: rate limit lifted", self.logs.messages())
        self.assertEqual([self.acquire(limiter, "g").ok for _ in range(3)], [True, True, True])

    def test_reconfigure_keeps_what_was_earned(self) -> None:
        limiter = LocalLimiter(settings(smtp_destination_rate_limit="1/s"), self.clock)
        self.assertTrue(self.acquire(limiter, "k").ok)
        self.assertTrue(self.acquire(limiter, "k").ok)
        limiter.reconfigure(settings(smtp_destination_rate_limit="1/m", smtp_connection_rate_limit="1/h",
                                     smtp_destination_concurrency_limit=5))
        # The 2 s owed at 1/s stay owed: one more now (the burst), then 2 s.
        self.assertTrue(self.acquire(limiter, "k").ok)
        self.assertAlmostEqual(self.acquire(limiter, "k").wait, 2.0, places=3)
        self.assertEqual((limiter.concurrency_limit, str(limiter.connection_rate)), (5, "1/h"))
        self.assertRaises(ValueError, limiter.reconfigure, settings(smtp_destination_rate_limit="x"))
        self.assertEqual(str(limiter.message_rate), "1/m")  # nothing changed by the refused one
        limiter.reconfigure(settings())
        self.assertTrue(self.acquire(limiter, "k").ok)  # no rate now

    def test_suspend_and_concurrency_actions(self) -> None:
        rules = parse_shaping("/TS03/ suspend 4h\n/4\\.7\\.650/ concurrency 1 10m\n", "t")
        limiter = LocalLimiter(settings(smtp_destination_concurrency_limit=5), self.clock, rules=rules)
        limiter.shape("yahoo", Status("4.7.1", "x", code=421, reply="421 4.7.1 [TS03] All messages"))
        self.assertEqual(self.acquire(limiter, "yahoo").wait, 4 * 3600)
        limiter.shape("ms", Status("4.7.650", "x", code=451, reply="451 4.7.650 rate limited"))
        self.assertTrue(self.acquire(limiter, "ms").ok)
        self.assertFalse(self.acquire(limiter, "ms").ok)
        self.clock.advance(600)
        self.assertTrue(self.acquire(limiter, "ms").ok)
        self.clock.advance(4 * 3600)
        text = "\n".join(self.logs.messages())
        self.assertIn("destination yahoo: suspended for 4h after", text)
        self.assertIn("destination ms: concurrency back to 5", text)
        self.assertIn("destination yahoo: resumed", text)


class SchedulerLimitTests(SynchronousTestCase):
    """The queue manager with a local limiter: waiting is not failing."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = Spool(self.mktemp(), clock=self.clock.seconds)
        self.spool.ensure_layout()
        self.agent = FakeDeliveryAgent(self.spool)
        self.logs = LogCapture(self)

    def manager(self, **overrides: object) -> QueueManager:
        config = Config.defaults().replace(**{k: str(v) for k, v in overrides.items()})
        limiter, keyer = make_limiter(config, self.clock)
        manager = QueueManager(config, self.spool, self.agent, self.clock,
                               lambda recipient: recipient.domain, limiter=limiter, keyer=keyer)
        self.addCleanup(manager.stop)
        return manager

    def enqueue(self, count: int, domain: str) -> None:
        for _ in range(count):
            self.spool.enqueue("s@example.org", [f"u@{domain}"], b"Subject: x\n\nbody\n")

    def finish_all(self, result: RequestResult | None = None) -> None:
        while self.agent.requests:
            _, deferred = self.agent.requests.pop(0)
            deferred.callback(result or RequestResult())

    def test_no_limit_no_limiter(self) -> None:
        self.assertEqual(make_limiter(Config.defaults(), self.clock), (None, None))

    def test_over_the_rate_waits_and_others_go_meanwhile(self) -> None:
        self.enqueue(6, "slow.example")
        self.enqueue(3, "other.example")
        manager = self.manager(smtp_destination_rate_limit="2/s",
                               smtp_destination_rollup_maps="inline:{ slow.example=slow }")
        manager.start()
        destinations = self.agent.destinations()
        self.assertEqual(destinations.count("slow.example"), 2)  # the burst of two
        self.assertEqual(destinations.count("other.example"), 2)
        self.finish_all()
        sent = 4
        for _ in range(10):
            self.clock.advance(0.5)
            sent += len(self.agent.requests)
            self.finish_all()
        self.assertEqual(sent, 9)
        self.assertEqual(self.agent.unsent, [])  # nothing deferred for waiting
        self.assertEqual(len(self.agent.finished), 9)
        self.assertFalse([m for m in self.logs.messages() if "slow" in m])  # no line per message

    def test_a_reply_shapes_the_key(self) -> None:
        self.enqueue(4, "gmail.com")
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("/^421[ -]4\\.7\\.28 / rate 1/m 10m\n")
        manager = self.manager(smtp_destination_rate_limit="100/s", smtp_shaping_maps=path,
                               smtp_destination_concurrency_limit=1,
                               smtp_initial_destination_concurrency=1)
        manager.start()
        self.assertEqual(len(self.agent.requests), 1)
        self.finish_all(RequestResult(replies=(GMAIL_RATE,)))
        # No burst after the reply: the next one a minute later.
        self.clock.advance(59)
        self.assertEqual(self.agent.requests, [])
        self.clock.advance(1)
        self.assertEqual(len(self.agent.requests), 1)
        self.finish_all()
        self.clock.advance(60)
        self.assertEqual(len(self.agent.requests), 1)
        self.finish_all()
        self.clock.advance(600)  # the action ends: the last one at the full rate
        self.finish_all()
        self.assertEqual(len(self.agent.finished), 4)
        lines = [m for m in self.logs.messages() if m.startswith("destination gmail.com")]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("rate lowered to 1/m for 10m", lines[0])
        self.assertEqual(lines[1], "destination gmail.com: rate back to 100/s")

    def test_bad_values_stop_the_start(self) -> None:
        for name, value in (("smtp_destination_rate_limit", "fast"),
                            ("smtp_shaping_maps", "/nonexistent"),
                            ("relayagent_redis", "http://x")):
            self.assertRaises((ValueError, ConfigError), check_limits,
                              Config.defaults().replace(**{name: value}))


class WorkerShareTests(SynchronousTestCase):
    def test_rates_split_per_worker_without_redis_and_whole_with_it(self) -> None:
        config = Config.defaults().replace(smtp_destination_rate_limit="100/m",
                                           smtp_destination_concurrency_limit="20")
        split = LimitSettings.from_config(split_limits(config, 4))
        self.assertEqual((split.smtp_destination_rate_limit, split.smtp_destination_concurrency_limit),
                         ("25/m", 5))
        shared = LimitSettings.from_config(split_limits(
            config.replace(relayagent_redis="redis://127.0.0.1:6379/0"), 4))
        self.assertEqual((shared.smtp_destination_rate_limit, shared.smtp_destination_concurrency_limit),
                         ("100/m", 20))


class AdmissionTests(SynchronousTestCase):
    """The queue manager's side of an asynchronous limiter (Redis's round
    trip), with the FakeLimiter answering when the test says."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = Spool(self.mktemp(), clock=self.clock.seconds)
        self.spool.ensure_layout()
        self.agent = FakeDeliveryAgent(self.spool)
        self.limiter = FakeLimiter()
        config = Config.defaults()
        self.manager = QueueManager(config, self.spool, self.agent, self.clock,
                                    lambda recipient: recipient.domain, limiter=self.limiter,
                                    keyer=Keyer(settings(smtp_destination_rollup_maps="inline:{ b.example=shared }")))
        self.addCleanup(self.manager.stop)

    def enqueue(self, count: int, domain: str) -> None:
        for _ in range(count):
            self.spool.enqueue("s@example.org", [f"u@{domain}"], b"Subject: x\n\nbody\n")

    def keys(self) -> list[str]:
        return [key for key, _ in self.limiter.asked]

    def test_one_question_per_destination_at_a_time(self) -> None:
        self.enqueue(3, "a.example")
        self.enqueue(1, "b.example")
        self.manager.start()
        self.assertEqual(sorted(self.keys()), ["a.example", "shared"])
        self.assertEqual(self.agent.requests, [])
        self.limiter.grant(self.keys().index("a.example"))
        # Granted: dispatched, and the destination asks for its next one.
        self.assertEqual(self.agent.destinations(), ["a.example"])
        self.assertEqual(sorted(self.keys()), ["a.example", "shared"])
        request, deferred = self.agent.requests.pop(0)
        self.assertEqual(request.limit_key, "a.example")
        deferred.callback(RequestResult(replies=(GMAIL_RATE,), connections=1))
        [(key, grant, connections)] = self.limiter.released
        self.assertEqual((key, grant.ok, connections), ("a.example", True, 1))
        self.assertEqual(self.limiter.shaped, [("a.example", GMAIL_RATE)])

    def test_a_wait_is_not_a_failure_and_ends_on_the_clock(self) -> None:
        self.enqueue(1, "a.example")
        self.manager.start()
        self.limiter.refuse(2.0)
        self.assertEqual((self.keys(), self.agent.unsent), ([], []))
        self.clock.advance(1.9)
        self.assertEqual(self.keys(), [])
        self.clock.advance(0.1)
        self.assertEqual(self.keys(), ["a.example"])

    def test_no_slot_asks_again_soon_or_when_one_frees(self) -> None:
        self.enqueue(2, "a.example")
        self.manager.start()
        self.limiter.grant()
        self.limiter.refuse(None)
        self.assertEqual(self.keys(), [])
        _, deferred = self.agent.requests.pop(0)
        deferred.callback(RequestResult())  # a slot of the key freed here
        self.assertEqual(self.keys(), ["a.example"])
        self.limiter.refuse(None)
        self.clock.advance(SLOT_RETRY)  # another node's may have freed
        self.assertEqual(self.keys(), ["a.example"])

    def test_a_grant_after_stop_is_given_back(self) -> None:
        self.enqueue(1, "a.example")
        self.manager.start()
        self.manager.stop()
        self.limiter.grant()
        self.assertEqual(self.agent.requests, [])
        self.assertEqual([key for key, _, _ in self.limiter.released], ["a.example"])


class ResultTests(SynchronousTestCase):
    def test_replies_and_connections_of_a_result(self) -> None:
        server = ServerInfo("mx.example", "192.0.2.1", 25, "example.net")
        deferral = Status("4.7.28", "said 421", code=421, reply="421 4.7.28 slow down")
        result = SmtpResult(
            outcomes={0: RecipientOutcome(deferral, server), 1: RecipientOutcome(deferral, server),
                      2: RecipientOutcome(Status("2.0.0", "ok", code=250), server)},
            attempts=[AttemptFailure(server, Status("4.4.2", "lost connection")),
                      AttemptFailure(None, Status("4.4.3", "lookup"))],
            transmissions={0: Transmission(1, False, 5.0, 6.0), 1: Transmission(1, False, 5.0, 6.0),
                           2: Transmission(2, False, 7.0, 8.0)},
        )
        self.assertEqual(server_replies(result), (deferral,))
        self.assertEqual(connections_made(result), 2)  # one new session, one address tried

    def test_mx_hosts_from_a_resolver(self) -> None:
        resolver = FakeDNSResolver()
        resolver.mx("gmail.com", (20, "alt1.gmail-smtp-in.l.google.com"), (5, "gmail-smtp-in.l.google.com"))
        hosts = self.successResultOf(mx_hosts_from(resolver)("gmail.com"))
        self.assertEqual(hosts, ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"])
