"""Tests for relayagent.master.worker (several worker processes on one spool):
the partition, the partitioned queue manager, the limits and the
parameter, the lines on the links, worker 0's pool and what the spawner
tells it, the lock check and the maillog's writer; all deterministic
(task.Clock, StringTransport, a fake reactor that adopts sockets).  The
spawner, the fork and the hand-over of what was read as root are in
tests/test_spawner.py; the end-to-end tests with real processes in
tests/test_workers_e2e.py.
"""

from __future__ import annotations

import collections
import io
import os
import socket
import zlib

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.master import worker
from relayagent.master.service import LineAppender
from relayagent.qmgr.scheduler import QueueManager
from relayagent.spool import ACTIVE, DEFERRED, INCOMING, trigger
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
        self.assertEqual(Config.defaults()["relayagent_workers"], "auto")
        self.assertEqual(Config.from_text("relayagent_workers = AUTO\n")["relayagent_workers"], "auto")
        self.assertEqual(Config.from_text("relayagent_workers = 4\n")["relayagent_workers"], 4)
        from relayagent.common.config import ConfigError
        for bad in ("0", "many", "2.5"):
            with self.assertRaises(ConfigError) as caught:
                Config.from_text(f"relayagent_workers = {bad}\n")
            self.assertIn("parameter relayagent_workers: bad value", str(caught.exception))
            self.assertIn("expected auto or an integer >= 1", str(caught.exception))

    def test_worker_count(self) -> None:
        self.patch(os, "sched_getaffinity", lambda pid: {0, 2, 5})
        self.assertEqual(worker.available_cpus(), 3)
        self.assertEqual(worker.worker_count(Config.defaults()), 3)
        self.assertEqual(worker.worker_count(Config.from_text("relayagent_workers = 1\n")), 1)
        self.assertEqual(worker.worker_count(Config.from_text("relayagent_workers = 8\n")), 8)

    def test_worker_count_without_an_affinity_mask(self) -> None:
        def unsupported(pid: int) -> set[int]:
            raise OSError("not here")

        self.patch(os, "sched_getaffinity", unsupported)
        self.patch(os, "cpu_count", lambda: None)
        self.assertEqual(worker.worker_count(Config.defaults()), 1)

    def test_exit_text(self) -> None:
        self.assertEqual(worker.exit_text(0), "exit status 0")
        self.assertEqual(worker.exit_text(3 << 8), "exit status 3")
        self.assertEqual(worker.exit_text(9), "killed by signal 9 (SIGKILL)")


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
        self.link = worker.ParentLink(lambda: self.queue_manager, self.clock, self.gone.append)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.warnings: list[dict] = []
        globalLogPublisher.addObserver(self.warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.warnings.append)

    def test_commands_from_the_parent(self) -> None:
        self.link.dataReceived(b"wakeup\nflush\nwakeup\n")
        self.assertEqual(self.queue_manager.calls, ["wakeup", "flush", "wakeup"])

    def test_a_flush_passed_on_is_not_logged_again(self) -> None:
        # Worker 0 logged "flush requested" when the request came: one
        # flush, one line, however many workers.
        self.link.dataReceived(b"flush\n")
        self.assertEqual(self.queue_manager.calls, ["flush"])
        self.assertEqual([e for e in self.warnings if "flush" in str(e.get("log_format", ""))], [])

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
        self.assertEqual(self.gone, [False])  # not announced: worker 0 died
        self.clock.advance(0)
        self.assertEqual(self.transport.value(), b"")  # nothing written after

    def test_end_of_file_after_stop_is_announced(self) -> None:
        self.link.dataReceived(b"stop\n")
        self.assertEqual(self.gone, [])  # the line alone stops nothing
        self.link.connectionLost(Failure(Exception("EOF")))
        self.assertEqual(self.gone, [True])
        self.assertEqual(self.queue_manager.calls, [])
        self.assertFalse(any("unknown command" in str(e.get("text", "")) for e in self.warnings))


class LogToWorkerZeroTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.link = worker.ParentLink(lambda: None, self.clock, lambda announced: None)
        self.transport = StringTransport()
        self.link.makeConnection(self.transport)
        self.fallback = io.StringIO()
        self.out = worker.LogToWorkerZero(self.link, fallback=self.fallback)

    def test_whole_lines_of_a_flush_go_to_worker_zero(self) -> None:
        self.out.write("2026-12-02T00:00:00+0000 [relayagent.qmgr#info] 1A2B: removed\n\tmore\npart")
        self.assertEqual(self.transport.value(), b"")
        self.out.flush()
        self.assertEqual(self.transport.value(),
                         b"log 2026-12-02T00:00:00+0000 [relayagent.qmgr#info] 1A2B: removed\nlog \tmore\n")
        self.transport.clear()
        self.out.write("ial caf\u00e9\n")
        self.out.flush()
        self.assertEqual(self.transport.value(), "log partial caf\u00e9\n".encode())
        self.assertEqual(self.fallback.getvalue(), "")

    def test_standard_error_once_the_link_is_gone(self) -> None:
        self.link.connectionLost(None)
        self.out.write("Main loop terminated.\n")
        self.out.flush()
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.fallback.getvalue(), "Main loop terminated.\n")


class FakeService:
    def __init__(self, queue_manager: QueueManager) -> None:
        self.queue_manager = queue_manager
        self.running = True
        self.stops = 0

    def stopService(self) -> Deferred:
        self.stops += 1
        self.running = False
        return self.queue_manager.stop()


class FakeUnixTransport(StringTransport):
    """An adopted UNIX socket: what was written, the descriptors sent
    with it, and the half-close."""

    def __init__(self) -> None:
        super().__init__()
        self.descriptors: list[int] = []
        self.write_closed = False

    def sendFileDescriptor(self, fd: int) -> None:
        self.descriptors.append(fd)

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self.stopped = 0
        self.adopted: list[tuple[int, object, FakeUnixTransport]] = []

    def stop(self) -> None:
        self.stopped += 1

    def adoptStreamConnection(self, fd: int, family: int, factory):  # noqa: ANN001
        assert family == socket.AF_UNIX
        protocol = factory.buildProtocol(None)
        transport = FakeUnixTransport()
        protocol.makeConnection(transport)
        self.adopted.append((fd, protocol, transport))


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

    def test_only_an_unannounced_end_of_file_is_logged(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = FakeService(FakeQueueManager())  # type: ignore[arg-type]
        for announced in (True, False):
            reactor = FakeReactor()
            reactor.running = True
            worker.WorkerRuntime(service, reactor).parent_gone(announced=announced)
            self.assertEqual(reactor.stopped, 1)  # stopped either way
        said = [event.get("log_format") for event in events if "parent" in str(event.get("log_format"))]
        self.assertEqual(said, ["the parent process is gone: stopping"])

    def test_no_line_when_the_worker_was_already_stopping(self) -> None:
        # Its own SIGINT (^C reaches every process of the terminal's
        # group) stops it first; its link closes in the shutdown.
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        clock.advance(START)
        spool = make_spool(self, clock=clock.seconds)
        queue_manager = QueueManager(Config.defaults(), spool, FakeDeliveryAgent(spool), clock, by_domain)
        queue_manager.start()
        service = FakeService(queue_manager)
        runtime = worker.WorkerRuntime(service, FakeReactor())
        runtime.stop_service()  # the shutdown trigger, at the signal
        runtime.parent_gone(announced=False)
        self.assertEqual([event for event in events if "parent" in str(event.get("log_format"))], [])
        self.assertEqual(service.stops, 1)


class WorkerPoolTests(SynchronousTestCase):
    """Worker 0's pool against a pretend spawner: the lines it sends, the
    reports it gets back, restarts and the stop."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.woken: list[bool] = []
        self.fatal: list[str] = []
        self.logged: list[str] = []
        self.pool = worker.WorkerPool(
            self.reactor, workers=3, on_wakeup=lambda: self.woken.append(True), on_fatal=self.fatal.append,
            on_log=self.logged.append,
        )
        self.warnings: list[str] = []
        self.infos: list[str] = []

        def observe(event: dict) -> None:
            if event.get("ralog_event") == "warning":
                self.warnings.append(event["text"])
            elif event.get("ralog_service") == "master":
                from twisted.logger import formatEvent
                self.infos.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        # A pretend fork: this is worker 0's side, with real sockets.
        self.pool.prepare(lambda index, link, lock_fd, listening: 0, worker.Privileges(), fork=lambda: 4242)
        self.assertEqual(self.pool.spawner_pid, 4242)
        self.lock_fd = 7
        self.pool.start(self.lock_fd)
        (_, self.spawner, self.control), *links = self.reactor.adopted
        self.links = {index: transport for index, (_, _, transport) in enumerate(links, 1)}

    def said(self, *lines: str) -> None:
        self.spawner.dataReceived("".join(line + "\n" for line in lines).encode("ascii"))

    def commands(self) -> list[str]:
        sent = self.control.value().decode("ascii").splitlines()
        self.control.clear()
        return sent

    def test_lock_handed_over_then_every_worker_started(self) -> None:
        self.assertEqual(len(self.reactor.adopted), 3)  # the spawner's socket, two links
        self.assertEqual(self.control.descriptors, [self.lock_fd])
        self.assertEqual(self.commands(), ["lock", "start 1", "start 2"])
        self.said("started 1 1001", "started 2 1002")
        self.assertEqual(self.infos, ["worker 1 started: pid 1001", "worker 2 started: pid 1002"])
        self.assertEqual(self.warnings, [])

    def test_triggers_go_to_every_running_worker_once_per_turn(self) -> None:
        self.said("started 1 1001")
        self.pool.send("wakeup")
        self.pool.send("wakeup")
        self.pool.send("flush")
        self.reactor.advance(0)
        self.assertEqual(self.links[1].value(), b"wakeup\nflush\n")
        self.assertEqual(self.links[2].value(), b"")  # not started yet

    def test_wakeup_from_a_worker(self) -> None:
        link = self.reactor.adopted[1][1]
        link.dataReceived(b"wak")
        self.assertEqual(self.woken, [])
        link.dataReceived(b"eup\n")
        self.assertEqual(self.woken, [True])
        link.dataReceived(b"rm -rf /\n" + b"x" * (worker.MAX_LOG_LINE + 1))
        self.assertEqual(len(self.warnings), 2)  # the unknown line, the overlong one

    def test_lines_of_twistds_log_from_a_worker(self) -> None:
        link = self.reactor.adopted[2][1]
        long = "x" * 5000  # a mail log line may be longer than a command
        link.dataReceived(f"log 1A2B: to=<r@example.net>, status=sent\nlog \tcontinued\nlog {long}\n".encode())
        link.dataReceived("log caf\u00e9\n".encode())
        self.assertEqual(self.logged, ["1A2B: to=<r@example.net>, status=sent", "\tcontinued", long, "caf\u00e9"])
        self.assertEqual(self.warnings, [])

    def test_unexpected_exit_is_logged_and_restarted_later(self) -> None:
        self.said("started 1 1001", "started 2 1002")
        self.commands()
        self.said(f"ended 1 1001 {1 << 8}")
        self.assertIn("process worker 1 pid 1001 exit status 1", self.warnings)
        self.assertIn("worker 1: starting it again in 10s", self.warnings)
        self.reactor.advance(worker.RESTART_DELAY - 0.1)
        self.assertEqual(self.commands(), [])
        self.reactor.advance(0.1)
        self.assertEqual(self.commands(), ["start 1"])
        self.said("started 1 1003")
        self.assertIn("worker 1 started: pid 1003", self.infos)

    def test_killed_by_signal(self) -> None:
        self.said("started 2 1002", "ended 2 1002 9")
        self.assertTrue(any("pid 1002 killed by signal 9 (SIGKILL)" in text for text in self.warnings))

    def test_a_report_for_another_pid_is_ignored(self) -> None:
        self.said("started 1 1001", "ended 1 999 0")
        self.assertEqual(self.warnings, [])

    def test_fork_failure_is_tried_again(self) -> None:
        self.commands()
        self.said("failed 1 fork: Resource temporarily unavailable")
        self.assertIn("cannot start worker 1: fork: Resource temporarily unavailable", self.warnings)
        self.reactor.advance(worker.RESTART_DELAY)
        self.assertEqual(self.commands(), ["start 1"])

    def test_unknown_lines_from_the_spawner(self) -> None:
        self.said("started one 1001", "hello")
        self.assertEqual(len(self.warnings), 2)

    def test_stop_half_closes_the_links_and_waits_for_the_spawner(self) -> None:
        self.said("started 1 1001", "started 2 1002")
        self.commands()
        stopped = self.pool.stop()
        self.assertTrue(all(link.write_closed for link in self.links.values()))
        # The end of file is announced: the workers do not take it for
        # worker 0's death.
        self.assertTrue(all(link.value().endswith(b"stop\n") for link in self.links.values()))
        self.assertFalse(self.control.write_closed)
        self.said("ended 1 1001 0")
        self.assertNoResult(stopped)
        self.said("ended 2 1002 0")
        # Every worker ended: end of file for the spawner, which leaves.
        self.assertTrue(self.control.write_closed)
        self.assertNoResult(stopped)
        self.spawner.connectionLost(None)
        self.successResultOf(stopped)
        self.assertEqual(self.warnings, [])  # exits at stop are expected
        self.assertEqual(self.fatal, [])
        self.reactor.advance(worker.RESTART_DELAY * 2)
        self.assertEqual(self.commands(), [])  # no restart

    def test_stop_waits_for_a_worker_asked_for_but_not_yet_reported(self) -> None:
        stopped = self.pool.stop()
        self.said("started 1 1001", "ended 1 1001 0", "failed 2 fork: no memory")
        self.spawner.connectionLost(None)
        self.successResultOf(stopped)

    def test_stop_kills_after_the_timeout(self) -> None:
        self.said("started 1 1001", "started 2 1002")
        self.commands()
        stopped = self.pool.stop()
        self.reactor.advance(worker.STOP_TIMEOUT)
        self.assertEqual(self.commands(), ["kill 1", "kill 2"])
        self.said("ended 1 1001 9", "ended 2 1002 9")
        self.spawner.connectionLost(None)
        self.successResultOf(stopped)

    def test_spawner_gone_while_running_stops_the_daemon(self) -> None:
        self.said("started 1 1001")
        self.spawner.connectionLost(None)
        self.assertEqual(len(self.fatal), 1)
        self.assertIn("the worker spawner (pid 4242) is gone", self.fatal[0])
        self.assertIn(self.fatal[0], self.warnings)
        stopped = self.pool.stop()
        self.assertNoResult(stopped)  # worker 1 still runs
        # Only worker 1 holds its end of the link now: end of file is its exit.
        self.reactor.adopted[1][1].connectionLost(None)
        self.successResultOf(stopped)


class LockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_the_parents_locked_descriptor_passes(self) -> None:
        fd = trigger.lock_spool(self.directory)
        self.addCleanup(os.close, fd)
        worker.check_lock(fd, self.directory)

    def test_another_file_is_refused(self) -> None:
        os.close(trigger.lock_spool(self.directory))  # master.lock exists, unlocked
        fd = os.open(os.path.join(self.directory, "other"), os.O_RDONLY | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        with self.assertRaises(worker.WorkerError) as caught:
            worker.check_lock(fd, self.directory)
        self.assertIn("is not", str(caught.exception))

    def test_a_spool_locked_by_someone_else_is_refused(self) -> None:
        held = trigger.lock_spool(self.directory)
        self.addCleanup(os.close, held)
        other = os.open(os.path.join(self.directory, trigger.LOCK_NAME), os.O_RDONLY)
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



class MakeServiceTests(SynchronousTestCase):
    def test_twistd_privileges_reach_the_service(self) -> None:
        from relayagent.master import tap

        options = tap.Options()
        options["configuration"] = Config.from_text(f"relayagent_workers = 2\nqueue_directory = {self.mktemp()}\n")
        options.parent = {"chroot": "/var/spool/chroot", "uid": 65534, "gid": None, "euid": False}
        top = tap.makeService(options)
        service = next(s for s in top if hasattr(s, "privileges"))
        self.addCleanup(service.smtp.close)
        self.assertEqual(service.privileges, worker.Privileges(65534, None, False))
        self.assertEqual(service.workers, 2)
        self.assertIsNone(service.pool)  # nothing forked before privilegedStartService
