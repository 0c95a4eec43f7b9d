"""
The boundary between the queue manager and the delivery agent, as a zope
interface: what ``relayagent.qmgr.scheduler.QueueManager`` calls on the
agent it is given.  The real one is ``relayagent.qmgr.delivery.
DeliveryAgent``; the test double is ``relayagent.testing.FakeDeliveryAgent``.

SYNOPSIS::

    IDeliveryAgent      deliver(request), defer_unsent(request, status), finish(message)
    ILimiter            acquire(key), release(key, grant, connections), shape(key, status), stop()
                        (``relayagent.qmgr.limits.LocalLimiter``, ``relayagent.qmgr.shared.SharedLimiter``)

DIAGNOSTICS
    None: a declaration.  ``zope.interface.verify.verifyObject`` raises
    ``BrokenImplementation`` / ``BrokenMethodImplementation`` for an object
    that lacks a method or takes other arguments.

Owns no parameters.
"""

from __future__ import annotations

from zope.interface import Interface


class IDeliveryAgent(Interface):
    """Runs the scheduler's delivery requests and ends its messages."""

    def deliver(request):
        """Deliver one relayagent.qmgr.scheduler.DeliveryRequest (a message's
        recipients for one destination): a Deferred firing with a
        RequestResult (``site_failure``: the Status that makes the whole
        destination dead, or None).  Per-recipient outcomes are recorded in
        the queue file by the agent, not returned."""

    def defer_unsent(request, status):
        """Record ``status`` for every recipient of ``request`` not yet done
        (a dead destination, no route, a crash): deferred, or bounced when
        hard."""

    def finish(message):
        """Every recipient of the ActiveMessage ``message`` is done for this
        round: remove, defer or bounce the queue file, and close it."""


class ILimiter(Interface):
    """The limits per destination key (``relayagent.qmgr.limits``): this
    process's own, or shared by a fleet through Redis."""

    def acquire(key):
        """A Deferred firing with a ``relayagent.qmgr.limits.Grant``: ok (a
        concurrency slot and one message of the rate taken), or the seconds
        to wait (None: until a slot frees).  Never fails."""

    def release(key, grant, connections=0):
        """The delivery that ``grant`` allowed is over; it opened
        ``connections`` new connections (counted against the connection
        rate)."""

    def shape(key, status):
        """A server reply (a ``Status`` with a code) for ``key``: apply the
        shaping rule that matches it, if any; returns the rule or None."""

    def stop():
        """Cancel timers and give back what is held; a Deferred."""
