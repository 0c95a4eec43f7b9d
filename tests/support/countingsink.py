"""
A small SMTP sink on loopback, in the test's own reactor, that counts what
a fleet's limits are about: sessions open at once (the most ever, and
when), and each message's arrival time and Message-ID.

    sink = CountingSink(delay=0.05)            # the pause before each 250 after DATA
    sink.reject_next(1, b"421-4.7.28 ...")     # the next N transactions get this reply at MAIL
    port = sink.listen(reactor)                # a free 127.0.0.1 port
    sink.sessions, sink.most_sessions, sink.arrivals   # [(time, message id)]
    sink.sessions_from("127.0.0.2")            # open sessions from one client address
    sink.accepted                              # TCP connections accepted in all
    await port.stopListening(); sink.close_all()

It speaks just enough ESMTP for relayagent: EHLO (PIPELINING, 8BITMIME),
MAIL, RCPT, DATA, RSET, NOOP, QUIT, and 502 for the rest.
"""

from __future__ import annotations

import re
import time
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.IGNORECASE)


class SinkSession(LineReceiver):
    """One SMTP session with the sink."""

    delimiter = b"\r\n"
    MAX_LENGTH = 65536

    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink
        self.in_data = False
        self.message_id: bytes | None = None
        # Lines that came while a delayed reply was due (a pipelining
        # client sends QUIT right after the dot): answered after it, in order.
        self.waiting = False
        self.held: list[bytes] = []

    def connectionMade(self) -> None:
        self.sink.opened(self)
        self.sendLine(b"220 sink.test ESMTP")

    def connectionLost(self, reason: Any = None) -> None:
        self.sink.closed(self)

    def lineReceived(self, line: bytes) -> None:
        if self.waiting:
            self.held.append(line)
            return
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.sink.arrived(self.message_id)
                self.message_id = None
                reply = b"250 2.0.0 Ok: queued"
                if self.sink.delay > 0:
                    self.waiting = True
                    call = self.sink.reactor.callLater(self.sink.delay, self._reply, reply)
                    self.sink.pending.add(call)
                else:
                    self.sendLine(reply)
                return
            if self.message_id is None:
                match = MESSAGE_ID.match(line)
                if match:
                    self.message_id = match.group(1)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME")
        elif verb == b"HELO":
            self.sendLine(b"250 sink.test")
        elif verb == b"MAIL":
            rejection = self.sink.take_rejection()
            if rejection is not None:
                self.sendLine(rejection)
                if rejection.startswith(b"421"):
                    self.transport.loseConnection()
                return
            self.sendLine(b"250 2.1.0 Ok")
        elif verb == b"RCPT":
            self.sendLine(b"250 2.1.5 Ok")
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb in (b"RSET", b"NOOP"):
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 Error: command not recognized")

    def _reply(self, reply: bytes) -> None:
        self.sink.pending = {call for call in self.sink.pending if call.active()}
        self.waiting = False
        if self.transport is None or not self.transport.connected:
            return
        self.sendLine(reply)
        held, self.held = self.held, []
        for line in held:
            self.lineReceived(line)


class CountingSink(Factory):
    """The sink's counters (module docstring)."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.reactor: Any = None
        self.open: set[SinkSession] = set()
        self.most_sessions = 0
        self.over: list[tuple[float, int]] = []  # (time, sessions) whenever a new most is reached
        self.session_log: list[tuple[float, int]] = []  # (time, sessions) at every change
        self.arrivals: list[tuple[float, bytes | None]] = []
        self.rejections: list[bytes] = []
        self.rejected: list[float] = []
        self.pending: set[Any] = set()  # the delayed replies
        self.accepted = 0  # connections ever accepted

    def buildProtocol(self, addr: Any) -> SinkSession:
        return SinkSession(self)

    def listen(self, reactor: Any) -> Any:
        """Listen on a free loopback port; the listening port."""
        self.reactor = reactor
        return reactor.listenTCP(0, self, interface="127.0.0.1")

    def reject_next(self, count: int, reply: bytes) -> None:
        """The next ``count`` MAIL commands get ``reply`` (a 421 closes)."""
        self.rejections.extend([reply] * count)

    def take_rejection(self) -> bytes | None:
        """The reply for this MAIL, if one is queued."""
        if self.rejections:
            self.rejected.append(time.monotonic())
            return self.rejections.pop(0)
        return None

    def opened(self, session: SinkSession) -> None:
        self.open.add(session)
        self.accepted += 1
        now = time.monotonic()
        self.session_log.append((now, len(self.open)))
        if len(self.open) > self.most_sessions:
            self.most_sessions = len(self.open)
            self.over.append((now, len(self.open)))

    def closed(self, session: SinkSession) -> None:
        self.open.discard(session)
        self.session_log.append((time.monotonic(), len(self.open)))

    def arrived(self, message_id: bytes | None) -> None:
        self.arrivals.append((time.monotonic(), message_id))

    def sessions_from(self, host: str) -> int:
        """Sessions open now from client address ``host``."""
        return sum(1 for session in self.open
                   if session.transport is not None and session.transport.getPeer().host == host)

    @property
    def sessions(self) -> int:
        """Sessions open now."""
        return len(self.open)

    def close_all(self) -> None:
        """Drop every open session and delayed reply (cleanup)."""
        for call in self.pending:
            if call.active():
                call.cancel()
        self.pending.clear()
        for session in list(self.open):
            if session.transport is not None:
                session.transport.abortConnection()
