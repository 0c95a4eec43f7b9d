"""
bench/drain.py's argument parsing and the helpers of its backlog workload
(``--backlog``): what they compute, on given inputs; bench/lightsink.py's
sessions on a fake connection; bench/submit.py's loop over a stand-in
command; bench/floor.py's session on a fake transport, and its listener
under a short smtp-source run (the one test here that starts
processes: no daemon, no sink).  Nothing is
timed (benchmarks measure; tests do not).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

from twisted.trial import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import drain  # noqa: E402  (bench/ on sys.path)
import floor  # noqa: E402
import lightsink  # noqa: E402
import submit  # noqa: E402


def parse(*argv: str):
    return drain.parse_arguments(list(argv))


class ArgumentTests(unittest.TestCase):
    def rejected(self, *argv: str) -> str:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit):
            parse(*argv)
        return stderr.getvalue()

    def test_defaults_unchanged(self) -> None:
        """Without --backlog the existing drain modes parse as before."""
        args = parse()
        self.assertFalse(args.backlog)
        self.assertIsNone(args.strace)
        self.assertEqual((args.messages, args.size, args.recipients, args.destinations), (20000, 2000, 1, 1))
        self.assertTrue(parse("--warm", "--vs-postfix").warm)
        self.assertEqual(parse("--latency", "5").latency, 5)

    def test_backlog(self) -> None:
        args = parse("--backlog", "--messages", "20000", "--size", "2000", "--vs-postfix")
        self.assertTrue(args.backlog)
        self.assertTrue(args.vs_postfix)
        self.assertEqual((args.messages, args.size), (20000, 2000))
        self.assertEqual(args.source_sessions, 20)
        self.assertEqual(args.strace, 1000, "the traced run is on by default with --backlog")

    def test_backlog_strace(self) -> None:
        self.assertEqual(parse("--backlog", "--strace", "0").strace, 0)
        self.assertEqual(parse("--backlog", "--strace", "200").strace, 200)
        self.assertIn("--strace", self.rejected("--backlog", "--strace", "-1"))

    def test_backlog_sessions_and_workers(self) -> None:
        args = parse("--backlog", "--source-sessions", "5", "--workers", "2")
        self.assertEqual((args.source_sessions, args.workers), (5, "2"))

    def test_backlog_excludes(self) -> None:
        for extra in (["--warm"], ["--latency", "3"], ["--destinations", "10"]):
            self.assertIn("--backlog", self.rejected("--backlog", *extra))

    def test_strace_needs_backlog(self) -> None:
        self.assertIn("--backlog", self.rejected("--strace", "100"))

    def test_rounds_settle_order_sink(self) -> None:
        args = parse("--backlog")
        self.assertEqual((args.rounds, args.settle, args.postfix_first, args.sink), (1, 300.0, False, "smtp-sink"))
        args = parse("--backlog", "--rounds", "3", "--settle", "0", "--postfix-first", "--sink", "light")
        self.assertEqual((args.rounds, args.settle, args.postfix_first, args.sink), (3, 0.0, True, "light"))
        self.assertIn("--rounds", self.rejected("--backlog", "--rounds", "0"))
        self.assertIn("--sink", self.rejected("--sink", "exim"))


class SmtpSourceCommandTests(unittest.TestCase):
    def test_command(self) -> None:
        self.assertEqual(
            drain.smtp_source_command(2525, 2000, 1500),
            [drain.SMTP_SOURCE, "-c", "-l", "1500", "-m", "2000", "-s", "20",
             "-f", drain.SENDER, "-t", drain.RECIPIENT, "127.0.0.1:2525"],
        )

    def test_recipients_and_sessions(self) -> None:
        command = drain.smtp_source_command(25, 10, 100, recipients=3, sessions=4, sender="a@b", recipient="c@d")
        self.assertEqual(command[1:], ["-c", "-l", "100", "-m", "10", "-s", "4", "-f", "a@b", "-t", "c@d",
                                       "-r", "3", "127.0.0.1:25"])


class BacklogConfigTests(unittest.TestCase):
    def test_config(self) -> None:
        """Defaults but for the listener, the next hop and the extra lines;
        no maillog_file, so the lines go into twistd's log."""
        directory = self.mktemp()
        os.makedirs(directory)
        path = drain.backlog_config(directory, 10587, 2526, ["relayagent_workers = 2"])
        self.assertEqual(path, os.path.join(directory, "main.cf"))
        with open(path) as handle:
            lines = handle.read().splitlines()
        self.assertEqual(lines, [
            "queue_directory = spool",
            "smtpd_endpoints = tcp:10587:interface=127.0.0.1",
            "relayhost = [127.0.0.1]:2526",
            "relayagent_workers = 2",
        ])

    def test_config_loads(self) -> None:
        from relayagent.common.config import Config

        directory = self.mktemp()
        os.makedirs(directory)
        config = Config.load(drain.backlog_config(directory, 10587, 2526, []))
        self.assertEqual(config.warnings, [])
        self.assertEqual(config["relayhost"], "[127.0.0.1]:2526")
        self.assertEqual(config["smtpd_endpoints"], ("tcp:10587:interface=127.0.0.1",))
        self.assertEqual(config["maillog_file"], "")


    def test_log_path(self) -> None:
        """The delivery lines are counted where they go: twistd's log by
        default, the maillog_file a --set line names."""
        directory = self.mktemp()
        os.makedirs(directory)
        twistd_log = os.path.join(directory, "twistd.log")
        path = drain.backlog_config(directory, 10587, 2526, [])
        self.assertEqual(drain.backlog_log_path(path, twistd_log), twistd_log)
        path = drain.backlog_config(directory, 10587, 2526, ["maillog_file = maillog"])
        self.assertEqual(drain.backlog_log_path(path, twistd_log), os.path.join(os.path.abspath(directory), "maillog"))


class LogCounterTests(unittest.TestCase):
    def test_incremental(self) -> None:
        path = self.mktemp()
        counter = drain.LogCounter(path, [b"status=deferred", b"suspended"])
        self.assertEqual(counter.update(), {b"status=deferred": 0, b"suspended": 0}, "no file yet")
        with open(path, "wb") as handle:
            handle.write(b"a: status=deferred (refused)\nb: status=deferred (delivery temporarily sus")
        self.assertEqual(counter.update(), {b"status=deferred": 1, b"suspended": 0},
                         "a line being written is not counted")
        with open(path, "ab") as handle:
            handle.write(b"pended: refused)\nc: status=sent\n")
        self.assertEqual(counter.update(), {b"status=deferred": 2, b"suspended": 1})
        self.assertEqual(counter.update(), {b"status=deferred": 2, b"suspended": 1}, "nothing counted twice")


class ProcessTreeTests(unittest.TestCase):
    def test_tree(self) -> None:
        table = {1: 0, 10: 1, 11: 10, 12: 10, 13: 12, 20: 1, 21: 20}
        self.assertEqual(drain.process_tree(10, table), [10, 11, 12, 13])
        self.assertEqual(drain.process_tree(21, table), [21])

    def test_own_tree(self) -> None:
        self.assertEqual(drain.process_tree(os.getpid())[0], os.getpid())
        self.assertGreaterEqual(drain.tree_cpu_seconds(os.getpid()), 0.0)


STRACE_OUTPUT = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.000400          10        40           epoll_wait
 30.00    0.000300           5        60         3 read
 20.00    0.000200           2       100           write
 10.00    0.000100         100         1         1 connect
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           4       201         4 total
"""


class StraceSummaryTests(unittest.TestCase):
    def test_parse(self) -> None:
        total, calls = drain.parse_strace_summary(STRACE_OUTPUT)
        self.assertEqual(total, 201)
        self.assertEqual(calls, [("write", 100), ("read", 60), ("epoll_wait", 40), ("connect", 1)])

    def test_blank_columns(self) -> None:
        """strace leaves usecs/call blank in some totals: the columns come
        from the header, not from counting fields."""
        text = STRACE_OUTPUT.replace("100.00    0.001000           4       201",
                                     "100.00    0.001000                   201")
        self.assertEqual(drain.parse_strace_summary(text)[0], 201)

    def test_empty(self) -> None:
        self.assertEqual(drain.parse_strace_summary(""), (0, []))


class PerUnitTests(unittest.TestCase):
    def test_per_unit(self) -> None:
        self.assertEqual(drain.per_unit(2.0, 1000), "2.00 ms")
        self.assertEqual(drain.per_unit(1.0, 0), "-")


class BacklogRatioTests(unittest.TestCase):
    def test_ratios(self) -> None:
        ours = {"fill_seconds": 20.0, "flush_seconds": 5.0, "fill_cpu": 30.0, "flush_cpu": 10.0}
        theirs = {"fill_seconds": 30.0, "flush_seconds": 15.0, "fill_cpu": 30.0, "flush_cpu": 30.0}
        with contextlib.redirect_stdout(io.StringIO()) as out:
            ratios = drain.report_backlog_ratios(ours, theirs)
        self.assertEqual(ratios["time", "fill"], 1.5)
        self.assertEqual(ratios["time", "flush"], 3.0)
        self.assertEqual(ratios["time", "whole"], 45.0 / 25.0)
        self.assertEqual(ratios["CPU", "fill"], 1.0)
        self.assertEqual(ratios["CPU", "whole"], 1.5)
        self.assertIn("fill 1.50, flush 3.00, whole 1.80", out.getvalue())


class CreationProbeTests(unittest.TestCase):
    def test_probe_files_stay(self) -> None:
        """The probe's files are left in place (removing them would make
        the creations after it dearer on the file systems it is for)."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.assertGreater(drain.creation_cost(directory), 0.0)
        (probe,) = os.listdir(directory)
        self.assertEqual(len(os.listdir(os.path.join(directory, probe))), drain.CREATION_PROBE_FILES)

    def test_settle_without_waiting(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        cost, waited = drain.settle(directory, 0.0)
        self.assertGreater(cost, 0.0)
        self.assertGreaterEqual(waited, 0.0)
        self.assertEqual(len(os.listdir(directory)), 1, "a limit of 0: one probe, whatever it found")


class FakeConnection:
    """What a lightsink session needs of its socket: send, at most
    ``room`` octets at a time (None: everything)."""

    def __init__(self, room: int | None = None) -> None:
        self.sent = b""
        self.room = room

    def send(self, data: bytes) -> int:
        if self.room == 0:
            raise BlockingIOError
        taken = data if self.room is None else data[: self.room]
        self.sent += taken
        return len(taken)


class FakeLightSink:
    def __init__(self) -> None:
        self.messages = 0
        self.closed = False
        self.writing: list[bool] = []

    def counted(self) -> None:
        self.messages += 1

    def want_write(self, session: object, wanted: bool) -> None:
        self.writing.append(wanted)

    def close(self, session: object) -> None:
        self.closed = True


class LightSinkSessionTests(unittest.TestCase):
    def session(self, room: int | None = None):
        sink = FakeLightSink()
        connection = FakeConnection(room)
        return lightsink.Session(sink, connection), sink, connection

    def test_pipelined_transactions(self) -> None:
        """Commands pipelined with an empty body, a stuffed "." line and a
        final "." cut across two reads: two messages, every reply in order."""
        session, sink, connection = self.session()
        session.received(b"EHLO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        session.received(b".\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                         b"line\r\n..\r\nmore\r")
        self.assertEqual(sink.messages, 1, "a stuffed '.' line is no end of DATA")
        session.received(b"\n.")
        session.received(b"\r\nQUIT\r\n")
        self.assertEqual(sink.messages, 2)
        replies = connection.sent.split(b"\r\n")
        codes = [reply[:3] for reply in replies if reply and not reply.startswith(b"250-")]
        self.assertEqual(codes, [b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"])
        self.assertIn(b"250-PIPELINING", connection.sent)
        self.assertTrue(sink.closed, "QUIT closes once its reply is out")

    def test_body_with_the_commands(self) -> None:
        """DATA, its body and the next command in one read."""
        session, sink, connection = self.session()
        session.received(b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nbody\r\n.\r\nNOOP\r\nBDAT 1\r\n")
        self.assertEqual(sink.messages, 1)
        self.assertTrue(connection.sent.endswith(b"250 2.0.0 Ok: queued\r\n250 2.0.0 Ok\r\n"
                                                 b"502 5.5.2 Error: command not recognized\r\n"))

    def test_blocked_send_waits_for_writable(self) -> None:
        session, sink, connection = self.session(room=0)
        session.received(b"NOOP\r\n")
        self.assertEqual(sink.writing, [True])
        connection.room = None
        session.flush()
        self.assertEqual(connection.sent, b"250 2.0.0 Ok\r\n")
        self.assertEqual(sink.writing, [True, False])


class SinkCountTests(unittest.TestCase):
    def counted(self, written: bytes) -> int:
        sink = drain.Sink.__new__(drain.Sink)  # no process: only the counter file
        sink.counter_path = self.mktemp()
        with open(sink.counter_path, "wb") as handle:
            handle.write(written)
        return sink.messages()

    def test_last_record(self) -> None:
        self.assertEqual(self.counted(b"mesg=1\rmesg=2\rmesg=17\r"), 17)
        self.assertEqual(self.counted(b""), 0)

    def test_record_being_written(self) -> None:
        """A record read while the sink writes it ("mesg=" alone) gives way
        to the one before (a ValueError once stopped a benchmark run)."""
        self.assertEqual(self.counted(b"mesg=41\rmesg=42\rmesg="), 42)
        self.assertEqual(self.counted(b"mesg="), 0)


class SubmitTests(unittest.TestCase):
    def test_each_message_goes_to_one_process(self) -> None:
        # A stand-in for sendmail that appends what it reads to a file.
        out = os.path.abspath(self.mktemp())  # the loop runs it in the repository
        command = [sys.executable, "-c", f"import sys; open({out!r}, 'ab').write(sys.stdin.buffer.read() + b'\\0')"]
        result = submit.submit_all(command, 3, 100)
        with open(out, "rb") as handle:
            messages = handle.read().split(b"\0")[:-1]
        self.assertEqual(len(messages), 3)
        self.assertEqual(len({message for message in messages}), 3)
        self.assertTrue(all(b"Subject:" in message and len(message) >= 100 for message in messages))
        self.assertGreater(result["cpu"], 0)
        self.assertLessEqual(result["median"], result["p90"])
        self.assertLessEqual(result["p90"], result["seconds"])

    def test_relayagent_runs_from_the_checkout(self) -> None:
        command = submit.relayagent_command()
        done = subprocess.run([*command, "--version"], cwd=drain.ROOT, capture_output=True, timeout=60)
        from relayagent import __version__

        self.assertEqual((done.returncode, done.stdout), (0, f"relayagent {__version__}\n".encode()))


class WorkDirectoryTests(unittest.TestCase):
    def test_removed_unless_kept(self) -> None:
        with drain.work_directory("relayagent-test-", keep=False) as removed:
            self.assertTrue(os.path.isdir(removed))
        self.assertFalse(os.path.exists(removed))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), drain.work_directory("relayagent-test-", keep=True) as kept:
            pass
        self.addCleanup(os.rmdir, kept)
        self.assertTrue(os.path.isdir(kept))
        self.assertEqual(out.getvalue(), f"work directory kept: {kept}\n")


class FloorTests(unittest.TestCase):
    def test_every_message_stored_once(self) -> None:
        """smtp-source's sessions, pipelined, each message a file of its
        own: the floor took them all (it exits 1 when a file is missing)."""
        if not os.path.exists(drain.SMTP_SOURCE):
            raise unittest.SkipTest("smtp-source not installed (Debian's postfix package)")
        done = subprocess.run(
            [sys.executable, os.path.join(drain.ROOT, "bench", "floor.py"),
             "--messages", "40", "--size", "300", "--processes", "2", "--source-sessions", "4"],
            capture_output=True, timeout=120, text=True,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("40 of 40 messages of 300 bytes", done.stdout)


class FloorSessionTests(unittest.TestCase):
    def session(self):
        from twisted.internet.defer import Deferred
        from twisted.internet.testing import StringTransport

        stored: list[tuple[bytes, Deferred]] = []

        def store(content: bytes) -> Deferred:
            done: Deferred = Deferred()
            stored.append((content, done))
            return done

        session = floor.FloorFactory(store).buildProtocol(None)
        transport = StringTransport()
        session.makeConnection(transport)
        return session, transport, stored

    def test_pipelined_past_the_end_of_data_replies_in_order(self) -> None:
        session, transport, stored = self.session()
        session.dataReceived(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
                             b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
        self.assertEqual([content for content, _ in stored], [b"Subject: x\r\n\r\n..dot\r\n"])
        before = transport.value()
        self.assertTrue(before.startswith(b"220 "))
        self.assertTrue(before.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"))
        self.assertNotIn(b"221", before)  # QUIT waits for the message's reply
        stored[0][1].callback(None)
        self.assertEqual(transport.value()[len(before):], b"250 2.0.0 Ok: queued\r\n221 2.0.0 Bye\r\n")
        self.assertTrue(transport.disconnecting)

    def test_empty_body_and_a_failed_write(self) -> None:
        session, transport, stored = self.session()
        session.dataReceived(b"DATA\r\n.\r\nNOOP\r\nVRFY x\r\n")
        self.assertEqual([content for content, _ in stored], [b""])
        stored[0][1].errback(OSError("disk full"))
        self.assertTrue(transport.value().endswith(
            b"451 4.3.0 Error: queue file write error\r\n250 2.0.0 Ok\r\n"
            b"502 5.5.2 Error: command not recognized\r\n"))
