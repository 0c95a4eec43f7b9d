"""
Where the phases report what the metrics count (``metrics_endpoints``):
one slot, ``probes.tap``, that holds the running metrics or None.

The phases that produce the maillog's events call the tap next to them:
the delivery agent for each recipient's outcome (``delivery``, with its
``delay`` and ``delays=a/b/c/d``), the session security for each
session's TLS result (``tls_session``).  With metrics off the slot is
None and each call site costs one attribute lookup and a comparison:
nothing is built, nothing imported (``prometheus_client`` is imported by
``relayagent.master.metrics`` only when metrics are on).  A tap must not
raise and must not block: it runs on the reactor thread, in the hot path.

This module is in ``common`` so that every layer may call it; the tap
itself (``relayagent.master.metrics.Metrics``) lives above them all.

SYNOPSIS::

    from relayagent.common import probes
    if probes.tap is not None:
        probes.tap.delivery(nexthop, "sent", "2.0.0", delay, delays)
    probes.install(tap); probes.remove(tap)

DIAGNOSTICS: ``install`` raises ``RuntimeError`` when another tap is
installed in the process.

Owns no parameters.
"""

from __future__ import annotations

from typing import Protocol


class MetricsTap(Protocol):
    """What the phases report (``relayagent.master.metrics.Metrics``)."""

    def delivery(self, nexthop: str | None, status: str, dsn: str, delay: float | None,
                 delays: tuple[float, float, float, float] | None) -> None:
        """One recipient's outcome: ``status`` sent, deferred, bounced or
        expired; ``nexthop`` the queue manager's destination (None when
        the outcome is not a delivery attempt's, as for expired)."""

    def tls_session(self, level: str, result: str) -> None:
        """One session's security: the TLS ``level`` in force and its
        result (Verified, Trusted, Untrusted, Anonymous or plaintext)."""


#: The running tap, or None (metrics off).
tap: MetricsTap | None = None


def install(new: MetricsTap) -> None:
    """Make ``new`` the process's tap."""
    global tap
    if tap is not None and tap is not new:
        raise RuntimeError("another metrics tap is installed in this process")
    tap = new


def remove(old: MetricsTap) -> None:
    """No tap any more (if ``old`` was it)."""
    global tap
    if tap is old:
        tap = None
