"""Tests for relayagent.master.metrics: the bounded nexthop label, what the
probes count, the sampled queue-manager state, the queue counts, the
/metrics resource over loopback, metrics off costing nothing, and the
Grafana dashboard's queries naming only metrics a scrape has."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from relayagent.common import probes
from relayagent.common.config import Config
from relayagent.master import metrics, metrics_http
from relayagent.master.service import RelayagentService
from relayagent.spool import Spool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DASHBOARD = os.path.join(ROOT, "docs", "examples", "grafana-relayagent.json")


def config_text(directory: str, extra: str = "") -> Config:
    return Config.from_text(
        f"queue_directory = {directory}\nmyhostname = relay.test\n"
        "relayhost = [127.0.0.1]:2525\nmetrics_endpoints = tcp:0:interface=127.0.0.1\n"
        "metrics_nexthops = example.com\nrelayagent_workers = 1\n" + extra
    )


def filled_metrics() -> tuple[metrics.Metrics, CollectorRegistry]:
    """A Metrics with every series it can have, at least once."""
    registry = CollectorRegistry()
    labels = metrics.NexthopLabels(["[127.0.0.1]:2525", "example.com"])
    counted = metrics.Metrics(labels, registry)
    counted.delivery("[127.0.0.1]:2525", "sent", "2.0.0", 0.5, (0.01, 0.02, 0.1, 0.37))
    counted.delivery("[127.0.0.1]:2525", "sent", "2.0.0", 1.5, (0.01, 0.02, 0.1, 1.37))
    counted.delivery("elsewhere.example", "deferred", "4.4.1", 30.0, (0.0, 0.0, 30.0, 0.0))
    counted.delivery("EXAMPLE.com", "bounced", "5.1.1", 0.2, (0.0, 0.0, 0.1, 0.1))
    counted.delivery(None, "expired", "4.4.7", None, None)
    counted.tls_session("may", "Untrusted")
    counted.tls_session("none", "plaintext")
    destinations = {
        "[127.0.0.1]:2525": SimpleNamespace(name="[127.0.0.1]:2525", window=5.0, busy=3),
        "a.example": SimpleNamespace(name="a.example", window=2.0, busy=1),
        "b.example": SimpleNamespace(name="b.example", window=1.0, busy=0),
    }
    manager = SimpleNamespace(active={"A": 1, "B": 2}, busy_total=4, destinations=destinations)
    counted.sample(manager, SimpleNamespace(reused=7, missed=2))
    return counted, registry


class NexthopLabelTests(SynchronousTestCase):
    def test_named_nexthops_keep_their_name_others_are_other(self):
        settings = metrics.MetricsSettings.from_config(config_text(self.mktemp()))
        labels = metrics.NexthopLabels.from_settings(settings)
        self.assertEqual(labels("[127.0.0.1]:2525"), "[127.0.0.1]:2525")
        self.assertEqual(labels("Example.COM"), "example.com")
        self.assertEqual(labels("gmail.com"), "other")
        self.assertEqual(labels(None), "none")


class CountingTests(SynchronousTestCase):
    def test_deliveries_by_status_dsn_class_and_bounded_nexthop(self):
        _, registry = filled_metrics()
        value = registry.get_sample_value
        self.assertEqual(value("relayagent_deliveries_total",
                               {"status": "sent", "dsn_class": "2", "nexthop": "[127.0.0.1]:2525"}), 2.0)
        self.assertEqual(value("relayagent_deliveries_total",
                               {"status": "deferred", "dsn_class": "4", "nexthop": "other"}), 1.0)
        self.assertEqual(value("relayagent_deliveries_total",
                               {"status": "bounced", "dsn_class": "5", "nexthop": "example.com"}), 1.0)
        self.assertEqual(value("relayagent_deliveries_total",
                               {"status": "expired", "dsn_class": "4", "nexthop": "none"}), 1.0)

    def test_delay_histograms_take_delay_and_each_part_of_delays(self):
        _, registry = filled_metrics()
        value = registry.get_sample_value
        # Four attempts had delays (the expired recipient had none).
        self.assertEqual(value("relayagent_delivery_delay_seconds_count"), 4.0)
        self.assertAlmostEqual(value("relayagent_delivery_delay_seconds_sum"), 32.2)
        self.assertEqual(value("relayagent_delivery_delay_seconds_bucket", {"le": "1.0"}), 2.0)
        self.assertAlmostEqual(value("relayagent_delivery_stage_delay_seconds_sum",
                                     {"stage": "conn_setup"}), 30.3)
        self.assertAlmostEqual(value("relayagent_delivery_stage_delay_seconds_sum",
                                     {"stage": "transmission"}), 1.84)
        self.assertEqual(value("relayagent_delivery_stage_delay_seconds_count",
                               {"stage": "before_qmgr"}), 4.0)

    def test_tls_sessions_by_level_and_result(self):
        _, registry = filled_metrics()
        self.assertEqual(registry.get_sample_value(
            "relayagent_tls_sessions_total", {"level": "may", "result": "Untrusted"}), 1.0)
        self.assertEqual(registry.get_sample_value(
            "relayagent_tls_sessions_total", {"level": "none", "result": "plaintext"}), 1.0)

    def test_sampled_queue_manager_state_and_cache_counts(self):
        counted, registry = filled_metrics()
        value = registry.get_sample_value
        self.assertEqual(value("relayagent_active_messages"), 2.0)
        self.assertEqual(value("relayagent_inflight_deliveries"), 4.0)
        self.assertEqual(value("relayagent_destination_concurrency", {"nexthop": "[127.0.0.1]:2525"}), 5.0)
        # a.example and b.example share "other": summed.
        self.assertEqual(value("relayagent_destination_concurrency", {"nexthop": "other"}), 3.0)
        self.assertEqual(value("relayagent_destination_inflight_deliveries", {"nexthop": "other"}), 1.0)
        self.assertEqual(value("relayagent_connection_cache_hits_total"), 7.0)
        self.assertEqual(value("relayagent_connection_cache_misses_total"), 2.0)
        # The next sample adds what happened since, and zeroes a
        # destination label that went away.
        manager = SimpleNamespace(active={}, busy_total=0, destinations={})
        cache = SimpleNamespace(reused=7, missed=2)
        counted.sample(manager, cache)
        cache.reused = 10
        counted.sample(manager, cache)
        self.assertEqual(value("relayagent_connection_cache_hits_total"), 17.0)
        # A reload's new cache counts from 0 again: its counts are added.
        counted.sample(manager, SimpleNamespace(reused=1, missed=0))
        self.assertEqual(value("relayagent_connection_cache_hits_total"), 18.0)
        self.assertEqual(value("relayagent_destination_concurrency", {"nexthop": "other"}), 0.0)
        self.assertEqual(value("relayagent_active_messages"), 0.0)


class QueueCollectorTests(SynchronousTestCase):
    def test_counts_each_queue_and_maildrop_when_present(self):
        spool = Spool(self.mktemp())
        spool.ensure_layout()
        spool.enqueue("a@example.org", ["b@example.net"], b"x\n")
        deferred = spool.enqueue("a@example.org", ["b@example.net"], b"x\n")
        spool.move(deferred, "incoming", "deferred")
        # Not a message: a stray name is not counted.
        open(os.path.join(spool.directory, "incoming", "README"), "w").close()
        registry = CollectorRegistry()
        registry.register(metrics.QueueCollector(spool.directory))
        value = registry.get_sample_value
        self.assertEqual(value("relayagent_queue_messages", {"queue": "incoming"}), 1.0)
        self.assertEqual(value("relayagent_queue_messages", {"queue": "deferred"}), 1.0)
        self.assertEqual(value("relayagent_queue_messages", {"queue": "hold"}), 0.0)
        self.assertIsNone(value("relayagent_queue_messages", {"queue": "maildrop"}))
        os.makedirs(os.path.join(spool.directory, "maildrop"))
        open(os.path.join(spool.directory, "maildrop", "0123456789abcdef0123456789abcdef"), "w").close()
        # A submission being written (a dot name) is not one yet.
        open(os.path.join(spool.directory, "maildrop", ".0123456789abcdef0123456789abcdef"), "w").close()
        self.assertEqual(value("relayagent_queue_messages", {"queue": "maildrop"}), 1.0)


class ServiceTests(SynchronousTestCase):
    def test_metrics_off_installs_nothing(self):
        config = Config.from_text(f"queue_directory = {self.mktemp()}\nrelayagent_workers = 1\n")
        self.assertEqual(metrics.metrics_services(config, lambda: None, reactor), [])
        service = RelayagentService(config, Clock())
        service.startService()
        try:
            self.assertIsNone(service.metrics)
            self.assertIsNone(probes.tap)
        finally:
            service.stopService()

    def test_metrics_on_installs_the_tap_until_stop(self):
        clock = Clock()
        service = RelayagentService(config_text(self.mktemp()), clock)
        service.startService()
        try:
            self.assertIs(probes.tap, service.metrics.metrics)
            clock.advance(metrics.SAMPLE_INTERVAL)
            self.assertEqual(service.metrics.registry.get_sample_value("relayagent_active_messages"), 0.0)
        finally:
            service.stopService()
        self.assertIsNone(probes.tap)
        self.assertIsNone(service.metrics)


class ReloadTests(SynchronousTestCase):
    def test_a_new_relayhost_names_the_label_from_the_next_sample(self):
        running = [config_text(self.mktemp())]
        counted, registry = filled_metrics()
        daemon = metrics.DaemonMetrics(counted, Clock(), scrape_registry=registry,
                                       multiprocess_directory=None, queue_manager=lambda: None,
                                       cache=lambda: None, config=lambda: running[0])
        running[0] = running[0].replace(relayhost="[192.0.2.7]:25")
        daemon.sample()
        counted.delivery("[192.0.2.7]:25", "sent", "2.0.0", 0.1, (0.0, 0.0, 0.05, 0.05))
        self.assertEqual(registry.get_sample_value(
            "relayagent_deliveries_total", {"status": "sent", "dsn_class": "2", "nexthop": "[192.0.2.7]:25"}), 1.0)

    def test_a_reload_keeps_the_endpoints(self):
        from relayagent.master.reload import restart_only_names

        self.assertIn("metrics_endpoints", restart_only_names())
        self.assertNotIn("metrics_nexthops", restart_only_names())


class WorkerExitTests(SynchronousTestCase):
    def test_an_exited_workers_gauges_go_its_counts_stay(self):
        directory = self.mktemp()
        os.makedirs(directory)
        names = ["gauge_livesum_4242.db", "counter_4242.db", "histogram_4242.db", "gauge_livesum_4343.db"]
        for name in names:
            open(os.path.join(directory, name), "wb").close()
        daemon = metrics.DaemonMetrics(None, Clock(), scrape_registry=None,
                                       multiprocess_directory=directory,
                                       queue_manager=lambda: None, cache=lambda: None)
        daemon.worker_exited(4242)
        self.assertEqual(sorted(os.listdir(directory)),
                         ["counter_4242.db", "gauge_livesum_4343.db", "histogram_4242.db"])


def dashboard_metric_names() -> set[str]:
    with open(DASHBOARD) as handle:
        dashboard = json.load(handle)
    expressions = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query") and isinstance(value, str):
                    expressions.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    names = set()
    for expression in expressions:
        names.update(re.findall(r"\brelayagent_[a-z_]+", expression))
    return names


class DashboardTests(SynchronousTestCase):
    def test_every_metric_the_dashboard_queries_is_in_a_scrape(self):
        _, registry = filled_metrics()
        spool = self.mktemp()
        os.makedirs(spool)
        registry.register(metrics.QueueCollector(spool))
        scraped = {line.split("{")[0].split(" ")[0]
                   for line in generate_latest(registry).decode().splitlines()
                   if line and not line.startswith("#")}
        names = dashboard_metric_names()
        self.assertGreater(len(names), 8)
        self.assertEqual(sorted(names - scraped), [])


class EndpointTests(TestCase):
    async def test_metrics_over_http_on_loopback(self):
        clock = Clock()
        service = RelayagentService(config_text(self.mktemp()), clock)
        service.startService()
        self.addCleanup(service.stopService)
        site = metrics_http.metrics_site(lambda: service.metrics, reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        probes.tap.delivery("[127.0.0.1]:2525", "sent", "2.0.0", 0.1, (0.0, 0.0, 0.05, 0.05))
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        response = await Agent(reactor).request(b"GET", url)
        body = (await readBody(response)).decode()
        self.assertEqual(response.code, 200)
        self.assertIn('relayagent_deliveries_total{dsn_class="2",nexthop="[127.0.0.1]:2525",status="sent"} 1.0',
                      body)
        self.assertIn('relayagent_queue_messages{queue="incoming"} 0.0', body)

    async def test_before_start_is_503(self):
        site = metrics_http.metrics_site(lambda: None, reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/metrics".encode()
        response = await Agent(reactor).request(b"GET", url)
        await readBody(response)
        self.assertEqual(response.code, 503)
