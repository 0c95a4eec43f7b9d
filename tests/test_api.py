"""Tests for relayagent.api and relayagent.spool.nonblocking: enqueue off the
reactor thread (its Deferred fires only after the fsyncs), the wakeup that
never blocks, the embeddable service, and the twisted.mail glue keeping the
reactor free with the daemon stopped (real reactor, loopback)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from typing import Any

from twisted.cred.checkers import AllowAnonymousAccess
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.mail import mail, smtp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relayagent import api
from relayagent.common.config import Config
from relayagent.spool import Spool, control, trigger
from relayagent.spool.nonblocking import ReactorWakeup, ThreadedSpool
from relayagent.testing import LogCapture

MESSAGE = b"From: a@example.org\r\nSubject: api\r\n\r\nbody\r\n"


class ManualThreadPool:
    """A thread pool that runs each call only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, tuple[Any, ...], dict[str, Any]]] = []

    def callInThreadWithCallback(self, on_result: Any, function: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append((on_result, function, args, kwargs))

    def run_next(self) -> None:
        on_result, function, args, kwargs = self.calls.pop(0)
        try:
            result = function(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class ImmediateReactor:
    """What deferToThreadPool needs of a reactor: callFromThread, at once."""

    def callFromThread(self, function: Any, *args: Any, **kwargs: Any) -> None:
        function(*args, **kwargs)


def short_directory() -> str:
    # Under /tmp: UNIX socket paths are limited to about 100 octets.
    return tempfile.mkdtemp(prefix="ra-api-")


class EnqueueOrderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = Spool(self.mktemp())
        self.spool.ensure_layout()
        self.pool = ManualThreadPool()
        self.events: list[str] = []
        real_fsync = os.fsync

        def recording_fsync(fd: int) -> None:
            self.events.append("fsync")
            real_fsync(fd)

        self.patch(os, "fsync", recording_fsync)

    def test_fires_only_after_the_file_and_directory_are_fsynced(self):
        wakeups: list[str] = []
        queued = api.enqueue(ThreadedSpool(self.spool, ImmediateReactor(), self.pool),
                             "a@example.org", ["b@example.net"], MESSAGE,
                             reactor=ImmediateReactor(), wakeup=lambda: wakeups.append("wakeup"))
        queued.addCallback(lambda queue_id: self.events.append("fired") or queue_id)
        # Nothing ran on the caller's thread: no write, no fsync, no id.
        self.assertNoResult(queued)
        self.assertEqual(self.events, [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        self.pool.run_next()
        queue_id = self.successResultOf(queued)
        # The file, then its directory, then the Deferred; then the wakeup.
        self.assertEqual(self.events, ["fsync", "fsync", "fired"])
        self.assertEqual(wakeups, ["wakeup"])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [queue_id])

    def test_a_bad_recipient_fails_and_queues_nothing(self):
        wakeups: list[str] = []
        queued = api.enqueue(ThreadedSpool(self.spool, ImmediateReactor(), self.pool),
                             "a@example.org", [], MESSAGE,
                             reactor=ImmediateReactor(), wakeup=lambda: wakeups.append("wakeup"))
        self.pool.run_next()
        self.failureResultOf(queued, ValueError)
        self.assertEqual(wakeups, [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])

    def test_enqueues_share_one_wakeup(self):
        from relayagent.api import _wakeup_for

        threaded = ThreadedSpool(self.spool, ImmediateReactor(), self.pool)
        first = _wakeup_for(reactor, threaded.directory)
        self.assertIs(_wakeup_for(reactor, threaded.directory), first)
        self.assertIsNot(_wakeup_for(reactor, threaded.directory + "x"), first)

    def test_threaded_spool_from_a_directory_makes_the_layout(self):
        directory = self.mktemp()
        threaded = api.threaded_spool(directory, ImmediateReactor(), self.pool)
        self.assertTrue(os.path.isdir(os.path.join(directory, "incoming")))
        self.assertEqual(threaded.directory, os.path.abspath(directory))


class StalledDaemon:
    """The trigger socket of a stopped daemon (``kill -STOP``): the kernel
    accepts connections into the backlog and nobody ever answers."""

    def __init__(self, queue_directory: str) -> None:
        path = trigger.socket_path(queue_directory)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)

    def close(self) -> None:
        self.sock.close()


class FakeQueueManager:
    def __init__(self) -> None:
        self.wakeups = 0

    def wakeup(self) -> None:
        self.wakeups += 1

    def flush(self) -> None:
        pass


class ReactorWakeupTests(TestCase):
    def setUp(self) -> None:
        self.directory = short_directory()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, True))

    async def test_wakes_a_listening_daemon(self):
        manager = FakeQueueManager()
        port = control.listen(reactor, self.directory, manager)
        self.addCleanup(port.stopListening)
        captured = LogCapture(self)
        answered = await ReactorWakeup(reactor, self.directory)()
        self.assertTrue(answered)
        self.assertEqual(manager.wakeups, 1)
        # Once per queued message: no line of Twisted's on either side
        # (AMP's "connection established" and "lost", the factories').
        await task.deferLater(reactor, 0.05, lambda: None)
        twisteds = [m for m in captured.messages()
                    if "connection established" in m or "connection lost" in m or "factory" in m.lower()]
        self.assertEqual(twisteds, [])

    async def test_no_daemon_is_false_without_error(self):
        self.assertFalse(await ReactorWakeup(reactor, self.directory)())

    async def test_a_stalled_daemon_times_out_quietly(self):
        stalled = StalledDaemon(self.directory)
        self.addCleanup(stalled.close)
        started = time.monotonic()
        answered = await ReactorWakeup(reactor, self.directory, timeout=0.2)()
        self.assertFalse(answered)
        self.assertLess(time.monotonic() - started, 5.0)

    async def test_calls_while_one_is_in_flight_become_one_more(self):
        manager = FakeQueueManager()
        port = control.listen(reactor, self.directory, manager)
        self.addCleanup(port.stopListening)
        wakeup = ReactorWakeup(reactor, self.directory)
        first = wakeup()
        for _ in range(5):
            wakeup()
        self.assertTrue(await first)
        # The one folded call is on its way now.
        self.assertIsNotNone(wakeup._in_flight)
        await wakeup._in_flight
        self.assertEqual(manager.wakeups, 2)


class Greeting(Protocol):
    """Fires ``greeted`` with the seconds from connect to the 220 line."""

    def __init__(self) -> None:
        self.greeted: defer.Deferred[float] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.started = time.monotonic()
        self.data = b""

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n" in self.data and not self.greeted.called:
            self.greeted.callback(time.monotonic() - self.started)
            self.transport.write(b"QUIT\r\n")
            self.transport.loseConnection()


class ReactorNeverBlockedTests(TestCase):
    """The issue's case: the daemon stopped, a slow disk; a second client
    of the twisted.mail server must still be greeted at once."""

    timeout = 30
    # Generous for a shared machine; blocking code takes 500 ms (the fsync
    # below) or 2 s (the old trigger's timeout).
    BOUND = 0.100
    SLOW_FSYNC = 0.5

    def setUp(self) -> None:
        self.directory = short_directory()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, True))
        config = Config.from_text(f"queue_directory = {self.directory}\nmyhostname = mx.example.org\n")
        self.stalled = StalledDaemon(self.directory)
        self.addCleanup(self.stalled.close)
        # A slow disk: every fsync waits, in whatever thread, until the
        # test has been greeted during one (``disk_free``), and half a
        # second at the most: on the reactor thread it would hold the
        # greeting that long.
        self.fsync_started: defer.Deferred[None] = defer.Deferred()
        self.disk_free = threading.Event()
        self.addCleanup(self.disk_free.set)
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            if threading.current_thread() is threading.main_thread():
                self.fsync_on_reactor_thread = True
            if not self.fsync_started.called:
                reactor.callFromThread(
                    lambda: self.fsync_started.called or self.fsync_started.callback(None))
            self.disk_free.wait(self.SLOW_FSYNC)
            real_fsync(fd)

        self.fsync_on_reactor_thread = False
        self.patch(os, "fsync", slow_fsync)
        mail_service = mail.MailService()
        mail_service.smtpPortal.registerChecker(AllowAnonymousAccess())
        self.relay = api.install_relayagent(mail_service, config, reactor=reactor)
        self.port = reactor.listenTCP(0, self.relay.esmtp_factory(), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def greeting_time(self) -> float:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = Greeting()
        await connectProtocol(endpoint, client)
        elapsed = await client.greeted
        # Closed on both sides before the test goes on (a clean reactor).
        await client.closed
        await task.deferLater(reactor, 0.05, lambda: None)
        return elapsed

    async def test_greeting_within_bound_while_queueing_with_the_daemon_stopped(self):
        sending = smtp.sendmail("127.0.0.1", "alice@example.org", ["bob@remote.example"],
                                MESSAGE, port=self.port.getHost().port,
                                requireAuthentication=False, requireTransportSecurity=False)
        # A refused message must fail the test, not leave it waiting.
        sending.addErrback(lambda failure: self.fsync_started.called
                           or self.fsync_started.errback(failure) or failure)
        await self.fsync_started
        # The message is being made durable right now.
        during_fsync = await self.greeting_time()
        self.disk_free.set()
        await sending
        # 250 given: the wakeup to the stopped daemon is on its way.
        during_wakeup = await self.greeting_time()
        self.assertLess(during_fsync, self.BOUND)
        self.assertLess(during_wakeup, self.BOUND)
        self.assertFalse(self.fsync_on_reactor_thread)
        spool = Spool(self.directory)
        self.assertEqual(len(list(spool.queue_ids("incoming"))), 1)
        # Let the wakeup give up (its 2 s timeout) before the test ends.
        wakeup = self.relay.intake.trigger
        if wakeup._in_flight is not None:
            await wakeup._in_flight


class DaemonListenerNeverBlockedTests(ReactorNeverBlockedTests):
    """The same for the daemon's own listener (``smtpd_endpoints``): its
    enqueue runs in the thread pool too (``listener._DaemonSpool``)."""

    def setUp(self) -> None:
        super().setUp()
        from relayagent.smtpd import listener
        from relayagent.smtpd.intake import Intake

        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()
        config = Config.from_text(f"queue_directory = {self.directory}\nmyhostname = mx.example.org\n"
                                  f"relayhost = [127.0.0.1]:{dead_port}\n")
        self.stalled.close()  # the daemon runs here: its own trigger socket
        self.mail_system = api.RelayagentService(config, reactor)
        self.mail_system.startService()
        self.addCleanup(self.mail_system.stopService)
        self.woken: list[int] = []
        intake = Intake.from_config(config, listener._DaemonSpool(self.mail_system.daemon, reactor),
                                    trigger=lambda: self.woken.append(1))
        self.port.stopListening()
        factory = listener.ListenerFactory(intake, config)
        # Each server connection's end, for a clean reactor at the end.
        self.connections_closed: list[defer.Deferred[None]] = []
        build = factory.buildProtocol

        def tracked(address: Any) -> Any:
            server = build(address)
            closed: defer.Deferred[None] = defer.Deferred()
            self.connections_closed.append(closed)
            lost = server.connectionLost

            def connection_lost(reason: Any) -> None:
                lost(reason)
                closed.callback(None)

            server.connectionLost = connection_lost
            return server

        factory.buildProtocol = tracked
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def test_greeting_within_bound_while_queueing_with_the_daemon_stopped(self):
        sending = smtp.sendmail("127.0.0.1", "alice@example.org", ["bob@remote.example"],
                                MESSAGE, port=self.port.getHost().port,
                                requireAuthentication=False, requireTransportSecurity=False)
        sending.addErrback(lambda failure: self.fsync_started.called
                           or self.fsync_started.errback(failure) or failure)
        await self.fsync_started
        during_fsync = await self.greeting_time()
        self.disk_free.set()
        await sending
        await defer.gatherResults(self.connections_closed)
        self.assertLess(during_fsync, self.BOUND)
        self.assertFalse(self.fsync_on_reactor_thread)
        self.assertEqual(self.woken, [1])


class RelayagentServiceTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = short_directory()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, True))
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()
        self.config = Config.from_text(
            f"queue_directory = {self.directory}\nmyhostname = mx.example.org\n"
            f"relayhost = [127.0.0.1]:{dead_port}\n"
        )

    def test_runs_in_one_process_unless_told(self):
        service = api.RelayagentService(self.config, reactor)
        self.assertEqual(service.daemon.workers, 1)
        self.assertEqual(service.daemon.parent, service)
        told = api.RelayagentService(self.config.replace(relayagent_workers="3"), reactor, workers=None)
        self.assertEqual(told.daemon.workers, 3)

    async def test_a_second_service_on_one_spool_raises_daemon_running(self):
        """Two queue managers on one spool would deliver each other's
        active files twice: the second start refuses, with the exception
        the public API names (no reaching into relayagent.spool)."""
        config = self.config.replace(maillog_file=os.path.join(self.directory, "maillog"))
        first = api.RelayagentService(config, reactor)
        first.startService()
        try:
            second = api.RelayagentService(config, reactor)
            self.assertRaises(api.DaemonRunning, second.startService)
            # Nothing of the refused one runs: it took neither the lock nor
            # the mail events (the first one's log lines stay the first's).
            self.assertIsNone(second.daemon._lock_fd)
            self.assertFalse(second.daemon.maillog.running)
            self.assertTrue(first.daemon.maillog.running)
            self.assertTrue(trigger.daemon_running(self.directory))
        finally:
            await first.stopService()
        # One last line, the first one's: no signal stopped it.
        with open(os.path.join(self.directory, "maillog"), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        self.assertEqual([line for line in lines if "terminating" in line], lines[-1:])
        self.assertRegex(lines[-1], r" relayagent/master\[%d\]: terminating$" % os.getpid())

    async def test_enqueue_before_start_fails_clearly(self):
        service = api.RelayagentService(self.config, reactor)
        with self.assertRaises(RuntimeError):
            await service.enqueue("a@example.org", ["b@example.net"], MESSAGE)

    async def test_enqueue_and_wakeup_in_a_started_service(self):
        service = api.RelayagentService(self.config, reactor)
        service.startService()
        try:
            woken: list[int] = []
            manager = service.daemon.queue_manager
            real_wakeup = manager.wakeup
            self.patch(manager, "wakeup", lambda: woken.append(1) or real_wakeup())
            queue_id = await service.enqueue("a@example.org", ["b@example.net"], MESSAGE)
            self.assertEqual(woken, [1])
            self.assertIsNotNone(service.daemon.spool.find(queue_id))
        finally:
            await service.stopService()
