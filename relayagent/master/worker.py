"""
Several worker processes sharing one spool (``relayagent_workers``;
Postfix: master(8) running several qmgr-and-smtp pairs is the nearest
thing, though Postfix has one qmgr and many smtp processes).

One process spends most of its time in Python on small messages; with
``relayagent_workers = N`` the daemon runs N processes, each a whole
queue manager and delivery agent, each on its own core.  The default,
``auto``, is one worker per CPU this process may run on
(``os.sched_getaffinity``); a number overrides it, and 1 is one process
with nothing of this module at work.

- **Partition.**  Worker k of N owns the queue files whose id maps to k
  (``spool.queueid.partition_of``: CRC-32 of the id, modulo N).  It takes
  only those from ``incoming/`` and ``deferred/`` and recovers only
  those from ``active/`` at start (``QueueManager(owns=...)``), so no
  two processes ever claim the same file, with no talk between them.
  ``mailq``, ``postsuper`` and the other commands still see everything.
- **Processes.**  The twistd process is worker 0: it keeps the maillog,
  the trigger socket and the spool lock (``trigger.lock_spool``), and
  binds the listener (``smtpd_endpoints``), on which every worker
  accepts (**Listener**).  Workers 1..N-1 are forks, not new
  programs: in ``privilegedStartService`` (after twistd's ``--chroot``,
  before its ``--uid``/``--gid``) worker 0 forks the *spawner*
  (``relayagent.master.spawner``), which drops to twistd's user and
  group at once and then forks each worker when worker 0 asks.  A
  worker is a copy of worker 0's memory as ``makeService`` left it, as
  root and outside the chroot: main.cf and its tables, the SASL password
  maps, the TLS keys and contexts, the name servers.  So a worker needs
  neither root, nor a file outside the chroot, nor a Python interpreter
  inside it, and a worker started again after an exit has the same
  configuration and secrets as the first.  Nothing is read a second
  time, serialised, or passed on a command line, in the environment or
  through a file (Postfix reads its tables in each smtp(8) before the
  chroot, as root, and master(8) stays root to start them; here nothing
  stays root).  Each worker makes its own reactor (``child.fresh_reactor``:
  the epoll descriptor and waker of worker 0's are shared kernel
  objects) and logs Twisted's events to its standard error.
- **Lock.**  Worker 0's locked descriptor of ``master.lock`` is handed
  to the spawner over its socket when worker 0 starts (``SCM_RIGHTS``)
  and inherited by every worker: an ``flock`` belongs to the open file
  description, so the spool stays locked while any process of this run
  lives, and a new daemon cannot start (and recover ``active/``) beside
  an orphaned worker.  A worker refuses to run unless the descriptor it
  holds is ``master.lock`` and is locked by it (``check_lock``).
- **Listener.**  Every worker accepts on the listening sockets of
  ``smtpd_endpoints``, as every smtpd(8) accepts on the one socket
  Postfix's master(8) opened.  twistd binds them in worker 0, as root
  (``privilegedStartService``, after this service's, which has forked
  the spawner by then); when worker 0 starts the workers it hands each
  TCP and implicit-TLS socket to the spawner after the lock, the same
  way (``listen I FAMILY`` with ``SCM_RIGHTS``), every worker inherits
  them from the spawner, a restarted one too, and adopts them
  (``reactor.adoptStreamPort``) under its own copy of the listener's
  factory (``smtpd.listener.SharedListener``: the factory, the TLS
  context of an ``ssl:`` endpoint and STARTTLS's are in the fork's
  memory, made as root) once its service has started.  A message a
  worker receives is queued by its own intake with an id of its own
  partition (``QueueIdGenerator(partition=)``), so its own queue
  manager, woken without a trigger to any other process
  (``RelayagentService.listener_queued``), delivers it (worker 0's too,
  once it hands a socket over; with none to hand over its listener's
  mail keeps spreading over every worker).  A ``unix:``
  endpoint stays with worker 0 (Twisted's UNIX port removes its path
  when it stops listening, which the first worker to stop would do for
  all), and so does any other kind (``systemd:``: a descriptor of
  worker 0's own).  At stop worker 0 stops accepting first (twistd stops
  the listeners before this service), then tells the spawner
  ``unlisten`` (it closes its copies: no worker is started again) and
  closes the links; each worker stops accepting before its queue
  manager, as worker 0 does, so the socket is closed, and refuses
  connections, once the last worker has let go of it.  The listener
  enforces no limit of its own per listener (no connection count or
  rate: each session is bounded by itself, ``MAX_HELD_LINES``), so
  nothing changes meaning; the kernel hands each new connection to
  whichever worker accepts first, so a busy worker takes fewer.
- **Parent gone, child stops.**  Each worker has a socket to worker 0
  (its *link*, made before the spawner is forked and kept for the life
  of the daemon); end of file on it (worker 0 stopped, or died, even by
  SIGKILL) stops the worker the way twistd stops: no new work, the
  transactions in flight finish, the active files stay for the next
  start, exit.  Worker 0 half-closes the links at stop and waits for the
  spawner to report every worker's exit (``STOP_TIMEOUT``, then SIGKILL)
  and for the spawner to leave, before it lets go of the lock.
- **Triggers.**  Lines on the links.  Worker 0 to a worker: ``wakeup``
  (new mail in ``incoming/``) and ``flush``, whenever worker 0's queue
  manager hears them from outside.  A worker to worker 0: ``wakeup``
  when it queued a notice (a bounce), which worker 0 passes on to every
  worker, itself included.  The lines of one reactor turn are sent once.
  ``reload`` and ``logrotate`` from worker 0: the worker re-reads main.cf
  and its tables, or reopens ``maillog_file`` (``relayagent.master.reload``).
- **Logs.**  A worker writes its mail log lines to worker 0's
  ``maillog_file`` descriptor (opened before the privilege drop, and
  inherited), in whole lines, one ``write`` per flush on an ``O_APPEND``
  descriptor (``service.LineAppender``): lines of two processes never
  mix.  Each process names its own pid (``relayagent/smtp[pid]``).
  twistd's log (where the mail lines go without ``maillog_file``) is
  written by worker 0 alone, which rotates it: a worker sends its lines
  of it over its link (``log TEXT``, ``LogToWorkerZero``), and worker 0
  writes them.  With twistd's ``--logger`` or ``--syslog`` (twistd's
  observer, not relayagent's) a worker's lines go to its standard error.
- **Limits.**  Each worker gets ceil(limit / N), at least 1, of the
  queue manager's limits (``split_limits``), so the whole daemon keeps
  Postfix's meaning of them; ``smtp_destination_rate_delay`` is
  multiplied by N so that the sum of the workers keeps the rate.
- **Restart.**  A worker that exits while worker 0 runs is logged
  (``warning: process worker K pid N exit status S``) and started again
  after ``RESTART_DELAY`` seconds, as master(8) throttles a failing
  service.  A spawner that goes away while worker 0 runs stops the
  daemon: no worker could be started again (the queue stays as it is).

SYNOPSIS

    pool = WorkerPool(reactor, workers=N, on_wakeup=..., on_fatal=...)
    pool.prepare(run_worker, privileges)   # privileged: forks the spawner
    pool.start(lock_fd, listening); pool.send(WAKEUP); pool.stop() -> Deferred
    worker_count(config) -> int;  partition_filter(index, workers) -> owns | None
    split_limits(config, workers) -> Config;  check_lock(lock_fd, queue_directory)
    WorkerRole, Privileges, ParentLink, WorkerRuntime
    (a worker's side after the fork is ``relayagent.master.child``)

DIAGNOSTICS: ``WorkerError`` (one line) for a lock descriptor that is not
this spool's locked ``master.lock``; a worker that exits is one warning
line (``exit status N`` or ``killed by signal N``) and is started again
after RESTART_DELAY; a worker the spawner cannot fork is a warning and
is tried again after RESTART_DELAY; a spawner that cannot drop
privileges, or that goes away, is a warning and the daemon stops.

Owns: relayagent_workers.
"""

from __future__ import annotations

import fcntl
import math
import os
import pwd
import signal
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.python.util import switchUID

from relayagent.common import maillog as ralog
from relayagent.common.config import Config, Settings
from relayagent.master.spawner import MAX_LINE, Listening, fork_spawner
from relayagent.spool.queueid import partition_of

log = Logger(namespace="relayagent.master.worker")

# Seconds before a worker that exited is started again (master(8)'s
# throttle is 60s for a failing service; a worker is the queue itself).
RESTART_DELAY = 10.0
# Seconds worker 0 waits for the workers at stop before SIGKILL (what is
# in flight then is delivered again by the next start: at least once).
STOP_TIMEOUT = 30.0
# The commands on the links.
WAKEUP = "wakeup"
FLUSH = "flush"
# A reload (SIGHUP, ``relayagent reload``) and a maillog reopen
# (SIGUSR1, ``relayagent logrotate``), passed on by worker 0
# (relayagent.master.reload).
RELOAD = "reload"
LOGROTATE = "logrotate"
# Worker 0's last line before it closes a link at its own stop: the end
# of file that follows is a request, not worker 0's death.
STOP = "stop"
COMMANDS = (WAKEUP, FLUSH, RELOAD, LOGROTATE, STOP)
# A line of twistd's log from a worker, for worker 0 to write: "log TEXT"
# (one per line of text; a continuation line keeps its tab).
LOG_PREFIX = "log "
MAX_LOG_LINE = 65536
# The queue manager's per-process limits that are shared out among the
# workers (see split_limits).
SPLIT_LIMITS = (
    "qmgr_message_active_limit",
    "qmgr_message_recipient_limit",
    "default_process_limit",
    "smtp_destination_concurrency_limit",
    "smtp_initial_destination_concurrency",
)
EX_USAGE = 64


@dataclass(frozen=True, slots=True)
class SharedLimits(Settings):
    """How many workers (``auto`` or a number), and the limits they share out."""

    relayagent_workers: int | str
    qmgr_message_active_limit: int
    qmgr_message_recipient_limit: int
    default_process_limit: int
    smtp_destination_concurrency_limit: int
    smtp_initial_destination_concurrency: int
    smtp_destination_rate_delay: float
    smtp_destination_rate_limit: str
    smtp_connection_rate_limit: str
    relayagent_redis: str


# Shared through Redis when relayagent_redis is set (relayagent.qmgr.shared):
# each worker then asks for the whole limit, not a share of it.
REDIS_SHARED = ("smtp_destination_concurrency_limit",)


class WorkerError(Exception):
    """A worker cannot run as asked (one line for the user)."""


@dataclass
class WorkerRole:
    """What makes a process worker ``index`` (1 .. workers-1): its index,
    the number of workers, and the locked ``master.lock`` descriptor it
    holds."""

    index: int
    workers: int
    lock_fd: int


@dataclass(frozen=True)
class Privileges:
    """twistd's ``--uid``, ``--gid`` and ``--euid``: what the spawner drops
    to, as twistd drops worker 0 right after ``privilegedStartService``
    (``_twistd_unix.UnixApplicationRunner.startApplication``)."""

    uid: int | None = None
    gid: int | None = None
    euid: bool = False

    @classmethod
    def from_twistd(cls, options: Mapping[str, Any] | None) -> Privileges:
        """From twistd's own options (the parent of ours); none outside twistd."""
        if not options:
            return cls()
        return cls(options.get("uid"), options.get("gid"), bool(options.get("euid")))

    def drop(self) -> None:
        """As twistd does: a uid without a gid takes the user's group."""
        uid, gid = self.uid, self.gid
        if uid is not None and gid is None:
            gid = pwd.getpwuid(uid).pw_gid
        if uid is not None or gid is not None:
            switchUID(uid, gid, self.euid)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset
    and cpusets narrow; all of the machine's where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(config: Config) -> int:
    """``relayagent_workers`` as a number: ``auto`` is ``available_cpus()``."""
    value = SharedLimits.from_config(config).relayagent_workers
    return available_cpus() if value == "auto" else int(value)


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
    ``workers``.  The rate limits (``smtp_destination_rate_limit``,
    ``smtp_connection_rate_limit``) are divided by ``workers``, unless
    ``relayagent_redis`` shares them: then every worker is a node of the
    fleet, asks Redis for the whole limit (and for the whole
    ``REDIS_SHARED``), and falls back to limit / nodes on its own.  One
    worker: ``config`` itself."""
    if workers <= 1:
        return config
    from relayagent.qmgr.rates import Rate  # noqa: PLC0415 - start-up time: only with workers

    limits = SharedLimits.from_config(config)
    shared = bool(limits.relayagent_redis.strip())
    overrides: dict[str, Any] = {
        name: max(1, math.ceil(getattr(limits, name) / workers)) for name in SPLIT_LIMITS
        if not (shared and name in REDIS_SHARED)
    }
    rate_delay = limits.smtp_destination_rate_delay
    if rate_delay > 0:
        overrides["smtp_destination_rate_delay"] = f"{rate_delay * workers:g}s"
    if not shared:
        for name in ("smtp_destination_rate_limit", "smtp_connection_rate_limit"):
            rate = Rate.parse(getattr(limits, name), name=name)
            if rate is not None:
                overrides[name] = str(rate.scaled(1 / workers))
    return config.replace(**overrides)


def check_lock(lock_fd: int, queue_directory: str) -> None:
    """The descriptor must be ``$queue_directory/master.lock``,
    exclusively locked through it (worker 0's open file description:
    locking again through it succeeds at once; a descriptor of another
    file, or a spool that another daemon holds, is refused)."""
    from relayagent.spool import trigger

    path = os.path.join(queue_directory, trigger.LOCK_NAME)
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


def exit_text(status: int) -> str:
    """A ``waitpid`` status in Postfix master(8)'s words: ``exit status N``
    or ``killed by signal N (NAME)``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by signal {number} ({name})"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


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


class _Given(Factory):
    """The factory of one connection whose protocol is already made
    (``reactor.adoptStreamConnection`` asks a factory)."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def adopt(reactor: Any, sock: socket.socket, protocol: Protocol) -> None:
    """Hand a connected UNIX socket to the reactor with ``protocol`` on it
    (the reactor takes a duplicate; ours is closed)."""
    try:
        reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _Given(protocol))
    finally:
        sock.close()


class _Lines(Protocol):
    """Lines of at most ``limit`` octets (UTF-8), without their line end;
    a longer one is dropped with a warning."""

    what = "a worker"
    limit = MAX_LINE

    def __init__(self) -> None:
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if len(self._buffer) > self.limit:
            self._buffer = b""
            ralog.log_warning(log, f"overlong line from {self.what} ignored", service="master")
        for line in lines:
            if len(line) > self.limit:
                ralog.log_warning(log, f"overlong line from {self.what} ignored", service="master")
                continue
            self.line(line.rstrip(b"\r").decode("utf-8", "replace"))

    def line(self, text: str) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# A worker's side (after the fork: relayagent.master.child)


class ParentLink(LineOnlyReceiver):
    """A worker's link to worker 0: its commands in, ``wakeup`` out;
    ``on_gone(announced)`` when worker 0 closes the link (``announced``:
    after a ``stop`` line, at worker 0's own stop) or dies."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, queue_manager: Callable[[], Any], clock: Any,
                 on_gone: Callable[[bool], object],
                 on_command: Callable[[str], object] | None = None) -> None:
        # queue_manager: a callable, since the service makes it at start.
        self._queue_manager = queue_manager
        self._on_gone = on_gone
        # reload and logrotate: the service's (RelayagentService.control_command).
        self._on_command = on_command
        self._sender = _LineSender(clock, self._write)
        self.gone = False
        self.stop_announced = False

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.gone:
            self.transport.write(data)

    def send(self, command: str) -> None:
        """Tell worker 0 (``wakeup``: this worker queued mail)."""
        if not self.gone:
            self._sender.send(command)

    def lineReceived(self, line: bytes) -> None:
        command = line.strip().decode("ascii", "replace")
        queue_manager = self._queue_manager()
        if command not in COMMANDS:
            ralog.log_warning(log, f"unknown command from the parent process: {command!r}")
            return
        if command == STOP:
            self.stop_announced = True  # the end of file follows
            return
        if command in (RELOAD, LOGROTATE):
            if self._on_command is not None:
                self._on_command(command)
            return
        if queue_manager is None:
            return  # not started yet; the start looks at the queues anyway
        if command == WAKEUP:
            queue_manager.wakeup()
        else:
            # Not logged again: worker 0 logged the request it passed on.
            queue_manager.flush()

    def lineLengthExceeded(self, line: bytes) -> None:
        ralog.log_warning(log, "overlong line from the parent process ignored")

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.gone:
            return
        self.gone = True
        self._sender.cancel()
        self._on_gone(self.stop_announced)


class LogToWorkerZero:
    """A worker's twistd log "file" (the ``out`` of its
    ``maillog.TwistdLogObserver``): the whole lines of each flush go to
    worker 0 over the link, as ``log TEXT`` lines, and worker 0 writes
    them into twistd's log, which it alone writes and rotates (a file
    this process cannot reach under a chroot).  Standard error, or
    nothing, once the link is gone."""

    def __init__(self, link: ParentLink, fallback: Any = None) -> None:
        self._link = link
        self._fallback = fallback
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        """Keep ``text`` for the next flush; returns its length."""
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        """Send the whole lines pending to worker 0 (``log TEXT`` each), or to
        the fallback once the link is gone; a trailing partial line waits."""
        text = "".join(self._pending)
        whole = text.rfind("\n") + 1
        rest = text[whole:]
        self._pending = [rest] if rest else []
        if not whole:
            return
        text = text[:whole]
        if self._link.transport is not None and not self._link.gone:
            lines = text[:-1].split("\n")
            self._link.transport.write("".join(f"{LOG_PREFIX}{line}\n" for line in lines).encode("utf-8", "replace"))
        elif self._fallback is not None:
            self._fallback.write(text)
            self._fallback.flush()


class WorkerRuntime:
    """Stops a worker once, whatever asks first: end of file on its
    link, or SIGTERM/SIGINT (the reactor's shutdown)."""

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

    def parent_gone(self, announced: bool = False) -> None:
        """End of file on the link: stop, as on SIGTERM.  Said in the
        log only when nothing else explains it: not at worker 0's own
        stop (``announced``), nor when this worker was already stopping
        (its own SIGINT or SIGTERM, a ^C on the terminal, closes the
        link), but when worker 0 died or was killed."""
        if self._stopping is not None:
            return  # already stopping: the link closed with the reactor
        if not announced:
            log.info("the parent process is gone: stopping")
        if self.reactor.running:
            self.reactor.stop()  # runs stop_service first (a shutdown trigger)
        else:
            self.stop_service()


# ---------------------------------------------------------------------------
# Worker 0's side


class _Link(_Lines):
    """Worker 0's end of one worker's link: the worker's lines (commands,
    and its lines of twistd's log)."""

    limit = MAX_LOG_LINE

    def __init__(self, pool: WorkerPool, index: int) -> None:
        super().__init__()
        self.pool = pool
        self.index = index
        self.what = f"worker {index}"

    def line(self, text: str) -> None:
        if text.startswith(LOG_PREFIX):
            self.pool.on_log(text[len(LOG_PREFIX):])
        else:
            self.pool.child_said(self.index, text.strip())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.pool.link_lost(self.index)


class _SpawnerLink(_Lines):
    """Worker 0's end of the spawner's socket."""

    what = "the worker spawner"

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__()
        self.pool = pool

    def command(self, text: str) -> None:
        if self.transport is not None:
            self.transport.write(text.encode("ascii") + b"\n")

    def line(self, text: str) -> None:
        self.pool.spawner_said(text)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.pool.spawner_gone()


class _Worker:
    """Worker k as worker 0 sees it: its link (for the life of the daemon)
    and its current process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.link: _Link | None = None
        self.sender: _LineSender | None = None
        self.pid: int | None = None
        # Fires when the process asked for with "start" has ended (or
        # could not be started).
        self.ended: Deferred[None] | None = None
        self.restart: Any = None


class WorkerPool:
    """Workers 1 .. N-1, from worker 0: the spawner forked (``prepare``),
    the workers started, told, restarted and stopped.

    ``on_wakeup()`` is called when a worker queued mail (worker 0 wakes
    its own queue manager, whose trigger hook sends ``wakeup`` back to
    every worker); ``on_fatal(text)`` when the spawner is gone while the
    pool runs; ``on_log(text)`` for each line of twistd's log a worker
    sends (``LogToWorkerZero``).  ``reactor`` adopts the sockets and is the clock.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        workers: int,
        on_wakeup: Callable[[], None],
        on_fatal: Callable[[str], None] | None = None,
        on_log: Callable[[str], None] | None = None,
        on_exit: Callable[[int], None] | None = None,
        restart_delay: float = RESTART_DELAY,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.workers = workers
        self.on_wakeup = on_wakeup
        self.on_fatal = on_fatal or (lambda text: None)
        self.on_log = on_log or (lambda text: None)
        # on_exit(pid): a worker process ended (the metrics forget its gauges).
        self.on_exit = on_exit or (lambda pid: None)
        self.restart_delay = restart_delay
        self.stop_timeout = stop_timeout
        self.children = {index: _Worker(index) for index in range(1, workers)}
        self.running = False
        self.spawner_pid: int | None = None
        self.spawner: _SpawnerLink | None = None
        self._sockets: tuple[socket.socket, dict[int, socket.socket]] | None = None
        self._spawner_gone = False
        # Listening sockets went to the spawner (start): "unlisten" at stop.
        self._listening_handed = False
        self._spawner_ended: Deferred[None] = Deferred()

    # -- before the privilege drop

    def prepare(self, run_worker: Callable[[int, socket.socket, int, Listening], int],
                privileges: Privileges = Privileges(), *, fork: Callable[[], int] = os.fork) -> None:
        """Make the sockets and fork the spawner (worker 0's
        ``privilegedStartService``: still root, already in the chroot).
        ``run_worker(index, link, lock_fd, listening)`` is what a worker
        process runs (``listening``: the listener sockets handed to
        ``start``); it returns the exit status."""
        self.spawner_pid, control, links = fork_spawner(sorted(self.children), run_worker, privileges, fork=fork)
        self._sockets = (control, links)

    # -- after it

    def start(self, lock_fd: int, listening: Listening | None = None) -> None:
        """Take the sockets into the reactor, hand the spool lock and the
        listening sockets (``listening``: smtpd_endpoints index ->
        (descriptor, address family), worker 0's own, which stay open
        here) to the spawner and start workers 1 .. N-1."""
        if self._sockets is None:
            raise RuntimeError("WorkerPool.start before prepare")
        control, links = self._sockets
        self._sockets = None
        self.running = True
        self.spawner = _SpawnerLink(self)
        adopt(self.reactor, control, self.spawner)
        for index, child in self.children.items():
            child.link = _Link(self, index)
            adopt(self.reactor, links[index], child.link)
            child.sender = _LineSender(self.clock, self._writer(child))
        # The descriptor goes with the first octet of the line after it.
        self.spawner.transport.sendFileDescriptor(lock_fd)
        self.spawner.command("lock")
        for index, (fd, family) in sorted((listening or {}).items()):
            self._listening_handed = True
            self.spawner.transport.sendFileDescriptor(fd)
            self.spawner.command(f"listen {index} {int(family)}")
        for index in self.children:
            self._start(index)

    @staticmethod
    def _writer(child: _Worker) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            if child.link is not None and child.link.transport is not None:
                child.link.transport.write(data)

        return write

    def _start(self, index: int) -> None:
        child = self.children[index]
        child.restart = None
        if not self.running or self._spawner_gone or self.spawner is None:
            return
        if child.ended is None:
            child.ended = Deferred()
        self.spawner.command(f"start {index}")

    def _schedule_restart(self, index: int) -> None:
        child = self.children[index]
        if self.running and child.restart is None:
            child.restart = self.clock.callLater(self.restart_delay, self._start, index)

    def send(self, command: str) -> None:
        """``wakeup``, ``flush``, ``reload`` or ``logrotate`` to every
        running worker (once per reactor turn)."""
        for child in self.children.values():
            if child.pid is not None and child.sender is not None:
                child.sender.send(command)

    # -- what comes back

    def child_said(self, index: int, line: str) -> None:
        """A line from worker ``index``: ``wakeup`` calls ``on_wakeup``; any
        other line is logged as a warning."""
        if line == WAKEUP:
            self.on_wakeup()
        elif line:
            ralog.log_warning(log, f"unknown line from worker {index}: {line[:100]!r}", service="master")

    def spawner_said(self, line: str) -> None:
        """A line from the spawner: ``started INDEX PID``, ``ended INDEX PID
        STATUS``, ``failed INDEX REASON`` or ``fatal TEXT``; anything else is
        logged as a warning."""
        words = line.split(" ", 3)
        try:
            if words[0] == "started" and len(words) == 3:
                self._started(int(words[1]), int(words[2]))
                return
            if words[0] == "ended" and len(words) == 4:
                self._ended(int(words[1]), int(words[2]), exit_text(int(words[3])))
                return
            if words[0] == "failed" and len(words) >= 3:
                self._failed(int(words[1]), line.split(" ", 2)[2])
                return
        except (ValueError, KeyError):
            pass
        if words[0] == "fatal":
            ralog.log_warning(log, f"worker spawner: {line[6:]}", service="master")
        elif line:
            ralog.log_warning(log, f"unknown line from the worker spawner: {line[:100]!r}", service="master")

    def _started(self, index: int, pid: int) -> None:
        child = self.children[index]
        child.pid = pid
        log.info("worker {index} started: pid {pid}", index=index, pid=pid, ralog_service="master")

    def _ended(self, index: int, pid: int, how: str) -> None:
        child = self.children[index]
        if child.pid != pid:
            return
        child.pid = None
        self.on_exit(pid)
        ended, child.ended = child.ended, None
        if self.running:
            ralog.log_warning(log, f"process worker {index} pid {pid} {how}", service="master")
            ralog.log_warning(log, f"worker {index}: starting it again in {self.restart_delay:g}s",
                              service="master")
            self._schedule_restart(index)
        if ended is not None:
            ended.callback(None)

    def _failed(self, index: int, reason: str) -> None:
        child = self.children[index]
        ended, child.ended = child.ended, None
        ralog.log_warning(log, f"cannot start worker {index}: {reason}", service="master")
        if self.running:
            ralog.log_warning(log, f"worker {index}: trying again in {self.restart_delay:g}s", service="master")
            self._schedule_restart(index)
        if ended is not None:
            ended.callback(None)

    def link_lost(self, index: int) -> None:
        """The link to worker ``index`` reached end of file: once the spawner is
        gone too, the worker has ended (with an unknown status)."""
        # While the spawner lives it holds the workers' ends of the links
        # too: end of file here then means the spawner is gone as well,
        # and the worker has exited (its exit status is unknown).
        child = self.children[index]
        if self._spawner_gone and child.pid is not None:
            self._ended(index, child.pid, "ended")

    def spawner_gone(self) -> None:
        """The spawner's socket is closed: workers asked for and never started
        are given up, and a running pool calls ``on_fatal`` (no worker can be
        started again)."""
        self._spawner_gone = True
        self._reap_spawner()
        for child in self.children.values():
            if child.pid is None and child.ended is not None:
                # Asked for, never reported: it will not come.
                ended, child.ended = child.ended, None
                ended.callback(None)
        if self.running:
            text = (f"the worker spawner (pid {self.spawner_pid}) is gone: no worker can be started "
                    "again; stopping")
            ralog.log_warning(log, text, service="master")
            self.on_fatal(text)
        if not self._spawner_ended.called:
            self._spawner_ended.callback(None)

    def _reap_spawner(self, tries: int = 50) -> None:
        # Forked by os.fork, not spawnProcess: the reactor does not reap it.
        if self.spawner_pid is None:
            return
        try:
            pid, _ = os.waitpid(self.spawner_pid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0 and tries > 0:
            # Its socket closed a moment before the process ended.
            self.clock.callLater(0.1, self._reap_spawner, tries - 1)

    # -- stop

    def stop_now(self) -> None:
        """During ``stop``: kill the workers still running now instead of
        after ``stop_timeout`` (what they had in flight stays queued)."""
        deadline = getattr(self, "_stop_deadline", None)
        if deadline is not None and deadline.active():
            deadline.cancel()
            self._kill_workers("still running at a second signal")

    def stop(self) -> Deferred[Any]:
        """End of file on every link (a worker stops as on SIGTERM); fire
        when every worker has ended and the spawner is gone; SIGKILL
        after ``stop_timeout``."""
        self.running = False
        if self._listening_handed and self.spawner is not None and not self._spawner_gone:
            # No worker is started again: the spawner's copies of the
            # listening sockets go now, so that the sockets close (and
            # refuse connections) once the last worker stops accepting.
            self.spawner.command("unlisten")
        if self._sockets is not None:
            # Prepared, never started: closing its socket ends the spawner.
            control, links = self._sockets
            self._sockets = None
            for sock in (control, *links.values()):
                sock.close()
            self._reap_spawner()
            return succeed(None)
        for child in self.children.values():
            if child.restart is not None and child.restart.active():
                child.restart.cancel()
            child.restart = None
            if child.sender is not None:
                child.sender.cancel()
            if child.link is not None and child.link.transport is not None:
                child.link.transport.write(f"{STOP}\n".encode("ascii"))
                child.link.transport.loseWriteConnection()
        waiting = [child for child in self.children.values() if child.ended is not None]

        def kill(why: str = f"did not stop in {self.stop_timeout:g}s") -> None:
            for child in waiting:
                if child.pid is None or child.ended is None or child.ended.called:
                    continue
                ralog.log_warning(log, f"worker {child.index} pid {child.pid} {why}: killing it",
                                  service="master")
                if not self._spawner_gone and self.spawner is not None:
                    self.spawner.command(f"kill {child.index}")
                else:
                    try:
                        os.kill(child.pid, signal.SIGKILL)
                    except OSError:
                        pass

        deadline = self.clock.callLater(self.stop_timeout, kill)
        # A second stop signal (stop_now) kills them without waiting.
        self._stop_deadline = deadline
        self._kill_workers = kill
        done = DeferredList([child.ended for child in waiting if child.ended is not None])

        def workers_ended(_: Any) -> Deferred[None]:
            if deadline.active():
                deadline.cancel()
            if self.spawner is None or self._spawner_gone:
                return succeed(None)
            # End of file for the spawner: it leaves (holding the lock
            # until then: wait for it).
            self.spawner.transport.loseWriteConnection()
            return self._spawner_ended

        def close_links(result: Any) -> Any:
            for child in self.children.values():
                if child.link is not None and child.link.transport is not None:
                    child.link.transport.loseConnection()
            return result

        return done.addCallback(workers_ended).addBoth(close_links)
