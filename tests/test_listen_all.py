"""Tests for the listener on every worker: the queue ids of a partition
(relayagent.spool.queueid), the listening sockets of ``smtpd_endpoints``
bound in worker 0 and taken by another worker
(relayagent.smtpd.listener.SharedListener, RelayagentService's
listening_descriptors / listen_in_worker / listener_queued), and their
hand-over to the spawner (relayagent.master.worker.WorkerPool, against a
pretend spawner; relayagent.master.spawner.Spawner, in this process over a
real socket pair).

Deterministic: fake reactors and clocks, no network but sockets that are
never connected; the forks are in tests/test_spawner.py and the whole
daemon in tests/test_workers_e2e.py.
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.master import spawner, worker
from relayagent.master.service import RelayagentService
from relayagent.smtpd.listener import ListenerFactory, daemon_listener_services
from relayagent.spool import Spool, queueid
from relayagent.spool.queueid import QueueIdGenerator, partition_of, queue_id_time
from tests.support.certs import CertificateAuthority
from tests.test_workers import FakeReactor


class PartitionedIdTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(queueid, "_last_microseconds", -1)
        self.now = 1_700_000_000.25
        self.clock = lambda: self.now

    def test_every_id_is_the_workers_own_unique_and_in_order(self) -> None:
        for workers in (2, 3, 4, 7, 16):
            for index in range(workers):
                generator = QueueIdGenerator(self.clock, partition=(index, workers))
                ids = [generator.next()[0] for _ in range(200)]
                self.assertEqual({partition_of(queue_id, workers) for queue_id in ids}, {index})
                self.assertEqual(ids, sorted(set(ids)))  # unique, increasing

    def test_shares_the_process_clock_with_other_generators(self) -> None:
        plain = QueueIdGenerator(self.clock)
        mine = QueueIdGenerator(self.clock, partition=(1, 2))
        ids = []
        for _ in range(100):
            ids.append(plain.next()[0])
            ids.append(mine.next()[0])
        self.assertEqual(ids, sorted(set(ids)))  # one sequence: never the same id
        self.assertEqual({partition_of(queue_id, 2) for queue_id in ids[1::2]}, {1})

    def test_close_to_the_clock(self) -> None:
        # A still clock: 100 ids of partition 3 of 4 skip about 3 each.
        generator = QueueIdGenerator(self.clock, partition=(3, 4))
        ids = [generator.next() for _ in range(100)]
        for _, arrival in ids:
            self.assertEqual(arrival, self.now)
        drift = queue_id_time(ids[-1][0]) - self.now
        self.assertGreater(drift, 0)
        self.assertLess(drift, 0.01)

    def test_one_worker_and_bad_partitions(self) -> None:
        self.assertIsNone(QueueIdGenerator(self.clock, partition=(0, 1))._partition)
        for bad in ((2, 2), (-1, 2), (0, 0)):
            with self.assertRaises(ValueError):
                QueueIdGenerator(self.clock, partition=bad)

    def test_the_spool_queues_with_the_generator_it_is_given(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(directory, True))
        spool = Spool(directory, clock=self.clock, queue_ids=QueueIdGenerator(self.clock, partition=(1, 3)))
        spool.ensure_layout()
        ids = [spool.enqueue("a@example.org", ["b@example.net"], b"Subject: x\n\nhi\n") for _ in range(10)]
        self.assertEqual({partition_of(queue_id, 3) for queue_id in ids}, {1})


class Port:
    """A bound TCP port as the reactor returns it."""

    def __init__(self, fd: int, family: int) -> None:
        self.fd = fd
        self.addressFamily = family
        self.connected = True

    def fileno(self) -> int:
        return self.fd


class BindingReactor(MemoryReactorClock):
    """A MemoryReactorClock whose TCP and TLS ports have a descriptor."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[Port] = []

    def listenTCP(self, port, factory, backlog=50, interface=""):  # noqa: ANN001, ANN201, N802
        super().listenTCP(port, factory, backlog, interface)
        self.ports.append(Port(100 + len(self.ports), socket.AF_INET6 if ":" in interface else socket.AF_INET))
        return self.ports[-1]

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):  # noqa: ANN001, ANN201, N802, N803
        super().listenSSL(port, factory, contextFactory, backlog, interface)
        self.ports.append(Port(100 + len(self.ports), socket.AF_INET))
        return self.ports[-1]


class FakeQueueManager:
    def __init__(self) -> None:
        self.wakeups: list[bool | tuple[str, bool]] = []

    def wakeup(self, *, pass_on: bool = True) -> None:
        self.wakeups.append(pass_on)

    def queued(self, queue_id: str, *, pass_on: bool = True) -> None:
        self.wakeups.append((queue_id, pass_on))


class ListenerCase(SynchronousTestCase):
    """A daemon with four endpoints: TCP, implicit TLS, UNIX, TCP over IPv6."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, True))
        leaf = CertificateAuthority().issue(["relay.test"], ip_addresses=["127.0.0.1"])
        cert, key = leaf.write(self.directory)
        self.config = Config.from_text(
            f"queue_directory = {self.directory}/spool\nmyhostname = relay.test\nrelayagent_workers = 2\n"
            "smtpd_endpoints = tcp:10025:interface=127.0.0.1,"
            f" ssl:10465:interface=127.0.0.1:privateKey={key}:certKey={cert},"
            f" unix:{self.directory}/smtpd.sock, tcp6:10025:interface=\\:\\:1\n",
            base_dir=self.directory,
        )
        self.reactor = BindingReactor()
        self.daemon = RelayagentService(self.config, self.reactor)
        self.addCleanup(self.daemon.smtp.close)
        self.daemon.listeners = daemon_listener_services(self.config, self.daemon, self.reactor)

    def bind(self) -> None:
        for listener in self.daemon.listeners:
            listener.service.privilegedStartService()


class SharedListenerTests(ListenerCase):
    """Worker 0 binds and names its descriptors; another worker adopts
    them with its own copy of the factory (implicit TLS too); a UNIX
    endpoint stays in worker 0."""

    def test_worker_zero_names_its_tcp_and_tls_sockets(self) -> None:
        self.assertEqual(self.daemon.listening_descriptors(), {})  # not bound yet
        self.bind()
        self.assertEqual(len(self.reactor.unixServers), 1)
        self.assertEqual(self.daemon.listening_descriptors(),
                         {0: (100, socket.AF_INET), 1: (101, socket.AF_INET), 3: (102, socket.AF_INET6)})
        self.reactor.ports[0].connected = False  # stopped listening
        self.assertNotIn(0, self.daemon.listening_descriptors())

    def test_another_worker_adopts_with_its_factory(self) -> None:
        # The worker's copy has bound nothing: it takes worker 0's sockets.
        handed = {}
        for number, family in ((0, socket.AF_INET), (1, socket.AF_INET), (3, socket.AF_INET6)):
            sock = socket.socket(family, socket.SOCK_STREAM)
            handed[number] = (os.dup(sock.fileno()), family)
            sock.close()
        self.daemon.listen_in_worker(handed)
        for fd, _ in handed.values():  # closed: the reactor keeps its own
            with self.assertRaises(OSError):
                os.fstat(fd)
        self.assertEqual(self.reactor.tcpServers, [])  # nothing bound
        self.assertEqual(self.reactor.sslServers, [])
        self.assertEqual(self.reactor.unixServers, [])
        adopted = self.reactor.adoptedPorts
        self.assertEqual([(fd, family) for fd, family, _ in adopted], list(handed.values()))
        plain, tls, plain6 = (factory for _, _, factory in adopted)
        self.assertIsInstance(plain, ListenerFactory)
        self.assertIs(plain6, plain)
        self.assertIsInstance(tls, TLSMemoryBIOFactory)
        self.assertIs(tls.wrappedFactory, plain)
        self.assertEqual(len(self.daemon._worker_listeners), 3)
        self.assertTrue(all(listener.service.running for listener in self.daemon._worker_listeners))

    def test_a_socket_that_cannot_be_taken_is_a_warning(self) -> None:
        fd = os.open(os.devnull, os.O_RDONLY)
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.daemon.listen_in_worker({2: (fd, socket.AF_UNIX), 9: (os.dup(fd), socket.AF_INET)})
        # Entry 3 (UNIX) is never handed over by worker 0; entry 10 does not exist.
        self.assertEqual(self.reactor.adoptedPorts, [])
        self.assertEqual(self.reactor.unixServers, [])
        self.assertEqual(self.daemon._worker_listeners, [])
        self.assertTrue(any("cannot listen on smtpd_endpoints entry 3" in str(event.get("text"))
                            for event in events))

    def test_the_listener_wakes_this_worker_alone(self) -> None:
        queue_manager = FakeQueueManager()
        self.daemon.queue_manager = queue_manager
        intake = self.daemon.listeners[0].service.factory.intake
        self.daemon.listener_queued()
        self.assertEqual(queue_manager.wakeups, [True])  # no intake_spool yet: as with one worker
        self.daemon.intake_spool = Spool(self.directory)
        # The listener hands its queue manager the id it queued.
        self.assertIsNone(intake.trigger)
        intake.on_queued("4F2A1B3C5D6E")
        self.assertEqual(queue_manager.wakeups, [True, ("4F2A1B3C5D6E", False)])


class FakePool:
    def __init__(self) -> None:
        self.started: list[tuple[int, dict]] = []

    def start(self, lock_fd: int, listening: dict) -> None:
        self.started.append((lock_fd, listening))


class WorkerZeroIdsTests(ListenerCase):
    """Worker 0's listener queues ids of partition 0 once it hands a
    socket to the others; with none to hand over, any id."""

    def start_workers(self) -> FakePool:
        pool = FakePool()
        self.daemon.pool = pool  # type: ignore[assignment]
        self.daemon._lock_fd = 5
        self.daemon.spool = Spool(self.directory + "/spool")
        self.daemon.spool.ensure_layout()
        self.daemon._start_workers()
        return pool

    def test_with_sockets_handed_over(self) -> None:
        self.bind()
        pool = self.start_workers()
        self.assertEqual(pool.started, [(5, self.daemon.listening_descriptors())])
        self.assertIsNotNone(self.daemon.intake_spool)
        ids = [self.daemon.intake_spool.enqueue("a@example.org", ["b@example.net"], b"\n") for _ in range(20)]
        self.assertEqual({partition_of(queue_id, 2) for queue_id in ids}, {0})

    def test_with_none(self) -> None:
        pool = self.start_workers()  # nothing bound: nothing to hand over
        self.assertEqual(pool.started, [(5, {})])
        self.assertIsNone(self.daemon.intake_spool)


class HandOverTests(SynchronousTestCase):
    """Worker 0's pool hands its listening sockets to the spawner after
    the lock, and takes the spawner's copies back at stop."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.pool = worker.WorkerPool(self.reactor, workers=2, on_wakeup=lambda: None)
        self.pool.prepare(lambda index, link, lock_fd, listening: 0, worker.Privileges(), fork=lambda: 4242)

    def commands(self, transport) -> list[str]:  # noqa: ANN001
        sent = transport.value().decode("ascii").splitlines()
        transport.clear()
        return sent

    def test_after_the_lock_each_with_its_line(self) -> None:
        self.pool.start(7, {3: (12, socket.AF_INET6), 0: (11, socket.AF_INET)})
        control = self.reactor.adopted[0][2]
        self.assertEqual(control.descriptors, [7, 11, 12])
        self.assertEqual(self.commands(control),
                         ["lock", f"listen 0 {int(socket.AF_INET)}", f"listen 3 {int(socket.AF_INET6)}", "start 1"])
        self.pool.spawner_said("started 1 1001")
        self.pool.stop()
        self.assertEqual(self.commands(control), ["unlisten"])

    def test_nothing_to_hand_over(self) -> None:
        self.pool.start(7, {})
        control = self.reactor.adopted[0][2]
        self.assertEqual(control.descriptors, [7])
        self.pool.stop()
        self.assertEqual(self.commands(control), ["lock", "start 1"])


class SpawnerListenTests(SynchronousTestCase):
    """The spawner keeps the listening sockets for every worker it forks
    and closes them at ``unlisten`` (in this process: no fork)."""

    def setUp(self) -> None:
        self.worker_zero, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.worker_zero.close)
        self.addCleanup(spawner_end.close)
        self.spawner = spawner.Spawner(spawner_end, {}, lambda index, link, lock_fd, listening: 0)

    def send(self, line: bytes, fd: int | None = None) -> None:
        if fd is None:
            self.worker_zero.sendall(line)
        else:
            socket.send_fds(self.worker_zero, [line], [fd])
        self.spawner.receive()

    def listening_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        return sock

    def test_kept_replaced_and_given_up(self) -> None:
        first, second, third = (self.listening_socket() for _ in range(3))
        self.send(b"listen 0 2\n", first.fileno())
        self.send(b"listen 1 2\n", second.fileno())
        kept = dict(self.spawner.listening)
        self.assertEqual(sorted(kept), [0, 1])
        for number, sock in ((0, first), (1, second)):
            fd, family = kept[number]
            self.assertEqual(family, socket.AF_INET)
            self.assertEqual(os.fstat(fd).st_ino, os.fstat(sock.fileno()).st_ino)
        # Entry 0 again: the descriptor it had is closed.
        self.send(b"listen 0 2\n", third.fileno())
        with self.assertRaises(OSError):
            os.fstat(kept[0][0])
        self.assertEqual(os.fstat(self.spawner.listening[0][0]).st_ino, os.fstat(third.fileno()).st_ino)
        held = [fd for fd, _ in self.spawner.listening.values()]
        self.send(b"unlisten\n")
        self.assertEqual(self.spawner.listening, {})
        for fd in held:
            with self.assertRaises(OSError):
                os.fstat(fd)

    def test_a_line_without_its_descriptor_is_dropped(self) -> None:
        self.send(b"listen 0 2\nlisten x 2\n")
        self.assertEqual(self.spawner.listening, {})
