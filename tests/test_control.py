"""Tests for relayagent.spool.control: the trigger socket, served by the reactor
and poked by the blocking client from a thread."""

from __future__ import annotations

import io
import os
import stat

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from relayagent.spool import control, trigger


class FakeQueueManager:
    def __init__(self) -> None:
        self.wakeups = 0
        self.flushes = 0

    def wakeup(self) -> None:
        self.wakeups += 1

    def flush(self) -> None:
        self.flushes += 1


class ControlTests(TestCase):
    def setUp(self) -> None:
        # UNIX socket paths are short (108 octets): a short directory.
        self.directory = os.path.relpath(self.mktemp())
        os.makedirs(self.directory)
        self.manager = FakeQueueManager()
        self.port = control.listen(reactor, self.directory, self.manager)
        self.addCleanup(self.port.stopListening)

    async def test_wakeup_and_flush(self) -> None:
        answered = await threads.deferToThread(trigger.trigger, self.directory, "wakeup")
        self.assertTrue(answered)
        self.assertEqual(self.manager.wakeups, 1)
        answered = await threads.deferToThread(trigger.trigger, self.directory, "flush")
        self.assertTrue(answered)
        self.assertEqual(self.manager.flushes, 1)

    def test_socket_is_private(self) -> None:
        mode = os.stat(trigger.socket_path(self.directory)).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode) & 0o077, 0)

    def test_no_daemon_is_not_an_error(self) -> None:
        self.assertFalse(trigger.trigger(self.mktemp(), "wakeup"))

    def test_unknown_command(self) -> None:
        self.assertRaises(ValueError, trigger.trigger, self.directory, "reboot")


class AnsweredCommandTests(TestCase):
    """reload and logrotate: the service's answer comes back to ``ask``."""

    def setUp(self) -> None:
        self.directory = os.path.relpath(self.mktemp())
        os.makedirs(self.directory)
        self.asked: list[str] = []

        def on_command(name: str) -> tuple[bool, str]:
            self.asked.append(name)
            if name == "reload":
                return False, "reload refused: main.cf, line 3: bad value; the running configuration stays"
            return True, ""

        self.port = control.listen(reactor, self.directory, FakeQueueManager(), on_command)
        self.addCleanup(self.port.stopListening)

    async def test_answers(self) -> None:
        answer = await threads.deferToThread(trigger.ask, self.directory, "reload")
        self.assertEqual(answer, (False, "reload refused: main.cf, line 3: bad value; the running "
                                         "configuration stays"))
        answer = await threads.deferToThread(trigger.ask, self.directory, "logrotate")
        self.assertEqual(answer, (True, ""))  # an empty text: the box still ends where it should
        self.assertEqual(self.asked, ["reload", "logrotate"])

    def test_no_daemon_is_none(self) -> None:
        self.assertIsNone(trigger.ask(self.mktemp(), "reload"))

    def test_unknown_command(self) -> None:
        self.assertRaises(ValueError, trigger.ask, self.directory, "wakeup")

    async def test_without_a_handler_the_daemon_says_so(self) -> None:
        other = os.path.relpath(self.mktemp())
        os.makedirs(other)
        port = control.listen(reactor, other, FakeQueueManager())
        self.addCleanup(port.stopListening)
        answer = await threads.deferToThread(trigger.ask, other, "reload")
        self.assertEqual(answer, (False, "reload is not supported here"))


class SecondDaemonTests(TestCase):
    """Two queue managers on one spool would deliver each other's active
    mail twice: the second one must refuse to start."""

    def setUp(self) -> None:
        self.directory = os.path.relpath(self.mktemp())
        os.makedirs(self.directory)
        self.port = control.listen(reactor, self.directory, FakeQueueManager())
        self.addCleanup(self.port.stopListening)

    def test_second_listener_is_refused(self) -> None:
        self.assertTrue(trigger.daemon_running(self.directory))
        self.assertRaises(trigger.DaemonRunning, control.listen, reactor, self.directory, FakeQueueManager())

    def test_spool_lock_is_exclusive_and_released(self) -> None:
        os.makedirs(os.path.join(self.directory, "public"), exist_ok=True)
        fd = trigger.lock_spool(self.directory)
        self.assertTrue(trigger.spool_locked(self.directory))
        self.assertRaises(trigger.DaemonRunning, trigger.lock_spool, self.directory)
        os.close(fd)
        self.assertFalse(trigger.spool_locked(self.directory))

    def test_twistd_options_refuse_a_second_daemon(self) -> None:

        from relayagent.master import tap

        # A deep path, as trial's are: the lock does not care about length.
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "public"))
        fd = trigger.lock_spool(directory)
        self.addCleanup(os.close, fd)
        config_path = os.path.join(directory, "main.cf")
        with open(config_path, "w") as handle:
            handle.write("queue_directory = .\n")
        options = tap.Options()
        self.patch(tap, "fatal_stream", io.StringIO())
        with self.assertRaises(tap.StartupFailure) as caught:
            options.parseOptions(["-c", config_path])
        self.assertEqual(caught.exception.code, tap.EX_TEMPFAIL)
        self.assertIn("already running", caught.exception.text)

    async def test_stale_socket_is_not_a_daemon(self) -> None:
        await self.port.stopListening()
        self.assertFalse(trigger.daemon_running(self.directory))
