"""
The running mail system: the service tree ``twistd -n relayagent`` starts
(Postfix: master(8) with qmgr(8) and smtp(8) under it).

``build_service(config, reactor)`` returns a ``RelayagentService`` holding:

- the maillog (``relayagent.common.maillog.MailLog``) on ``maillog_file``;
  without one, relayagent's lines go into twistd's log (straight to its
  observer when relayagent writes it: ``master.tap.twistd_log``);
- the spool (``relayagent.spool.Spool``);
- smtp(8)'s entry point (``relayagent.smtp.deliver.SmtpAgent``), which
  owns the real resolver (``resolve.NexthopResolver``), the connector
  (``connect.Connector``), the ESMTP session factory
  (``session.SMTPSessionFactory``) with the security policy
  (``security.SecurityPolicy``) and the connection cache (``conncache``);
- the delivery agent (``relayagent.qmgr.delivery.DeliveryAgent``) over it;
- the queue manager (``scheduler.QueueManager``), routing with the smtp
  agent's ``route``;
- the trigger socket (``control``: ``$queue_directory/public/qmgr``);
- the pickup of ``maildrop/`` (``relayagent.smtpd.pickup``: what local
  users who are not the mail system submit), made at start (mode 1733);
- SIGHUP and SIGUSR1: reload and reopen the maillog (``reload``,
  ``logrotate``, ``relayagent.master.reload``).

Privileges (twistd ``--uid``, ``--gid``, ``--chroot``): twistd loads the
plugin (``makeService``, where this runs) as the starting user and
outside the chroot, then chroots, then calls ``privilegedStartService``,
then drops to ``--uid``/``--gid``, then calls ``startService``.  So
everything that needs root or files outside the chroot happens here, in
``build_service``: main.cf and its lookup tables are read, SASL password
tables and TLS keys are loaded, ``/etc/resolv.conf`` is read (once, as
Postfix's resolver does at start-up), the log file is opened, under
``--chroot`` the modules otherwise imported where first needed are
imported (``tap.import_before_chroot``), and a descriptor of the queue
directory is kept.  The spool itself, the
trigger socket and the queue manager start in ``startService``, as the
unprivileged user, so that what they create belongs to that user; under
a chroot the queue directory is found again through the kept descriptor.

With ``relayagent_workers = N > 1`` (``relayagent/master/worker.py``;
the default, ``auto``, is one per CPU) this process is worker 0: it
keeps all of the above and owns the queue files of partition 0.  In
``privilegedStartService``, after the chroot and before the privilege
drop, it forks the worker spawner (``relayagent/master/spawner.py``),
which drops privileges and forks workers 1..N-1 when ``startService``
asks (``worker.WorkerPool``).  A worker is a copy of this process as
``build_service`` left it, so the tables, passwords and keys read here
are its own without being read again: it runs under ``--chroot`` and
with files only root may read.  Each worker becomes one of the service
(``become_worker``) and gets the same stack without trigger socket,
lock taking or workers of its own; it accepts on the listening sockets
worker 0 bound and handed over (``listening_descriptors``,
``listen_in_worker``), queues what it receives with ids of its own
partition (``intake_spool``) and delivers it itself
(``listener_queued``).  Worker 0's last line, once everything has
stopped, is Postfix's master's: ``terminating on signal 15`` (the
signal that stopped it; ``terminating`` when the application did).
The maillog is written in whole
lines, one ``write`` per flush, on an ``O_APPEND`` descriptor
(``LineAppender``), so that the lines of several processes never mix.

SYNOPSIS: ``build_service``, ``RelayagentService`` (``reload``,
``logrotate``, ``listen_in_worker``, ``listener_queued``),
``LineAppender``, ``open_log``.

DIAGNOSTICS: ``build_service`` raises ``ConfigError`` for a bad
parameter; ``startService`` raises ``trigger.DaemonRunning`` when another
queue manager holds the spool.

Owns no parameters; reads queue_directory, maillog_file, log_format,
delay_logging_resolution_limit (for the text of Twisted's observers:
``maillog.set_resolution``); the number of workers from
``worker.worker_count``.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - "xn--" names after a chroot need the codec loaded
import os
from typing import TYPE_CHECKING, Any, TextIO

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger

from relayagent.common import maillog as ralog
from relayagent.common.config import Config
from relayagent.master import child, stop, worker
from relayagent.master import reload as reloading
from relayagent.master.metrics import DaemonMetrics, start_metrics
from relayagent.qmgr.delivery import DeliveryAgent
from relayagent.qmgr.limits import Keyer, LimitSettings
from relayagent.qmgr.scheduler import Feedback, QueueManager, SchedulerSettings
from relayagent.qmgr.shared import check_limits, make_limiter, mx_hosts_from
from relayagent.smtp.deliver import SmtpAgent
from relayagent.smtp.mtasts import PolicyCache, PolicyStore
from relayagent.smtp.resolve import (
    NexthopResolver,
    ResolveSettings,
    check_relays,
    make_dns_resolver,
)
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tlsrpt import Recorder, Reporter, TLSRPTSettings
from relayagent.smtpd.pickup import Pickup, PickupSettings
from relayagent.spool import Spool, control, maildrop, trigger
from relayagent.spool.queueid import QueueIdGenerator
from relayagent.spool.spool import SpoolSettings

if TYPE_CHECKING:  # the listener's module is imported only with smtpd_endpoints (master.tap)
    from relayagent.smtpd.listener import SharedListener

log = Logger(namespace="relayagent.master.service")

class RelayagentService(MultiService):
    """Spool, queue manager, delivery agent, trigger socket, log observers."""

    def __init__(self, config: Config, reactor: Any, *, log_out: TextIO | None = None,
                 security: SecurityPolicy | None = None, dns_resolver: Any = None,
                 resolver: NexthopResolver | None = None,
                 privileges: worker.Privileges | None = None,
                 twistd_log: ralog.TwistdLogObserver | None = None) -> None:
        super().__init__()
        # role: None in the twistd process (worker 0 of relayagent_workers);
        # a worker's after become_worker (relayagent.master.worker).
        self.role: worker.WorkerRole | None = None
        self.workers: int = worker.worker_count(config)
        # twistd's --uid/--gid, for the worker spawner to drop to.
        self.privileges = privileges or worker.Privileges()
        # Each worker's share of the queue manager's limits.
        self.config = config = worker.split_limits(config, self.workers)
        self.reactor = reactor
        self.queue_directory = SpoolSettings.from_config(config).queue_directory
        # maillog_file: relayagent's lines only, in log_format; else they
        # go into twistd's log (relayagent.common.maillog.MailLog).  Made at
        # start: the pid in its lines is the running process's, not that
        # of the twistd process that forked to become a daemon.
        self.log_out = log_out
        self.maillog: ralog.MailLog | None = None
        # twistd's log when relayagent writes it (master.tap.twistd_log; a
        # child worker's standard error): without maillog_file it takes
        # the mail events straight, as a MailLog would.
        self.twistd_log = twistd_log
        self.resolver = resolver or NexthopResolver(config, dns_resolver, reactor)
        self.security = security
        self.dns_resolver = dns_resolver
        self.smtp = SmtpAgent.from_config(config, reactor, resolver=self.resolver, security=security)
        # MTA-STS's cache and TLSRPT's counters live in the queue
        # directory, found again after a chroot (spool_directory).
        self.mta_sts: PolicyStore | None = getattr(security, "mta_sts", None)
        self.tlsrpt: Recorder | None = getattr(security, "tlsrpt", None)
        self.tlsrpt_reporter: Reporter | None = None
        if self.mta_sts is not None:
            cache_name = self.mta_sts.settings.smtp_mta_sts_cache_directory
            self.mta_sts.cache = PolicyCache(lambda: os.path.join(self.spool_directory(), cache_name))
        if self.tlsrpt is not None:
            self.tlsrpt.directory_source = lambda: os.path.join(self.spool_directory(), "tlsrpt")
        # Under --chroot the path above means nothing after the chroot: keep
        # a descriptor to find the directory again (module docstring).
        self._directory_fd: int | None = None
        try:
            self._directory_fd = os.open(self.queue_directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            self._directory_fd = None  # made at start, as the running user
        self._resolved_directory: str | None = None
        self.spool: Spool | None = None
        # The listener's spool with more than one worker: the same
        # directory, ids of this worker's partition (listener_queued).
        self.intake_spool: Spool | None = None
        # smtpd_endpoints (set by master.tap): worker 0 hands their
        # sockets to the others, which listen on them too.
        self.listeners: list[SharedListener] = []
        # What a worker listens on (listen_in_worker), stopped first.
        self._worker_listeners: list[SharedListener] = []
        self.queue_manager: QueueManager | None = None
        self.agent: DeliveryAgent | None = None
        self.limiter: Any = None
        self.listening: Any = None
        self._lock_fd: int | None = None
        self._stopping: stop.BoundedStop | None = None
        self.pool: worker.WorkerPool | None = None
        # A worker's link to worker 0 (relayagent.master.worker.ParentLink).
        self.parent_link: Any = None
        # SIGHUP and SIGUSR1 (worker 0): put back at stop.
        self._uninstall_signals: Any = None
        # maildrop/ into incoming/ (worker 0: relayagent.smtpd.pickup).
        self.pickup: Pickup | None = None
        # This process's metrics (metrics_endpoints; None when off).
        self.metrics: DaemonMetrics | None = None

    def reload(self) -> tuple[bool, str]:
        """Re-read main.cf and the tables (SIGHUP, ``relayagent reload``;
        ``relayagent.master.reload``)."""
        return reloading.reload(self)

    def logrotate(self) -> tuple[bool, str]:
        """Reopen ``maillog_file`` (SIGUSR1, ``relayagent logrotate``)."""
        return reloading.logrotate(self)

    def control_command(self, name: str) -> tuple[bool, str]:
        """``reload`` or ``logrotate``, from the trigger socket or (in a
        worker) from worker 0's link."""
        if name == worker.RELOAD:
            return self.reload()
        if name == worker.LOGROTATE:
            return self.logrotate()
        return False, f"unknown command: {name}"

    def spool_directory(self) -> str:
        """The queue directory as this process sees it now (after a chroot
        too); the same answer every time."""
        if self._resolved_directory is not None:
            return self._resolved_directory
        directory = self.queue_directory
        if not os.path.isdir(directory) and self._directory_fd is not None:
            # Chrooted: the kept descriptor leads to the queue directory.
            os.fchdir(self._directory_fd)
            directory = os.getcwd()
            if not os.path.isabs(directory) or directory.startswith("(unreachable)"):
                raise RuntimeError(
                    f"queue_directory {self.queue_directory} is outside the chroot directory"
                )
        self._resolved_directory = directory
        return directory

    def reload_limits(self, config: Config) -> None:
        """A reload's limits per destination key (``relayagent.master.
        reload``; checked by ``check_limits`` before): the running limiter
        takes the new rates, concurrency and shaping rules, the queue
        manager a new keyer (rollup maps); a first limit makes a limiter.
        Where Redis is stays until a restart (a parameter the reload keeps)."""
        if self.queue_manager is None:
            return  # not started: startService builds them from self.config
        dns_resolver = getattr(self.resolver, "dns_resolver", None)
        mx_hosts = mx_hosts_from(dns_resolver) if dns_resolver is not None else None
        settings = LimitSettings.from_config(config)
        if self.limiter is None:
            self.limiter, keyer = make_limiter(config, self.reactor, mx_hosts=mx_hosts)
            self.queue_manager.set_limits(self.limiter, keyer)
            return
        self.limiter.reconfigure(settings)
        self.queue_manager.set_limits(self.limiter, Keyer(settings, mx_hosts=mx_hosts, clock=self.reactor))

    def become_worker(self, role: worker.WorkerRole, *,
                      twistd_log: ralog.TwistdLogObserver | None = None) -> None:
        """In a worker process (``relayagent.master.child``): this copy of
        worker 0's service becomes worker ``role.index``, holding worker
        0's lock, with no workers of its own; ``twistd_log`` takes the
        place of worker 0's (the worker's standard error)."""
        self.role = role
        self.twistd_log = twistd_log
        self.workers = role.workers
        self._lock_fd = role.lock_fd
        self.pool = None

    def privilegedStartService(self) -> None:
        # Two queue managers on one spool would each recover the other's
        # active/ files and deliver them twice: the second refuses to
        # start.  Locked here, before a chroot or privilege drop, when the
        # spool exists; a new spool is locked in startService.  A worker
        # holds worker 0's lock (relayagent.master.worker).
        if self.role is None and os.path.isdir(self.queue_directory):
            self._lock_fd = trigger.lock_spool(self.queue_directory)
        super().privilegedStartService()
        if self.role is None and self.workers > 1:
            # Still root, in the chroot: the spawner drops privileges itself.
            self._prepare_workers()

    def _prepare_workers(self) -> None:
        self.pool = worker.WorkerPool(
            self.reactor,
            workers=self.workers,
            on_wakeup=lambda: self.queue_manager.wakeup() if self.queue_manager is not None else None,
            on_fatal=self._fatal,
            on_log=self._worker_log,
            stop_timeout=stop.StopSettings.from_config(self.config).relayagent_stop_timeout,
            on_exit=lambda pid: self.metrics.worker_exited(pid) if self.metrics is not None else None,
        )
        self.pool.prepare(lambda index, link, lock_fd, listening: child.run(self, index, link, lock_fd, listening),
                          self.privileges)

    def _worker_log(self, text: str) -> None:
        """A line of twistd's log from a worker (``worker.LogToWorkerZero``),
        written by this process, which alone writes (and rotates) the file:
        into the observer's buffer with its own lines, so that the file
        (twistd's ``LogFile`` is unbuffered) gets one write a reactor turn,
        not one a worker's line."""
        write_lines = getattr(self.twistd_log, "write_lines", None)  # a SyslogObserver has none
        if write_lines is not None:
            write_lines(text + "\n")

    def _fatal(self, text: str) -> None:
        """The workers cannot go on: the daemon stops (the queue stays)."""
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def startService(self) -> None:
        # The delays' text in events that Twisted's observers render
        # (twistd's log without maillog_file, --logger, --syslog).
        ralog.set_resolution(ralog.MaillogSettings.from_config(self.config).delay_logging_resolution_limit)
        if self.log_out is not None and self.maillog is None:
            self.maillog = ralog.MailLog(self.config, self.log_out,
                                         flush_later=ralog.after_this_turn(self.reactor))
        directory = self.spool_directory()
        index = self.role.index if self.role is not None else 0
        # What the queue directories hold besides queue files is told once,
        # by worker 0 (every worker scans every directory).
        self.spool = Spool(directory, clock=self.reactor.seconds,
                           on_stray=_log_stray if index == 0 else None)
        self.spool.ensure_layout()
        if self.role is not None:
            # Worker 0's is made with the workers, if it hands them sockets.
            self.intake_spool = self._partitioned_spool(directory, index)
        if self._lock_fd is None:
            # Before the log is taken: a start refused here (DaemonRunning)
            # leaves nothing of this service running.
            self._lock_fd = trigger.lock_spool(directory)
        if self.maillog is not None:
            self.maillog.start()
        elif self.twistd_log is not None:
            ralog.take_mail_events(self.twistd_log)
        if index == 0:
            try:
                maildrop.ensure(directory)  # as the daemon's user: others submit through it
            except OSError as exc:
                ralog.log_warning(log, f"cannot make {maildrop.maildrop_directory(directory)}: "
                                  f"{exc.strerror or exc}; only the mail system's user can submit",
                                  service="pickup")
        queue_manager: QueueManager | None = None
        # Before the workers start: worker 0 empties the metrics' files.
        self.metrics = start_metrics(self.config, directory, self.reactor, index=index,
                                     workers=self.workers, queue_manager=lambda: self.queue_manager,
                                     cache=lambda: self.smtp.cache, running_config=lambda: self.config)

        def new_mail() -> None:
            if self.parent_link is not None:
                # A child: the parent wakes every worker, this one too.
                self.parent_link.send(worker.WAKEUP)
            elif queue_manager is not None:
                queue_manager.wakeup()

        def on_trigger(command: str) -> None:
            # Worker 0 passes the triggers it hears on to the others.
            if self.pool is not None:
                self.pool.send(command)

        self.agent = DeliveryAgent(
            self.config, self.spool, self.reactor,
            smtp=self.smtp,
            new_mail=new_mail,
            # Unlinking delivered files off the reactor thread.
            removal_reactor=self.reactor,
        )
        # Made here, in the process that runs it: a worker's Redis
        # connection is its own (relayagent.qmgr.shared).
        dns_resolver = getattr(self.resolver, "dns_resolver", None)
        limiter, keyer = make_limiter(
            self.config, self.reactor,
            mx_hosts=mx_hosts_from(dns_resolver) if dns_resolver is not None else None)
        self.limiter = limiter
        queue_manager = QueueManager(
            self.config, self.spool, self.agent, self.reactor, self.smtp.route,
            owns=worker.partition_filter(index, self.workers),
            on_trigger=on_trigger if self.role is None and self.workers > 1 else None,
            limiter=limiter, keyer=keyer,
        )
        self.queue_manager = queue_manager
        self._start_transport_security(index, new_mail)
        if self.role is not None:
            # A child: no trigger socket (the parent's pipe brings them).
            super().startService()
            queue_manager.start()
            return
        try:
            self.listening = control.listen(self.reactor, directory, queue_manager, self.control_command)
        except trigger.DaemonRunning:
            # Two queue managers on one spool would each recover the other's
            # active/ files and deliver them twice: refuse to start.
            raise
        except Exception as exc:  # noqa: BLE001 - triggers are a hint; the poll still works
            ralog.log_warning(log, f"cannot listen on {trigger.socket_path(directory)}: {exc}")
        super().startService()
        self._uninstall_signals = reloading.install_signals(self)
        self.pickup = Pickup(self.spool, self.reactor, settings=PickupSettings.from_config(self.config),
                             on_queued=queue_manager.wakeup)
        if self.workers > 1:
            # First: a child needs about half a second to import and read
            # its configuration, time this process spends activating its
            # own share of the queue.  Their files never overlap.
            self._start_workers()
        queue_manager.start()
        self.pickup.start()

    def _start_transport_security(self, index: int, new_mail: Any) -> None:
        """MTA-STS's cache and refresh, TLSRPT's counters, and (worker 0)
        the TLSRPT reports."""
        if self.mta_sts is not None:
            # Worker 0 alone refreshes in the background; the others find
            # its refreshed files (PolicyStore.current).
            self.mta_sts.start(refresh=index == 0)
        if self.tlsrpt is not None:
            self.tlsrpt.worker = index
            self.tlsrpt.start()
            if index == 0 and self.spool is not None:
                # The MTA-STS client when there is one: made before a chroot,
                # with the same trust anchors.
                self.tlsrpt_reporter = Reporter.from_config(
                    self.config, self.tlsrpt, self.reactor, self.dns_resolver, self.spool.enqueue, wakeup=new_mail,
                    http=getattr(self.mta_sts, "http", None))
                self.tlsrpt_reporter.start()

    def _start_workers(self) -> None:
        assert self._lock_fd is not None
        if self.pool is None:
            # Started without privilegedStartService (not by twistd): the
            # spawner is forked now, as whoever runs this.
            self._prepare_workers()
        assert self.pool is not None
        listening = self.listening_descriptors()
        if listening and self.spool is not None:
            # The others accept too, each queueing its own share: so does
            # worker 0.  (Without a shared socket, a unix: endpoint alone,
            # its mail keeps spreading over every worker.)
            self.intake_spool = self._partitioned_spool(self.spool.directory, 0)
        self.pool.start(self._lock_fd, listening)

    def _partitioned_spool(self, directory: str, index: int) -> Spool:
        """The listener's spool of worker ``index``: ids of its partition."""
        return Spool(directory, clock=self.reactor.seconds,
                     queue_ids=QueueIdGenerator(self.reactor.seconds, partition=(index, self.workers)))

    def listening_descriptors(self) -> dict[int, tuple[int, int]]:
        """Worker 0's listening sockets that the other workers accept on too
        (``SharedListener.descriptor``: TCP and implicit TLS; bound by
        twistd's ``privilegedStartService``, before the workers start):
        smtpd_endpoints index -> (descriptor, address family)."""
        found = {}
        for number, listener in enumerate(self.listeners):
            descriptor = listener.descriptor()
            if descriptor is not None:
                found[number] = descriptor
        return found

    def listen_in_worker(self, listening: dict[int, tuple[int, int]]) -> None:
        """A worker: accept on worker 0's listening sockets (each descriptor
        is closed; the reactor listens on a duplicate) with this process's
        copy of each listener's factory, which queues into this process's
        ``intake_spool``.  One that cannot be taken is a warning (worker 0
        and the others still accept on it)."""
        for number, (fd, family) in sorted(listening.items()):
            if not 0 <= number < len(self.listeners):
                os.close(fd)
                continue
            listener = self.listeners[number]
            try:
                listener.listen_on(fd, family)
            except Exception as exc:  # noqa: BLE001 - the other workers listen; this one delivers
                ralog.log_warning(log, f"cannot listen on smtpd_endpoints entry {number + 1}: {exc}",
                                  service="master")
                continue
            self._worker_listeners.append(listener)

    def listener_queued(self, queue_id: str | None = None) -> None:
        """The listener queued a message (its trigger): with several workers
        its id is this worker's (``intake_spool``), so this queue manager
        alone looks at ``incoming/``; with one, the queue manager's wakeup.
        Given the id, the queue manager takes it by name (``queued``)."""
        queue_manager = self.queue_manager
        if queue_manager is None:
            return
        pass_on = self.intake_spool is None
        if queue_id is None:
            queue_manager.wakeup(pass_on=pass_on)
        else:
            queue_manager.queued(queue_id, pass_on=pass_on)

    def stopService(self) -> Deferred[Any]:
        waits: list[Deferred[Any]] = []
        # A worker's listeners first: no new session (worker 0's are
        # twistd's to stop, before this service).
        for listener in self._worker_listeners:
            waits.append(maybeDeferred(listener.service.stopService))
        self._worker_listeners = []
        if self._uninstall_signals is not None:
            self._uninstall_signals()
            self._uninstall_signals = None
        if self.pickup is not None:
            self.pickup.stop()
            self.pickup = None
        if self.listening is not None:
            waits.append(maybeDeferred(self.listening.stopListening))
            self.listening = None
        if self.queue_manager is not None:
            waits.append(self.queue_manager.stop())
        if self.pool is not None:
            # The children hold the lock too: wait for them before it goes.
            waits.append(self.pool.stop())
        waits.append(maybeDeferred(super().stopService))
        # At most relayagent_stop_timeout, said in the log (master.stop).
        in_flight = self.queue_manager.busy_total if self.queue_manager is not None else 0
        self._stopping = stop.bounded_stop(self.reactor, gatherResults(waits, consumeErrors=True),
                                           in_flight=in_flight, settings=stop.StopSettings.from_config(self.config))

        def after(_: Any) -> None:
            if self.limiter is not None:
                self.limiter.stop()
            if self.agent is not None:
                self.agent.stop()
            for part in (self.mta_sts, self.tlsrpt, self.tlsrpt_reporter):
                if part is not None:
                    part.stop()
            self.smtp.close()
            if self.metrics is not None:
                self.metrics.stop()
                self.metrics = None
            if self._lock_fd is not None:
                if self.role is None:
                    # Worker 0 of a daemon that ran (it held the spool):
                    # Postfix's master says so as its last line.
                    _log_termination(self.reactor)
                os.close(self._lock_fd)
                self._lock_fd = None
            if self.maillog is not None:
                self.maillog.stop()
            elif self.twistd_log is not None:
                ralog.give_back_mail_events(self.twistd_log)
                self.twistd_log.flush()

        return self._stopping.done.addBoth(after)

    def stop_now(self) -> None:
        """A second stop signal: the stop waits no longer for the
        deliveries in flight (they stay queued)."""
        if self._stopping is not None:
            self._stopping.now()
        if self.pool is not None:
            self.pool.stop_now()


def _log_termination(reactor: Any) -> None:
    """The daemon's last line, Postfix's master's: ``terminating on
    signal 15`` when a signal stopped it (the number the reactor's
    handlers, and ``stop.install_stop_signals``, record for twistd's
    exit status), ``terminating`` when the application stopped it."""
    number = getattr(reactor, "_exitSignal", None)
    if number:
        log.info("terminating on signal {signal}", signal=number, ralog_service="master")
    else:
        log.info("terminating", ralog_service="master")


def _log_stray(queue: str, name: str, problem: str) -> None:
    """A directory entry the spool skips (``Spool(on_stray=)``), once, as
    the queue manager's warning: ``warning: incoming/NAME: not a regular
    file: a FIFO; left alone``."""
    # A name is bytes on disk: undecodable octets are shown as \xNN, and
    # the maillog turns control characters into "?".
    shown = os.fsencode(name).decode("utf-8", "backslashreplace")
    ralog.log_warning(log, f"{queue}/{shown}: {problem}; left alone", service="qmgr")


class LineAppender:
    """The maillog's stream: text is kept until ``flush`` (once per
    reactor turn, ``logging._Writer``) and then written whole lines at a
    time, in one ``write`` on an ``O_APPEND`` descriptor, so that the
    lines of several processes sharing the file never mix (a buffered
    file object would cut a line at its buffer's size).  More than
    ``limit`` characters pending are written at once, up to the last
    whole line."""

    def __init__(self, fd: int, *, limit: int = 65536) -> None:
        self.fd = fd
        self.limit = limit
        self._pending: list[str] = []
        self._size = 0

    def fileno(self) -> int:
        """The ``O_APPEND`` descriptor the lines are written to."""
        return self.fd

    def write(self, text: str) -> int:
        """Keep ``text`` for the next flush (flushing now when more than
        ``limit`` characters are pending); returns its length."""
        self._pending.append(text)
        self._size += len(text)
        if self._size >= self.limit:
            self.flush()
        return len(text)

    def flush(self) -> None:
        """Write the whole lines pending in one ``write`` (more only after
        a short write); a trailing partial line waits for the rest.  An
        OSError from ``os.write`` is raised to the caller."""
        if not self._pending:
            return
        text = "".join(self._pending)
        whole = text.rfind("\n") + 1
        rest = text[whole:]
        self._pending = [rest] if rest else []
        self._size = len(rest)
        if whole:
            data = memoryview(text[:whole].encode("utf-8", "replace"))
            while data:
                data = data[os.write(self.fd, data):]

    def close(self) -> None:
        """Flush, then close the descriptor."""
        self.flush()
        os.close(self.fd)


def open_log(config: Config) -> LineAppender | None:
    """``maillog_file``, opened now (before privileges are dropped); None
    when it is empty: the lines then go into twistd's log."""
    path = ralog.MaillogSettings.from_config(config).maillog_file
    if not path:
        return None
    inherited = ralog.inherited_descriptor(path)
    if inherited is not None:
        # /dev/stdout (a container's log): the descriptor twistd writes
        # too, not a new open of the file behind it, which would have an
        # offset of its own (twistd's lines would overwrite ours).
        # O_APPEND on the shared description, for both writers.
        import fcntl

        fd = os.dup(inherited)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        return LineAppender(fd)
    # O_APPEND: every write lands at the end, whoever else writes.
    return LineAppender(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666))


def build_service(config: Config, reactor: Any, *,
                  privileges: worker.Privileges | None = None,
                  twistd_log: ralog.TwistdLogObserver | None = None) -> RelayagentService:
    """Everything that needs root or the world outside a chroot, done now
    (module docstring); the rest starts with the service.  ``privileges``:
    twistd's ``--uid``/``--gid``, which the worker spawner drops to.
    ``twistd_log``: twistd's log, when relayagent writes it."""
    # Bad scheduler values stop the start, not the first delivery.
    limits = SchedulerSettings.from_config(config)
    Feedback.parse(limits.smtp_destination_concurrency_positive_feedback,
                   name="smtp_destination_concurrency_positive_feedback")
    Feedback.parse(limits.smtp_destination_concurrency_negative_feedback,
                   name="smtp_destination_concurrency_negative_feedback")
    # A relayhost that does not parse stops the start (ConfigError).
    check_relays(ResolveSettings.from_config(config))
    check_limits(config)
    # Reads /etc/resolv.conf now, once, as Postfix does at start-up.
    dns_resolver = make_dns_resolver(config, reactor)
    tlsrpt = TLSRPTSettings.from_config(config)
    recorder = (Recorder(os.path.join(tlsrpt.queue_directory, "tlsrpt"), reactor,
                         interval=tlsrpt.smtp_tlsrpt_interval) if tlsrpt.smtp_tlsrpt_enable else None)
    return RelayagentService(
        config,
        reactor,
        log_out=open_log(config),
        security=SecurityPolicy(config, mta_sts=PolicyStore.from_config(config, reactor, dns_resolver),
                                tlsrpt=recorder, dns_resolver=dns_resolver, clock=reactor),
        dns_resolver=dns_resolver,
        privileges=privileges,
        twistd_log=twistd_log,
    )
