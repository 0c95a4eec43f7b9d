"""Start-up failures and the stop of ``twistd -n relayagent``.

Each start-up failure is one ``relayagent: fatal: ...`` line on standard
error and a sysexits status (real twistd processes); a stop waits for
the deliveries in flight at most ``relayagent_stop_timeout``, says so,
and a second signal ends the wait, with no traceback and nothing lost
(real twistd and smtp-sink processes); ``BoundedStop`` on a fake clock.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relayagent.common.config import Config
from relayagent.master import stop
from relayagent.spool import Spool
from tests.support.ports import free_port
from tests.support.scripted_server import SILENT_AFTER, Answer, Script, ScriptedServer
from tests.test_daemon_e2e import ROOT, TWISTD, DaemonTestCase, body


class StartupFailureTests(SynchronousTestCase):
    """One line on standard error, a sysexits status, no traceback."""

    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            raise SkipTest(f"twistd not found next to {sys.executable}")
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        os.chmod(self.base, 0o755)

    def twistd(self, config_text: str | None, *options: str) -> subprocess.CompletedProcess[str]:
        path = os.path.join(self.base, "main.cf")
        if config_text is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(config_text)
        return subprocess.run(
            [TWISTD, "-n", "--pidfile=", *options, "relayagent", "-c", path],
            cwd=self.base, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
            timeout=120,
        )

    def assertFatal(self, result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
        self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("relayagent: fatal: "), result.stderr)
        self.assertIn(text, result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertNotIn("Usage:", result.stdout + result.stderr)
        self.assertEqual(result.returncode, code, result.stdout + result.stderr)

    def test_port_in_use(self) -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = self.twistd(f"queue_directory = spool\nrelayagent_workers = 1\n"
                                 f"smtpd_endpoints = tcp:{port}:interface=127.0.0.1\n")
        self.assertFatal(result, 69, f"bind 127.0.0.1 port {port}: Address already in use")

    def test_port_in_use_daemonized(self) -> None:
        # twistd's parent waits for the daemon's word: it prints our line
        # (its own way, and exits 1), and the pid file goes.
        pidfile = os.path.join(self.base, "twistd.pid")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with open(os.path.join(self.base, "main.cf"), "w", encoding="utf-8") as handle:
                handle.write(f"queue_directory = spool\nrelayagent_workers = 1\n"
                             f"smtpd_endpoints = tcp:{port}:interface=127.0.0.1\n")
            result = subprocess.run(
                [TWISTD, f"--pidfile={pidfile}", "--logfile=twistd.log", "relayagent",
                 "-c", os.path.join(self.base, "main.cf")],
                cwd=self.base, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                timeout=120)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"relayagent: fatal: bind 127.0.0.1 port {port}: Address already in use", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        with open(os.path.join(self.base, "twistd.log"), encoding="utf-8") as handle:
            self.assertRegex(handle.read(), rf"relayagent/master\[\d+\]: fatal: bind 127.0.0.1 port {port}: ")
        self.assertFalse(os.path.exists(pidfile))

    def test_unwritable_spool(self) -> None:
        spool = os.path.join(self.base, "closed", "spool")
        os.makedirs(spool)
        if os.geteuid() == 0:
            # Root may write anywhere: start as root, run as nobody.
            os.chmod(os.path.dirname(spool), 0o700)
            options: tuple[str, ...] = ("--uid", "nobody", "--gid", "nogroup")
        else:
            os.chmod(spool, 0o500)
            self.addCleanup(os.chmod, spool, 0o700)
            options = ()
        result = self.twistd(f"queue_directory = {spool}\nrelayagent_workers = 1\n", *options)
        self.assertFatal(result, 73, "Permission denied")

    def test_config_error(self) -> None:
        result = self.twistd("queue_directory = spool\nsmtp_connect_timeout = soon\n")
        self.assertFatal(result, 78, "main.cf, line 2: parameter smtp_connect_timeout")

    def test_relayhost_syntax(self) -> None:
        result = self.twistd("queue_directory = spool\nrelayhost = [127.0.4.1:43001\n")
        self.assertFatal(result, 78, "relayhost: missing ']' in destination '[127.0.4.1:43001'")

    def test_listener_certificate_missing(self) -> None:
        result = self.twistd("queue_directory = spool\nsmtpd_endpoints = tcp:0:interface=127.0.0.1\n"
                             "smtpd_tls_security_level = may\nsmtpd_tls_cert_file = /nonexistent/cert.pem\n")
        self.assertFatal(result, 78, "cannot use smtpd_tls_cert_file '/nonexistent/cert.pem'")

    def test_missing_config(self) -> None:
        result = self.twistd(None)
        self.assertFatal(result, 78, "cannot read configuration")


class StopTests(DaemonTestCase):
    """The stop of a daemon with a delivery in flight to a server that
    never answers the message's final "." (a scripted server)."""

    timeout = 120

    async def start(self, stop_timeout: str, workers: int = 1, messages: int = 1) -> subprocess.Popen:
        # Silent after the message's ".": the delivery stays in flight.
        server = ScriptedServer()
        listener = server.listen(Script(dot=Answer((), SILENT_AFTER)))
        server.start()
        self.addCleanup(server.stop)
        self.port = listener.port
        self.queue_ids = sorted(self.spool.enqueue("sender@example.org", [f"rcpt{n}@example.net"], body(n))
                                for n in range(messages))
        self.queue_id = self.queue_ids[0]
        daemon = self.start_daemon(self.write_config(
            f"relayagent_stop_timeout = {stop_timeout}\nrelayagent_workers = {workers}\n"))
        await self.wait_for(lambda: sum("." in session.commands for session in list(listener.sessions)) >= messages,
                            60, "the message data at the server")
        return daemon

    def twistd_output(self) -> str:
        with open(os.path.join(self.base, "twistd.out"), encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def still_queued(self) -> list[str]:
        spool = Spool(self.spool_directory)
        return [qid for queue in ("incoming", "active", "deferred") for qid in spool.queue_ids(queue)]

    async def test_the_stop_waits_at_most_the_timeout(self) -> None:
        daemon = await self.start("2s")
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        status = await threads.deferToThread(daemon.wait, 60)
        elapsed = time.monotonic() - started
        # twistd ends with the signal that stopped it (an orderly stop).
        self.assertEqual(status, -signal.SIGTERM)
        self.assertGreaterEqual(elapsed, 1.9)
        self.assertLess(elapsed, 20)
        output = self.twistd_output() + self.log_text()
        self.assertIn("stopping: waiting for 1 deliveries in flight (at most 2s", output)
        self.assertIn("stopping: 1 deliveries still in flight after 2s: stopped before they ended; "
                      "they stay queued", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(self.still_queued(), [self.queue_id])

    async def test_a_second_signal_stops_at_once(self) -> None:
        daemon = await self.start("60s")
        started = time.monotonic()
        daemon.send_signal(signal.SIGINT)
        await self.wait_for(lambda: "deliveries in flight" in self.log_text(), 10, "the stop to begin")
        daemon.send_signal(signal.SIGINT)
        status = await threads.deferToThread(daemon.wait, 60)
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(status, -signal.SIGINT)
        output = self.twistd_output() + self.log_text()
        self.assertIn("still in flight at a second signal", output)
        self.assertNotIn("ReactorNotRunning", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(self.still_queued(), [self.queue_id])


    async def test_a_second_signal_stops_the_workers_too(self) -> None:
        daemon = await self.start("60s", workers=2, messages=4)
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: "deliveries in flight" in self.log_text(), 10, "the stop to begin")
        daemon.send_signal(signal.SIGTERM)
        status = await threads.deferToThread(daemon.wait, 60)
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(status, -signal.SIGTERM)
        output = self.twistd_output() + self.log_text()
        self.assertNotIn("Traceback", output)
        self.assertEqual(sorted(self.still_queued()), self.queue_ids)


class BoundedStopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.settings = stop.StopSettings.from_config(Config.from_text("relayagent_stop_timeout = 10s\n"))
        self.waiting: Deferred[None] = Deferred()

    def test_nothing_in_flight_nothing_said(self) -> None:
        bounded = stop.bounded_stop(self.clock, self.waiting, in_flight=0, settings=self.settings)
        self.assertFalse(bounded.done.called)
        self.waiting.callback(None)
        self.assertTrue(bounded.done.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_wait_ends_with_the_deliveries(self) -> None:
        bounded = stop.bounded_stop(self.clock, self.waiting, in_flight=2, settings=self.settings)
        self.clock.advance(9)
        self.assertFalse(bounded.done.called)
        self.waiting.callback(None)
        self.assertTrue(bounded.done.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_wait_ends_at_the_timeout(self) -> None:
        bounded = stop.bounded_stop(self.clock, self.waiting, in_flight=2, settings=self.settings)
        self.clock.advance(10)
        self.assertTrue(bounded.done.called)
        self.waiting.callback(None)  # later: nothing more happens

    def test_now(self) -> None:
        bounded = stop.bounded_stop(self.clock, self.waiting, in_flight=1, settings=self.settings)
        bounded.now()
        self.assertTrue(bounded.done.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        bounded.now()  # a third signal: nothing more


class _SignalReactor:
    """What ``install_stop_signals`` uses of a reactor, recorded: running
    at once, calls from the signal handler kept until ``run_calls``."""

    def __init__(self) -> None:
        self.running = True
        self.stopped = 0
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callWhenRunning(self, function: Any) -> None:
        function()

    def callFromThread(self, function: Any, *args: Any) -> None:
        self.calls.append((function, args))

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)

    def stop(self) -> None:
        self.stopped += 1


class StopSignalTests(SynchronousTestCase):
    """``install_stop_signals`` with the handlers called directly (no
    signal is sent): the first signal to the earlier handler, a second
    to ``stop_now``, an ignored signal left ignored."""

    def setUp(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self.addCleanup(signal.signal, number, signal.getsignal(number))
        self.reactor = _SignalReactor()
        self.stops_now = 0

    def stop_now(self) -> None:
        self.stops_now += 1

    def test_first_to_the_earlier_handler_then_stop_now(self) -> None:
        seen: list[int] = []
        signal.signal(signal.SIGTERM, lambda number, frame: seen.append(number))
        stop.install_stop_signals(self.reactor, self.stop_now)
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        self.assertEqual(seen, [signal.SIGTERM])
        handler(signal.SIGTERM, None)
        self.reactor.run_calls()
        self.assertEqual((seen, self.stops_now, self.reactor.stopped), ([signal.SIGTERM], 1, 0))

    def test_an_ignored_signal_stays_ignored(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop.install_stop_signals(self.reactor, self.stop_now)
        self.assertEqual(signal.getsignal(signal.SIGINT), signal.SIG_IGN)
        self.assertNotIn(signal.getsignal(signal.SIGTERM), (signal.SIG_IGN, signal.SIG_DFL))

    def test_a_first_signal_without_a_handler_ends_twistd_by_it(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop.install_stop_signals(self.reactor, self.stop_now)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.reactor.run_calls()
        # twistd's runner reads _exitSignal to end with the signal.
        self.assertEqual((self.reactor.stopped, getattr(self.reactor, "_exitSignal", None)),
                         (1, signal.SIGTERM))
        self.assertEqual(self.stops_now, 0)



class SampleConfigTests(DaemonTestCase):
    """The README's run command on the sample conf/main.cf (a copy, laid
    out as in the checkout, on a free port) writes Postfix's lines to
    standard output."""

    async def test_postfix_lines_on_standard_output(self) -> None:
        conf = os.path.join(self.base, "checkout", "conf")
        os.makedirs(conf)
        with open(os.path.join(ROOT, "conf", "main.cf"), encoding="utf-8") as handle:
            sample = handle.read()
        self.assertIn("smtpd_endpoints = tcp:10587:interface=127.0.0.1\n", sample)
        port = free_port()
        path = os.path.join(conf, "main.cf")
        with open(path, "w", encoding="utf-8") as handle:
            # Nothing goes out: the recipient's domain does not resolve.
            handle.write(sample.replace("tcp:10587:", f"tcp:{port}:") + "relayagent_workers = 1\n")
        self.start_daemon(path)
        out = os.path.join(self.base, "twistd.out")
        await self.wait_for(lambda: f"starting on {port}" in open(out).read(), 60, "the listener")
        await threads.deferToThread(self.send, port)
        await self.wait_for(lambda: "(queue active)" in open(out).read(), 60, "the queue manager's line")
        text = open(out).read()
        for pattern in (r" relayagent/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.1\]",
                        r" relayagent/smtpd\[\d+\]: \w{16}: client=unknown\[127\.0\.0\.1\]",
                        r" relayagent/cleanup\[\d+\]: \w{16}: message-id=<sample@example.org>",
                        r" relayagent/qmgr\[\d+\]: \w{16}: from=<a@example.org>, size=\d+, nrcpt=1 \(queue active\)"):
            self.assertRegex(text, pattern)
        self.assertTrue(os.path.isdir(os.path.join(self.base, "checkout", "var", "spool", "incoming")))

    def send(self, port: int) -> None:
        import smtplib

        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("a@example.org", ["b@nowhere.invalid"],
                            b"Message-ID: <sample@example.org>\r\nSubject: x\r\n\r\nx\r\n")


class MaillogOnStandardOutputTests(DaemonTestCase):
    """``maillog_file = /dev/stdout`` with standard output a file opened
    as ``> file`` (no O_APPEND): twistd's lines and the maillog's both
    stay whole (a new open of /dev/stdout had an offset of its own, and
    twistd's writes overwrote the maillog's lines)."""

    async def test_no_line_overwritten(self) -> None:
        await self.start_sink()
        config = self.write_config("relayagent_workers = 1\n")
        with open(config, encoding="utf-8") as handle:
            text = handle.read().replace(f"maillog_file = {self.maillog}", "maillog_file = /dev/stdout")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(text)
        ids = [self.spool.enqueue("sender@example.org", [f"rcpt{n}@example.net"], body(n)) for n in range(5)]
        out_path = os.path.join(self.base, "stdout")
        with open(out_path, "wb") as out:  # as the shell's "> file"
            daemon = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "relayagent", "-c", config], cwd=self.base,
                env=dict(os.environ, PYTHONPATH=ROOT), stdout=out, stderr=subprocess.STDOUT)
        self.processes.append(daemon)

        def text_now() -> str:
            with open(out_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()

        await self.wait_for(lambda: text_now().count(": removed") == len(ids), 60, "the deliveries")
        daemon.send_signal(signal.SIGTERM)
        await threads.deferToThread(daemon.wait, 60)
        lines = text_now().splitlines()
        self.assertIn("Server Shut Down.", lines[-1])
        for queue_id in ids:
            self.assertEqual(sum(f"{queue_id}: removed" in line for line in lines), 1, queue_id)
        # Every line whole: twistd's layout or the maillog's.
        pattern = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d |\w{3} [ \d]\d \d\d:\d\d:\d\d )")
        self.assertEqual([line for line in lines if not pattern.match(line)], [])
