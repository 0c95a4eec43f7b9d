"""
The HTTP side of the metrics (``metrics_endpoints``): a twisted.web site
whose ``/metrics`` is the Prometheus text exposition of the daemon's
registry (``relayagent.master.metrics``), rendered in the reactor's
thread pool so that reading the queue directories and the workers'
files never holds the reactor.  Imported only when metrics are on.

SYNOPSIS

    site = metrics_site(lambda: daemon.metrics, reactor)
    MetricsResource(lambda: daemon.metrics, reactor)

DIAGNOSTICS: 503 before the daemon has started (no registry yet); a
scrape that fails is HTTP 500 and one logged failure.

Owns no parameters (``metrics`` owns metrics_endpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from relayagent.master.metrics import DaemonMetrics

log = Logger(namespace="relayagent.master.metrics")


class MetricsResource(Resource):
    """``GET /metrics``: the registry of ``metrics()`` (looked up at each
    request: the metrics start with the service), rendered in the
    reactor's thread pool."""

    isLeaf = True

    def __init__(self, metrics: Callable[[], DaemonMetrics | None], reactor: Any) -> None:
        super().__init__()
        self.metrics = metrics
        self.reactor = reactor

    def render_GET(self, request: Any) -> Any:
        """The exposition, or 503 before the daemon has started."""
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        current = self.metrics()
        if current is None or current.registry is None:
            request.setResponseCode(503)
            return b"relayagent has not started\n"
        rendering = deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      generate_latest, current.registry)

        def send(body: bytes) -> None:
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(body)
            request.finish()

        def failed(reason: Any) -> None:
            log.failure("cannot render the metrics", reason)
            request.setResponseCode(500)
            request.finish()

        rendering.addCallbacks(send, failed)
        return NOT_DONE_YET


def metrics_site(metrics: Callable[[], DaemonMetrics | None], reactor: Any) -> Site:
    """The web site of ``metrics_endpoints``: ``/metrics``."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(metrics, reactor))
    site = Site(root)
    site.noisy = False
    # No access log lines in the mail log.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
