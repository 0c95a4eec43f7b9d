"""
Reload and log rotation of a running daemon (Postfix: ``postfix reload``,
master(8) on SIGHUP, which re-reads main.cf and restarts its children;
``postfix logrotate``).

``reload(service)`` re-reads main.cf (the path the daemon started with)
and the lookup tables, builds the phases' settings and objects from it
(smtp's resolver with ``transport_maps`` and ``relayhost``, the security
policy with ``smtp_tls_policy_maps``, ``smtp_sasl_password_maps`` and the
TLS files, the session settings with ``debug_peer_list`` and the
timeouts, the connection cache, the queue manager's limits, the delivery
agent's lifetimes and notices) and, only when all of them could be
built, swaps them in: the next delivery request uses the new ones; a
request in flight finishes on the objects it began with (it holds them),
and the old connection cache's idle sessions are closed.  Settings are
frozen dataclasses bound once; a reload binds new ones, it never changes
one in place.

What cannot change while the daemon runs keeps its running value, and
one warning names it: the queue directory and its lock, the listener
(``smtpd_endpoints`` and what it reads), the maillog (``maillog_file``,
``log_format``, ``syslog_name``), ``relayagent_workers``, the name
servers (``dns_nameservers``, read once at start-up as Postfix's resolver
does), the metrics' endpoints (``metrics_endpoints``), MTA-STS's policy store and TLSRPT's recorder (their parameters:
the running store, cache and counters go on, handed to the new security
policy), the Redis server of the shared limits (``relayagent_redis`` and
its prefix, lease and timeout: the rates, keys and shaping tables do
change) and, since twistd dropped them, the privileges (``--uid``).  A
main.cf that does not load, or a setting the phases refuse (a bad TLS
file, an unreadable table), is one warning, and the running
configuration stays whole.  The daemon re-reads the files as the user it
runs as (twistd's ``--uid``), in its chroot if any: a file only root may
read (a SASL password table made root-only) cannot be re-read, the
reload is refused with that reason, and a restart reads it.

With ``relayagent_workers`` > 1, worker 0 reloads, logs the line, and
sends ``reload`` to every worker over its link; each worker reloads the
same way (a worker that cannot logs its own warning).

``logrotate(service)`` reopens ``maillog_file`` (after ``mv maillog
maillog.1`` the next lines go to a new ``maillog``) on the same
descriptor (``dup2``), in every worker likewise.  It does not rename
the file (Postfix's ``postfix logrotate`` does; here logrotate(8) or
``mv`` does, as for any daemon that reopens its log on a signal).

Signals (worker 0, ``install_signals``): SIGHUP reloads, SIGUSR1
reopens ``maillog_file`` and then does what was installed before it
(twistd's rotation of ``--logfile``), so SIGUSR1 without ``--logfile``
no longer ends the daemon.  Workers ignore both (``spawner``): worker 0
tells them.

SYNOPSIS

    ok, text = reload(service);  ok, text = logrotate(service)
    uninstall = install_signals(service)
    restart_only_names() -> frozenset

DIAGNOSTICS: never raises for a bad configuration: ``(False, reason)``
and one warning line (``warning: reload refused: ...; the running
configuration stays``); ``(True, text)`` on success, logged as Postfix's
master(8) does: ``reload -- version V, configuration PATH``.  A
``maillog_file`` that cannot be reopened is one warning, and the lines
keep going to the old file.

Owns no parameters.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from twisted.logger import Logger

from relayagent import __version__
from relayagent.common import maillog as ralog
from relayagent.common.config import PARAMETERS, Config, ConfigError
from relayagent.master import worker
from relayagent.qmgr.scheduler import Feedback, SchedulerSettings
from relayagent.qmgr.shared import RedisSettings, check_limits
from relayagent.smtp.deliver import SmtpAgent
from relayagent.smtp.mtasts import MTASTSSettings
from relayagent.smtp.resolve import NexthopResolver
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tlsrpt import TLSRPTSettings
from relayagent.spool.spool import SpoolSettings

log = Logger(namespace="relayagent.master.reload")

_KEPT_NAMES = ("relayagent_workers", "dns_nameservers", "metrics_endpoints")


def restart_only_names() -> frozenset[str]:
    """The parameters a reload keeps at their running values."""
    # The listener's modules (twisted.mail, twisted.cred) load with the
    # first reload, not at start: no listener by default (start-up time).
    from relayagent.smtpd.intake import IntakeSettings  # noqa: PLC0415
    from relayagent.smtpd.listener import ListenerSettings  # noqa: PLC0415
    from relayagent.smtpd.tls import ServerTLSSettings  # noqa: PLC0415

    # The settings of the phases a reload does not rebuild (module docstring).
    kept_settings = (SpoolSettings, ListenerSettings, IntakeSettings, ralog.MaillogSettings,
                     MTASTSSettings, TLSRPTSettings, RedisSettings, ServerTLSSettings)
    names = {f.name for settings in kept_settings for f in fields(settings)}
    names.update(_KEPT_NAMES)
    return frozenset(name for name in names if name in PARAMETERS)


def _changed(old: Config, new: Config) -> list[str]:
    changed = []
    for name in PARAMETERS:
        try:
            if old[name] != new[name]:
                changed.append(name)
        except KeyError:
            continue
    return changed


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _refuse(reason: str) -> tuple[bool, str]:
    text = f"reload refused: {reason}; the running configuration stays"
    ralog.log_warning(log, text, service="master")
    return False, text


def reload(service: Any) -> tuple[bool, str]:
    """Re-read main.cf and the tables and swap the new settings in
    (module docstring); ``(ok, text)``."""
    path = service.config.path
    if not path:
        return _refuse("the daemon was not started from a main.cf file")
    worker_zero = service.role is None
    try:
        loaded = Config.load(path)
    except ConfigError as exc:
        return _refuse(_first_line(exc))
    old = service.config
    new = worker.split_limits(loaded, service.workers)
    kept = [name for name in _changed(old, new) if name in restart_only_names()]
    if kept:
        try:
            new = new.replace(**{name: old.raw(name) for name in kept})
        except ConfigError as exc:
            return _refuse(_first_line(exc))
    try:
        scheduler = SchedulerSettings.from_config(new)
        for name in ("smtp_destination_concurrency_positive_feedback",
                     "smtp_destination_concurrency_negative_feedback"):
            Feedback.parse(getattr(scheduler, name), name=name)
        check_limits(new)  # the rates, keys, rollup and shaping tables
        # The tables are opened and the TLS files read here: a file
        # that cannot be read refuses the whole reload.
        old_security = service.security
        # MTA-STS's store and TLSRPT's recorder run on (their cache,
        # refresh and counters): the new policy takes the running ones.
        security = SecurityPolicy(new, mta_sts=getattr(old_security, "mta_sts", None),
                                  tlsrpt=getattr(old_security, "tlsrpt", None),
                                  dane_applies=getattr(old_security, "dane_applies", None),
                                  dns_resolver=service.resolver.dns_resolver, clock=service.reactor)
        resolver = NexthopResolver(new, service.resolver.dns_resolver, service.reactor)
        smtp = SmtpAgent.from_config(new, service.reactor, resolver=resolver, security=security)
    except (ConfigError, ValueError, OSError) as exc:
        return _refuse(_first_line(exc))

    old_smtp = service.smtp
    service.config, service.security, service.resolver, service.smtp = new, security, resolver, smtp
    if service.agent is not None:
        service.agent.reconfigure(new, smtp)
    if service.queue_manager is not None:
        service.queue_manager.reconfigure(new, smtp.route)
    service.reload_limits(new)
    # Its idle sessions go; a session in flight finishes on it, and is
    # closed at the end of its transaction or by the cache's timer.
    old_smtp.close()
    if worker_zero:
        for warning in loaded.warnings:
            ralog.log_warning(log, f"reload: {warning}", service="master")
        if kept:
            ralog.log_warning(log, f"reload: {', '.join(sorted(kept))} changed: the running "
                              "value stays until the daemon is restarted", service="master")
        log.info("reload -- version {version}, configuration {path}",
                 version=__version__, path=path, ralog_service="master")
        if service.pool is not None:
            service.pool.send(worker.RELOAD)
    return True, f"reload -- version {__version__}, configuration {path}"


def reopen(appender: Any, path: str) -> None:
    """Point ``appender``'s descriptor (``service.LineAppender``) at
    ``path`` again, made if missing: what is pending goes to the old
    file first.  Raises ``OSError``, leaving the old file in place."""
    appender.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        # The same number: the observer, and a worker forked later, keep it.
        os.dup2(fd, appender.fd, inheritable=False)
    finally:
        os.close(fd)


def logrotate(service: Any) -> tuple[bool, str]:
    """Reopen ``maillog_file`` in this process (and, from worker 0, in
    every worker); ``(ok, text)``."""
    path = ralog.MaillogSettings.from_config(service.config).maillog_file
    if not path or service.log_out is None or not hasattr(service.log_out, "fd"):
        return True, "no maillog_file: nothing to reopen"
    if ralog.inherited_descriptor(path) is not None:
        # /dev/stdout: the descriptor shared with twistd (service.open_log);
        # a new open would write at an offset of its own, over twistd's.
        return True, f"{path} is a descriptor of the daemon's own: nothing to reopen"
    try:
        reopen(service.log_out, path)
    except OSError as exc:
        text = f"cannot reopen {path}: {exc.strerror or exc}; logging to the old file"
        ralog.log_warning(log, text, service="master")
        return False, text
    if service.role is None and service.pool is not None:
        service.pool.send(worker.LOGROTATE)
    return True, f"reopened {path}"


def install_signals(service: Any) -> Callable[[], None]:
    """SIGHUP reloads, SIGUSR1 reopens the maillog then runs the handler
    it replaces (twistd's ``--logfile`` rotation); returns the function
    that puts the previous handlers back.  Nothing outside the main
    thread (signals can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    reactor = service.reactor
    previous_hup = signal.getsignal(signal.SIGHUP)
    previous_usr1 = signal.getsignal(signal.SIGUSR1)

    def on_hup(number: int, frame: Any) -> None:
        reactor.callFromThread(service.reload)

    def on_usr1(number: int, frame: Any) -> None:
        reactor.callFromThread(service.logrotate)
        if callable(previous_usr1):
            previous_usr1(number, frame)

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, on_usr1)

    def uninstall() -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number, previous in ((signal.SIGHUP, previous_hup), (signal.SIGUSR1, previous_usr1)):
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)

    return uninstall
