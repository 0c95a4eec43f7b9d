"""Tests for relayagent.qmgr.shared: SharedLimiter against a real
redis-server (started here on a loopback port and a Unix socket in a
temporary directory), two limiters in this process standing for two
nodes.  Skips when redis-server is missing.

- concurrency slots are shared, and a node that stops renewing (dead)
  frees its slots within the lease;
- the message rate is one GCRA on the server for every node;
- a shaping action set by one node holds for the others, logged once;
- Redis stopped: the local share (limit / nodes), one warning line;
  started again: one line, and the decisions are Redis's again.

Every wait is bounded; the server is stopped in cleanup."""

from __future__ import annotations

import time

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from relayagent.common.config import Config
from relayagent.common.status import Status
from relayagent.qmgr.interfaces import ILimiter
from relayagent.qmgr.limits import LimitSettings, parse_shaping
from relayagent.qmgr.shared import RedisSettings, SharedLimiter, parse_redis_address
from relayagent.testing import LogCapture
from tests.support.redis import RedisServer


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class AddressTests(TestCase):
    def test_forms(self) -> None:
        self.assertEqual(str(parse_redis_address("redis://127.0.0.1:6380/2")), "redis://127.0.0.1:6380/2")
        self.assertEqual(parse_redis_address("redis://localhost").port, 6379)
        self.assertEqual(parse_redis_address("unix:/run/redis.sock?db=3").db, 3)
        for bad in ("http://x", "redis://", "unix:relative", "redis://h:99999", "redis://h/x"):
            self.assertRaises(ValueError, parse_redis_address, bad)


class SharedLimiterTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:
        if not RedisServer.available():
            raise SkipTest(RedisServer.missing_reason)
        self.redis = RedisServer()
        self.addCleanup(self.redis.close)
        await self.redis.start()
        self.logs = LogCapture(self)
        self.limiters: list[SharedLimiter] = []

    async def tearDown(self) -> None:
        for limiter in self.limiters:
            await limiter.stop()

    def limiter(self, unix: bool = False, rules: str = "", **overrides: object) -> SharedLimiter:
        values = {"relayagent_redis": f"unix:{self.redis.socket}" if unix else self.redis.url,
                  "relayagent_redis_lease": "1s", "relayagent_redis_timeout": "0.5s",
                  "relayagent_redis_prefix": f"t{id(self)}:", **overrides}
        config = Config.defaults().replace(**{k: str(v) for k, v in values.items()})
        limiter = SharedLimiter(LimitSettings.from_config(config), RedisSettings.from_config(config),
                                reactor, rules=parse_shaping(rules, "t"))
        self.limiters.append(limiter)
        return limiter

    def warnings(self) -> list[str]:
        return [m for m in self.logs.messages() if "shared limits" in m]

    async def test_slots_are_shared_and_a_dead_node_frees_them_within_the_lease(self) -> None:
        a = self.limiter(smtp_destination_concurrency_limit=3)
        b = self.limiter(unix=True, smtp_destination_concurrency_limit=3)
        verifyObject(ILimiter, a)
        await a.start()
        await b.start()
        held = [await a.acquire("k"), await a.acquire("k"), await b.acquire("k")]
        self.assertTrue(all(grant.ok for grant in held))
        refused = await b.acquire("k")
        self.assertEqual((refused.ok, refused.wait), (False, None))
        self.assertTrue((await b.acquire("other")).ok)
        b.release("k", held[2])
        await sleep(0.05)
        again = await b.acquire("k")
        self.assertTrue(again.ok)
        # a renews through two lease times: its slots stay.
        await sleep(1.5)
        self.assertFalse((await b.acquire("k")).ok)
        # a dies: no more renewals, nothing released.
        a._renewal.stop()
        died = time.monotonic()
        while not (await b.acquire("k")).ok:
            self.assertLess(time.monotonic() - died, 3.0, "the dead node's slots were not freed")
            await sleep(0.05)
        self.assertLess(time.monotonic() - died, 1.0 + 0.5)
        self.assertEqual(b.nodes_seen, 2)

    async def test_one_rate_for_every_node(self) -> None:
        nodes = [self.limiter(smtp_destination_rate_limit="20/s"), self.limiter(unix=True,
                 smtp_destination_rate_limit="20/s")]
        granted = []

        async def run(limiter: SharedLimiter, until: float) -> None:
            while time.monotonic() < until:
                grant = await limiter.acquire("fast")
                if grant.ok:
                    granted.append(time.monotonic())
                    limiter.release("fast", grant)
                else:
                    await sleep(max(0.0, min(grant.wait or 0.01, until - time.monotonic())))

        started = time.monotonic()
        runs = [Deferred.fromCoroutine(run(node, started + 1.5)) for node in nodes]
        for running in runs:
            await running
        # 1.5 s at 20/s plus the burst of two, give or take one.
        self.assertLessEqual(abs(len(granted) - 32), 2, len(granted))

    async def test_shaping_is_shared_and_logged_once(self) -> None:
        rules = "/^421[ -]4\\.7\\.28 / suspend 1s\n"
        a, b = self.limiter(rules=rules), self.limiter(rules=rules)
        reply = Status("4.7.28", "x", code=421, reply="421 4.7.28 unusual rate")
        self.assertIsNotNone(a.shape("google", reply))
        await sleep(0.1)
        b.shape("google", reply)
        await sleep(0.1)
        grant = await b.acquire("google")
        self.assertFalse(grant.ok)
        self.assertTrue(0.5 < grant.wait <= 1.0, grant.wait)
        lines = [m for m in self.logs.messages() if m.startswith("destination google")]
        self.assertEqual(lines, ['destination google: suspended for 1s after "421 4.7.28 unusual rate"'])
        await sleep(1.0)
        self.assertTrue((await b.acquire("google")).ok)
        self.assertIn("destination google: resumed", self.logs.messages())

    async def test_a_rate_cut_holds_for_every_node_at_once(self) -> None:
        rules = "/^421[ -]4\\.7\\.28 / rate 2/s 2s\n"
        a = self.limiter(rules=rules, smtp_destination_rate_limit="100/s")
        b = self.limiter(rules=rules, smtp_destination_rate_limit="100/s")
        self.assertTrue((await b.acquire("google")).ok)
        a.shape("google", Status("4.7.28", "x", code=421, reply="421 4.7.28 unusual rate"))
        await sleep(0.05)
        # No burst after the cut: b's next one half a second away.
        grant = await b.acquire("google")
        self.assertFalse(grant.ok)
        self.assertTrue(0.3 < grant.wait <= 0.5, grant.wait)
        await sleep(grant.wait)
        self.assertTrue((await b.acquire("google")).ok)
        self.assertFalse((await b.acquire("google")).ok)
        await sleep(2.0)  # the action is over: 100/s again
        self.assertTrue((await b.acquire("google")).ok)
        self.assertTrue((await b.acquire("google")).ok)

    async def test_redis_away_local_share_then_back(self) -> None:
        a = self.limiter(smtp_destination_concurrency_limit=4)
        b = self.limiter(smtp_destination_concurrency_limit=4)
        await a.start()
        await b.start()
        await a.renew()
        self.assertEqual(a.nodes_seen, 2)
        b._renewal.stop()  # b says nothing more: every line below is a's
        held = await a.acquire("k")
        self.assertIsNotNone(held.lease)
        await self.redis.stop()
        grants = [await a.acquire("k") for _ in range(4)]
        # 4 / 2 nodes = 2 locally, the Redis slot held counted among them.
        self.assertEqual([grant.ok for grant in grants], [True, False, False, False])
        self.assertIsNone(grants[0].lease)
        self.assertFalse(a.up)
        self.assertEqual(len([w for w in self.warnings() if "cannot reach" in w]), 1)
        a.release("k", held)
        self.assertTrue((await a.acquire("k")).ok)
        await self.redis.start()
        deadline = time.monotonic() + 10
        while not a.up:
            self.assertLess(time.monotonic(), deadline, "the shared limits did not come back")
            await sleep(0.1)
        grant = await a.acquire("k")
        self.assertTrue(grant.ok)
        self.assertIsNotNone(grant.lease)
        self.assertEqual(len([w for w in self.warnings() if "reachable again" in w]), 1)
