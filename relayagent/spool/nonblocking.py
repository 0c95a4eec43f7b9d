"""
The spool and the trigger socket for code that runs in a reactor: an
enqueue whose writes and fsyncs happen in a thread pool, and a wakeup of
the queue manager that never waits on the reactor thread.

``Spool.enqueue`` writes the queue file, fsyncs it, links it into its
queue and fsyncs the directory before it returns: tens of milliseconds
on an ordinary disk, seconds on a busy one.  In a reactor's thread that
stops every other connection for as long.  ``ThreadedSpool`` runs the
same call in a thread pool (``deferToThreadPool`` with the reactor and
pool it is given) and returns a Deferred that fires with the queue id in
the reactor thread only after the call has returned, that is, once the
file is durable; it fails with the call's exception (``ValueError``,
``OSError``) when nothing was queued.  ``new_message`` is the same for
content that arrives in pieces (the listener's DATA): the pieces are
held in memory (streamed into the file under ``tmp/`` past the spool's
memory limit); at the end the reactor thread writes the file out (no
fsync: the write lands in the page cache) and one hand-off to the pool
fsyncs it and links it.  The pool thread runs little Python: the
envelope, the head, the scans and the write stay in the reactor thread,
as the session's other work does, so the two seldom take turns at
CPython's lock (each turn a pair of futex calls and a wake-up).  The
queue ids stay unique: the id generator takes a lock (``queueid``).

``trigger.trigger`` is blocking by design (for command-line programs):
connect, send, wait up to 2 s for the answer.  A daemon that is stopped
(``kill -STOP``), or wedged, accepts the connection and never answers,
so each call would hold the reactor for the whole timeout.
``ReactorWakeup`` sends the same AMP ``Wakeup`` through the reactor
(``UNIXClientEndpoint``), gives up after the timeout without anyone
waiting for it, and keeps at most one wakeup in flight: calls that come
while one is on its way are folded into one more after it (the queue
manager scans ``incoming/`` once for all of them).  A trigger is a hint:
the queue manager polls ``incoming/`` anyway.

SYNOPSIS (``EnqueueingSpool``: the protocol both spools satisfy)

    spool = ThreadedSpool(Spool(queue_directory), reactor, reactor.getThreadPool())
    d = spool.enqueue(sender, recipients, content)     # Deferred[str]
    message = spool.new_message(sender, recipients)    # an SMTP server's DATA
    message.write(piece); d = message.commit()         # Deferred[str]
    wakeup = ReactorWakeup(reactor, queue_directory)
    wakeup()                                           # returns at once

DIAGNOSTICS: ``ThreadedSpool.enqueue``'s Deferred fails as
``Spool.enqueue`` raises; ``ReactorWakeup`` logs nothing when no daemon
listens (it is no error) and its Deferred (``wakeup()``'s result, which
callers may ignore) fires with True when the daemon answered, else
False; it never fails.

Owns no parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, BinaryIO, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relayagent.common.envelope import Recipient
from relayagent.spool import control, trigger
from relayagent.spool.spool import INCOMING, IncomingMessage, Spool


class EnqueueingSpool(Protocol):
    """What the intake needs of a spool: ``Spool``, ``ThreadedSpool`` or
    a test's fake (``relayagent.testing.FakeSpool``)."""

    def enqueue(self, sender: str, recipients: Sequence[str | Recipient],
                content: bytes | BinaryIO, **options: Any) -> str | Deferred[str]:
        """Queue one message: its queue id, or a Deferred of it, once durable."""
        ...


class ThreadedSpool:
    """A ``Spool`` whose ``enqueue`` runs in ``threadpool`` and returns a
    Deferred of the queue id (module docstring).  Everything else is the
    spool's, reached through ``spool``."""

    def __init__(self, spool: Spool, reactor: Any, threadpool: ThreadPool | None = None) -> None:
        self.spool = spool
        self.reactor = reactor
        # The reactor's own pool by default (started on first use, stopped
        # at reactor shutdown).
        self.threadpool = threadpool if threadpool is not None else reactor.getThreadPool()

    @property
    def directory(self) -> str:
        """The queue directory (the intake checks its free space)."""
        return self.spool.directory

    def enqueue(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        content: bytes | BinaryIO,
        *,
        queue: str = INCOMING,
        **options: Any,
    ) -> Deferred[str]:
        """``Spool.enqueue`` in the thread pool: a Deferred that fires with
        the queue id once the file and its directory are fsynced.  A
        ``content`` stream must not be touched until it fires."""
        return deferToThreadPool(
            self.reactor, self.threadpool, self.spool.enqueue,
            sender, recipients, content, queue=queue, **options,
        )

    def new_message(self, sender: str, recipients: Sequence[str | Recipient],
                    **options: Any) -> ThreadedIncomingMessage:
        """``Spool.new_message`` whose ``commit`` writes the file out in
        the caller's thread and hands its fsyncs and link to the thread
        pool (one hand-off a message), returning a Deferred of the queue id.
        Raises ValueError for a bad argument, at once."""
        return ThreadedIncomingMessage(self.spool.new_message(sender, recipients, **options),
                                       self.reactor, self.threadpool)


class ThreadedIncomingMessage:
    """An ``IncomingMessage`` (``Spool.new_message``) committed in a
    thread pool: ``write`` and ``discard`` run where they are called
    (``write`` only holds the content in memory until it passes the
    spool's memory limit), ``commit`` returns a Deferred."""

    def __init__(self, message: IncomingMessage, reactor: Any, threadpool: ThreadPool) -> None:
        self.message = message
        self.reactor = reactor
        self.threadpool = threadpool

    def write(self, data: bytes) -> None:
        """Add ``data`` to the content (``IncomingMessage.write``)."""
        self.message.write(data)

    def commit(self) -> Deferred[str]:
        """Write the file out here (``IncomingMessage.write_out``), then
        ``IncomingMessage.commit`` in the thread pool: fires with the
        queue id once the file and its directory entry are on disk, fails
        as either raises.  The message must not be touched until it
        fires."""
        try:
            self.message.write_out()
        except Exception:
            return fail()
        return deferToThreadPool(self.reactor, self.threadpool, self.message.commit)

    def discard(self) -> None:
        """Drop the message (``IncomingMessage.discard``)."""
        self.message.discard()


_QUIET_FACTORY = Factory.forProtocol(control.QuietAMP)
_QUIET_FACTORY.noisy = False


class ReactorWakeup:
    """``trigger.trigger(queue_directory, "wakeup")`` without blocking:
    a callable that returns a Deferred at once (module docstring)."""

    def __init__(self, reactor: Any, queue_directory: str, *,
                 timeout: float = trigger.CLIENT_TIMEOUT) -> None:
        self.reactor = reactor
        self.path = trigger.socket_path(queue_directory)
        self.timeout = timeout
        self._in_flight: Deferred[bool] | None = None
        self._again = False

    def __call__(self) -> Deferred[bool]:
        """Wake the queue manager; the Deferred fires with whether it
        answered (a call while one is in flight shares a later one)."""
        if self._in_flight is not None:
            self._again = True
            return succeed(False)
        self._in_flight = self._send()
        self._in_flight.addBoth(self._done)
        return self._in_flight

    def _done(self, answered: bool) -> bool:
        self._in_flight = None
        if self._again:
            self._again = False
            self()
        return answered

    def _send(self) -> Deferred[bool]:
        endpoint = UNIXClientEndpoint(self.reactor, self.path, timeout=self.timeout)
        connecting = endpoint.connect(_QUIET_FACTORY)

        def ask(protocol: control.QuietAMP) -> Deferred[bool]:
            answer = protocol.callRemote(control.Wakeup)
            answer.addTimeout(self.timeout, self.reactor)

            def hang_up(result: Any) -> bool:
                protocol.transport.loseConnection()
                return not isinstance(result, Failure)

            return answer.addBoth(hang_up)

        # No daemon (no socket, a stale one, a timeout): quietly False.
        return connecting.addCallback(ask).addErrback(lambda _: False)
