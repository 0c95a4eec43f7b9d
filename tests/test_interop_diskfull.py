"""Interop: the built-in listener on a real, small, full file system.

The spool is on a 1 MB tmpfs mounted for the test (root only; skipped,
saying why, where mounting fails), the listener runs in-process on a
loopback port and swaks, a client nobody here wrote, talks to it:

- with message_size_limit = 200000, MAIL FROM gets "452 4.3.1
  Insufficient system storage" once less than 1.5 x that is free, and
  every message that got 250 is in incoming/, whole;
- with message_size_limit = 0 (no limit, so no early refusal), a message
  larger than the free space gets "451 4.3.0 Error: queue file write
  error" at the final ".", leaves nothing behind, and the next message
  is taken once there is room.

Neither costs a traceback (trial fails a test that logs one).  Every
wait is bounded; the file system is unmounted in cleanup.
"""

from __future__ import annotations

import os
import subprocess

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from relayagent.common.config import Config
from relayagent.smtpd.listener import make_listener_services
from relayagent.spool import INCOMING, Spool
from tests.support.ports import free_port
from tests.test_interop_twistedmail import SWAKS

TMPFS_SIZE = "1m"


def mount_tmpfs(directory: str) -> str | None:
    """Mount a small tmpfs on ``directory``; None, or why it could not be."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", directory],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount: {exc}"
    if result.returncode != 0:
        return f"mount -t tmpfs failed: {(result.stderr or result.stdout).strip()}"
    return None


class FullDiskListenerTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if SWAKS is None:
            raise SkipTest("swaks is not installed")
        self.mountpoint = os.path.abspath(self.mktemp())
        os.makedirs(self.mountpoint)
        problem = mount_tmpfs(self.mountpoint)
        if problem is not None:
            raise SkipTest(problem)
        self.addCleanup(subprocess.run, ["umount", self.mountpoint], check=False, timeout=30)
        self.spool = Spool(self.mountpoint)
        self.spool.ensure_layout()
        self.warnings: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_level") is LogLevel.warn:
                self.warnings.append(str(event.get("text") or event.get("log_format")))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.bodies = os.path.abspath(self.mktemp())  # not on the tmpfs
        os.makedirs(self.bodies)

    async def listener(self, message_size_limit: int) -> int:
        port = free_port()
        config = Config.from_text(
            f"queue_directory = {self.mountpoint}\n"
            f"smtpd_endpoints = tcp:{port}:interface=127.0.0.1\n"
            f"message_size_limit = {message_size_limit}\n"
            "myhostname = relay.test\n"
        )
        services = make_listener_services(config, self.spool, reactor=reactor)
        for service in services:
            service.startService()
            self.addCleanup(service.stopService)
        return port

    def body(self, name: str, size: int) -> str:
        path = os.path.join(self.bodies, name)
        line = (name + " ").ljust(75, "x") + "\n"
        with open(path, "w") as handle:
            handle.write(line * (size // len(line)))
        return path

    async def swaks(self, port: int, body: str, subject: str) -> tuple[int, str]:
        out, err, code = await getProcessOutputAndValue(
            SWAKS,
            ["--server", "127.0.0.1", "--port", str(port), "--timeout", "30",
             "--from", "sender@example.org", "--to", "rcpt@remote.example",
             "--header", f"Subject: {subject}", "--body", body],
            env=dict(os.environ), reactor=reactor,
        )
        return code, (out + err).decode(errors="replace")

    def queued_subjects(self) -> dict[str, bytes]:
        found = {}
        for queue_id in self.spool.queue_ids(INCOMING):
            with self.spool.open(queue_id, INCOMING, writable=False) as queue_file:
                with queue_file.envelope.open_content() as content:
                    data = content.read()
            subject = data.split(b"\nSubject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            found[subject] = data
        return found

    def assertNothingHalfWritten(self) -> None:
        self.assertEqual(os.listdir(os.path.join(self.mountpoint, "tmp")), [])

    async def test_452_at_mail_from_and_every_250_is_kept(self) -> None:
        port = await self.listener(message_size_limit=200_000)
        accepted: dict[str, str] = {}
        refused = None
        for number in range(20):
            subject = f"message-{number}"
            body = self.body(subject, 100_000)
            code, transcript = await self.swaks(port, body, subject)
            if code == 0:
                self.assertIn("250 2.0.0 Ok: queued as", transcript)
                accepted[subject] = body
                continue
            refused = transcript
            break
        self.assertIsNotNone(refused, "the 1 MB file system never filled up")
        self.assertIn("<** 452 4.3.1 Insufficient system storage", refused)
        self.assertNotIn("RCPT TO", refused.split("452 4.3.1")[1])  # refused at MAIL FROM
        self.assertGreater(len(accepted), 2)
        # Nothing that got 250 is lost, nor cut short.
        queued = self.queued_subjects()
        self.assertEqual(sorted(queued), sorted(accepted))
        for subject, path in accepted.items():
            with open(path, "rb") as handle:
                first_line = handle.readline().rstrip(b"\n")
            self.assertEqual(queued[subject].count(first_line), 100_000 // 76)
        self.assertNothingHalfWritten()
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("not enough free space in mail queue", self.warnings[0])
        # Room again (two messages delivered, say): mail is taken again.
        for queue_id in list(self.spool.queue_ids(INCOMING))[:3]:
            self.spool.remove(queue_id, INCOMING)
        code, transcript = await self.swaks(port, self.body("after", 1000), "after")
        self.assertEqual(code, 0, transcript)

    async def test_451_when_a_write_fails_and_nothing_is_left_behind(self) -> None:
        port = await self.listener(message_size_limit=0)
        code, transcript = await self.swaks(port, self.body("small-1", 50_000), "small-1")
        self.assertEqual(code, 0, transcript)
        code, transcript = await self.swaks(port, self.body("huge", 2_000_000), "huge")
        self.assertNotEqual(code, 0)
        self.assertIn("<** 451 4.3.0 Error: queue file write error", transcript)
        self.assertEqual(sorted(self.queued_subjects()), ["small-1"])
        self.assertNothingHalfWritten()
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("451 4.3.0 Error: queue file write error: No space left on device",
                      self.warnings[0])
        # The failed message took its space with it: the next one fits.
        code, transcript = await self.swaks(port, self.body("small-2", 50_000), "small-2")
        self.assertEqual(code, 0, transcript)
        self.assertEqual(sorted(self.queued_subjects()), ["small-1", "small-2"])
