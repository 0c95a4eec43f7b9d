"""Tests for relayagent.smtp.conncache: storing, taking, expiry and the reuse
limits of idle sessions, on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.smtp.conncache import CachedSession, ConnectionCache
from relayagent.testing import FakeSession


class ConnectionCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def cache(self, **kwargs) -> ConnectionCache:
        options = dict(idle_limit=2.0, reuse_time_limit=300.0)
        options.update(kwargs)
        return ConnectionCache(self.clock, **options)

    def entry(self) -> CachedSession:
        return CachedSession(FakeSession(), nexthop="[relay.example]:587", created=self.clock.seconds())

    def test_from_config_defaults(self) -> None:
        cache = ConnectionCache.from_config(Config.defaults(), self.clock)
        self.assertEqual((cache.idle_limit, cache.reuse_time_limit, cache.reuse_count_limit),
                         (2.0, 300.0, 0))
        self.assertTrue(cache.on_demand)

    def test_take_by_nexthop_counts_uses(self) -> None:
        cache = self.cache()
        entry = self.entry()
        self.assertTrue(cache.store(entry))
        # Only under its nexthop: no session is found by server address.
        self.assertIsNone(cache.take("192.0.2.1:587"))
        self.assertIs(cache.take("[relay.example]:587"), entry)
        self.assertEqual(entry.uses, 2)
        self.assertIsNone(cache.take("[relay.example]:587"))
        self.assertEqual(len(cache), 0)

    def test_idle_session_closed_after_the_time_limit(self) -> None:
        cache = self.cache()
        entry = self.entry()
        cache.store(entry)
        self.clock.advance(1.9)
        self.assertEqual(entry.session.quits, 0)
        self.clock.advance(0.1)
        self.assertEqual(entry.session.quits, 1)
        self.assertIsNone(cache.take("[relay.example]:587"))

    def test_taken_session_is_not_closed_by_its_old_timer(self) -> None:
        cache = self.cache()
        entry = self.entry()
        cache.store(entry)
        cache.take("[relay.example]:587")
        self.clock.advance(10)
        self.assertEqual(entry.session.quits, 0)

    def test_reuse_time_limit(self) -> None:
        cache = self.cache()
        entry = self.entry()
        self.clock.advance(299)
        self.assertTrue(cache.reusable(entry))
        self.clock.advance(1)
        self.assertFalse(cache.reusable(entry))
        self.assertFalse(cache.store(entry))

    def test_reuse_count_limit(self) -> None:
        cache = self.cache(reuse_count_limit=2)
        entry = self.entry()
        self.assertTrue(cache.store(entry))
        self.assertIs(cache.take("[relay.example]:587"), entry)  # second use
        self.assertFalse(cache.store(entry))

    def test_freshest_session_first(self) -> None:
        cache = self.cache()
        first, second = self.entry(), self.entry()
        cache.store(first)
        cache.store(second)
        self.assertIs(cache.take("[relay.example]:587"), second)
        self.assertIs(cache.take("[relay.example]:587"), first)

    def test_policy(self) -> None:
        cache = self.cache(always_cache=("relay.example",))
        self.assertTrue(cache.wants_caching("[relay.example]:587", "example.com", 0))
        self.assertFalse(cache.wants_caching("other.example", "other.example", 0))
        self.assertTrue(cache.wants_caching("other.example", "other.example", 1))
        self.assertFalse(self.cache(on_demand=False).wants_caching("other.example", "other.example", 5))
        self.assertFalse(self.cache(idle_limit=0).wants_caching("[relay.example]:587", "x", 5))

    def test_close_all(self) -> None:
        cache = self.cache()
        entries = [self.entry(), self.entry()]
        for entry in entries:
            cache.store(entry)
        cache.close_all()
        self.assertEqual([e.session.quits for e in entries], [1, 1])
        self.assertEqual(len(cache), 0)
        self.clock.advance(5)
        self.assertEqual([e.session.quits for e in entries], [1, 1])
