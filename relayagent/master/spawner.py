"""
The worker spawner: the small process that forks the workers of a
daemon with ``relayagent_workers`` > 1 and reports their ends (Postfix:
master(8), which starts smtp(8) and qmgr(8) and starts them again when
they exit; but this one is not root).

Worker 0 (the twistd process) forks it in ``privilegedStartService``
(``fork_spawner``): after twistd's ``--chroot``, before its
``--uid``/``--gid``, with everything that needed root or the world
outside the chroot already in memory (``service.build_service`` ran in
``makeService``).  The spawner drops to twistd's user and group at once
(``worker.Privileges``), points Twisted's log at its standard error
(twistd's log file is worker 0's alone), and then only forks: each
worker is a copy of that memory, so it needs neither root, nor a file
outside the chroot, nor a Python interpreter inside it.  Nothing it
holds is ever read again, serialised or written anywhere.

Its input is lines on a UNIX socket from worker 0, its output lines back::

    lock                  with a descriptor (SCM_RIGHTS): the locked
                          master.lock, for the workers to hold
    listen I FAMILY       with a descriptor: the listening socket of
                          smtpd_endpoints entry I (address family
                          FAMILY), for every worker to accept on
    unlisten              close those (the daemon stops: no worker will
                          be started again, and a socket no process
                          accepts on must not take connections)
    start K               fork worker K  -> started K PID | failed K REASON
    kill K                SIGKILL to worker K (it did not stop in time)
                          -> ended K PID STATUS, whenever a worker exits
                             (STATUS: the waitpid status)
                          -> fatal REASON, when it cannot run (it exits)

End of file on the socket (worker 0 stopped, or died) ends the spawner
at once; the workers see end of file on their own links and stop by
themselves.  Every worker it forks inherits the lock and the listening
sockets it holds (``run_worker(index, link, lock_fd, listening)``, with
``listening`` {I: (descriptor, family)}: ``relayagent.master.child``
listens on them).  It ignores SIGINT and SIGTERM: ^C on a terminal or a
service manager's stop reaches worker 0 and the workers, which stop in
order, and the spawner goes with worker 0.  It and the workers ignore
SIGUSR1 and SIGHUP (worker 0's signals to reopen the logs and to
reload, which it passes on over the links: ``relayagent.master.reload``).  A worker
starts with the default SIGINT, SIGTERM and SIGCHLD handling (its
reactor installs its own).

SYNOPSIS

    pid, control, links = fork_spawner(indices, run_worker, privileges)
    Spawner(control, links, run_worker).serve() -> exit status
    run_worker(index, link, lock_fd, listening) -> exit status  # in the worker
    log_to_stderr()

DIAGNOSTICS: a fork that fails is ``failed K fork: REASON``; a privilege
drop that fails is ``fatal cannot drop privileges: REASON`` and exit
status 1; an exception in a worker is a traceback on its standard
error and exit status 70 (EX_SOFTWARE).

Owns no parameters.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn, Protocol

from twisted.logger import Logger, globalLogPublisher, textFileLogObserver

log = Logger(namespace="relayagent.master.spawner")

EX_SOFTWARE = 70
# The longest line on the spawner's socket or a worker's link.
MAX_LINE = 1024
# The most descriptors taken from one read ("lock" and each "listen"
# bring one; each comes with an octet of its own).
_MAX_FDS = 64
# What a worker is handed: smtpd_endpoints index -> (descriptor, family).
Listening = dict[int, tuple[int, int]]


class Dropper(Protocol):
    """What the spawner drops to (``worker.Privileges``)."""

    def drop(self) -> None:
        """Give up root for the configured user and group (``--uid``/``--gid``)
        in the process that calls it, for good."""


class _WorkerZeroGone(Exception):
    """Worker 0 closed the socket (or died)."""


def _flush_stdio() -> None:
    # Buffered output written once, not once per process after a fork.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def log_to_stderr(observer: Any = None) -> None:
    """This process's Twisted events to ``observer`` (default: a text
    observer on its standard error), and no longer to the observers it
    inherited: twistd's log file is written, and rotated, by worker 0
    alone."""
    # LogPublisher has no public "remove all"; its list is read, not changed.
    for inherited in list(getattr(globalLogPublisher, "_observers", ())):
        globalLogPublisher.removeObserver(inherited)
    # twistd points sys.stdout and sys.stderr at the log; back to the files.
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    if observer is None and sys.__stderr__ is not None:
        observer = textFileLogObserver(sys.__stderr__)
    if observer is not None:
        globalLogPublisher.addObserver(observer)


def fork_spawner(
    indices: Iterable[int],
    run_worker: Callable[[int, socket.socket, int, Listening], int],
    privileges: Dropper,
    *,
    fork: Callable[[], int] = os.fork,
) -> tuple[int, socket.socket, dict[int, socket.socket]]:
    """Worker 0's side: the spawner's socket and one link per worker,
    then the fork.  Returns the spawner's pid, worker 0's end of its
    socket and worker 0's ends of the links.  The spawner's side never
    returns (``os._exit``)."""
    if threading.active_count() > 1:
        # Only the forking thread goes on in the fork: a lock another
        # thread held stays locked there.  twistd has started none yet.
        log.warn("forking the worker spawner with {count} threads running", count=threading.active_count())
    control, spawner_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pairs = {index: socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for index in indices}
    _flush_stdio()
    # What is in memory now is the workers' too: keep the cyclic
    # collector's hands off it, so that its pages stay shared.
    gc.collect()
    gc.freeze()
    # Blocked across the fork, so that the spawner has ignored them
    # before one can reach it (worker 0 gets its own when it unblocks).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        pid = fork()
        if pid == 0:
            _spawner_process(spawner_end, control, {index: pair[1] for index, pair in pairs.items()},
                             [pair[0] for pair in pairs.values()], run_worker, privileges, mask)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    spawner_end.close()
    for _, worker_end in pairs.values():
        worker_end.close()
    return pid, control, {index: pair[0] for index, pair in pairs.items()}


def _spawner_process(control: socket.socket, worker_zero_end: socket.socket,
                     links: dict[int, socket.socket], worker_zero_links: list[socket.socket],
                     run_worker: Callable[[int, socket.socket, int, Listening], int], privileges: Dropper,
                     mask: Iterable[int]) -> NoReturn:
    status = EX_SOFTWARE
    try:
        # Ignored from the start: worker 0's ^C must not end it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Worker 0 rotates twistd's log file on SIGUSR1 (master.tap); in
        # the spawner and the workers that handler would rotate it too.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        # SIGHUP is worker 0's to reload; it tells the workers.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        worker_zero_end.close()
        for sock in worker_zero_links:
            sock.close()
        log_to_stderr()
        try:
            privileges.drop()
        except (OSError, KeyError) as exc:
            control.sendall(f"fatal cannot drop privileges: {exc}\n".encode("ascii", "replace"))
            status = 1
        else:
            status = Spawner(control, links, run_worker).serve()
    except BaseException:  # noqa: BLE001 - said on stderr, then the exit status tells
        traceback.print_exc()
    finally:
        _flush_stdio()
        os._exit(status)


class Spawner:
    """The spawner's loop: commands from worker 0, forks, reaps, reports."""

    def __init__(self, control: socket.socket, links: Mapping[int, socket.socket],
                 run_worker: Callable[[int, socket.socket, int, Listening], int]) -> None:
        self.control = control
        self.links = dict(links)
        self.run_worker = run_worker
        self.lock_fd: int | None = None
        # The listening sockets, for every worker (lines "listen").
        self.listening: Listening = {}
        self.children: dict[int, int] = {}  # pid -> index
        self._buffer = b""
        self._fds: list[int] = []
        self._wakeup: tuple[int, int] | None = None

    def serve(self) -> int:
        """Until end of file from worker 0; the exit status (0)."""
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        self._wakeup = (wake_read, wake_write)
        # SIGCHLD wakes select through the pipe (a handler is needed for
        # the wakeup descriptor to be written).
        signal.signal(signal.SIGCHLD, lambda number, frame: None)
        signal.set_wakeup_fd(wake_write)
        self.control.setblocking(True)
        try:
            while True:
                self.reap()
                readable, _, _ = select.select([self.control, wake_read], [], [])
                if wake_read in readable:
                    while True:
                        try:
                            if not os.read(wake_read, 512):
                                break
                        except BlockingIOError:
                            break
                if self.control in readable:
                    self.receive()
        except _WorkerZeroGone:
            return 0

    def receive(self) -> None:
        """Read from worker 0's socket and carry out each whole line: ``lock``
        (with the spool lock's descriptor), ``listen I FAMILY`` (with a
        listening socket), ``unlisten``, ``start N``, ``kill N``; other
        lines and descriptors nothing asked for are dropped.  Raises
        _WorkerZeroGone when the socket is closed or fails."""
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 4096, _MAX_FDS)
        except OSError:
            raise _WorkerZeroGone() from None
        # A descriptor comes with the first octet of its line, which may
        # end in a later read.
        self._fds.extend(fds)
        if not data:
            raise _WorkerZeroGone()
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
        for line in lines:
            words = line.decode("ascii", "replace").split()
            if words == ["lock"] and self._fds:
                if self.lock_fd is not None:
                    os.close(self.lock_fd)
                self.lock_fd = self._fds.pop(0)
            elif (len(words) == 3 and words[0] == "listen" and words[1].isdigit() and words[2].isdigit()
                  and self._fds):
                previous = self.listening.get(int(words[1]))
                if previous is not None:
                    os.close(previous[0])
                self.listening[int(words[1])] = (self._fds.pop(0), int(words[2]))
            elif words == ["unlisten"]:
                for fd, _ in self.listening.values():
                    os.close(fd)
                self.listening = {}
            elif len(words) == 2 and words[0] in ("start", "kill") and words[1].isdigit():
                (self.start if words[0] == "start" else self.kill)(int(words[1]))
        if not self._buffer:
            while self._fds:  # nothing asked for them
                os.close(self._fds.pop())

    def say(self, text: str) -> None:
        """Send one line to worker 0; raises _WorkerZeroGone when it cannot be
        sent."""
        try:
            self.control.sendall(text.encode("ascii", "replace") + b"\n")
        except OSError:
            raise _WorkerZeroGone() from None

    def start(self, index: int) -> None:
        """Fork worker ``index`` and report ``started INDEX PID``, or ``failed
        INDEX REASON`` when there is no such worker, it already runs, the
        spool lock's descriptor has not come, or the fork fails."""
        if index not in self.links:
            self.say(f"failed {index} no such worker")
            return
        if index in self.children.values():
            self.say(f"failed {index} already running")
            return
        if self.lock_fd is None:
            self.say(f"failed {index} no lock descriptor")
            return
        _flush_stdio()
        try:
            pid = os.fork()
        except OSError as exc:
            self.say(f"failed {index} fork: {exc.strerror}")
            return
        if pid == 0:
            self._worker_process(index)
        self.children[pid] = index
        self.say(f"started {index} {pid}")

    def kill(self, index: int) -> None:
        """Send SIGKILL to the running process of worker ``index``, if there is
        one; its end is reported by ``reap``."""
        for pid, owner in self.children.items():
            if owner == index:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def reap(self) -> None:
        """Collect every child that has ended, without waiting, and tell worker
        0 ``ended INDEX PID STATUS`` for each."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            if index is not None:
                self.say(f"ended {index} {pid} {status}")

    def _worker_process(self, index: int) -> NoReturn:
        status = EX_SOFTWARE
        try:
            signal.set_wakeup_fd(-1)
            if self._wakeup is not None:
                for fd in self._wakeup:
                    os.close(fd)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            link = self.links.pop(index)
            self.control.close()
            for other in self.links.values():
                other.close()
            assert self.lock_fd is not None
            status = self.run_worker(index, link, self.lock_fd, dict(self.listening))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else EX_SOFTWARE
        except BaseException:  # noqa: BLE001 - said on stderr, then the exit status tells
            traceback.print_exc()
        finally:
            _flush_stdio()
            os._exit(status)

