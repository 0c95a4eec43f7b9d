"""
A worker process of a daemon with ``relayagent_workers`` > 1, from its
fork on: ``run(service, index, link, lock_fd, listening)`` is what the spawner
(``relayagent.master.spawner``) calls in the new process, where
``service`` is this process's copy of worker 0's ``RelayagentService``
as ``makeService`` built it (as root, outside any chroot: tables, SASL
passwords, TLS keys and contexts already in memory).

It gives the reactor new kernel objects (``fresh_reactor``: the epoll
descriptor and the waker pipe of worker 0's reactor are shared with
worker 0 after a fork; everything built on the reactor keeps working,
since it is the same object), checks the spool lock it holds, makes the
service worker ``index`` (``RelayagentService.become_worker``), puts its
link to worker 0 on the reactor, logs through worker 0 (or to its
standard error), accepts on the listening sockets of ``smtpd_endpoints``
worker 0 handed over (``listening``: ``RelayagentService.listen_in_worker``)
once its service has started, and runs until worker 0 goes away
(``worker.ParentLink``, ``worker.WorkerRuntime``) or SIGTERM.

SYNOPSIS

    status = run(service, index, link, lock_fd, listening)
    fresh_reactor(reactor)

DIAGNOSTICS: ``run`` returns 0, or a sysexits code with one line on
standard error: 64 (EX_USAGE) for a bad or foreign lock descriptor, 70
(EX_SOFTWARE) when the service could not start (with the traceback in
the log).

Owns no parameters (``worker`` owns relayagent_workers).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.logger import Logger

from relayagent.common import maillog as ralog
from relayagent.master.spawner import EX_SOFTWARE, Listening, log_to_stderr
from relayagent.master.worker import (
    EX_USAGE,
    LogToWorkerZero,
    ParentLink,
    WorkerError,
    WorkerRole,
    WorkerRuntime,
    adopt,
    check_lock,
)

log = Logger(namespace="relayagent.master.worker")


def fresh_reactor(reactor: Any) -> None:
    """After a fork: the reactor made again in place, with a poller and
    a waker of its own.  Worker 0's are kernel objects this process
    shares (registering a descriptor on the inherited epoll instance
    would register it in worker 0's).  Nothing else is lost: the service
    was built before any timer, reader or system event trigger was
    added.  Tested with the epoll, poll and asyncio reactors (an asyncio
    reactor made again takes a new event loop; the old one is left
    alone, never closed: closing it would unregister its descriptors
    from the shared epoll instance)."""
    poller = getattr(reactor, "_poller", None)
    waker = getattr(reactor, "waker", None)
    type(reactor).__init__(reactor)
    # This process's copies only; worker 0's are untouched.
    if poller is not None and hasattr(poller, "close"):
        poller.close()
    if waker is not None:
        waker.connectionLost(None)


def run(service: Any, index: int, link: socket.socket, lock_fd: int,
        listening: Listening | None = None) -> int:
    """Worker ``index``: runs until worker 0 goes away; returns the exit
    status (0, or a sysexits code with one line on standard error).
    ``listening``: the listener sockets to accept on (smtpd_endpoints
    index -> (descriptor, family)), each closed here or by the reactor."""
    listening = dict(listening or {})
    reactor = service.reactor
    fresh_reactor(reactor)
    runtime = WorkerRuntime(service, reactor)
    parent = ParentLink(lambda: service.queue_manager, reactor, runtime.parent_gone,
                        on_command=service.control_command)
    # Twisted's and relayagent's other events (and the mail lines without
    # maillog_file) in twistd's layout with Postfix's text: into twistd's
    # log through worker 0 when relayagent writes that log (worker 0 alone
    # writes and rotates the file), else to standard error.  Never to the
    # observers inherited from worker 0.
    out: Any = sys.__stderr__
    if service.twistd_log is not None:
        out = LogToWorkerZero(parent, fallback=sys.__stderr__)
    settings = ralog.MaillogSettings.from_config(service.config)
    program = getattr(service.twistd_log, "program", f"{settings.syslog_name}/smtp")
    twistd_log: Any
    if isinstance(service.twistd_log, ralog.SyslogObserver):
        # Each worker sends its own lines to syslog, with its own pid.
        twistd_log = ralog.SyslogObserver(facility=settings.syslog_facility, program=program,
                                          resolution=settings.delay_logging_resolution_limit,
                                          skip=ralog.is_worker_port_chatter)
    else:
        twistd_log = ralog.TwistdLogObserver(
            out, resolution=settings.delay_logging_resolution_limit,
            flush_later=ralog.after_this_turn(reactor), hostname=settings.myhostname,
            program=program, skip=ralog.is_worker_port_chatter)
    log_to_stderr(twistd_log)
    adopt(reactor, link, parent)
    try:
        check_lock(lock_fd, service.spool_directory())
    except WorkerError as exc:
        print(f"relayagent: fatal: worker {index}: {exc}", file=sys.stderr)
        for fd, _ in listening.values():
            os.close(fd)
        return EX_USAGE
    service.become_worker(WorkerRole(index, service.workers, lock_fd), twistd_log=twistd_log)
    service.parent_link = parent
    reactor.addSystemEventTrigger("before", "shutdown", runtime.stop_service)
    status = [0]

    def start() -> None:
        try:
            service.startService()
        except Exception:  # noqa: BLE001 - one logged failure, then exit for worker 0 to see
            log.failure("worker {index} could not start", index=index)
            status[0] = EX_SOFTWARE
            reactor.stop()
            return
        # After the start: the spool and queue manager the factory's
        # intake queues into exist now.
        service.listen_in_worker(listening)

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]
