"""End-to-end: ``twistd -n relayagent -c CONFIG`` in front of Postfix's
smtp-sink (relayhost = [127.0.0.1]:PORT), run as subprocesses.

Skips when smtp-sink is missing.  Every wait is bounded; every process
started here is stopped in cleanup.
"""

from __future__ import annotations

import email
import email.policy
import glob
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor, task, threads
from twisted.trial.unittest import SkipTest, TestCase

from relayagent.spool import DEFERRED, Message, Spool, trigger
from tests.support.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMTP_SINK = shutil.which("smtp-sink") or ("/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


def body(number: int, tag: str = "e2e") -> bytes:
    return (
        f"From: sender@example.org\nTo: rcpt@example.net\nSubject: test {number}\n"
        f"Message-ID: <{tag}-{number}@example.org>\n\nmessage {number}\n"
    ).encode()


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class DaemonTestCase(TestCase):
    timeout = 240

    def setUp(self) -> None:
        if SMTP_SINK is None:
            raise SkipTest("smtp-sink (Debian package postfix) is not installed")
        if not os.path.exists(TWISTD):
            raise SkipTest(f"twistd not found next to {sys.executable}")
        # Under /tmp: a short path (UNIX socket names are limited to about
        # 100 octets) that smtp-sink's unprivileged user can reach.
        self.base = tempfile.mkdtemp(prefix="ra-e2e-")
        if not os.environ.get("RA_KEEP"):  # RA_KEEP=1 keeps logs and dumps to look at
            self.addCleanup(shutil.rmtree, self.base, True)
        self.spool_directory = os.path.join(self.base, "spool")
        self.dumps = os.path.join(self.base, "dumps")
        os.makedirs(self.dumps)
        os.chmod(self.dumps, 0o777)  # smtp-sink writes as nobody
        os.chmod(self.base, 0o755)
        self.maillog = os.path.join(self.base, "maillog")
        self.port = free_port()
        self.dead_port = free_port()  # nothing listens: mail for local.test stays deferred
        self.processes: list[subprocess.Popen] = []
        self.spool = Spool(self.spool_directory)
        self.spool.ensure_layout()

    def tearDown(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

    # -- processes

    async def start_sink(self, *options: str) -> None:
        args = [SMTP_SINK, "-u", "nobody", "-d", os.path.join(self.dumps, "%M."), *options,
                f"127.0.0.1:{self.port}", "256"]
        self.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await self.wait_for(self.port_open, 10, "smtp-sink to listen")

    def port_open(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def write_config(self, extra: str = "") -> str:
        path = os.path.join(self.base, "main.cf")
        with open(path, "w") as handle:
            handle.write(
                f"queue_directory = {self.spool_directory}\n"
                f"relayhost = [127.0.0.1]:{self.port}\n"
                f"transport_maps = inline:{{ local.test=smtp:[127.0.0.1]:{self.dead_port} }}\n"
                f"maillog_file = {self.maillog}\n"
                "myhostname = relay.test\n"
                "smtp_connect_timeout = 5s\n"
                + extra
            )
        return path

    def start_daemon(self, config: str, *twistd_options: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=ROOT)
        log = open(os.path.join(self.base, "twistd.out"), "ab")  # noqa: SIM115 - closed in tearDown
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *twistd_options, "relayagent", "-c", config],
            cwd=self.base, env=env, stdout=log, stderr=subprocess.STDOUT,
            # As from a terminal, whatever started the tests: a script's
            # background job ignores SIGINT, and a daemon started so keeps
            # ignoring it (the stop tests send it).
            preexec_fn=_interruptible,
        )
        log.close()
        self.processes.append(process)
        return process

    async def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await task.deferLater(reactor, 0.1, lambda: None)

    # -- looking

    def queued(self, *queues: str) -> int:
        return sum(sum(1 for _ in self.spool.queue_ids(queue))
                   for queue in (queues or ("incoming", "active", "deferred")))

    def dump_files(self) -> list[str]:
        return [p for p in glob.glob(os.path.join(self.dumps, "*")) if os.path.getsize(p) > 0]

    def message_ids(self) -> list[bytes]:
        found = []
        for path in self.dump_files():
            with open(path, "rb") as handle:
                found.extend(MESSAGE_ID.findall(handle.read()))
        return found

    def log_text(self) -> str:
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""


class DeliveryTests(DaemonTestCase):
    async def test_thousand_messages_each_delivered_once(self) -> None:
        await self.start_sink()
        config = self.write_config()
        count_api, count_cli = 990, 10
        self.spool.enqueue_many(
            Message("sender@example.org", [f"rcpt{n}@example.net"], body(n)) for n in range(count_api)
        )
        started = time.monotonic()
        self.start_daemon(config)
        for n in range(count_api, count_api + count_cli):
            result = subprocess.run(
                [sys.executable, "-c", "from relayagent.cli import main; raise SystemExit(main())",
                 "-c", config, "sendmail", "-i", "-f", "sender@example.org", f"rcpt{n}@example.net"],
                input=body(n), env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, timeout=60,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
        total = count_api + count_cli
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= total, 180,
                            "the queue to empty")
        elapsed = time.monotonic() - started
        ids = self.message_ids()
        self.assertEqual(len(ids), total)
        self.assertEqual(len(set(ids)), total)
        await self.wait_for(lambda: self.log_text().count("status=sent") >= total, 10, "the log")
        text = self.log_text()
        self.assertEqual(text.count("status=sent"), total)
        self.assertEqual(text.count(": removed"), total)
        reused = len(re.findall(r"conn_use=\d+", text))
        # Reported by the test run: messages per second, connection reuse.
        print(f"\ne2e: {total} messages in {elapsed:.1f}s = {total / elapsed:.0f} msg/s, "
              f"{reused} deliveries on reused connections")
        self.assertGreater(reused, total // 2)


class FaultTests(DaemonTestCase):
    def enqueue(self, count: int = 3, sender: str = "sender@local.test") -> list[str]:
        return [self.spool.enqueue(sender, [f"rcpt{n}@example.net"], body(n, "fault")) for n in range(count)]

    async def test_soft_rcpt_reject_defers_with_next_attempt(self) -> None:
        await self.start_sink("-r", "RCPT")
        ids = self.enqueue()
        before = time.time()
        self.start_daemon(self.write_config())
        await self.wait_for(lambda: self.queued(DEFERRED) == len(ids), 60, "deferral")
        for queue_id in ids:
            with self.spool.open(queue_id, DEFERRED) as queue_file:
                self.assertEqual(queue_file.attempts, 1)
                self.assertGreaterEqual(queue_file.next_attempt, before + 300)
                self.assertLess(queue_file.next_attempt, time.time() + 301)
            (record,) = self.spool.read_log("defer", queue_id)
            self.assertTrue(record.status.startswith("4."), record)
        self.assertEqual(self.dump_files(), [])
        self.assertIn("status=deferred", self.log_text())

    async def test_hard_rcpt_reject_bounces_with_a_dsn_for_the_sender(self) -> None:
        await self.start_sink("-f", "RCPT")
        ids = self.enqueue(2)
        self.start_daemon(self.write_config())

        def settled() -> bool:
            text = self.log_text()
            return all(f"{i}: removed" in text for i in ids) and self.queued(DEFERRED) == 2

        await self.wait_for(settled, 60, "bounces")
        text = self.log_text()
        self.assertEqual(text.count("status=bounced"), 2)
        self.assertEqual(text.count("sender non-delivery notification"), 2)
        # The DSNs wait for local.test (nothing listens there): read them.
        for queue_id in self.spool.queue_ids(DEFERRED):
            with self.spool.open(queue_id, DEFERRED) as queue_file:
                envelope = queue_file.envelope
                self.assertEqual(envelope.sender, "")
                self.assertEqual([r.address for r in envelope.recipients], ["sender@local.test"])
                with envelope.open_content() as stream:
                    report = email.message_from_bytes(stream.read(), policy=email.policy.default)
            self.assertEqual(report.get_content_type(), "multipart/report")
            status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
            self.assertIn("Action: failed", status.as_string())
            self.assertIn("Status: 5.", status.as_string())

    async def test_disconnect_after_data_defers(self) -> None:
        await self.start_sink("-q", "DATA")
        ids = self.enqueue(2)
        self.start_daemon(self.write_config())
        await self.wait_for(lambda: self.queued(DEFERRED) == len(ids), 60, "deferral")
        self.assertIn("lost connection", self.log_text())
        self.assertEqual(self.dump_files(), [])

    async def test_ehlo_and_helo_refused_bounces(self) -> None:
        # Postfix bounces when both EHLO and HELO get 5xx (smtp_helo():
        # "refused to talk to me" is final); it is not a greeting to skip.
        await self.start_sink("-f", "EHLO,HELO")
        ids = self.enqueue(1)
        self.start_daemon(self.write_config())
        await self.wait_for(lambda: f"{ids[0]}: removed" in self.log_text(), 60, "the bounce")
        (line,) = [line for line in self.log_text().splitlines() if "to=<rcpt0@example.net>" in line]
        self.assertIn("dsn=5.3.0, status=bounced (host 127.0.0.1[127.0.0.1] refused to talk to me: 500 5.3.0", line)

    async def test_large_message_damaged_in_its_content_goes_to_corrupt(self) -> None:
        # Over the first read (64 KiB), the content's checksum is checked
        # only as the body streams: the damage is found mid-DATA, no "."
        # goes, and the file moves to corrupt/ instead of being retried.
        await self.start_sink()
        damaged = self.spool.enqueue("sender@example.org", ["rcpt@example.net"],
                                     body(0, "damaged") + b"x" * 300_000 + b"\n")
        path = self.spool.path("incoming", damaged)
        with open(path, "r+b") as handle:
            handle.seek(-1000, os.SEEK_END)
            octet = handle.read(1)
            handle.seek(-1000, os.SEEK_END)
            handle.write(bytes([octet[0] ^ 0x01]))
        good = self.spool.enqueue("sender@example.org", ["rcpt@example.net"], body(1, "good"))
        self.start_daemon(self.write_config())
        await self.wait_for(lambda: self.queued() == 0 and self.queued("corrupt") == 1, 60,
                            "the damaged file in corrupt/")
        await self.wait_for(lambda: f"{good}: removed" in self.log_text(), 10, "the good message")
        self.assertEqual(list(self.spool.queue_ids("corrupt")), [damaged])
        self.assertEqual(self.message_ids(), [b"good-1@example.org"])
        self.assertIn(f"{damaged}: ", self.log_text())
        self.assertNotIn("Unhandled", open(os.path.join(self.base, "twistd.out")).read())

    async def test_slow_replies_still_deliver(self) -> None:
        await self.start_sink("-W", "DATA:1")
        ids = self.enqueue(3, sender="sender@example.org")
        self.start_daemon(self.write_config())
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) == len(ids), 60,
                            "delivery")
        self.assertEqual(self.log_text().count("status=sent"), len(ids))


class CrashTests(DaemonTestCase):
    async def test_sigkill_mid_delivery_loses_nothing(self) -> None:
        await self.start_sink()
        config = self.write_config()
        total = 3000
        self.spool.enqueue_many(
            Message("sender@example.org", [f"rcpt{n}@example.net"], body(n, "crash")) for n in range(total)
        )
        first = self.start_daemon(config)
        await self.wait_for(lambda: len(self.dump_files()) >= 500, 120, "deliveries to start")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        self.assertNotEqual(self.queued(), 0, "the crash came too late to test anything")
        self.start_daemon(config)
        await self.wait_for(lambda: self.queued() == 0, 180, "the queue to empty after restart")
        await self.wait_for(lambda: len(set(self.message_ids())) >= total, 20, "the sink's dumps")
        ids = self.message_ids()
        unique = set(ids)
        self.assertEqual(len(unique), total)
        duplicates = len(ids) - len(unique)
        # At most the transactions in flight: the per-destination concurrency limit.
        print(f"\ncrash: {total} messages, {duplicates} delivered twice")
        self.assertLessEqual(duplicates, 20)


class PrivilegeTests(DaemonTestCase):
    """twistd --uid/--gid/--chroot: the spool, the trigger socket and the
    log work after the drop.  Root only (and it is what CI runs as)."""

    def setUp(self) -> None:
        if os.getuid() != 0:
            raise SkipTest("dropping privileges needs root")
        super().setUp()

    def chroot_files(self) -> None:
        os.makedirs(os.path.join(self.base, "etc"))
        os.makedirs(os.path.join(self.base, "dev"))
        for name in ("passwd", "group"):
            with open(f"/etc/{name}") as source, open(os.path.join(self.base, "etc", name), "w") as copy:
                copy.writelines(line for line in source if line.startswith(("nobody:", "nogroup:")))
        os.mknod(os.path.join(self.base, "dev", "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))

    async def run_unprivileged(self, *twistd_options: str) -> None:
        await self.start_sink()
        ids = [self.spool.enqueue("sender@example.org", [f"r{n}@example.net"], body(n, "priv")) for n in range(5)]
        for directory, _, files in os.walk(self.spool_directory):
            os.chown(directory, 65534, 65534)
            for name in files:
                os.chown(os.path.join(directory, name), 65534, 65534)
        config = self.write_config()
        self.start_daemon(config, "--uid", "65534", "--gid", "65534", *twistd_options)
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) == len(ids), 60,
                            "delivery as nobody")
        socket_path = os.path.join(self.spool_directory, "public", "qmgr")
        await self.wait_for(lambda: os.path.exists(socket_path), 10, "the trigger socket")
        self.assertEqual(os.stat(socket_path).st_uid, 65534)
        answered = await threads.deferToThread(trigger.trigger, self.spool_directory, "flush")
        self.assertTrue(answered)
        self.assertEqual(self.log_text().count("status=sent"), len(ids))

    async def test_uid_and_gid(self) -> None:
        await self.run_unprivileged()

    async def test_chroot(self) -> None:
        self.chroot_files()
        await self.run_unprivileged("--chroot", self.base)


# A line of twistd's log: Twisted's "<stamp> [<system>] <text>", or
# relayagent's "<stamp> <host> relayagent/<daemon>[pid]: <text>"; and the
# delays of a delivery line.
TWISTD_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:?\d\d "
                         r"(?:\[([^\]]+)\]|\S+ (\S+/\w+)\[\d+\]:) (.*)$")
DELAYS = re.compile(r", delay=([0-9.]+), delays=([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+), dsn=")


class TwistdLogTests(DaemonTestCase):
    """Without maillog_file the mail lines are in twistd's own log, in
    Postfix's text: on standard output with -n, in --logfile, and through
    --logger (Twisted's JSON observer here) with their fields."""

    def config_without_maillog(self) -> str:
        return self.write_config("maillog_file =\n")

    def assert_postfix_text(self, texts: list[str]) -> None:
        from relayagent.common.maillog import format_delay

        deliveries = [text for text in texts if ": to=<" in text]
        self.assertTrue(deliveries, texts)
        for text in deliveries:
            match = DELAYS.search(text)
            self.assertIsNotNone(match, text)
            for number in match.groups():
                # Postfix's numbers are their own rounding.
                self.assertEqual(format_delay(float(number)), number, text)

    def twistd_texts(self, path: str) -> list[str]:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        return [match.group(3) for match in map(TWISTD_LINE.match, lines) if match]

    async def test_standard_output(self) -> None:
        # A bounce: queue active, bounced, the notice, removed, and the
        # notice itself deferred (nothing listens for local.test).
        await self.start_sink("-f", "RCPT")
        queue_id = self.spool.enqueue("sender@local.test", ["rcpt@example.net"], body(1, "twistd"))
        self.start_daemon(self.config_without_maillog())
        out = os.path.join(self.base, "twistd.out")
        await self.wait_for(lambda: "status=deferred" in open(out).read(), 60, "the deferred notice")
        texts = self.twistd_texts(out)
        self.assertIn(f"{queue_id}: removed", texts)
        self.assertTrue(any(t.startswith(f"{queue_id}: from=<sender@local.test>, size=") and
                            t.endswith(", nrcpt=1 (queue active)") for t in texts), texts)
        [bounced] = [t for t in texts if t.startswith(f"{queue_id}: to=<rcpt@example.net>")]
        self.assertIn(", dsn=5.", bounced)
        self.assertIn(", status=bounced (host 127.0.0.1[127.0.0.1] said: ", bounced)
        [notice] = [t for t in texts if t.startswith(f"{queue_id}: sender non-delivery notification: ")]
        dsn_id = notice.rsplit(" ", 1)[1]
        [deferred] = [t for t in texts if t.startswith(f"{dsn_id}: to=<sender@local.test>")]
        self.assertIn(", status=deferred (connect to 127.0.0.1[127.0.0.1]:", deferred)
        self.assert_postfix_text(texts)
        self.assertFalse(os.path.exists(self.maillog))

    async def test_logfile(self) -> None:
        await self.start_sink()
        queue_id = self.spool.enqueue("sender@example.org", ["rcpt@example.net"], body(1, "twistd"))
        path = os.path.join(self.base, "twistd.log")
        self.start_daemon(self.config_without_maillog(), "--logfile", path)
        await self.wait_for(lambda: os.path.exists(path) and f"{queue_id}: removed" in open(path).read(),
                            60, "the delivery in --logfile")
        texts = self.twistd_texts(path)
        [sent] = [t for t in texts if t.startswith(f"{queue_id}: to=<rcpt@example.net>, relay=127.0.0.1")]
        self.assertIn(", dsn=2.0.0, status=sent (250 2.0.0 Ok", sent)
        self.assert_postfix_text(texts)
        self.assertTrue(any(re.search(r" relayagent/smtp\[\d+\]: " + queue_id, line) for line in open(path)))

    async def test_logger_json(self) -> None:
        from twisted.logger import eventsFromJSONLogFile, formatEvent

        await self.start_sink()
        queue_id = self.spool.enqueue("sender@example.org", ["rcpt@example.net"], body(1, "twistd"))
        path = os.path.join(self.base, "twistd.json")
        self.patch(os, "environ", dict(os.environ, RA_JSON_LOG=path))
        # One process: with --logger the workers' lines go to their standard
        # error, not to twistd's observer (README, "Several worker processes").
        self.start_daemon(self.write_config("maillog_file =\nrelayagent_workers = 1\n"),
                          "--logger", "tests.support.jsonlog.observer")

        def read_events() -> list[dict]:
            if not os.path.exists(path):
                return []
            with open(path, encoding="utf-8") as handle:
                return list(eventsFromJSONLogFile(handle))

        await self.wait_for(lambda: f"{queue_id}: removed" in map(formatEvent, read_events()), 60,
                            "the delivery in the JSON log")
        events = read_events()
        [sent] = [e for e in events if e.get("ralog_event") == "delivery"]
        self.assertEqual((sent["queue_id"], sent["to"], sent["dsn"], sent["status"]),
                         (queue_id, "rcpt@example.net", "2.0.0", "sent"))
        self.assertIsInstance(sent["delay"], float)
        self.assertEqual(len(sent["delays"]), 4)
        self.assertTrue(all(isinstance(value, float) for value in sent["delays"]))
        self.assert_postfix_text([formatEvent(e) for e in events])
