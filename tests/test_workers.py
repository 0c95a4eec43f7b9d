"""Tests for relayagent.master.worker (several worker processes on one spool):
the partition, the partitioned queue manager, the limits, the lines on
the pipes, the parent's pool, the lock check and the maillog's writer;
all deterministic (task.Clock, StringTransport, a fake process reactor).
The end-to-end tests with real processes are in tests/test_workers_e2e.py.
"""

from __future__ import annotations

import collections
import os
import zlib

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.master import worker
from relayagent.master.service import LineAppender
from relayagent.qmgr.scheduler import QueueManager
from relayagent.spool import ACTIVE, DEFERRED, INCOMING, control
from relayagent.spool.queueid import QueueIdGenerator, partition_of
from relayagent.testing import FakeDeliveryAgent
from tests.helpers_spool import make_spool
from tests.test_scheduler import START, by_domain


class PartitionTests(SynchronousTestCase):
    def test_stable_known_values(self) -> None:
        # CRC-32, not hash(): the same in every process and every run.
        self.assertEqual(partition_of("0000000000100001", 5), zlib.crc32(b"0000000000100001") % 5)
        for workers in (2, 3, 7):
            self.assertEqual(partition_of("1A2B3C4D5E6F7G8H", workers),
                             partition_of("1A2B3C4D5E6F7G8H", workers))
        self.assertEqual(partition_of("1A2B3C4D5E6F7G8H", 1), 0)

    def test_spread_of_real_ids(self) -> None:
        # Ids of one process made in a burst share all but their last
        # time digits: the CRC still spreads them evenly.
        now = [START]

        def clock() -> float:
            now[0] += 0.000_01
            return now[0]

        generator = QueueIdGenerator(clock)
        ids = [generator.next()[0] for _ in range(12000)]
        self.assertEqual(len(set(ids)), len(ids))
        for workers in (2, 3, 4):
            counts = collections.Counter(partition_of(queue_id, workers) for queue_id in ids)
            self.assertEqual(sorted(counts), list(range(workers)))
            share = len(ids) / workers
            for count in counts.values():
                self.assertLess(abs(count - share), share * 0.1, counts)

    def test_filter(self) -> None:
        self.assertIsNone(worker.partition_filter(0, 1))
        owns = worker.partition_filter(1, 3)
        assert owns is not None
        self.assertEqual(owns("1A2B3C4D5E6F7G8H"), partition_of("1A2B3C4D5E6F7G8H", 3) == 1)


class PartitionedQueueManagerTests(SynchronousTestCase):
    """Three queue managers on one spool: each takes only its own files,
    and every file is taken by exactly one."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = make_spool(self, clock=self.clock.seconds)

    def enqueue(self, count: int, queue: str) -> list[str]:
        return [self.spool.enqueue("s@example.org", ["r@example.net"], b"Subject: x\n\nhi\n", queue=queue)
                for _ in range(count)]

    def test_each_file_claimed_by_exactly_one_worker(self) -> None:
        incoming = self.enqueue(60, INCOMING)
        deferred = self.enqueue(30, DEFERRED)
        for queue_id in deferred:  # due: the mtime is the next attempt time
            os.utime(self.spool.path(DEFERRED, queue_id), (START - 10, START - 10))
        crashed = self.enqueue(15, ACTIVE)  # left in active/ by a dead run
        everything = set(incoming) | set(deferred) | set(crashed)
        workers = 3
        claimed: dict[int, list[str]] = {}
        for index in range(workers):
            agent = FakeDeliveryAgent(self.spool)
            manager = QueueManager(Config.defaults(), self.spool, agent, self.clock, by_domain,
                                   owns=worker.partition_filter(index, workers))
            manager.start()
            self.addCleanup(manager.stop)
            # Activated (one destination: only its window's worth are
            # dispatched yet).
            claimed[index] = list(manager.active)
            for queue_id in claimed[index]:
                self.assertEqual(partition_of(queue_id, workers), index)
        union = [queue_id for ids in claimed.values() for queue_id in ids]
        self.assertEqual(len(union), len(set(union)))  # nobody twice
        self.assertEqual(set(union), everything)  # nobody left out
        self.assertTrue(all(claimed.values()))

    def test_recover_leaves_other_workers_active_files(self) -> None:
        crashed = self.enqueue(20, ACTIVE)
        agent = FakeDeliveryAgent(self.spool)
        manager = QueueManager(Config.defaults(), self.spool, agent, self.clock, by_domain,
                               owns=worker.partition_filter(1, 2))
        manager.start()
        self.addCleanup(manager.stop)
        mine = {q for q in crashed if partition_of(q, 2) == 1}
        self.assertEqual(set(manager.active), mine)
        self.assertTrue(mine)
        self.assertTrue({request.message.queue_id for request, _ in agent.requests} <= mine)
        for queue_id in set(crashed) - mine:  # still there for their owner
            self.assertTrue(os.path.exists(self.spool.path(ACTIVE, queue_id)))

    def test_triggers_reach_the_hook_and_the_poll_does_not(self) -> None:
        heard: list[str] = []
        manager = QueueManager(Config.defaults(), self.spool, FakeDeliveryAgent(self.spool), self.clock,
                               by_domain, on_trigger=heard.append)
        manager.start()
        self.addCleanup(manager.stop)
        self.clock.advance(5)  # five polls
        self.assertEqual(heard, [])
        manager.wakeup()
        manager.flush()
        self.assertEqual(heard, ["wakeup", "flush"])


class LimitTests(SynchronousTestCase):
    def test_split_among_workers(self) -> None:
        config = Config.defaults()
        split = worker.split_limits(config, 3)
        self.assertEqual(split["qmgr_message_active_limit"], 6667)  # ceil(20000 / 3)
        self.assertEqual(split["qmgr_message_recipient_limit"], 6667)
        self.assertEqual(split["default_process_limit"], 34)  # ceil(100 / 3)
        self.assertEqual(split["smtp_destination_concurrency_limit"], 7)  # ceil(20 / 3)
        self.assertEqual(split["smtp_initial_destination_concurrency"], 2)  # ceil(5 / 3)
        self.assertEqual(split["smtp_destination_rate_delay"], 0)
        self.assertEqual(split["relayhost"], config["relayhost"])

    def test_at_least_one_and_rate_delay(self) -> None:
        config = Config.from_text("default_process_limit = 1\nsmtp_destination_concurrency_limit = 2\n"
                                  "smtp_destination_rate_delay = 1.5s\n")
        split = worker.split_limits(config, 4)
        self.assertEqual(split["default_process_limit"], 1)
        self.assertEqual(split["smtp_destination_concurrency_limit"], 1)
        self.assertEqual(split["smtp_destination_rate_delay"], 6.0)

    def test_one_worker_is_unchanged(self) -> None:
        config = Config.defaults()
        self.assertIs(worker.split_limits(config, 1), config)

    def test_parameter(self) -> None:
        self.assertEqual(Config.defaults()["relayagent_workers"], 1)
        self.assertEqual(Config.from_text("relayagent_workers = 4\n")["relayagent_workers"], 4)
        from relayagent.common.config import ConfigError
        self.assertRaises(ConfigError, Config.from_text, "relayagent_workers = 0\n")

    def test_chroot_refused(self) -> None:
        config = Config.from_text("relayagent_workers = 2\n")
        with self.assertRaises(worker.WorkerError) as caught:
            worker.refuse_chroot(config, "/var/spool/chroot")
        self.assertIn("--chroot", str(caught.exception))
        worker.refuse_chroot(config, None)
        worker.refuse_chroot(Config.defaults(), "/var/spool/chroot")


class FakeQueueManager:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = True

    def wakeup(self) -> None:
        self.calls.append("wakeup")

    def flush(self) -> None:
        self.calls.append("flush")


class ParentLinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.queue_manager = FakeQueueManager()
        self.gone: list[bool] = []
        self.link = worker.ParentLink(lambda: self.queue_manager, self.clock, lambda: self.gone.append(True))
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.warnings: list[dict] = []
        globalLogPublisher.addObserver(self.warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.warnings.append)

    def test_commands_from_the_parent(self) -> None:
        self.link.dataReceived(b"wakeup\nflush\nwakeup\n")
        self.assertEqual(self.queue_manager.calls, ["wakeup", "flush", "wakeup"])

    def test_unknown_command_is_ignored_with_a_warning(self) -> None:
        self.link.dataReceived(b"rm -rf\n")
        self.assertEqual(self.queue_manager.calls, [])
        self.assertTrue(any("unknown command" in str(e.get("text", "")) for e in self.warnings))

    def test_wakeups_to_the_parent_once_per_turn(self) -> None:
        self.link.send("wakeup")
        self.link.send("wakeup")
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(0)
        self.assertEqual(self.transport.value(), b"wakeup\n")

    def test_end_of_file_means_gone_once(self) -> None:
        self.link.send("wakeup")
        self.link.connectionLost(Failure(Exception("EOF")))
        self.link.connectionLost(Failure(Exception("EOF")))
        self.assertEqual(self.gone, [True])
        self.clock.advance(0)
        self.assertEqual(self.transport.value(), b"")  # nothing written after


class FakeService:
    def __init__(self, queue_manager: QueueManager) -> None:
        self.queue_manager = queue_manager
        self.running = True
        self.stops = 0

    def stopService(self) -> Deferred:
        self.stops += 1
        self.running = False
        return self.queue_manager.stop()


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self.stopped = 0
        self.spawned: list[tuple] = []

    def stop(self) -> None:
        self.stopped += 1

    def spawnProcess(self, protocol, executable, args, env=None, childFDs=None):  # noqa: ANN001
        transport = FakeProcessTransport(1000 + len(self.spawned))
        self.spawned.append((protocol, executable, args, env, childFDs, transport))
        protocol.makeConnection(transport)
        return transport


class FakeProcessTransport(StringTransport):
    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.stdin_closed = False
        self.signals: list[str] = []

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class WorkerRuntimeTests(SynchronousTestCase):
    def test_end_of_file_stops_the_queue_manager(self) -> None:
        clock = Clock()
        clock.advance(START)
        spool = make_spool(self, clock=clock.seconds)
        queue_manager = QueueManager(Config.defaults(), spool, FakeDeliveryAgent(spool), clock, by_domain)
        queue_manager.start()
        self.assertTrue(queue_manager.running)
        service = FakeService(queue_manager)
        reactor = FakeReactor()
        runtime = worker.WorkerRuntime(service, reactor)
        link = worker.ParentLink(lambda: queue_manager, clock, runtime.parent_gone)
        link.makeConnection(StringTransport())
        link.connectionLost(Failure(Exception("EOF")))
        self.assertFalse(queue_manager.running)
        self.assertEqual(service.stops, 1)
        runtime.stop_service()  # the shutdown trigger too: still once
        self.assertEqual(service.stops, 1)

    def test_end_of_file_stops_a_running_reactor(self) -> None:
        reactor = FakeReactor()
        reactor.running = True
        service = FakeService(FakeQueueManager())  # type: ignore[arg-type]
        runtime = worker.WorkerRuntime(service, reactor)
        runtime.parent_gone()
        # The reactor's stop runs the service's stop (a shutdown trigger).
        self.assertEqual(reactor.stopped, 1)
        self.assertEqual(service.stops, 0)


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.woken: list[bool] = []
        self.pool = worker.WorkerPool(
            self.reactor, config_path="/etc/relayagent/main.cf", workers=3, lock_fd=7, log_fd=9,
            on_wakeup=lambda: self.woken.append(True), executable="/usr/bin/python3",
        )
        self.warnings: list[str] = []

        def observe(event: dict) -> None:
            if event.get("ralog_event") == "warning":
                self.warnings.append(event["text"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.pool.start()

    def test_children_started_with_the_lock_and_log_descriptors(self) -> None:
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (_, executable, args, env, child_fds, _) in enumerate(self.reactor.spawned, 1):
            self.assertEqual(executable, "/usr/bin/python3")
            self.assertEqual(args[1:3], ["-m", "relayagent.master.child"])
            self.assertIn("--index", args)
            self.assertEqual(args[args.index("--index") + 1], str(index))
            self.assertEqual(args[args.index("--workers") + 1], "3")
            self.assertEqual(args[args.index("--lock-fd") + 1], "7")
            self.assertEqual(args[args.index("--log-fd") + 1], "9")
            self.assertEqual(child_fds, {0: "w", 1: "r", 2: 2, 7: 7, 9: 9})
            self.assertTrue(env["PYTHONPATH"].startswith(worker._PACKAGE_ROOT))

    def test_triggers_go_to_every_child_once_per_turn(self) -> None:
        self.pool.send("wakeup")
        self.pool.send("wakeup")
        self.pool.send("flush")
        self.reactor.advance(0)
        for *_, transport in self.reactor.spawned:
            self.assertEqual(transport.value(), b"wakeup\nflush\n")

    def test_wakeup_from_a_child(self) -> None:
        protocol = self.reactor.spawned[0][0]
        protocol.outReceived(b"wak")
        self.assertEqual(self.woken, [])
        protocol.outReceived(b"eup\n")
        self.assertEqual(self.woken, [True])

    def test_unexpected_exit_is_logged_and_restarted_later(self) -> None:
        protocol = self.reactor.spawned[0][0]
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertIn("process /usr/bin/python3 -m relayagent.master.worker pid 1000 exit status 1",
                      self.warnings)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(worker.RESTART_DELAY - 0.1)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(0.1)
        self.assertEqual(len(self.reactor.spawned), 3)
        args = self.reactor.spawned[2][2]
        self.assertEqual(args[args.index("--index") + 1], "1")

    def test_killed_by_signal(self) -> None:
        protocol = self.reactor.spawned[1][0]
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertTrue(any("pid 1001 killed by signal 9" in text for text in self.warnings))

    def test_stop_closes_stdin_and_waits(self) -> None:
        stopped = self.pool.stop()
        transports = [spawned[5] for spawned in self.reactor.spawned]
        self.assertTrue(all(t.stdin_closed for t in transports))
        self.assertNoResult(stopped)
        for protocol, *_ in self.reactor.spawned:
            protocol.processEnded(Failure(ProcessDone(0)))
        self.successResultOf(stopped)
        self.assertEqual(self.warnings, [])  # an exit at stop is expected
        self.reactor.advance(worker.RESTART_DELAY * 2)
        self.assertEqual(len(self.reactor.spawned), 2)  # no restart

    def test_stop_kills_after_the_timeout(self) -> None:
        stopped = self.pool.stop()
        self.reactor.advance(worker.STOP_TIMEOUT)
        transports = [spawned[5] for spawned in self.reactor.spawned]
        self.assertEqual([t.signals for t in transports], [["KILL"], ["KILL"]])
        for protocol, *_ in self.reactor.spawned:
            protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.successResultOf(stopped)


class LockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_the_parents_locked_descriptor_passes(self) -> None:
        fd = control.lock_spool(self.directory)
        self.addCleanup(os.close, fd)
        worker.check_lock(fd, self.directory)

    def test_another_file_is_refused(self) -> None:
        os.close(control.lock_spool(self.directory))  # master.lock exists, unlocked
        fd = os.open(os.path.join(self.directory, "other"), os.O_RDONLY | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        with self.assertRaises(worker.WorkerError) as caught:
            worker.check_lock(fd, self.directory)
        self.assertIn("is not", str(caught.exception))

    def test_a_spool_locked_by_someone_else_is_refused(self) -> None:
        held = control.lock_spool(self.directory)
        self.addCleanup(os.close, held)
        other = os.open(os.path.join(self.directory, control.LOCK_NAME), os.O_RDONLY)
        self.addCleanup(os.close, other)
        with self.assertRaises(worker.WorkerError) as caught:
            worker.check_lock(other, self.directory)
        self.assertIn("locked by another", str(caught.exception))

    def test_a_closed_descriptor_is_refused(self) -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
        self.assertRaises(worker.WorkerError, worker.check_lock, fd, self.directory)


class LineAppenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.writes: list[bytes] = []
        real_write = os.write

        def spy(fd: int, data) -> int:  # noqa: ANN001
            self.writes.append(bytes(data))
            return real_write(fd, data)

        self.patch(os, "write", spy)

    def open(self, **kwargs) -> LineAppender:  # noqa: ANN003
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        appender = LineAppender(fd, **kwargs)
        self.addCleanup(appender.close)
        return appender

    def test_whole_lines_in_one_write_per_flush(self) -> None:
        appender = self.open()
        appender.write("one\n")
        appender.write("two\nthr")
        self.assertEqual(self.writes, [])
        appender.flush()
        self.assertEqual(self.writes, [b"one\ntwo\n"])
        appender.write("ee\n")
        appender.flush()
        self.assertEqual(self.writes, [b"one\ntwo\n", b"three\n"])

    def test_a_large_turn_is_written_early_in_whole_lines(self) -> None:
        appender = self.open(limit=20)
        for number in range(10):
            appender.write(f"line {number}\n")
        appender.flush()
        self.assertTrue(all(chunk.endswith(b"\n") for chunk in self.writes))
        self.assertGreater(len(self.writes), 1)
        with open(self.path, "rb") as handle:
            self.assertEqual(handle.read(), b"".join(f"line {n}\n".encode() for n in range(10)))

    def test_two_writers_append(self) -> None:
        first, second = self.open(), self.open()
        first.write("a\n")
        second.write("b\n")
        second.flush()
        first.flush()
        with open(self.path, "rb") as handle:
            self.assertEqual(handle.read(), b"b\na\n")



class ChrootRefusedAtStartTests(SynchronousTestCase):
    def test_make_service_stops_with_one_line(self) -> None:
        from relayagent.master import tap

        options = tap.Options()
        options["configuration"] = Config.from_text(f"relayagent_workers = 2\nqueue_directory = {self.mktemp()}\n")
        options.parent = {"chroot": "/var/spool/chroot"}  # twistd's options
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options)
        self.assertTrue(str(caught.exception).startswith("relayagent: fatal: relayagent_workers = 2"))
