"""Tests for relayagent.control: the trigger socket, served by the reactor
and poked by the blocking client from a thread."""

from __future__ import annotations

import os
import stat

from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from relayagent import control


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
        answered = await threads.deferToThread(control.trigger, self.directory, "wakeup")
        self.assertTrue(answered)
        self.assertEqual(self.manager.wakeups, 1)
        answered = await threads.deferToThread(control.trigger, self.directory, "flush")
        self.assertTrue(answered)
        self.assertEqual(self.manager.flushes, 1)

    def test_socket_is_private(self) -> None:
        mode = os.stat(control.socket_path(self.directory)).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode) & 0o077, 0)

    def test_no_daemon_is_not_an_error(self) -> None:
        self.assertFalse(control.trigger(self.mktemp(), "wakeup"))

    def test_unknown_command(self) -> None:
        self.assertRaises(ValueError, control.trigger, self.directory, "reboot")
