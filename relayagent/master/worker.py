"""
Several worker processes sharing one spool (``relayagent_workers``;
Postfix: master(8) running several qmgr-and-smtp pairs is the nearest
thing, though Postfix has one qmgr and many smtp processes).

One process spends most of its time in Python on small messages; with
``relayagent_workers = N`` the daemon runs N processes, each a whole
queue manager and delivery agent, each on its own core:

- **Partition.**  Worker k of N owns the queue files whose id maps to k
  (``spool.queueid.partition_of``: CRC-32 of the id, modulo N).  It takes
  only those from ``incoming/`` and ``deferred/`` and recovers only
  those from ``active/`` at start (``QueueManager(owns=...)``), so no
  two processes ever claim the same file, with no talk between them.
  ``mailq``, ``postsuper`` and the other commands still see everything.
- **Processes.**  The twistd process is worker 0: it keeps the maillog,
  the trigger socket, the listener (``smtpd_endpoints``) and the spool
  lock (``control.lock_spool``).  After the privilege drop it starts
  workers 1..N-1 (``WorkerPool``) as ``python -m relayagent.master.child -c
  MAIN.CF --index k --workers N --lock-fd F [--log-fd L]``; each builds
  the same delivery stack (``service.build_service`` with a
  ``WorkerRole``) without trigger socket or listener.
- **Lock.**  The parent's locked descriptor of ``master.lock`` is passed
  to each child at the same number: an ``flock`` belongs to the open
  file description, so the spool stays locked while any worker of this
  run lives, and a new daemon cannot start (and recover ``active/``)
  beside an orphaned worker.  A child refuses to run unless the
  descriptor it is given is ``master.lock`` and is locked by it.
- **Parent gone, child stops.**  A child's standard input is a pipe from
  the parent; end of file on it (the parent stopped, or died, even by
  SIGKILL) stops the child the way twistd stops: no new work, the
  transactions in flight finish, the active files stay for the next
  start, exit.  The parent closes the pipes at stop and waits for the
  children (``STOP_TIMEOUT``, then SIGKILL) before it lets go of the lock.
- **Triggers.**  Lines on the pipes.  Parent to child: ``wakeup`` (new
  mail in ``incoming/``) and ``flush``, whenever worker 0's queue
  manager hears them from outside.  Child to parent (its standard
  output): ``wakeup`` when it queued a notice (a bounce), which the
  parent passes on to every worker, itself included.  The lines of one
  reactor turn are sent once.  A child's standard error is the parent's.
- **Logs.**  A child writes its mail log lines to the parent's
  ``maillog_file`` descriptor (opened before the privilege drop), in
  whole lines, one ``write`` per flush on an ``O_APPEND`` descriptor
  (``service.LineAppender``): lines of two processes never mix.  Each
  process names its own pid (``relayagent/smtp[pid]``).
- **Limits.**  Each worker gets ceil(limit / N), at least 1, of the
  queue manager's limits (``split_limits``), so the whole daemon keeps
  Postfix's meaning of them; ``smtp_destination_rate_delay`` is
  multiplied by N so that the sum of the workers keeps the rate.
- **Restart.**  A child that exits while the parent runs is logged
  (``warning: process ... pid N exit status S``) and started again after
  ``RESTART_DELAY`` seconds, as master(8) throttles a failing service.

Not under ``--chroot`` (``refuse_chroot``): a Python interpreter cannot
be started inside a chroot that does not hold one.  The children start
as the unprivileged user, so main.cf and the tables it names must be
readable by that user.

SYNOPSIS

    pool = WorkerPool(...); pool.start(); pool.send(WAKEUP); pool.stop() -> Deferred
    partition_filter(index, workers) -> owns(queue_id) | None
    split_limits(config, workers) -> Config;  refuse_chroot(config, chroot)
    check_lock(lock_fd, queue_directory);  WorkerRole, ParentLink, WorkerRuntime
    (a child's entry point is ``relayagent.master.child``)

DIAGNOSTICS: ``WorkerError`` (one line) for ``--chroot`` with more than one
worker and for a lock descriptor that is not this spool's locked
``master.lock``; a child that exits is one warning line (``exit status
N`` or ``killed by signal N``) and is started again after RESTART_DELAY.

Owns: relayagent_workers.
"""

from __future__ import annotations

import fcntl
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from relayagent.common import maillog as ralog
from relayagent.common.config import Config, Settings
from relayagent.spool.queueid import partition_of

log = Logger(namespace="relayagent.master.worker")

# Seconds before a child that exited is started again (master(8)'s
# throttle is 60s for a failing service; a worker is the queue itself).
RESTART_DELAY = 10.0
# Seconds the parent waits for its children at stop before SIGKILL (what
# is in flight then is delivered again by the next start: at least once).
STOP_TIMEOUT = 30.0
# The commands on the pipes.
WAKEUP = "wakeup"
FLUSH = "flush"
COMMANDS = (WAKEUP, FLUSH)
# The queue manager's per-process limits that are shared out among the
# workers (see split_limits).
SPLIT_LIMITS = (
    "qmgr_message_active_limit",
    "qmgr_message_recipient_limit",
    "default_process_limit",
    "smtp_destination_concurrency_limit",
    "smtp_initial_destination_concurrency",
)


@dataclass(frozen=True, slots=True)
class SharedLimits(Settings):
    """How many workers, and the limits they share out."""

    relayagent_workers: int
    qmgr_message_active_limit: int
    qmgr_message_recipient_limit: int
    default_process_limit: int
    smtp_destination_concurrency_limit: int
    smtp_initial_destination_concurrency: int
    smtp_destination_rate_delay: float
# Where the relayagent package is: the children find it on PYTHONPATH.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EX_USAGE = 64
EX_SOFTWARE = 70
EX_CONFIG = 78


class WorkerError(Exception):
    """A worker cannot run as asked (one line for the user)."""


@dataclass
class WorkerRole:
    """What makes a process a child worker: its index (1 .. workers-1),
    the number of workers, the passed lock descriptor and maillog
    descriptor (None: no maillog_file)."""

    index: int
    workers: int
    lock_fd: int
    log_fd: int | None = None


def partition_filter(index: int, workers: int) -> Callable[[str], bool] | None:
    """``owns(queue_id)`` for worker ``index`` of ``workers``; None when
    there is one worker (the queue manager then calls nothing per file)."""
    if workers <= 1:
        return None

    def owns(queue_id: str) -> bool:
        return partition_of(queue_id, workers) == index

    return owns


def split_limits(config: Config, workers: int) -> Config:
    """The configuration of one of ``workers`` workers: each of
    ``SPLIT_LIMITS`` becomes ceil(limit / workers), at least 1, and a
    non-zero ``smtp_destination_rate_delay`` is multiplied by
    ``workers``.  One worker: ``config`` itself."""
    if workers <= 1:
        return config
    limits = SharedLimits.from_config(config)
    overrides: dict[str, Any] = {
        name: max(1, math.ceil(getattr(limits, name) / workers)) for name in SPLIT_LIMITS
    }
    rate_delay = limits.smtp_destination_rate_delay
    if rate_delay > 0:
        overrides["smtp_destination_rate_delay"] = f"{rate_delay * workers:g}s"
    return config.replace(**overrides)


def refuse_chroot(config: Config, chroot: str | None) -> None:
    """Raise ``WorkerError`` for ``relayagent_workers`` > 1 under
    twistd ``--chroot``."""
    workers = SharedLimits.from_config(config).relayagent_workers
    if chroot and workers > 1:
        raise WorkerError(
            f"relayagent_workers = {workers} is not supported with "
            "twistd --chroot (workers are new Python processes); set relayagent_workers = 1"
        )


def check_lock(lock_fd: int, queue_directory: str) -> None:
    """The passed descriptor must be ``$queue_directory/master.lock``,
    exclusively locked through it (the parent's open file description:
    locking again through it succeeds at once; a descriptor of another
    file, or a spool that another daemon holds, is refused)."""
    from relayagent.spool import control

    path = os.path.join(queue_directory, control.LOCK_NAME)
    try:
        held = os.fstat(lock_fd)
        named = os.stat(path)
    except OSError as exc:
        raise WorkerError(f"no lock descriptor {lock_fd} for {path}: {exc.strerror}") from None
    if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
        raise WorkerError(f"descriptor {lock_fd} is not {path}")
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WorkerError(f"{path} is locked by another relayagent daemon") from None
    except OSError as exc:
        raise WorkerError(f"cannot lock {path}: {exc.strerror}") from None


class _LineSender:
    """Commands written as lines, each at most once per reactor turn."""

    def __init__(self, clock: Any, write: Callable[[bytes], None]) -> None:
        self._clock = clock
        self._write = write
        self._pending: list[str] = []
        self._call: Any = None

    def send(self, command: str) -> None:
        if command not in self._pending:
            self._pending.append(command)
        if self._call is None:
            self._call = self._clock.callLater(0, self._send_pending)

    def _send_pending(self) -> None:
        self._call = None
        pending, self._pending = self._pending, []
        if pending:
            self._write("".join(command + "\n" for command in pending).encode("ascii"))

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._pending = []


# ---------------------------------------------------------------------------
# The child's side


class ParentLink(LineOnlyReceiver):
    """A child's standard input and output: the parent's commands in,
    ``wakeup`` out; ``on_gone`` when the parent closes the pipe or dies."""

    delimiter = b"\n"
    MAX_LENGTH = 1024

    def __init__(self, queue_manager: Callable[[], Any], clock: Any,
                 on_gone: Callable[[], object]) -> None:
        # queue_manager: a callable, since the service makes it at start.
        self._queue_manager = queue_manager
        self._on_gone = on_gone
        self._sender = _LineSender(clock, self._write)
        self.gone = False

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.gone:
            self.transport.write(data)

    def send(self, command: str) -> None:
        """Tell the parent (``wakeup``: this worker queued mail)."""
        if not self.gone:
            self._sender.send(command)

    def lineReceived(self, line: bytes) -> None:
        command = line.strip().decode("ascii", "replace")
        queue_manager = self._queue_manager()
        if command not in COMMANDS:
            ralog.log_warning(log, f"unknown command from the parent process: {command!r}")
            return
        if queue_manager is None:
            return  # not started yet; the start looks at the queues anyway
        if command == WAKEUP:
            queue_manager.wakeup()
        else:
            log.info("flush requested: retrying the deferred queue")
            queue_manager.flush()

    def lineLengthExceeded(self, line: bytes) -> None:
        ralog.log_warning(log, "overlong line from the parent process ignored")

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.gone:
            return
        self.gone = True
        self._sender.cancel()
        self._on_gone()


class WorkerRuntime:
    """Stops a child once, whatever asks first: end of file from the
    parent, or SIGTERM/SIGINT (the reactor's shutdown)."""

    def __init__(self, service: Any, reactor: Any) -> None:
        self.service = service
        self.reactor = reactor
        self._stopping: Deferred[Any] | None = None

    def stop_service(self) -> Deferred[Any]:
        """The service's stop, once (a ``before shutdown`` trigger)."""
        if self._stopping is None:
            if getattr(self.service, "running", False):
                self._stopping = self.service.stopService()
            else:
                self._stopping = succeed(None)
        return self._stopping

    def parent_gone(self) -> None:
        """End of file on standard input: stop, as on SIGTERM."""
        log.info("the parent process is gone: stopping")
        if self.reactor.running:
            self.reactor.stop()  # runs stop_service first (a shutdown trigger)
        else:
            self.stop_service()


# ---------------------------------------------------------------------------
# The parent's side


class _ChildProtocol(ProcessProtocol):
    """One child seen from the parent: its standard output's lines, its end."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self._buffer = b""
        self.ended: Deferred[None] = Deferred()
        self.sender: _LineSender | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.sender = _LineSender(self.pool.clock, self._write)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and self.pid is not None:
            try:
                self.transport.write(data)
            except (OSError, AttributeError):
                pass  # it is ending; processEnded says so

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > 1024:
            self._buffer = b""  # not ours: no command is that long
        for line in lines:
            self.pool.child_said(self.index, line.strip().decode("ascii", "replace"))

    def processEnded(self, reason: Failure) -> None:
        if self.sender is not None:
            self.sender.cancel()
        self.pool.child_ended(self, reason)
        self.ended.callback(None)


class WorkerPool:
    """Workers 1 .. N-1, from the parent: started, told, restarted, stopped.

    ``on_wakeup()`` is called when a child queued mail (the parent wakes
    its own queue manager, whose trigger hook sends ``wakeup`` back to
    every child).  ``reactor`` spawns and is the clock.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        config_path: str,
        workers: int,
        lock_fd: int,
        log_fd: int | None,
        on_wakeup: Callable[[], None],
        executable: str = sys.executable,
        restart_delay: float = RESTART_DELAY,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.config_path = os.path.abspath(config_path)
        self.workers = workers
        self.lock_fd = lock_fd
        self.log_fd = log_fd
        self.on_wakeup = on_wakeup
        self.executable = executable
        self.restart_delay = restart_delay
        self.stop_timeout = stop_timeout
        self.children: dict[int, _ChildProtocol] = {}
        self.running = False
        self._restarts: dict[int, Any] = {}

    def command_line(self, index: int) -> list[str]:
        args = [self.executable, "-m", "relayagent.master.child", "-c", self.config_path,
                "--index", str(index), "--workers", str(self.workers),
                "--lock-fd", str(self.lock_fd)]
        if self.log_fd is not None:
            args += ["--log-fd", str(self.log_fd)]
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
        return env

    def start(self) -> None:
        self.running = True
        for index in range(1, self.workers):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self.running:
            return
        child = _ChildProtocol(self, index)
        # The same descriptor numbers in the child: it is told them.
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: 2, self.lock_fd: self.lock_fd}
        if self.log_fd is not None:
            child_fds[self.log_fd] = self.log_fd
        try:
            self.reactor.spawnProcess(child, self.executable, self.command_line(index),
                                      env=self.environment(), childFDs=child_fds)
        except OSError as exc:
            ralog.log_warning(log, f"cannot start worker {index}: {exc}", service="master")
            self._schedule_restart(index)
            return
        self.children[index] = child
        log.info("worker {index} started: pid {pid}", index=index, pid=child.pid, ralog_service="master")

    def _schedule_restart(self, index: int) -> None:
        if self.running and index not in self._restarts:
            self._restarts[index] = self.clock.callLater(self.restart_delay, self._spawn, index)

    def send(self, command: str) -> None:
        """``wakeup`` or ``flush`` to every child (once per reactor turn)."""
        for child in self.children.values():
            if child.sender is not None:
                child.sender.send(command)

    def child_said(self, index: int, line: str) -> None:
        if line == WAKEUP:
            self.on_wakeup()
        elif line:
            ralog.log_warning(log, f"unknown line from worker {index}: {line[:100]!r}", service="master")

    def child_ended(self, child: _ChildProtocol, reason: Failure) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
        if not self.running:
            return
        ralog.log_warning(
            log, f"process {self.executable} -m relayagent.master.worker pid {child.pid} {_exit_text(reason)}",
            service="master",
        )
        ralog.log_warning(log, f"worker {child.index}: starting it again in {self.restart_delay:g}s", service="master")
        self._schedule_restart(child.index)

    def stop(self) -> Deferred[Any]:
        """Close every child's standard input (it stops as on SIGTERM) and
        fire when all have exited; SIGKILL after ``stop_timeout``."""
        self.running = False
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        children = list(self.children.values())
        if not children:
            return succeed(None)
        for child in children:
            if child.sender is not None:
                child.sender.cancel()
            try:
                child.transport.closeStdin()
            except (OSError, AttributeError):
                pass

        def kill() -> None:
            for child in children:
                if not child.ended.called:
                    ralog.log_warning(log, f"worker {child.index} pid {child.pid} did not stop "
                                      f"in {self.stop_timeout:g}s: killing it", service="master")
                    try:
                        child.transport.signalProcess("KILL")
                    except ProcessExitedAlready:
                        pass

        deadline = self.clock.callLater(self.stop_timeout, kill)
        done = DeferredList([child.ended for child in children])

        def finished(result: Any) -> Any:
            if deadline.active():
                deadline.cancel()
            return result

        return done.addBoth(finished)


def _exit_text(reason: Failure) -> str:
    """Postfix master(8)'s words: ``exit status N`` or ``killed by signal N``."""
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = str(value.signal)
        return f"killed by signal {value.signal} ({name})"
    if isinstance(value, (ProcessDone, ProcessTerminated)):
        return f"exit status {value.exitCode}"
    return f"ended: {value}"
