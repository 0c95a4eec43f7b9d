"""
Prometheus metrics for the whole daemon (``metrics_endpoints``), served
by twisted.web as ``GET /metrics`` in Prometheus' text format.

Off by default: with ``metrics_endpoints`` empty nothing here runs,
``prometheus_client`` is not even imported, and the phases' probes
(``relayagent.common.probes``) cost one attribute lookup each.

What is counted, and where from (the names are listed in docs/metrics.rst):

- deliveries by ``status`` (sent, deferred, bounced, expired), ``dsn_class``
  (2, 4, 5) and ``nexthop``; the delivery delay (``delay=``) and its four
  parts (``delays=a/b/c/d``) as histograms: from the delivery agent, next
  to each recipient's maillog line (``probes.tap.delivery``);
- TLS sessions by ``level`` and ``result`` (Verified, Trusted, Untrusted,
  Anonymous, plaintext): from the session security, once per new session
  (``probes.tap.tls_session``);
- connection cache hits and misses: the cache's own counts, sampled;
- active messages, deliveries in flight, and per destination its
  concurrency window and deliveries in flight: the queue manager's
  state, sampled every ``SAMPLE_INTERVAL`` seconds (nothing is added to
  the scheduler's hot path);
- messages per queue (incoming, active, deferred, hold, corrupt, and
  maildrop when there is one): counted in the queue directories at each
  scrape, in a thread, by worker 0 (the queues are the daemon's, not a
  worker's).

The ``nexthop`` label is bounded: it is the queue manager's destination
when that is relayhost's or one listed in ``metrics_nexthops``, ``other``
for every other, ``none`` for an outcome that is no delivery attempt
(expired).  A label per destination seen would grow with every domain
mailed; a "top N seen" would differ from worker to worker and from run
to run.  A fixed list gives the same series in every worker and every
run, which is what a dashboard needs, and costs nothing to keep.

Several workers (``relayagent_workers``), one endpoint: prometheus-client's
multiprocess mode.  Each process writes its values to memory-mapped files
in ``$queue_directory/metrics/`` (cleaned by worker 0 at start, before
the workers are forked); worker 0 serves the sum (counters and
histograms summed, gauges summed over the living workers: ``livesum``),
and a worker that exits is marked dead (``mark_process_dead``: its
gauges go, its counts stay).  We chose it over sums sent on the workers'
pipes because a scrape then waits for no worker (a busy one answers
nothing for a while), the pipes keep carrying only triggers and log
lines, and the merging rules are prometheus-client's, tested there.
With one process there are no files: the values are in memory.

A scrape renders in the reactor's thread pool: the queue-directory
counts and the multiprocess files are read off the reactor thread
(``relayagent.master.metrics_http``, imported only when metrics are on).

SYNOPSIS::

    metrics = start_metrics(config, queue_directory, reactor, index=0, workers=N,
                            queue_manager=lambda: qm, cache=lambda: smtp.cache)
    services = metrics_services(config, lambda: daemon.metrics, reactor)  # worker 0
    metrics.worker_exited(pid); metrics.stop()
    MetricsSettings, NexthopLabels, QueueCollector, Metrics, DaemonMetrics

DIAGNOSTICS: a bad endpoint string stops start-up (twistd's error for
a strports description); a queue directory that cannot be read counts
as 0; the HTTP side's are ``metrics_http``'s.

A reload (``relayagent.master.reload``) keeps ``metrics_endpoints``
until a restart; a new relayhost or ``metrics_nexthops`` names the
labels from the next sample on.

Owns: metrics_endpoints, metrics_nexthops.  Reads relayhost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService
from twisted.internet.task import LoopingCall

from relayagent.common import probes
from relayagent.common.config import Config, Settings, split_list
from relayagent.spool.maildrop import MAILDROP, is_maildrop_name
from relayagent.spool.queueid import is_queue_id
from relayagent.spool.spool import QUEUES

# The gauges of the queue manager's state are this old at most.
SAMPLE_INTERVAL = 5.0
OTHER = "other"
NONE = "none"
# Under queue_directory: the multiprocess files (several workers only).
MULTIPROCESS_DIRECTORY = "metrics"
# Seconds: from a local relay's milliseconds to a day in the queue.
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 300.0, 900.0, 3600.0, 14400.0, 86400.0)
# The parts of delays=a/b/c/d, in order.
STAGES = ("before_qmgr", "in_qmgr", "conn_setup", "transmission")


@dataclass(frozen=True, slots=True)
class MetricsSettings(Settings):
    """The metrics' parameters, bound once."""

    metrics_endpoints: tuple[str, ...]
    metrics_nexthops: tuple[str, ...]
    relayhost: str


class NexthopLabels:
    """The bounded ``nexthop`` label of a destination (module docstring):
    the destination itself when named, else ``other``; ``none`` for None."""

    def __init__(self, named: Iterable[str]) -> None:
        self.named = {name.lower(): name for name in named if name}

    @classmethod
    def from_settings(cls, settings: MetricsSettings) -> NexthopLabels:
        """relayhost's nexthops and ``metrics_nexthops``."""
        return cls([*split_list(settings.relayhost), *settings.metrics_nexthops])

    def __call__(self, nexthop: str | None) -> str:
        """The label of ``nexthop``."""
        if nexthop is None:
            return NONE
        return self.named.get(nexthop.lower(), OTHER)


def count_queue(path: str) -> int:
    """The messages in one queue directory (entries named as queue ids;
    0 when the directory cannot be read)."""
    try:
        with os.scandir(path) as entries:
            return sum(1 for entry in entries if is_queue_id(entry.name))
    except OSError:
        return 0


def count_maildrop(path: str) -> int | None:
    """The finished submissions in ``maildrop/`` (not those being
    written), or None when there is no such directory."""
    try:
        with os.scandir(path) as entries:
            return sum(1 for entry in entries if is_maildrop_name(entry.name))
    except OSError:
        return None


class QueueCollector:
    """``relayagent_queue_messages{queue}``, counted in the queue
    directories at each scrape (a prometheus-client custom collector)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Any]:
        """One gauge family, a sample per queue."""
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("relayagent_queue_messages", "Messages in each queue directory.",
                                   labels=["queue"])
        for queue in QUEUES:
            family.add_metric([queue], count_queue(os.path.join(self.directory, queue)))
        maildrop = count_maildrop(os.path.join(self.directory, MAILDROP))
        if maildrop is not None:
            family.add_metric([MAILDROP], maildrop)
        yield family


class Metrics:
    """One process's metrics, and the tap the phases call
    (``probes.MetricsTap``).  ``registry``: where the metrics register
    (None in multiprocess mode: the files are what is scraped)."""

    def __init__(self, labels: NexthopLabels, registry: Any) -> None:
        # Imported here, not at the top: metrics off imports nothing.
        from prometheus_client import Counter, Gauge, Histogram

        self.labels = labels
        self.deliveries = Counter(
            "relayagent_deliveries", "Recipient outcomes (the maillog's status= lines).",
            ["status", "dsn_class", "nexthop"], registry=registry)
        self.delay = Histogram(
            "relayagent_delivery_delay_seconds",
            "Time from arrival to the outcome of each recipient's attempt (delay=).",
            buckets=DELAY_BUCKETS, registry=registry)
        self.stage_delay = Histogram(
            "relayagent_delivery_stage_delay_seconds",
            "The parts of delays=a/b/c/d: before_qmgr, in_qmgr, conn_setup, transmission.",
            ["stage"], buckets=DELAY_BUCKETS, registry=registry)
        self.tls = Counter(
            "relayagent_tls_sessions", "New SMTP sessions by TLS level and result.",
            ["level", "result"], registry=registry)
        self.cache_hits = Counter(
            "relayagent_connection_cache_hits", "Deliveries that reused a cached session.",
            registry=registry)
        self.cache_misses = Counter(
            "relayagent_connection_cache_misses",
            "Connection cache lookups that found no usable session.", registry=registry)
        self.active = Gauge(
            "relayagent_active_messages", "Messages in the queue managers' active queues.",
            registry=registry, multiprocess_mode="livesum")
        self.inflight = Gauge(
            "relayagent_inflight_deliveries", "Delivery requests being worked on.",
            registry=registry, multiprocess_mode="livesum")
        self.destination_concurrency = Gauge(
            "relayagent_destination_concurrency",
            "Concurrency windows of the destinations (summed over the nexthop label).",
            ["nexthop"], registry=registry, multiprocess_mode="livesum")
        self.destination_inflight = Gauge(
            "relayagent_destination_inflight_deliveries",
            "Deliveries in flight per destination (summed over the nexthop label).",
            ["nexthop"], registry=registry, multiprocess_mode="livesum")
        # The labelled children, looked up once each (labels() takes a lock).
        self._outcomes: dict[tuple[str, str, str], Any] = {}
        self._stages = [self.stage_delay.labels(stage) for stage in STAGES]
        self._sessions: dict[tuple[str, str], Any] = {}
        self._destinations_seen: set[str] = set()
        self._hits_seen = 0
        self._misses_seen = 0
        # The cache the counts were read from: a reload makes a new one,
        # whose counts start again at 0.
        self._cache_seen: Any = None

    # -- the tap (probes.MetricsTap)

    def delivery(self, nexthop: str | None, status: str, dsn: str, delay: float | None,
                 delays: tuple[float, float, float, float] | None) -> None:
        """Count one recipient's outcome (``probes.MetricsTap``)."""
        key = (status, dsn[:1], self.labels(nexthop))
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = self.deliveries.labels(*key)
        child.inc()
        if delay is not None:
            self.delay.observe(delay)
        if delays is not None:
            for stage, seconds in zip(self._stages, delays, strict=True):
                stage.observe(seconds)

    def tls_session(self, level: str, result: str) -> None:
        """Count one new session's TLS result (``probes.MetricsTap``)."""
        key = (level, result)
        child = self._sessions.get(key)
        if child is None:
            child = self._sessions[key] = self.tls.labels(*key)
        child.inc()

    # -- sampled state

    def sample(self, queue_manager: Any, cache: Any) -> None:
        """Copy the queue manager's state and the cache's counts into the
        gauges and counters (every SAMPLE_INTERVAL, and at stop)."""
        if queue_manager is not None:
            self.active.set(len(queue_manager.active))
            self.inflight.set(queue_manager.busy_total)
            windows: dict[str, float] = {}
            busy: dict[str, int] = {}
            for destination in list(queue_manager.destinations.values()):
                label = self.labels(destination.name)
                windows[label] = windows.get(label, 0.0) + destination.window
                busy[label] = busy.get(label, 0) + destination.busy
            for label in self._destinations_seen - windows.keys():
                windows[label], busy[label] = 0.0, 0
            for label, window in windows.items():
                self.destination_concurrency.labels(label).set(window)
                self.destination_inflight.labels(label).set(busy[label])
            self._destinations_seen.update(windows)
        if cache is not None:
            if cache is not self._cache_seen:
                self._cache_seen, self._hits_seen, self._misses_seen = cache, 0, 0
            hits, misses = cache.reused, getattr(cache, "missed", 0)
            if hits > self._hits_seen:
                self.cache_hits.inc(hits - self._hits_seen)
            if misses > self._misses_seen:
                self.cache_misses.inc(misses - self._misses_seen)
            self._hits_seen, self._misses_seen = hits, misses


class DaemonMetrics:
    """The metrics of one process of the daemon: the tap installed, the
    sampler running, and (worker 0) what a scrape reads (``registry``)."""

    def __init__(self, metrics: Metrics, reactor: Any, *, scrape_registry: Any,
                 multiprocess_directory: str | None,
                 queue_manager: Callable[[], Any], cache: Callable[[], Any],
                 config: Callable[[], Config] | None = None) -> None:
        self.metrics = metrics
        self.reactor = reactor
        #: What worker 0 serves (None in the other workers).
        self.registry = scrape_registry
        self.multiprocess_directory = multiprocess_directory
        self._queue_manager = queue_manager
        self._cache = cache
        # The running configuration (a reload swaps it): relayhost and
        # metrics_nexthops name the labels.
        self._config = config
        self._settings = MetricsSettings.from_config(config()) if config is not None else None
        self._sampler = LoopingCall(self.sample)
        self._sampler.clock = reactor

    def start(self) -> None:
        """Install the tap and start sampling."""
        probes.install(self.metrics)
        self._sampler.start(SAMPLE_INTERVAL, now=False)

    def sample(self) -> None:
        """Sample the queue manager and the cache now; after a reload that
        changed relayhost or metrics_nexthops, label by the new ones."""
        if self._config is not None:
            settings = MetricsSettings.from_config(self._config())
            if settings != self._settings:
                self._settings = settings
                self.metrics.labels = NexthopLabels.from_settings(settings)
        self.metrics.sample(self._queue_manager(), self._cache())

    def stop(self) -> None:
        """A last sample, the tap removed."""
        if self._sampler.running:
            self._sampler.stop()
        self.sample()
        probes.remove(self.metrics)

    def worker_exited(self, pid: int) -> None:
        """A worker process ended: its gauges no longer count."""
        if self.multiprocess_directory is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.multiprocess_directory)


def _multiprocess_mode(directory: str, *, clean: bool) -> None:
    """prometheus-client's multiprocess mode in this process, its files in
    ``directory`` (emptied first when ``clean``: worker 0, before the
    workers start).  The value class is chosen again here, not only at
    import: this may run after prometheus_client was imported, and in a
    forked worker."""
    if clean:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.unlink(os.path.join(directory, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()


def metrics_enabled(config: Config) -> bool:
    """Whether ``metrics_endpoints`` asks for metrics."""
    return bool(MetricsSettings.from_config(config).metrics_endpoints)


def start_metrics(config: Config, queue_directory: str, reactor: Any, *, index: int, workers: int,
                  queue_manager: Callable[[], Any], cache: Callable[[], Any],
                  running_config: Callable[[], Config] | None = None) -> DaemonMetrics | None:
    """This process's metrics, started; None when metrics are off.
    ``index``: this worker's number (0: the twistd process, which serves
    them); ``workers``: how many there are; ``queue_manager``, ``cache``
    and ``running_config`` give the current queue manager, connection
    cache and configuration (each may change at a reload)."""
    settings = MetricsSettings.from_config(config)
    if not settings.metrics_endpoints:
        return None
    from prometheus_client import CollectorRegistry

    labels = NexthopLabels.from_settings(settings)
    scrape: Any = None
    directory: str | None = None
    if workers > 1:
        from prometheus_client import multiprocess

        directory = os.path.join(queue_directory, MULTIPROCESS_DIRECTORY)
        _multiprocess_mode(directory, clean=index == 0)
        metrics = Metrics(labels, registry=None)
        if index == 0:
            scrape = CollectorRegistry()
            multiprocess.MultiProcessCollector(scrape, path=directory)
    else:
        scrape = CollectorRegistry()
        metrics = Metrics(labels, registry=scrape)
    if scrape is not None:
        scrape.register(QueueCollector(queue_directory))
    daemon_metrics = DaemonMetrics(metrics, reactor, scrape_registry=scrape,
                                   multiprocess_directory=directory,
                                   queue_manager=queue_manager, cache=cache, config=running_config)
    daemon_metrics.start()
    return daemon_metrics


def metrics_services(config: Config, metrics: Callable[[], DaemonMetrics | None],
                     reactor: Any) -> list[IService]:
    """One server service per ``metrics_endpoints`` string (none when
    empty), serving ``metrics()``'s registry."""
    settings = MetricsSettings.from_config(config)
    if not settings.metrics_endpoints:
        return []
    # Imported only now: twisted.web, and strports with automat, cost
    # start-up time that metrics off must not pay.
    from twisted.application import strports

    from relayagent.master.metrics_http import metrics_site

    site = metrics_site(metrics, reactor)
    return [strports.service(description, site, reactor=reactor)
            for description in settings.metrics_endpoints]
