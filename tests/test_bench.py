"""
bench/drain.py's argument parsing and the helpers of its backlog workload
(``--backlog``): what they compute, on given inputs.  Nothing here starts a
daemon or a sink, and nothing is timed (benchmarks measure; tests do not).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

from twisted.trial import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import drain  # noqa: E402  (bench/ on sys.path)


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
