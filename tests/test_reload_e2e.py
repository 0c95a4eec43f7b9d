"""End-to-end: reload and log rotation of a running ``twistd -n relayagent``
(``relayagent.master.reload``), real processes on loopback.

- SIGHUP with a changed ``relayhost``: the next delivery goes to the new
  host while a transaction held in DATA by a server of this test
  finishes on the old one;
- ``relayagent reload`` does the same; a broken main.cf is refused with
  one warning and the old configuration stays; no daemon: exit 69;
- ``mv maillog maillog.1; relayagent logrotate`` (and SIGUSR1) sends the
  next lines to a new maillog; SIGUSR1 without ``--logfile`` leaves the
  daemon running;
- with ``relayagent_workers = 2`` both workers reload and reopen.

Skips when smtp-sink is missing (DaemonTestCase).  Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from relayagent.spool import trigger
from relayagent.spool.queueid import partition_of
from tests.support.ports import free_port
from tests.test_daemon_e2e import ROOT, DaemonTestCase, body

SENT = re.compile(r": ([0-9A-V]{16}): to=<([^>]*)>, relay=[^,]*\]:(\d+),.*status=sent")
RELOADED = re.compile(r"relayagent/master\[\d+\]: reload -- version \S+, configuration (\S+)$", re.MULTILINE)


class _HoldingSession(LineReceiver):
    """An SMTP server that answers DATA only when the test releases it."""

    delimiter = b"\r\n"

    def __init__(self, server: HoldingServer) -> None:
        self.server = server
        self.lines: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.sendLine(b"220 hold.test ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if self.lines is not None:
            if line == b".":
                self.server.messages.append(b"\n".join(self.lines))
                self.lines = None
                self.sendLine(b"250 2.0.0 Ok: queued")
            else:
                self.lines.append(line)
            return
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-hold.test")
            self.sendLine(b"250 8BITMIME")
        elif verb == b"DATA":
            if not self.server.data_started.called:
                self.server.data_started.callback(None)
            self.server.release.addCallback(self._go_ahead)
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 2.0.0 Ok")

    def _go_ahead(self, result: object) -> object:
        self.lines = []
        self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        return result


class HoldingServer(Factory):
    """The old relayhost: holds every transaction in DATA until ``release``."""

    def __init__(self) -> None:
        self.data_started: Deferred[None] = Deferred()
        self.release: Deferred[None] = Deferred()
        self.messages: list[bytes] = []

    def buildProtocol(self, addr: object) -> _HoldingSession:
        return _HoldingSession(self)


class ReloadTestCase(DaemonTestCase):
    def config(self, relayhost_port: int, extra: str = "", *, workers: int = 1) -> str:
        path = os.path.join(self.base, "main.cf")
        with open(path + ".new", "w") as handle:
            handle.write(
                f"queue_directory = {self.spool_directory}\n"
                f"relayhost = [127.0.0.1]:{relayhost_port}\n"
                f"maillog_file = {self.maillog}\n"
                "myhostname = relay.test\n"
                "smtp_connect_timeout = 5s\n"
                f"relayagent_workers = {workers}\n"
                + extra
            )
        os.replace(path + ".new", path)
        return path

    def command(self, config: str, *words: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "import sys; from relayagent.cli import main; sys.exit(main())", "-c", config, *words],
            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, timeout=60, text=True,
        )

    def enqueue(self, number: int, tag: str) -> str:
        queue_id = self.spool.enqueue("sender@example.org", [f"{tag}{number}@example.net"], body(number, tag))
        trigger.trigger(self.spool_directory, "wakeup")
        return queue_id

    def sent(self, text: str | None = None) -> dict[str, int]:
        """Queue id -> the port it was delivered to."""
        return {m.group(1): int(m.group(3)) for m in SENT.finditer(self.log_text() if text is None else text)}

    async def started(self, config: str, *options: str) -> subprocess.Popen:
        daemon = self.start_daemon(config, *options)
        await self.wait_for(lambda: trigger.daemon_running(self.spool_directory), 60, "the daemon to listen")
        return daemon

    async def reloaded(self, count: int) -> None:
        await self.wait_for(lambda: len(RELOADED.findall(self.log_text())) >= count, 30, "the reload line")


class ReloadTests(ReloadTestCase):
    async def test_sighup_moves_the_next_delivery_and_lets_the_one_in_flight_finish(self) -> None:
        await self.start_sink()  # the new relayhost: self.port
        holding = HoldingServer()
        old_port = reactor.listenTCP(0, holding, interface="127.0.0.1")
        self.addCleanup(old_port.stopListening)
        old = old_port.getHost().port
        config = self.config(old)
        pidfile = os.path.join(self.base, "twistd.pid")
        daemon = await self.started(config, "--pidfile", pidfile)
        in_flight = self.enqueue(1, "old")
        await holding.data_started  # the transaction is in DATA, held
        self.config(self.port)
        daemon.send_signal(signal.SIGHUP)
        await self.reloaded(1)
        self.assertEqual(RELOADED.findall(self.log_text()), [config])
        after = self.enqueue(2, "new")
        await self.wait_for(lambda: after in self.sent(), 30, "the delivery after the reload")
        self.assertEqual(self.sent()[after], self.port)
        self.assertNotIn(in_flight, self.sent())  # still held
        holding.release.callback(None)
        await self.wait_for(lambda: in_flight in self.sent(), 30, "the held transaction to finish")
        self.assertEqual(self.sent()[in_flight], old)
        self.assertEqual(len(holding.messages), 1)
        self.assertIn(b"old-1@example.org", holding.messages[0])
        self.assertEqual(len(self.dump_files()), 1)
        self.assertIsNone(daemon.poll())  # SIGHUP did not end it
        with open(pidfile) as handle:
            self.assertEqual(int(handle.read()), daemon.pid)
        self.assertEqual(self.queued(), 0)
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        self.assertFalse(os.path.exists(pidfile))  # no stale twistd.pid

    async def test_reload_command_and_a_broken_main_cf(self) -> None:
        await self.start_sink()
        dead = free_port()  # nothing listens: the first relayhost defers
        config = self.config(dead)
        daemon = await self.started(config)
        self.config(self.port)
        result = self.command(config, "reload")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("refreshing the mail system", result.stderr)
        await self.reloaded(1)
        first = self.enqueue(1, "cmd")
        await self.wait_for(lambda: first in self.sent(), 30, "the delivery after the reload")
        self.assertEqual(self.sent()[first], self.port)

        # A main.cf that does not parse: SIGHUP is refused, the old one stays.
        self.config(dead, "smtp_helo_timeout = soon\n")
        daemon.send_signal(signal.SIGHUP)
        await self.wait_for(lambda: "reload refused" in self.log_text(), 30, "the refusal")
        refusals = [line for line in self.log_text().splitlines() if "reload refused" in line]
        self.assertEqual(len(refusals), 1)
        self.assertIn("warning: reload refused:", refusals[0])
        self.assertIn("smtp_helo_timeout", refusals[0])
        self.assertEqual(len(RELOADED.findall(self.log_text())), 1)
        second = self.enqueue(2, "cmd")
        await self.wait_for(lambda: second in self.sent(), 30, "a delivery on the old configuration")
        self.assertEqual(self.sent()[second], self.port)
        # The command cannot even read it: the configuration error, 78.
        result = self.command(config, "reload")
        self.assertEqual(result.returncode, 78, result.stderr)
        self.assertIsNone(daemon.poll())

        # One the command reads but the daemon refuses (a table it cannot open): 78, the reason.
        self.config(dead, f"transport_maps = texthash:{self.base}/no-such-table\n")
        result = self.command(config, "reload")
        self.assertEqual(result.returncode, 78, result.stderr)
        self.assertIn("reload refused: ", result.stderr)
        self.assertIn("the running configuration stays", result.stderr)
        third = self.enqueue(3, "cmd")
        await self.wait_for(lambda: third in self.sent(), 30, "a delivery on the old configuration")
        self.assertEqual(self.sent()[third], self.port)

        # What needs a restart is kept, and said.
        self.config(self.port, "smtpd_endpoints = tcp:0:interface=127.0.0.1\n")
        self.assertEqual(self.command(config, "reload").returncode, 0)
        await self.reloaded(2)
        self.assertRegex(self.log_text(), r"warning: reload: smtpd_endpoints changed: the running value "
                         r"stays until the daemon is restarted")
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        # No daemon: the mail system is down.
        result = self.command(config, "reload")
        self.assertEqual(result.returncode, 69, result.stderr)
        self.assertIn("mail system is down", result.stderr)
        self.assertEqual(self.command(config, "logrotate").returncode, 69)


class LogrotateTests(ReloadTestCase):
    async def rotated(self, daemon: subprocess.Popen, config: str, rotate) -> None:  # noqa: ANN001
        first = self.enqueue(1, "rot")
        await self.wait_for(lambda: first in self.sent(), 30, "the first delivery")
        os.rename(self.maillog, self.maillog + ".1")
        rotate()
        second = self.enqueue(2, "rot")
        await self.wait_for(lambda: second in self.sent(), 30, "a delivery logged in the new maillog")
        with open(self.maillog + ".1", encoding="utf-8") as handle:
            old = handle.read()
        self.assertIn(first, self.sent(old))
        self.assertNotIn(second, self.sent(old))
        self.assertNotIn(first, self.sent())
        self.assertIsNone(daemon.poll())

    async def test_logrotate_command(self) -> None:
        await self.start_sink()
        config = self.config(self.port)
        daemon = await self.started(config)

        def rotate() -> None:
            result = self.command(config, "logrotate")
            self.assertEqual(result.returncode, 0, result.stderr)

        await self.rotated(daemon, config, rotate)

    async def test_sigusr1_without_logfile_reopens_and_keeps_running(self) -> None:
        await self.start_sink()
        config = self.config(self.port)
        daemon = await self.started(config)  # -n, twistd's log on standard output
        await self.rotated(daemon, config, lambda: daemon.send_signal(signal.SIGUSR1))

    async def test_sigusr1_with_logfile_also_rotates_twistds_log(self) -> None:
        await self.start_sink()
        config = self.config(self.port)
        logfile = os.path.join(self.base, "twistd.log")
        daemon = await self.started(config, "--logfile", logfile)
        await self.rotated(daemon, config, lambda: daemon.send_signal(signal.SIGUSR1))
        await self.wait_for(lambda: os.path.exists(logfile + ".1"), 30, "twistd's log rotated")


class WorkersReloadTests(ReloadTestCase):
    async def test_both_workers_reload_and_reopen(self) -> None:
        await self.start_sink()
        dead = free_port()
        config = self.config(dead, workers=2)
        daemon = await self.started(config)
        await self.wait_for(lambda: "worker 1 started: pid" in self.log_text(), 60, "worker 1")
        self.config(self.port, workers=2)
        daemon.send_signal(signal.SIGHUP)
        await self.reloaded(1)
        os.rename(self.maillog, self.maillog + ".1")
        self.assertEqual(self.command(config, "logrotate").returncode, 0)
        # Enough messages that each worker's partition has some.
        ids = [self.enqueue(n, "w") for n in range(16)]
        self.assertEqual({partition_of(queue_id, 2) for queue_id in ids}, {0, 1})
        await self.wait_for(lambda: set(ids) <= set(self.sent()), 60, "every delivery, in the new maillog")
        self.assertEqual(set(self.sent()[queue_id] for queue_id in ids), {self.port})
        pids = set(re.findall(r"relayagent/smtp\[(\d+)\]: [0-9A-V]{16}: to=<w", self.log_text()))
        self.assertEqual(len(pids), 2, pids)  # both workers, both logging to the new file
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
