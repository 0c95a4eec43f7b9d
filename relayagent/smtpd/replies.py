"""
The listener's replies onto the wire: flushed as Postfix's smtpd flushes
them, and written through to the socket when nothing waits before them.

Postfix's smtpd buffers its replies and flushes them when the client has
sent nothing more that is waiting to be read: a pipelining client that
sent MAIL, ten RCPTs and DATA in one packet gets the twelve replies in
one packet.  ``ReplyWriter.batch()`` is that: the replies given while a
read's lines are handled go out together when it ends.

A write given to a Twisted transport waits in its buffer for the next
reactor turn: the socket is registered for writing (an ``epoll_ctl``),
the reactor comes round, sends, and unregisters it (another).  For a
reply of a few dozen bytes to a client that is waiting for it, that is
most of its cost (docs/performance.rst, the backlog's fill).  When
nothing of ours is still in the transport's buffer, the writer sends at
once on the transport's socket (``ITCPTransport.getHandle``); whatever
the kernel does not take then goes to ``transport.write`` as before, and
the writer stays behind the transport until it says its buffer is empty
(it registers as the transport's pull producer, whose
``resumeProducing`` the transport calls when it has written everything):
so no byte ever overtakes one given earlier.

Never written through: a transport that is no plain TCP connection (a
test's ``StringTransport``, an implicit-TLS endpoint's TLS protocol),
one that is closing, one that has a producer of someone else's once a
send falls short (the writer could not be told when its buffer is
empty), and any after ``stop_writing_through()`` (STARTTLS: the replies
held so far are sent, and from then on the bytes must go through the
TLS layer).  The writer knows of the bytes written through it: every
reply of the session must be, as the listener's ``sendLine`` makes
them.  A send that fails with anything but "would
block" gives the data to the transport, whose own write meets the same
error and ends the connection as it would have.

SYNOPSIS

    replies = ReplyWriter(transport)
    replies.write(b"250 2.1.0 Ok\\r\\n")     # at once, or after the batch
    with replies.batch(): handle(lines)      # their replies sent together
    replies.stop_writing_through()           # STARTTLS: the 220 sent first

DIAGNOSTICS: none of its own: what cannot be sent is handed to the
transport, which reports a lost connection as it always does.

Owns no parameters.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.interfaces import IPullProducer, ISSLTransport
from zope.interface import implementer


@implementer(IPullProducer)
class ReplyWriter:
    """The replies of one SMTP session (module docstring)."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self._batches = 0
        self._held: list[bytes] = []
        self._socket = _plain_socket(transport)
        # True while bytes handed to the transport may still be in its
        # buffer (we are then its producer, until it says it is empty).
        self._behind_transport = False
        self._registering = False

    def write(self, data: bytes) -> None:
        """Send ``data`` now, or at the end of the batch being made.  Only
        replies written through are held: a transport buffers what it is
        given until the reactor's next turn anyway, and a TLS transport
        drops what comes after its ``loseConnection`` (a QUIT's 221 held
        in a batch would be lost)."""
        if self._batches and self._socket is not None:
            self._held.append(data)
        else:
            self._send(data)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Hold the replies written inside until the outermost batch ends,
        then send them together."""
        self._batches += 1
        try:
            yield
        finally:
            self._batches -= 1
            if not self._batches:
                self._flush()

    def _flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._send(data)

    def stop_writing_through(self) -> None:
        """Send what the batch holds now (the 220 of STARTTLS must leave in
        plaintext, before the transport changes), then everything goes
        through ``transport.write``."""
        self._flush()
        self._socket = None

    def _send(self, data: bytes) -> None:
        sock = self._socket
        if sock is None or self._behind_transport or self.transport.disconnecting:
            self.transport.write(data)
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The transport's own write meets the same error and ends the
            # connection as it would have without us.
            self._socket = None
            self.transport.write(data)
            return
        if sent < len(data):
            self.transport.write(data[sent:])
            self._wait_for_transport()

    def _wait_for_transport(self) -> None:
        self._registering = True
        try:
            self.transport.registerProducer(self, False)
        except RuntimeError:
            # Someone else produces for this transport: we cannot be told
            # when its buffer is empty, so we stay behind it for good.
            self._socket = None
            return
        finally:
            self._registering = False
        self._behind_transport = True

    # IPullProducer: the transport has written all it had.

    def resumeProducing(self) -> None:
        """The transport's buffer is empty: write through again."""
        if self._registering:
            return  # registerProducer's own first call, not a drained buffer
        self._behind_transport = False
        self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        """The connection is gone: nothing to do (the transport discards
        what it held)."""
        self._socket = None


def _plain_socket(transport: Any) -> socket.socket | None:
    """The socket of a plain TCP transport, or None for anything else."""
    if ISSLTransport.providedBy(transport):
        return None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None or not hasattr(transport, "registerProducer"):
        return None
    handle = get_handle()
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return None
    return handle
