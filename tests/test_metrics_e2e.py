"""End-to-end: the metrics endpoint of a real daemon (``twistd -n
relayagent``, two workers: prometheus-client's multiprocess mode) in front
of Postfix's smtp-sink, scraped over loopback, its counters and gauges held
against the maillog and the queue directories.

Skips when smtp-sink is missing (tests.test_daemon_e2e.DaemonTestCase)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task
from twisted.web.client import Agent, readBody

from relayagent.master.metrics import SAMPLE_INTERVAL
from relayagent.spool import Message
from tests.support.ports import free_port
from tests.test_daemon_e2e import DaemonTestCase, body


class MetricsEndpointTests(DaemonTestCase):
    async def scrape(self, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        text = (await readBody(response)).decode()
        self.assertEqual(response.code, 200, text)
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    @staticmethod
    def total(samples, name: str, **labels: str) -> float:
        return sum(value for (sample, sample_labels), value in samples.items()
                   if sample == name and all((k, v) in sample_labels for k, v in labels.items()))

    async def test_scrape_matches_the_maillog_and_the_queues(self) -> None:
        await self.start_sink()
        metrics_port = free_port()
        config = self.write_config(
            f"metrics_endpoints = tcp:{metrics_port}:interface=127.0.0.1\n"
            "relayagent_workers = 2\n"
        )
        sent, deferred = 40, 3
        self.spool.enqueue_many(
            [Message("sender@example.org", [f"rcpt{n}@example.net"], body(n)) for n in range(sent)]
            + [Message("sender@example.org", [f"rcpt{n}@local.test"], body(n, "deferred"))
               for n in range(deferred)]
        )
        self.start_daemon(config)

        def settled() -> bool:
            text = self.log_text()
            return (text.count("status=sent") == sent and text.count("status=deferred") == deferred
                    and self.queued("deferred") == deferred and self.queued("incoming", "active") == 0)

        await self.wait_for(settled, 120, "the deliveries and deferrals")
        text = self.log_text()
        samples = await self.scrape(metrics_port)
        relay = f"[127.0.0.1]:{self.port}"
        self.assertEqual(self.total(samples, "relayagent_deliveries_total", status="sent"),
                         text.count("status=sent"))
        self.assertEqual(self.total(samples, "relayagent_deliveries_total",
                                    status="sent", dsn_class="2", nexthop=relay), sent)
        self.assertEqual(self.total(samples, "relayagent_deliveries_total", status="deferred"),
                         text.count("status=deferred"))
        # local.test's nexthop is not relayhost's: "other".
        self.assertEqual(self.total(samples, "relayagent_deliveries_total",
                                    status="deferred", nexthop="other"), deferred)
        self.assertEqual(self.total(samples, "relayagent_delivery_delay_seconds_count"),
                         sent + deferred)
        for queue, expected in [("incoming", 0), ("active", 0), ("deferred", deferred),
                                ("hold", 0), ("corrupt", 0)]:
            self.assertEqual(samples[("relayagent_queue_messages", (("queue", queue),))], expected,
                             queue)
        self.assertGreaterEqual(self.total(samples, "relayagent_tls_sessions_total"), 1)

        # The gauges and the cache's counts are sampled every
        # SAMPLE_INTERVAL, in each worker: within that of a quiet queue the
        # gauges read 0 and the cache has been looked up (each delivery
        # asks it first).
        deadline = reactor.seconds() + 3 * SAMPLE_INTERVAL
        while True:
            now = await self.scrape(metrics_port)
            busy = (self.total(now, "relayagent_active_messages"),
                    self.total(now, "relayagent_inflight_deliveries"))
            lookups = (self.total(now, "relayagent_connection_cache_hits_total")
                       + self.total(now, "relayagent_connection_cache_misses_total"))
            if busy == (0, 0) and lookups > 0:
                break
            self.assertLess(reactor.seconds(), deadline, f"active, in flight: {busy}; cache: {lookups}")
            await task.deferLater(reactor, 0.5, lambda: None)
