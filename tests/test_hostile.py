"""
Tests for what a queue directory may hold besides queue files (issue 12):
FIFOs, sockets, devices, directories, symbolic links, hard links, other
users' files, names that are no queue id.  None of them may block the
spool, be followed, be written, or stop the queue (relayagent.spool.safeopen
has the rules); and the queue manager's lines are logged once, as qmgr.

A FIFO that is opened and read blocks forever: every test that could
block runs ``within`` a deadline (SIGALRM), so a regression fails the
test instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
from collections.abc import Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relayagent import cli
from relayagent.common import maillog as ralog
from relayagent.common.config import Config
from relayagent.common.status import Status
from relayagent.master import tap
from relayagent.qmgr import scheduler as scheduler_module
from relayagent.qmgr.scheduler import DeliveryRequest, QueueManager, RequestResult
from relayagent.spool import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    INCOMING,
    CorruptQueueFile,
    Spool,
    safeopen,
    trigger,
)
from relayagent.spool import spool as spool_module
from relayagent.spool.errors import NotAQueueFile
from relayagent.spool.queueid import QueueIdGenerator
from tests.helpers_spool import StepClock, make_spool, queue_path, read_file, write_file

START = 1_700_000_000.0


@contextlib.contextmanager
def within(seconds: float = 5.0) -> Iterator[None]:
    """Fail, rather than hang, when the block takes longer than ``seconds``
    (a read of a FIFO blocks forever)."""

    def expired(signum: int, frame: object) -> None:
        raise AssertionError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def new_id() -> str:
    """A queue id no spool of the test has used."""
    return QueueIdGenerator(lambda: START).next()[0]


def require_root() -> None:
    if os.geteuid() != 0:
        raise SkipTest("needs root (chown, mknod of a device)")


class HostileSpoolTestCase(SynchronousTestCase):
    """A spool, a valid queue file outside it, and a record of strays."""

    def setUp(self) -> None:
        self.strays: list[tuple[str, str, str]] = []
        self.spool = make_spool(self, clock=StepClock(), on_stray=lambda *s: self.strays.append(s))
        # A valid queue file outside the spool, whose done marks must
        # never change: the target of links.
        self.outside = os.path.abspath(self.mktemp())
        os.makedirs(self.outside)
        other = make_spool(self, clock=StepClock())
        self.outside_id = other.enqueue("a@example.org", ["victim@example.net"], b"Subject: secret\n\nsecret\n")
        self.outside_file = os.path.join(self.outside, "queuefile")
        os.rename(queue_path(other, INCOMING, self.outside_id), self.outside_file)
        self.outside_bytes = read_file(self.outside_file)

    def assertOutsideUntouched(self) -> None:
        self.assertEqual(read_file(self.outside_file), self.outside_bytes)

    def enqueue(self, queue: str = INCOMING) -> str:
        return self.spool.enqueue("a@example.org", ["b@example.net"], b"Subject: x\n\nbody\n", queue=queue)

    def place(self, kind: str, queue: str = INCOMING, queue_id: str | None = None) -> str:
        """Put a hostile entry of ``kind`` in ``queue``; return its name."""
        queue_id = queue_id or new_id()
        path = os.path.join(self.spool.directory, queue, queue_id)
        if kind == "fifo":
            os.mkfifo(path, 0o600)
        elif kind == "socket":
            os.mknod(path, 0o600 | stat.S_IFSOCK)
        elif kind == "device":
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        elif kind == "directory":
            os.mkdir(path, 0o700)
        elif kind == "symlink":
            os.symlink(self.outside_file, path)
        elif kind == "passwd":
            os.symlink("/etc/passwd", path)
        elif kind == "dangling":
            os.symlink(os.path.join(self.outside, "nothing"), path)
        elif kind == "hardlink":
            os.link(self.outside_file, path)
        else:
            raise ValueError(kind)
        return queue_id


class NotRegularFileTests(HostileSpoolTestCase):
    """FIFOs, sockets, devices, directories and symbolic links: skipped by
    every scan, reported once, refused by open without being opened."""

    KINDS = ("fifo", "socket", "directory", "symlink", "passwd", "dangling")

    def test_scan_skips_and_reports_each(self) -> None:
        bad = {kind: self.place(kind) for kind in self.KINDS}
        good = self.enqueue()
        with within():
            self.assertEqual(list(self.spool.scan(INCOMING)), [good])
            self.assertEqual(list(self.spool.queue_ids(INCOMING)), [good])
        problems = {name: problem for queue, name, problem in self.strays if queue == INCOMING}
        self.assertEqual(set(problems), set(bad.values()))
        self.assertIn("a FIFO", problems[bad["fifo"]])
        self.assertIn("a socket", problems[bad["socket"]])
        self.assertIn("a directory", problems[bad["directory"]])
        for kind in ("symlink", "passwd", "dangling"):
            self.assertIn("a symbolic link", problems[bad[kind]])

    def test_open_refuses_each_without_blocking(self) -> None:
        for kind in self.KINDS:
            queue_id = self.place(kind)
            for writable in (True, False):
                with within():
                    error = self.assertRaises(NotAQueueFile, self.spool.open, queue_id, INCOMING,
                                              writable=writable)
                self.assertIn("not a regular file", error.reason, kind)
        self.assertOutsideUntouched()

    def test_a_device_is_never_opened(self) -> None:
        require_root()
        queue_id = self.place("device")
        self.assertEqual(list(self.spool.scan(INCOMING)), [])
        error = self.assertRaises(NotAQueueFile, self.spool.open, queue_id, INCOMING)
        self.assertIn("a character device", error.reason)

    def test_etc_passwd_is_neither_opened_nor_changed(self) -> None:
        before = os.stat("/etc/passwd")
        queue_id = self.place("passwd")
        # Refused for being a link, before any open of the target (the
        # reader's "bad magic" would mean it was opened read-write).
        error = self.assertRaises(NotAQueueFile, self.spool.open, queue_id, INCOMING)
        self.assertIn("a symbolic link", error.reason)
        self.spool.mark_corrupt(queue_id, INCOMING, "test")
        after = os.stat("/etc/passwd")
        self.assertEqual((after.st_mtime_ns, after.st_size, after.st_ino),
                         (before.st_mtime_ns, before.st_size, before.st_ino))
        self.assertTrue(os.path.islink(queue_path(self.spool, CORRUPT, queue_id)))

    def test_mark_corrupt_moves_the_link_not_its_target(self) -> None:
        queue_id = self.place("symlink")
        self.spool.mark_corrupt(queue_id, INCOMING, "test")
        moved = queue_path(self.spool, CORRUPT, queue_id)
        self.assertTrue(os.path.islink(moved))
        self.assertEqual(os.readlink(moved), self.outside_file)
        self.assertOutsideUntouched()

    def test_find_sees_a_dangling_link(self) -> None:
        queue_id = self.place("dangling")
        self.assertEqual(self.spool.find(queue_id), INCOMING)

    def test_reported_once_however_many_scans(self) -> None:
        fifo = self.place("fifo")
        for _ in range(5):
            list(self.spool.scan(INCOMING))
        self.assertEqual([name for _, name, _ in self.strays], [fifo])

    def test_reported_again_after_it_was_gone(self) -> None:
        fifo = self.place("fifo")
        list(self.spool.scan(INCOMING))
        os.unlink(queue_path(self.spool, INCOMING, fifo))
        list(self.spool.scan(INCOMING))
        self.place("fifo", queue_id=fifo)
        list(self.spool.scan(INCOMING))
        self.assertEqual([name for _, name, _ in self.strays], [fifo, fifo])

    def test_a_flood_is_reported_up_to_the_memory_then_once(self) -> None:
        self.patch(spool_module, "STRAY_MEMORY", 3)
        for _ in range(6):
            self.place("fifo")
        for _ in range(3):
            list(self.spool.scan(INCOMING))
        self.assertEqual(len(self.strays), 4)
        self.assertIn("not reporting the others", self.strays[-1][2])

    def test_names_that_are_no_queue_id(self) -> None:
        write_file(os.path.join(self.spool.directory, INCOMING, ".swp"), b"")
        os.mkfifo(os.path.join(self.spool.directory, INCOMING, "fifo"))
        with within():
            self.assertEqual(list(self.spool.scan(INCOMING)), [])
            list(self.spool.scan(INCOMING))
        self.assertEqual(sorted(self.strays), [(INCOMING, ".swp", "not a queue id"),
                                               (INCOMING, "fifo", "not a queue id")])

    def test_no_report_without_on_stray(self) -> None:
        quiet = Spool(self.spool.directory)
        self.place("fifo")
        self.assertEqual(list(quiet.scan(INCOMING)), [])

    def test_listing_skips_them(self) -> None:
        for kind in self.KINDS:
            self.place(kind)
        good = self.enqueue()
        with within():
            entries = list(self.spool.entries())
        self.assertEqual([(e.queue_id, e.error) for e in entries], [(good, None)])

    def test_deferred_scan_skips_them(self) -> None:
        self.place("symlink", DEFERRED)
        self.place("fifo", DEFERRED)
        good = self.enqueue(DEFERRED)
        with within():
            self.assertEqual(list(self.spool.scan(DEFERRED, due=START * 2)), [good])

    def test_recovery_skips_them(self) -> None:
        directory = self.place("directory", ACTIVE)
        self.place("symlink", ACTIVE)
        good = self.enqueue(ACTIVE)
        self.assertEqual(self.spool.recover(), [good])
        self.assertIn((ACTIVE, directory, "not a regular file: a directory"), self.strays)

    def test_recovery_survives_a_directory_in_tmp(self) -> None:
        os.mkdir(os.path.join(self.spool.directory, "tmp", "stuck"))
        self.assertEqual(self.spool.recover(), [])
        ((queue, name, problem),) = self.strays
        self.assertEqual((queue, name), ("tmp", "stuck"))
        self.assertIn("cannot remove", problem)


class LinkAndOwnerTests(HostileSpoolTestCase):
    """Files that are regular but not ours: refused, never written."""

    def test_hard_link_to_a_file_outside(self) -> None:
        queue_id = self.place("hardlink")
        self.assertEqual(list(self.spool.scan(INCOMING)), [queue_id])  # a regular file
        error = self.assertRaises(NotAQueueFile, self.spool.open, queue_id, INCOMING)
        self.assertIn("2 hard links", error.reason)
        self.spool.mark_corrupt(queue_id, INCOMING, error.reason)
        self.assertOutsideUntouched()
        self.assertEqual(os.stat(self.outside_file).st_nlink, 2)  # only the name moved

    def test_enqueue_between_link_and_unlink(self) -> None:
        # Our own publish links tmp/ID into its queue, then unlinks tmp/ID:
        # a reader in between sees two links to the same inode.
        queue_id = self.enqueue()
        twin = os.path.join(self.spool.directory, "tmp", queue_id)
        os.link(queue_path(self.spool, INCOMING, queue_id), twin)
        self.spool.open(queue_id, INCOMING, writable=False).close()
        self.assertTrue(os.path.exists(twin))  # mailq changes nothing
        with self.spool.open(queue_id, INCOMING) as queue_file:
            queue_file.mark_done(0)
        self.assertFalse(os.path.exists(twin))  # the queue manager finished the publish

    def test_writer_unlinks_its_tmp_name_while_the_reader_looks(self) -> None:
        # The CI race: the reader's fstat counts two links, then the
        # writer (sendmail, another process) unlinks tmp/ID before the
        # reader looks at it.  The file is ours, not a hard link: it must
        # open, for the queue manager and for mailq, never go to corrupt/.
        for writable in (True, False):
            queue_id = self.enqueue()
            twin = os.path.join(self.spool.directory, "tmp", queue_id)
            os.link(queue_path(self.spool, INCOMING, queue_id), twin)
            original = safeopen._same_inode

            def writer_unlinks_first(path: str, info: os.stat_result, twin: str = twin,
                                     original: Callable[..., bool] = original) -> bool:
                os.unlink(twin)
                return original(path, info)

            self.patch(safeopen, "_same_inode", writer_unlinks_first)
            with self.spool.open(queue_id, INCOMING, writable=writable) as queue_file:
                self.assertEqual(queue_file.queue_id, queue_id)
            self.assertFalse(os.path.exists(twin))
            self.patch(safeopen, "_same_inode", original)

    def test_tmp_name_of_another_file_is_no_excuse(self) -> None:
        queue_id = self.place("hardlink")
        write_file(os.path.join(self.spool.directory, "tmp", queue_id), b"other")
        self.assertRaises(NotAQueueFile, self.spool.open, queue_id, INCOMING)

    def test_another_users_file(self) -> None:
        require_root()
        queue_id = self.enqueue()
        os.chown(queue_path(self.spool, INCOMING, queue_id), 12345, -1)
        error = self.assertRaises(NotAQueueFile, self.spool.open, queue_id, INCOMING)
        self.assertIn("owned by uid 12345", error.reason)

    def test_files_belong_to_the_queue_directorys_owner(self) -> None:
        # root's mailq on a spool of the daemon's user (uid 65534).
        require_root()
        queue_id = self.enqueue()
        os.chown(os.path.join(self.spool.directory, INCOMING), 65534, -1)
        os.chown(queue_path(self.spool, INCOMING, queue_id), 65534, -1)
        self.spool.open(queue_id, INCOMING, writable=False).close()

    def test_writable_by_others(self) -> None:
        queue_id = self.enqueue()
        os.chmod(queue_path(self.spool, INCOMING, queue_id), 0o666)
        error = self.assertRaises(NotAQueueFile, self.spool.open, queue_id, INCOMING)
        self.assertIn("mode 0666", error.reason)

    def test_not_a_queue_file_is_a_corrupt_queue_file(self) -> None:
        # Every handler of CorruptQueueFile (scheduler, mailq, postsuper)
        # handles these too.
        self.assertTrue(issubclass(NotAQueueFile, CorruptQueueFile))


class ReplacedWhileQueuedTests(HostileSpoolTestCase):
    """An open QueueFile reopens its file by name for each update: a name
    swapped meanwhile is never written or read."""

    def swap(self, queue_id: str, kind: str) -> None:
        os.unlink(queue_path(self.spool, INCOMING, queue_id))
        self.place(kind, queue_id=queue_id)

    def test_update_after_a_swap_for_a_link(self) -> None:
        queue_id = self.enqueue()
        queue_file = self.spool.open(queue_id, INCOMING)
        self.addCleanup(queue_file.close)
        self.swap(queue_id, "symlink")
        self.assertRaises(NotAQueueFile, queue_file.mark_done, 0)
        self.assertRaises(NotAQueueFile, queue_file.record_attempt, START)
        self.assertRaises(NotAQueueFile, queue_file.envelope.open_content)
        self.assertOutsideUntouched()

    def test_update_after_a_swap_for_a_hard_link_or_a_fifo(self) -> None:
        for kind in ("hardlink", "fifo"):
            queue_id = self.enqueue()
            queue_file = self.spool.open(queue_id, INCOMING)
            self.addCleanup(queue_file.close)
            self.swap(queue_id, kind)
            with within():
                self.assertRaises(NotAQueueFile, queue_file.mark_done, 0)
        self.assertOutsideUntouched()


class LogFileTests(HostileSpoolTestCase):
    """defer/ and bounce/ logs: never followed, never waited for."""

    def test_fifo_as_defer_log(self) -> None:
        queue_id = self.enqueue()
        os.mkfifo(os.path.join(self.spool.directory, "defer", queue_id))
        with within():
            self.assertEqual(self.spool.read_log("defer", queue_id), [])
            with self.spool.open(queue_id, INCOMING) as queue_file:
                self.assertRaises(OSError, queue_file.defer, 0, Status("4.4.1", "refused"))
            entries = list(self.spool.entries())
        self.assertEqual([e.queue_id for e in entries], [queue_id])
        self.assertEqual([(q, n) for q, n, _ in self.strays], [("defer", queue_id)])

    def test_directory_as_defer_log_does_not_stop_a_removal(self) -> None:
        queue_id = self.enqueue()
        os.mkdir(os.path.join(self.spool.directory, "defer", queue_id))
        self.spool.remove(queue_id, INCOMING)
        self.assertIsNone(self.spool.find(queue_id))
        self.assertEqual([(q, n) for q, n, _ in self.strays], [("defer", queue_id)])

    def test_symlink_as_bounce_log_is_not_followed(self) -> None:
        queue_id = self.enqueue()
        os.symlink(self.outside_file, os.path.join(self.spool.directory, "bounce", queue_id))
        with self.spool.open(queue_id, INCOMING) as queue_file:
            self.assertRaises(OSError, queue_file.bounce, 0, Status("5.1.1", "unknown"))
        self.assertEqual(self.spool.read_log("bounce", queue_id), [])
        self.assertOutsideUntouched()


# ---------------------------------------------------------------------------
# The queue manager


class FakeAgent:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.requests: list[DeliveryRequest] = []

    def deliver(self, request: DeliveryRequest) -> Deferred[RequestResult]:
        self.requests.append(request)
        return Deferred()

    def defer_unsent(self, request: DeliveryRequest, status: Status) -> None:
        pass

    def finish(self, message: object) -> None:
        pass


class QueueManagerTests(HostileSpoolTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()
        self.clock.advance(START)
        self.spool.clock = self.clock.seconds
        self.agent = FakeAgent(self.spool)
        self.events: list[dict] = []
        observer = self.events.append
        self.patch(scheduler_module, "log", Logger(namespace="relayagent.qmgr", observer=observer))
        self.patch(spool_module, "log", Logger(namespace="relayagent.spool", observer=observer))

    def manager(self) -> QueueManager:
        manager = QueueManager(Config.defaults(), self.spool, self.agent, self.clock,
                               lambda recipient: recipient.domain)
        self.addCleanup(manager.stop)
        return manager

    def delivered(self) -> list[str]:
        return [request.message.queue_id for request in self.agent.requests]

    def test_bad_entries_in_incoming_do_not_stop_the_queue(self) -> None:
        bad = {kind: self.place(kind) for kind in ("fifo", "symlink", "directory", "passwd", "dangling")}
        zero = new_id()
        write_file(queue_path(self.spool, INCOMING, zero), b"")
        good = self.enqueue()
        manager = self.manager()
        with within():
            manager.start()
            for _ in range(5):
                self.clock.advance(scheduler_module.INCOMING_POLL)  # five more scans
        self.assertEqual(self.delivered(), [good])
        # Left alone where they are, each reported once; the empty file,
        # a corrupt queue file, went to corrupt/.
        for queue_id in bad.values():
            self.assertTrue(os.path.lexists(queue_path(self.spool, INCOMING, queue_id)))
        self.assertEqual(sorted(name for _, name, _ in self.strays), sorted(bad.values()))
        self.assertEqual(list(self.spool.queue_ids(CORRUPT)), [zero])
        self.assertOutsideUntouched()

    def test_a_hard_link_goes_to_corrupt_unwritten(self) -> None:
        queue_id = self.place("hardlink")
        good = self.enqueue()
        self.manager().start()
        self.assertEqual(self.delivered(), [good])
        self.assertEqual(list(self.spool.queue_ids(CORRUPT)), [queue_id])
        self.assertOutsideUntouched()

    def test_a_link_that_took_a_files_place_after_the_scan(self) -> None:
        queue_id = self.enqueue()
        real_move = self.spool.move

        def move_then_swap(queue_id: str, from_queue: str, to_queue: str) -> None:
            real_move(queue_id, from_queue, to_queue)
            path = queue_path(self.spool, to_queue, queue_id)
            if to_queue == ACTIVE:
                os.unlink(path)
                os.symlink(self.outside_file, path)

        self.patch(self.spool, "move", move_then_swap)
        self.manager().start()
        self.assertEqual(self.delivered(), [])
        moved = queue_path(self.spool, CORRUPT, queue_id)
        self.assertTrue(os.path.islink(moved))
        self.assertOutsideUntouched()

    def test_a_directory_in_active_is_not_recovered(self) -> None:
        self.place("directory", ACTIVE)
        manager = self.manager()
        manager.start()
        self.assertEqual(manager.counters.activated, 0)
        self.assertFalse(any("recovering" in (e.get("log_format") or "") for e in self.events))
        self.assertEqual(len(self.strays), 1)

    def test_an_unopenable_file_is_deferred_not_stuck_in_active(self) -> None:
        queue_id = self.enqueue(ACTIVE)

        def no_descriptors(*args: object, **kwargs: object) -> None:
            raise OSError(24, "Too many open files")

        self.patch(self.spool, "open", no_descriptors)
        self.manager().start()
        self.assertEqual(self.spool.find(queue_id), DEFERRED)
        mtime = os.lstat(queue_path(self.spool, DEFERRED, queue_id)).st_mtime
        self.assertEqual(mtime, START + 300)  # minimal_backoff_time
        (warning,) = [e for e in self.events if e.get("ralog_event") == ralog.WARNING]
        self.assertIn("Too many open files; deferred", warning["text"])

    def test_lines_are_the_queue_managers(self) -> None:
        self.enqueue(ACTIVE)
        bad = new_id()
        write_file(queue_path(self.spool, INCOMING, bad), b"garbage")
        self.manager().start()
        out = io.StringIO()
        observer = ralog.PostfixFormatObserver(out, hostname="relay.test", program="relayagent/smtp",
                                               pid=1)
        for event in self.events:
            observer(event)
        lines = out.getvalue().splitlines()
        recovering = [line for line in lines if "recovering 1 message(s)" in line]
        corrupt = [line for line in lines if "corrupt queue file moved" in line]
        self.assertEqual(len(recovering), 1, lines)
        self.assertEqual(len(corrupt), 1, lines)
        self.assertIn(" relayagent/qmgr[1]: recovering", recovering[0])
        self.assertIn(f" relayagent/qmgr[1]: warning: {bad}: corrupt queue file moved from active "
                      "to corrupt: not a relayagent queue file (bad magic)", corrupt[0])
        self.assertNotIn("warning: warning", out.getvalue())


class LogLineTests(SynchronousTestCase):
    def render(self, namespace: str, emit) -> str:
        out = io.StringIO()
        observer = ralog.PostfixFormatObserver(out, hostname="h", program="relayagent/smtp", pid=1)
        emit(Logger(namespace=namespace, observer=observer))
        return out.getvalue()

    def test_namespace_decides_the_program(self) -> None:
        self.assertIn("relayagent/qmgr[1]: warning: x",
                      self.render("relayagent.qmgr", lambda log: ralog.log_warning(log, "x")))
        self.assertIn("relayagent/qmgr[1]: hello",
                      self.render("relayagent.qmgr", lambda log: log.info("hello")))
        # The delivery agent's warnings stay smtp's; an explicit service wins.
        self.assertIn("relayagent/smtp[1]: warning: x",
                      self.render("relayagent.qmgr.delivery", lambda log: ralog.log_warning(log, "x")))
        self.assertIn("relayagent/master[1]: warning: x",
                      self.render("relayagent.qmgr",
                                  lambda log: ralog.log_warning(log, "x", service="master")))

    def test_config_warnings_say_warning_once(self) -> None:
        events: list[dict] = []
        config = Config.from_text("bogus_parameter = 1\n")
        (text,) = config.warnings
        service = tap.SpoolStateService(config, directory=self.mktemp)
        service.log = Logger(namespace="relayagent.master.tap", observer=events.append)
        service.startService()
        self.addCleanup(service.stopService)
        (warning,) = [e for e in events if e["log_level"] is LogLevel.warn]
        self.assertEqual(ralog.render(warning), f"warning: {text}")


# ---------------------------------------------------------------------------
# mailq and postsuper


class CommandTests(HostileSpoolTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.config_path = os.path.join(os.path.dirname(self.spool.directory), "main.cf")
        write_file(self.config_path, f"queue_directory = {self.spool.directory}\n".encode())

    def run_command(self, *argv: str) -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        with within():
            code = cli.run(["-c", self.config_path, *argv], stdin=io.BytesIO(b""),
                           stdout=stdout, stderr=stderr)
        return code, stdout.getvalue(), stderr.getvalue()

    def test_mailq_skips_them_with_one_warning_each(self) -> None:
        bad = [self.place(kind) for kind in ("fifo", "symlink", "directory")]
        good = self.enqueue()
        for argv in (("mailq",), ("mailq", "--json")):
            code, out, err = self.run_command(*argv)
            self.assertEqual(code, 0)
            self.assertIn(good, out)
            for queue_id in bad:
                self.assertNotIn(queue_id, out)
                self.assertEqual(err.count(queue_id), 1, err)
            self.assertEqual(len(err.splitlines()), 3, err)
        code, out, err = self.run_command("mailq", "--json")
        self.assertEqual([json.loads(line)["queue_id"] for line in out.splitlines()], [good])

    def test_mailq_lists_a_hard_link_as_unreadable(self) -> None:
        queue_id = self.place("hardlink")
        code, out, err = self.run_command("mailq")
        self.assertEqual(code, 0)
        self.assertIn(f"{queue_id}: unreadable queue file in incoming: has 2 hard links", err)

    def test_postsuper_delete_all_removes_entries_not_targets(self) -> None:
        for kind in ("fifo", "symlink", "dangling", "hardlink"):
            self.place(kind)
        directory = self.place("directory")
        good = self.enqueue()
        code, out, err = self.run_command("postsuper", "-d", "ALL")
        self.assertEqual(code, 0, err)
        self.assertIn("Deleted: 5 messages", err)
        self.assertIn(f"{directory}: a directory in incoming, not a queue file; left alone", err)
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, INCOMING)), [directory])
        self.assertOutsideUntouched()
        self.assertNotIn(good, os.listdir(os.path.join(self.spool.directory, INCOMING)))

    def test_postsuper_requeue_refuses_a_fifo(self) -> None:
        queue_id = self.place("fifo", DEFERRED)
        code, out, err = self.run_command("postsuper", "-r", queue_id)
        self.assertEqual(code, 0)
        self.assertIn("not a regular file: a FIFO", err)
        self.assertTrue(stat.S_ISFIFO(os.lstat(queue_path(self.spool, DEFERRED, queue_id)).st_mode))

    def test_postsuper_hold_moves_a_link_not_its_target(self) -> None:
        queue_id = self.place("symlink")
        code, out, err = self.run_command("postsuper", "-h", queue_id)
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.islink(queue_path(self.spool, "hold", queue_id)))
        self.assertOutsideUntouched()


class SpoolLockTests(SynchronousTestCase):
    """master.lock, in the spool's top directory, opened as root before
    the privilege drop."""

    def test_a_fifo_or_link_as_the_lock_file(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, trigger.LOCK_NAME)
        elsewhere = os.path.join(directory, "elsewhere")
        os.mkfifo(path)
        with within():
            self.assertRaises(OSError, trigger.lock_spool, directory)
        os.unlink(path)
        os.symlink(elsewhere, path)
        self.assertRaises(OSError, trigger.lock_spool, directory)
        self.assertFalse(os.path.lexists(elsewhere))  # the dangling target was not created
