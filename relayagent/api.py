"""
relayagent for Twisted code: queue mail from a running reactor, run the
mail system inside your own application, make relayagent the outbound
transport of a twisted.mail server.  This module is the public, stable
surface; the packages under it are relayagent's own and may change.

Nothing here blocks the reactor.  ``enqueue`` writes and fsyncs the queue
file in a thread pool and fires its Deferred, with the queue id, in the
reactor thread once the file is durable: from then on the message
survives a crash and is delivered once (the daemon's promise, DESIGN.md).
The queue manager is then woken through the reactor; when no daemon
runs, or one is stopped, nothing waits for it (it polls ``incoming/``
when it comes back).

SYNOPSIS::

    from relayagent import api

    # 1. Queue into the spool of a relayagent daemon (twistd relayagent)
    config = api.load_config("/etc/relayagent/main.cf")
    d = api.enqueue(config, "alice@example.org", ["bob@example.net"], message_bytes,
                    reactor=reactor)
    d.addCallback(lambda queue_id: print("queued as", queue_id))

    # 2. The whole mail system in your process, no twistd
    mail_system = api.RelayagentService(config, reactor)
    mail_system.setServiceParent(application)       # or startService()
    d = mail_system.enqueue("alice@example.org", ["bob@example.net"], message_bytes)
    mail_system.wakeup()                             # e.g. after writing files yourself

    # 3. The outbound transport of a twisted.mail MailService
    relay = api.install_relayagent(mail_service, config, reactor=reactor)
    strports.service("tcp:2525", relay.esmtp_factory()).setServiceParent(mail_service)

DIAGNOSTICS: ``enqueue``'s Deferred fails with ``ValueError`` for a bad
sender or recipient (or none) and ``OSError`` when the spool cannot take
the message (a full disk, a permission); in both cases nothing is queued.
``load_config`` and ``RelayagentService`` raise ``ConfigError`` for a bad
``main.cf``; ``RelayagentService.startService`` raises
``DaemonRunning`` when another daemon holds the spool.

Owns no parameters: it reads what the daemon reads (``main.cf``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail
from twisted.python.threadpool import ThreadPool

from relayagent.common.config import Config, ConfigError
from relayagent.common.envelope import BodyType, Recipient, Ret
from relayagent.master.metrics import metrics_services
from relayagent.master.service import RelayagentService as _DaemonService
from relayagent.master.service import build_service
from relayagent.smtpd.twistedmail import MaildirDomain, RelayTransport, install_relayagent
from relayagent.spool import Spool
from relayagent.spool.nonblocking import EnqueueingSpool, ReactorWakeup, ThreadedSpool
from relayagent.spool.spool import SpoolSettings
from relayagent.spool.trigger import DaemonRunning

__all__ = [
    "BodyType",
    "Config",
    "ConfigError",
    "DaemonRunning",
    "EnqueueingSpool",
    "MaildirDomain",
    "ReactorWakeup",
    "Recipient",
    "RelayTransport",
    "RelayagentService",
    "Ret",
    "ThreadedSpool",
    "enqueue",
    "install_relayagent",
    "load_config",
    "threaded_spool",
]


def load_config(path: str) -> Config:
    """Read a ``main.cf`` (Postfix's syntax, relayagent's parameter
    table); raises ``ConfigError`` naming the file, line and parameter."""
    return Config.load(path)


def threaded_spool(spool: Spool | Config | str, reactor: Any,
                   threadpool: ThreadPool | None = None) -> ThreadedSpool:
    """A spool whose ``enqueue`` returns a Deferred and never blocks the
    reactor: ``spool`` is a ``Spool``, a ``Config`` (its
    ``queue_directory``) or a queue directory; ``threadpool`` defaults to
    the reactor's.  The queue directories are made if missing."""
    if not isinstance(spool, Spool):
        directory = (SpoolSettings.from_config(spool).queue_directory
                     if isinstance(spool, Config) else spool)
        spool = Spool(directory)
        spool.ensure_layout()
    return ThreadedSpool(spool, reactor, threadpool)


def enqueue(
    spool: ThreadedSpool | Spool | Config | str,
    sender: str,
    recipients: Sequence[str | Recipient],
    content: bytes | BinaryIO,
    *,
    reactor: Any,
    threadpool: ThreadPool | None = None,
    wakeup: Callable[[], object] | None = None,
    envid: str | None = None,
    ret: Ret | None = None,
    body_type: BodyType | None = None,
    smtputf8: bool = False,
) -> Deferred[str]:
    """Queue one message without blocking the reactor.

    Returns a Deferred that fires with the queue id once the queue file
    and its directory are fsynced (module docstring), then wakes the
    queue manager: ``wakeup`` if given, else a ``Wakeup`` sent through
    the reactor on the daemon's trigger socket (``ReactorWakeup``), whose
    outcome nobody waits for.

    ``spool``: a ``ThreadedSpool`` (kept across calls: the cheapest), a
    ``Spool``, a ``Config`` or a queue directory.  ``sender`` is the
    envelope sender ("" for the null sender); ``recipients`` addresses or
    ``Recipient`` objects; ``content`` the message (header and body) as
    bytes or a binary stream, which must not be touched until the
    Deferred fires.  ``envid``, ``ret``, ``body_type`` and ``smtputf8``
    are the ESMTP parameters of RFC 3461, RFC 6152 and RFC 6531 (None:
    not given; ``body_type`` None is worked out from the content).
    """
    threaded = spool if isinstance(spool, ThreadedSpool) else threaded_spool(spool, reactor, threadpool)
    if wakeup is None:
        wakeup = _wakeup_for(reactor, threaded.directory)
    queued = threaded.enqueue(sender, recipients, content, envid=envid, ret=ret,
                              body_type=body_type, smtputf8=smtputf8)

    def woken(queue_id: str) -> str:
        wakeup()
        return queue_id

    return queued.addCallback(woken)


# One ReactorWakeup per reactor and queue directory: the wakeups of many
# enqueues share one in flight (ReactorWakeup folds those that come
# while one is on its way).
_wakeups: dict[tuple[int, str], ReactorWakeup] = {}


def _wakeup_for(reactor: Any, directory: str) -> ReactorWakeup:
    key = (id(reactor), directory)
    wakeup = _wakeups.get(key)
    if wakeup is None or wakeup.reactor is not reactor:
        wakeup = _wakeups[key] = ReactorWakeup(reactor, directory)
    return wakeup


class RelayagentService(MultiService):
    """The relayagent mail system as a Twisted service, for an application
    of your own: what ``twistd relayagent`` runs (spool, queue manager,
    delivery agent, trigger socket, maillog), without twistd.

    ``config`` is a ``Config`` or the path of a ``main.cf``.  Everything
    that reads files (tables, TLS keys, ``/etc/resolv.conf``) is read
    here, as ``twistd relayagent`` reads it before dropping privileges;
    the queue starts with the service.

    ``workers``: the service runs in this one process by default; None
    takes ``relayagent_workers`` from ``config`` (whose default, ``auto``,
    forks copies of your process, application included, one per CPU).
    ``threadpool``: where ``enqueue`` writes (default: the reactor's).
    """

    def __init__(self, config: Config | str, reactor: Any, *, workers: int | None = 1,
                 threadpool: ThreadPool | None = None) -> None:
        super().__init__()
        if not isinstance(config, Config):
            config = load_config(config)
        if workers is not None:
            config = config.replace(relayagent_workers=str(workers))
        self.config = config
        self.reactor = reactor
        self.threadpool = threadpool
        #: The daemon's own service tree (``relayagent.master.service``).
        self.daemon: _DaemonService = build_service(config, reactor)
        self.daemon.setServiceParent(self)
        # metrics_endpoints, as under twistd.
        for endpoint in metrics_services(config, lambda: self.daemon.metrics, reactor):
            endpoint.setServiceParent(self)
        self._threaded: ThreadedSpool | None = None

    def wakeup(self) -> None:
        """Tell the queue manager that ``incoming/`` has new mail (what
        the trigger socket's ``Wakeup`` does); a no-op before start."""
        if self.daemon.queue_manager is not None:
            self.daemon.queue_manager.wakeup()

    def flush(self) -> None:
        """Retry every deferred message now (``relayagent flush``); a
        no-op before start."""
        if self.daemon.queue_manager is not None:
            self.daemon.queue_manager.flush()

    def enqueue(self, sender: str, recipients: Sequence[str | Recipient],
                content: bytes | BinaryIO, **options: Any) -> Deferred[str]:
        """``relayagent.api.enqueue`` into this service's spool, woken
        directly (no socket).  Fails with ``RuntimeError`` before the
        service has started (the spool opens at start)."""
        if self.daemon.spool is None:
            return fail(RuntimeError("the relayagent service has not started"))
        if self._threaded is None or self._threaded.spool is not self.daemon.spool:
            self._threaded = ThreadedSpool(self.daemon.spool, self.reactor, self.threadpool)
        return enqueue(self._threaded, sender, recipients, content, reactor=self.reactor,
                       wakeup=self.wakeup, **options)
