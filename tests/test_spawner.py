"""Tests for relayagent.master.spawner and relayagent.master.child with real
forks of this process: the spawner's lines (lock, start, kill, ended,
failed), a restart being the same copy of memory, the signals it
ignores and the end of file that ends it; a fresh reactor after a fork;
and the hand-over itself: a worker forked by a spawner that dropped to
nobody uses the SASL password map and the TLS key worker 0 read as root,
files it cannot open itself (root only).

Every wait is bounded (socket timeouts, and a process's end waited for
on its pidfd, not polled for); every process forked here is ended and
reaped in cleanup.  No timing is asserted.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import secrets
import select
import signal
import socket
import tempfile
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relayagent.common.config import Config
from relayagent.master import child, spawner, worker
from relayagent.master.service import build_service
from relayagent.smtp.tls import TLSLevel, TLSPolicy
from tests.support.certs import CertificateAuthority

TIMEOUT = 20.0
NOBODY = 65534


class Lines:
    """Blocking line reads from a socket, with a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.buffer = b""

    def next(self) -> str:
        while b"\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("end of file")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode("ascii")


def wait_until_gone(pid: int, timeout: float = TIMEOUT) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to end (any process, not
    only a child of this one): its pidfd becomes readable when it does.
    True once it has ended (a zombie included), or if it is gone already."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], max(timeout, 0.0))
        return bool(readable)
    finally:
        os.close(pidfd)


def wait_for_exit(pid: int) -> int:
    """Reap ``pid`` (a child of this process), killed if it has not ended
    within ``TIMEOUT``; its waitpid status, -1 if reaped already."""
    if not wait_until_gone(pid):
        os.kill(pid, signal.SIGKILL)
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:  # reaped already
        return -1


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


class SpawnerCase(SynchronousTestCase):
    def fork_spawner(self, run_worker, privileges: worker.Privileges | None = None,  # noqa: ANN001
                     indices: tuple[int, ...] = (1, 2)) -> None:
        self.addCleanup(gc.unfreeze)  # fork_spawner froze this process's objects
        pid, control, links = spawner.fork_spawner(indices, run_worker, privileges or worker.Privileges())
        self.spawner_pid = pid
        self.control = control
        self.replies = Lines(control)
        self.links = links
        self.link_lines = {index: Lines(link) for index, link in links.items()}
        self.workers: list[int] = []

        def cleanup() -> None:
            for worker_pid in self.workers:
                # A worker may end between the look and the kill.
                if not process_gone(worker_pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker_pid, signal.SIGKILL)
            for sock in (control, *links.values()):
                sock.close()
            wait_for_exit(pid)
            deadline = time.monotonic() + TIMEOUT
            for worker_pid in self.workers:
                wait_until_gone(worker_pid, deadline - time.monotonic())

        self.addCleanup(cleanup)

    def hand_lock(self) -> os.stat_result:
        handle = tempfile.TemporaryFile()
        self.addCleanup(handle.close)
        socket.send_fds(self.control, [b"lock\n"], [handle.fileno()])
        return os.fstat(handle.fileno())

    def start(self, index: int) -> int:
        self.control.sendall(f"start {index}\n".encode())
        reply = self.replies.next().split()
        self.assertEqual(reply[:2], ["started", str(index)])
        pid = int(reply[2])
        self.workers.append(pid)
        return pid


def echo_worker(marker: str):  # noqa: ANN201
    """A worker that says who it is and what it holds, then does what its
    link says: ``exit N``; ``sleep``: wait for a signal or the end of the
    link (a worker to kill); or end of file (exit 0)."""

    def run(index: int, link: socket.socket, lock_fd: int, listening: dict) -> int:
        lock = os.fstat(lock_fd)
        link.sendall(f"hello {index} {os.getpid()} {os.getppid()} {lock.st_ino} {marker}\n".encode())
        command = link.recv(100).decode()
        if command.startswith("exit "):
            return int(command.split()[1])
        if command.startswith("sleep"):
            link.recv(100)  # blocks until killed, or the link's end in cleanup
        return 0

    return run


class SpawnerTests(SpawnerCase):
    def setUp(self) -> None:
        # In this process's memory before the fork: every worker has it.
        self.marker = secrets.token_hex(8)
        self.fork_spawner(echo_worker(self.marker))

    def test_start_hand_over_and_exit_status(self) -> None:
        lock = self.hand_lock()
        pid = self.start(1)
        words = self.link_lines[1].next().split()
        self.assertEqual(words, ["hello", "1", str(pid), str(self.spawner_pid), str(lock.st_ino), self.marker])
        self.links[1].sendall(b"exit 3\n")
        self.assertEqual(self.replies.next(), f"ended 1 {pid} {3 << 8}")

    def test_a_restart_is_a_new_fork_of_the_same_memory(self) -> None:
        self.hand_lock()
        first = self.start(1)
        self.link_lines[1].next()
        self.links[1].sendall(b"exit 0\n")
        self.assertEqual(self.replies.next(), f"ended 1 {first} 0")
        second = self.start(1)
        self.assertNotEqual(first, second)
        self.assertTrue(self.link_lines[1].next().endswith(self.marker))
        self.links[1].sendall(b"exit 0\n")
        self.assertEqual(self.replies.next(), f"ended 1 {second} 0")

    def test_two_workers_each_on_its_own_link(self) -> None:
        self.hand_lock()
        one, two = self.start(1), self.start(2)
        self.assertEqual(self.link_lines[1].next().split()[2], str(one))
        self.assertEqual(self.link_lines[2].next().split()[2], str(two))
        self.links[2].sendall(b"exit 2\n")
        self.assertEqual(self.replies.next(), f"ended 2 {two} {2 << 8}")
        self.links[1].sendall(b"exit 1\n")
        self.assertEqual(self.replies.next(), f"ended 1 {one} {1 << 8}")

    def test_kill(self) -> None:
        self.hand_lock()
        pid = self.start(2)
        self.link_lines[2].next()
        self.links[2].sendall(b"sleep\n")
        self.control.sendall(b"kill 2\n")
        self.assertEqual(self.replies.next(), f"ended 2 {pid} {signal.SIGKILL}")

    def test_refusals(self) -> None:
        self.control.sendall(b"start 1\n")
        self.assertEqual(self.replies.next(), "failed 1 no lock descriptor")
        self.hand_lock()
        self.control.sendall(b"start 7\n")
        self.assertEqual(self.replies.next(), "failed 7 no such worker")
        self.start(1)
        self.control.sendall(b"start 1\nwhatever\n")
        self.assertEqual(self.replies.next(), "failed 1 already running")

    def test_signals_are_ignored_and_end_of_file_ends_it(self) -> None:
        self.hand_lock()
        os.kill(self.spawner_pid, signal.SIGTERM)
        os.kill(self.spawner_pid, signal.SIGINT)
        pid = self.start(1)
        self.link_lines[1].next()
        self.control.close()
        self.assertEqual(wait_for_exit(self.spawner_pid), 0)
        # The worker does not go with it: it stops at the end of its link.
        self.assertFalse(process_gone(pid))
        self.links[1].close()
        self.assertTrue(wait_until_gone(pid))
        self.assertTrue(process_gone(pid))


def accepting_worker(index: int, link: socket.socket, lock_fd: int, listening: dict) -> int:
    """A worker that accepts one connection on each listening socket it was
    handed and greets it with its pid, then says so on its link."""
    for number, (fd, family) in sorted(listening.items()):
        with socket.socket(family, socket.SOCK_STREAM, fileno=fd) as listener:
            listener.settimeout(TIMEOUT)
            connection, _ = listener.accept()
            with connection:
                connection.sendall(f"{os.getpid()}\n".encode())
        link.sendall(f"accepted {number}\n".encode())
    link.sendall(b"done\n")
    link.recv(100)
    return 0


class SpawnerListeningTests(SpawnerCase):
    """Every worker forked, a restarted one too, accepts on the listening
    socket worker 0 handed to the spawner; after ``unlisten`` none is
    handed on."""

    def setUp(self) -> None:
        self.fork_spawner(accepting_worker, indices=(1,))
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.listener.close)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.hand_lock()
        socket.send_fds(self.control, [f"listen 0 {int(socket.AF_INET)}\n".encode()], [self.listener.fileno()])

    def greeting(self) -> int:
        with socket.create_connection(self.listener.getsockname(), timeout=TIMEOUT) as client:
            return int(Lines(client).next())

    def test_each_fork_accepts_on_the_socket(self) -> None:
        for _ in range(2):  # the first worker, then a restart
            pid = self.start(1)
            self.assertEqual(self.greeting(), pid)
            self.assertEqual(self.link_lines[1].next(), "accepted 0")
            self.assertEqual(self.link_lines[1].next(), "done")
            self.links[1].sendall(b"exit\n")
            self.assertEqual(self.replies.next(), f"ended 1 {pid} 0")
        self.control.sendall(b"unlisten\n")
        pid = self.start(1)
        self.assertEqual(self.link_lines[1].next(), "done")  # nothing to accept on
        self.links[1].sendall(b"exit\n")
        self.assertEqual(self.replies.next(), f"ended 1 {pid} 0")


class FreshReactorTests(SynchronousTestCase):
    def check_fork(self, reactor) -> None:  # noqa: ANN001
        """In a fork, after fresh_reactor: a timer fires and a socket is
        read on the reactor; here, nothing changed."""
        readers = set(reactor.getReaders())
        report_read, report_write = os.pipe()
        here, there = socket.socketpair()
        self.addCleanup(here.close)
        self.addCleanup(there.close)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(report_read)
                child.fresh_reactor(reactor)
                from twisted.internet.protocol import Factory, Protocol

                seen: list[object] = []

                def saw(what: object) -> None:
                    seen.append(what)
                    if len(seen) == 2:
                        reactor.stop()

                class Reader(Protocol):
                    def dataReceived(self, data: bytes) -> None:
                        saw(data)

                factory = Factory()
                factory.buildProtocol = lambda addr: Reader()
                reactor.callLater(0, saw, "timer")
                reactor.adoptStreamConnection(there.fileno(), socket.AF_UNIX, factory)
                reactor.callLater(TIMEOUT, reactor.stop)
                reactor.run(installSignalHandlers=False)
                status = 0 if sorted(map(str, seen)) == ["b'ping'", "timer"] else 2
                os.write(report_write, repr(sorted(map(str, seen))).encode())
            finally:
                os._exit(status)
        os.close(report_write)
        here.sendall(b"ping")
        with os.fdopen(report_read, "rb") as report:
            self.assertEqual(report.read(), repr(["b'ping'", "timer"]).encode())
        self.assertEqual(wait_for_exit(pid), 0)
        self.assertEqual(set(reactor.getReaders()), readers)  # this process's is untouched

    def test_epoll(self) -> None:
        from twisted.internet import reactor  # the installed one, not running here

        self.check_fork(reactor)

    def test_poll(self) -> None:
        from twisted.internet.pollreactor import PollReactor

        self.check_fork(PollReactor())

    def test_asyncio(self) -> None:
        import asyncio

        from twisted.internet.asyncioreactor import AsyncioSelectorReactor

        loop = asyncio.new_event_loop()
        self.addCleanup(loop.close)
        self.check_fork(AsyncioSelectorReactor(loop))

    def test_building_the_service_leaves_nothing_on_the_reactor(self) -> None:
        # What fresh_reactor drops (timers, readers, triggers) must be
        # nothing the service needs: build_service adds none.
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        directory = self.mktemp()
        config = Config.from_text(f"queue_directory = {directory}\nrelayagent_workers = 2\n")
        service = build_service(config, reactor)
        self.addCleanup(service.smtp.close)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertEqual(reactor.getReaders() + reactor.getWriters(), [])
        self.assertEqual((reactor.triggers, reactor.whenRunningHooks), ({}, []))


class HandOverTests(SpawnerCase):
    """What worker 0 read as root is the worker's, after the spawner
    dropped to nobody: the files themselves it cannot open."""

    def setUp(self) -> None:
        if os.getuid() != 0:
            raise SkipTest("dropping privileges needs root")
        self.directory = tempfile.mkdtemp(prefix="ra-handover-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, True))
        os.chmod(self.directory, 0o755)
        self.password = secrets.token_urlsafe(12)
        self.passwords = os.path.join(self.directory, "sasl_passwd")
        with open(self.passwords, "w") as handle:
            handle.write(f"[127.0.0.1]:2525 alice:{self.password}\n")
        ca = CertificateAuthority()
        _, self.key_path = ca.issue(["client.example"], client=True).write(self.directory, stem="client")
        for path in (self.passwords, self.key_path):
            os.chown(path, 0, 0)
            os.chmod(path, 0o600)

    def test_the_worker_uses_what_was_read_as_root(self) -> None:
        config = Config.from_text(
            f"queue_directory = {self.directory}/spool\n"
            "relayagent_workers = 2\n"
            "smtp_sasl_auth_enable = yes\n"
            "smtp_sasl_password_maps = texthash:sasl_passwd\n"
            "smtp_tls_cert_file = client.crt\n"
            "smtp_tls_key_file = client.key\n",
            base_dir=self.directory,
        )
        from twisted.internet import reactor

        service = build_service(config, reactor)  # as root, as makeService does
        self.addCleanup(service.smtp.close)
        files = (self.passwords, self.key_path)
        password = self.password

        def run(index: int, link: socket.socket, lock_fd: int, listening: dict) -> int:
            report: dict[str, object] = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
            report["unreadable"] = []
            for path in files:
                try:
                    open(path, "rb").close()
                except PermissionError:
                    report["unreadable"].append(path)  # type: ignore[union-attr]
            found = service.security.sasl.passwords.credentials_for("127.0.0.1", "[127.0.0.1]:2525")
            report["user"] = found.username
            report["password matches"] = found.password == password
            # A context built now, after the drop, for a policy's own ciphers.
            policy = TLSPolicy(TLSLevel.ENCRYPT, ciphers="high", source="test")
            from OpenSSL import SSL

            connection = SSL.Connection(service.security.tls.context_for(policy), None)
            # (.CN would import the charmap codec, which nobody cannot read
            # where Python lives under /root.)
            report["certificate"] = connection.get_certificate().to_cryptography().subject.rfc4514_string()
            link.sendall(json.dumps(report).encode() + b"\n")
            return 0

        self.fork_spawner(run, worker.Privileges(NOBODY, NOBODY), indices=(1,))
        self.hand_lock()
        self.start(1)
        report = json.loads(self.link_lines[1].next())
        self.assertEqual(report["uid"], NOBODY)
        self.assertEqual(report["gid"], NOBODY)
        self.assertNotIn(0, report["groups"])
        self.assertEqual(sorted(report["unreadable"]), sorted(files))
        self.assertEqual(report["user"], "alice")
        self.assertTrue(report["password matches"])
        self.assertEqual(report["certificate"], "CN=client.example")
        self.assertEqual(uid_of(self.spawner_pid), NOBODY)
        self.assertEqual(os.getuid(), 0)  # this process (worker 0) is still root

    def test_a_spawner_that_cannot_drop_says_so(self) -> None:
        def unused(index: int, link: socket.socket, lock_fd: int, listening: dict) -> int:
            return 0

        # A user no passwd entry names (its gid is looked up).
        self.fork_spawner(unused, worker.Privileges(4_000_000_000 - 7, None), indices=(1,))
        self.assertTrue(self.replies.next().startswith("fatal cannot drop privileges: "))
        self.assertEqual(os.WEXITSTATUS(wait_for_exit(self.spawner_pid)), 1)
