"""
A bounded, logged stop, as Postfix's master stops its children.

A stop (SIGTERM, Ctrl-C) lets the deliveries in flight finish, says so
(``stopping: waiting for 2 deliveries in flight (at most 30s; a second
signal stops at once)``) and waits at most ``relayagent_stop_timeout``;
then, or at a second SIGTERM or Ctrl-C, it stops anyway (``stopping: 2
deliveries still in flight: stopped before they ended; they stay
queued``).  What is interrupted is not lost: its queue file stays in
``active/`` (recipients already delivered are marked done) and the next
start recovers it; a transaction cut short may be delivered again, as in
Postfix when its children are killed.  A second signal never prints
Twisted's ``ReactorNotRunning`` traceback.

SYNOPSIS

    settings = StopSettings.from_config(config)
    done = bounded_stop(reactor, waiting, in_flight=n, settings=settings)
    install_stop_signals(reactor, stop_now)     # after the reactor's own handlers

DIAGNOSTICS: none raised; the lines above, under ``relayagent/master``.

Owns: relayagent_stop_timeout.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relayagent.common import maillog as ralog
from relayagent.common.config import Settings

log = Logger(namespace="relayagent.master.stop")


@dataclass(frozen=True, slots=True)
class StopSettings(Settings):
    """How long a stop waits for the deliveries in flight."""

    relayagent_stop_timeout: float


class BoundedStop:
    """One stop: ``done`` fires when ``waiting`` does, when the timeout
    passes, or at ``now()`` (a second signal), whichever comes first."""

    def __init__(self, reactor: Any, waiting: Deferred[Any], *, in_flight: int,
                 settings: StopSettings) -> None:
        self.done: Deferred[None] = Deferred()
        self.in_flight = in_flight
        self._timeout = settings.relayagent_stop_timeout
        self._timer: Any = None
        if in_flight:
            log.info("stopping: waiting for {count} deliveries in flight (at most {timeout}s; "
                     "a second signal stops at once)", count=in_flight, timeout=_seconds(self._timeout))
            self._timer = reactor.callLater(self._timeout, self._give_up, f"after {_seconds(self._timeout)}s")
        waiting.addBoth(self._finished)

    def _finished(self, result: Any) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if not self.done.called:
            self.done.callback(None)

    def _give_up(self, why: str) -> None:
        if self.done.called:
            return
        ralog.log_warning(log, f"stopping: {self.in_flight} deliveries still in flight {why}: "
                          "stopped before they ended; they stay queued", service="master")
        self.done.callback(None)

    def now(self) -> None:
        """A second signal: stop without waiting any longer."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._give_up("at a second signal")


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def bounded_stop(reactor: Any, waiting: Deferred[Any], *, in_flight: int, settings: StopSettings) -> BoundedStop:
    """A ``BoundedStop`` of ``waiting`` (what the service's stop waits
    for); ``in_flight`` deliveries are under way."""
    return BoundedStop(reactor, waiting, in_flight=in_flight, settings=settings)


def install_stop_signals(reactor: Any, stop_now: Callable[[], None]) -> None:
    """SIGINT and SIGTERM: the first goes to the handler they had (the
    reactor's: "Received SIGTERM, shutting down.", the reactor stopped,
    and twistd ends with that signal), a later one calls ``stop_now``
    (the stop waits no longer) instead of stopping a reactor that is
    already stopping.  Installed once the reactor runs (its own handlers
    are installed as it starts).

    A signal ignored when we start stays ignored: a shell starts a
    script's background job with SIGINT ignored, and then neither
    Python nor the reactor handles it.  A first signal whose earlier
    handler is not Python code (the default) stops the reactor itself,
    and tells twistd to end with that signal, as the reactor's does."""
    state = {"signals": 0}
    previous: dict[int, Any] = {}

    def handler(number: int, frame: Any) -> None:
        state["signals"] += 1
        first = previous.get(number)
        if state["signals"] == 1 and callable(first):
            first(number, frame)
        elif state["signals"] == 1:
            reactor.callFromThread(_stop_reactor, reactor, number)
        else:
            reactor.callFromThread(stop_now)

    def install() -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(number)
            if current == signal.SIG_IGN:
                continue
            previous[number] = current
            signal.signal(number, handler)

    reactor.callWhenRunning(install)


def _stop_reactor(reactor: Any, number: int) -> None:
    if getattr(reactor, "running", False) and not getattr(reactor, "_stopped", False):
        # What the reactor's own sigInt and sigTerm record: twistd then
        # ends by that signal (app._exitWithSignal), not with status 0.
        reactor._exitSignal = number
        reactor.stop()


__all__ = ["BoundedStop", "StopSettings", "bounded_stop", "install_stop_signals"]
